"""Attention rollout and ViT class-token maps (seqvis.analysis.vit_maps)."""

import jax
import numpy as np
import pytest

from seqvis.analysis import vit_maps
from seqvis.models import vit

T = 5  # tokens: class token + 2x2 patches


def _closed_form_uniform_then(k_layers):
    """Rollout of k layers that all attend uniformly: Â = ½U + ½I with U = 1/T (U² = U), so
    Â^k = 2^-k I + (1 − 2^-k) U."""
    u = np.full((T, T), 1.0 / T)
    return 2.0 ** -k_layers * np.eye(T) + (1 - 2.0 ** -k_layers) * u


def test_rollout_closed_forms_identity_and_uniform():
    eye = np.broadcast_to(np.eye(T), (1, 3, T, T))  # [batch, heads, T, T]
    uni = np.full((1, 3, T, T), 1.0 / T)
    # identity then identity: nothing mixes.
    np.testing.assert_allclose(vit_maps.rollout(np.stack([eye, eye]))[0], np.eye(T), atol=1e-12)
    # identity then uniform: Â2 Â1 = (½U + ½I) I.
    np.testing.assert_allclose(vit_maps.rollout(np.stack([eye, uni]))[0], 0.5 * np.full((T, T), 1 / T) + 0.5 * np.eye(T),
                               atol=1e-12)
    # uniform twice: ¼I + ¾U.
    r = vit_maps.rollout(np.stack([uni, uni]))[0]
    np.testing.assert_allclose(r, _closed_form_uniform_then(2), atol=1e-12)
    # without the residual term: U · U = U.
    np.testing.assert_allclose(vit_maps.rollout(np.stack([uni, uni]), residual=False)[0], np.full((T, T), 1 / T))


def test_rollout_heads_averaged_rows_sum_to_one_and_order_matters():
    rng = np.random.default_rng(0)
    a = rng.random((3, 2, 4, T, T))
    a /= a.sum(-1, keepdims=True)
    r = vit_maps.rollout(a)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    # independent computation: mean over heads, ½A + ½I, renormalise, product last layer leftmost
    steps = [0.5 * a[l].mean(1) + 0.5 * np.eye(T) for l in range(3)]
    expected = np.einsum("bij,bjk,bkl->bil", steps[2], steps[1], steps[0])
    np.testing.assert_allclose(r, expected, atol=1e-12)
    # a permutation attention in layer 1 (token i reads token i+1) then identity: R = ½P + ½I
    perm = np.roll(np.eye(T), 1, axis=1)
    r2 = vit_maps.rollout(np.stack([np.broadcast_to(perm, (1, 1, T, T)), np.broadcast_to(np.eye(T), (1, 1, T, T))]))
    np.testing.assert_allclose(r2[0], 0.5 * perm + 0.5 * np.eye(T), atol=1e-12)


def _two_layer_vit_with_uniform_attention(**kw):
    """A 2-layer ViT whose query and key kernels and biases are zero: every attention logit is 0,
    so every head of every layer attends uniformly (1/T)."""
    model = vit.build("mu/8", num_classes=3, depth=2, **kw)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.zeros(s.shape, s.dtype) if any(getattr(p, "key", None) in ("query", "key") for p in path)
        else (0.2 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    return model, {"params": params}, x


@pytest.mark.parametrize("scan", [False, True])
def test_vit_maps_on_a_vit_with_uniform_attention(scan):
    model, variables, x = _two_layer_vit_with_uniform_attention(scan_layers=scan)
    res = vit_maps.vit_maps(model, variables, x)
    assert res["attention"].shape == (2, 2, 2, T, T)  # [layers, batch, heads, T, T] from the sown weights
    np.testing.assert_allclose(res["attention"], 1.0 / T, atol=1e-6)
    np.testing.assert_allclose(res["rollout"][0], _closed_form_uniform_then(2), atol=1e-6)
    np.testing.assert_allclose(res["rollout"].sum(-1), 1.0, atol=1e-6)
    # class-token row over the 4 patches: uniform after renormalising; last layer per head likewise
    assert res["rollout_map"].shape == (2, 2, 2) and res["last_layer_maps"].shape == (2, 2, 2, 2)
    np.testing.assert_allclose(res["rollout_map"], 0.25, atol=1e-6)
    np.testing.assert_allclose(res["last_layer_maps"], 0.25, atol=1e-6)
    assert res["logits"].shape == (2, 3)


def test_vit_maps_gap_uses_the_mean_row():
    model, variables, x = _two_layer_vit_with_uniform_attention(pool="gap")
    res = vit_maps.vit_maps(model, variables, x)
    assert res["rollout"].shape == (2, 4, 4) and res["rollout_map"].shape == (2, 2, 2)
    np.testing.assert_allclose(res["rollout_map"], 0.25, atol=1e-6)


def test_fused_attention_gives_a_clear_error():
    model, variables, x = _two_layer_vit_with_uniform_attention(use_fused_attention=True)
    with pytest.raises(ValueError, match="use_fused_attention=False"):
        vit_maps.vit_maps(model, variables, x)


def test_pngs_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    model, variables, x = _two_layer_vit_with_uniform_attention()
    res = vit_maps.vit_maps(model, variables, x)
    one = tmp_path / "one.png"
    vit_maps.save_maps_png(str(one), x[0], res["rollout_map"][0], res["last_layer_maps"][0], title="t")
    over = tmp_path / "overview.png"
    vit_maps.save_overview_png(str(over), x, res["rollout_map"], ["a", "b"])
    for p in (one, over):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_cli_errors_name_the_workdir(tmp_path):
    from seqvis.cli import vit_maps as cli

    with pytest.raises(SystemExit, match="config.json does not exist"):
        cli.main([f"--workdir={tmp_path}"])
