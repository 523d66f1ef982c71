"""Attention: worked example, numpy reference, masks, module behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.models import attention as att
from seqvis.models.common import lengths_to_valid


def np_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_attention(q, k, v, mask=None):
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -1e30)
    w = np_softmax(logits)
    return w @ v, w


def test_worked_example():
    q = jnp.array([[1.0, 0.0]])
    k = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out, w = att.dot_product_attention(q, k, k, return_weights=True)
    np.testing.assert_allclose(w[0], [0.401, 0.198, 0.401], atol=5e-4)
    np.testing.assert_allclose(out[0], [0.802, 0.599], atol=5e-4)
    # And the exact values from the formula: logits [1, 0, 1]/sqrt(2).
    e = np.exp(np.array([1, 0, 1]) / np.sqrt(2))
    np.testing.assert_allclose(w[0], e / e.sum(), rtol=1e-6)


def test_against_numpy_with_mask():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
    k = rng.normal(size=(2, 3, 7, 8)).astype(np.float32)
    v = rng.normal(size=(2, 3, 7, 4)).astype(np.float32)
    mask = rng.random((2, 1, 5, 7)) > 0.3
    mask[..., 0] = True  # every row keeps at least one key
    out, w = att.dot_product_attention(q, k, v, mask, return_weights=True)
    ref_out, ref_w = np_attention(q, k, v, mask)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(w)[~np.broadcast_to(mask, w.shape)] < 1e-30)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def test_fully_masked_row_is_finite():
    q = jnp.ones((1, 2, 4))
    k = jnp.ones((1, 3, 4))
    mask = jnp.zeros((1, 2, 3), bool)
    out = att.dot_product_attention(q, k, k, mask)
    assert np.all(np.isfinite(out))


def test_shape_errors():
    with pytest.raises(ValueError, match="last .feature. axis"):
        att.dot_product_attention(jnp.ones((2, 4)), jnp.ones((3, 5)), jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="same number of positions"):
        att.dot_product_attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((2, 4)))


def test_masks():
    c = np.asarray(att.make_causal_mask(4))
    np.testing.assert_array_equal(c, np.tril(np.ones((4, 4), bool)))
    valid = lengths_to_valid(jnp.array([2, 4]), 4)
    np.testing.assert_array_equal(valid, [[1, 1, 0, 0], [1, 1, 1, 1]])
    pm = att.make_padding_mask(valid)
    assert pm.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(pm[0, 0, 3], [1, 1, 0, 0])


def _mha(**kw):
    return att.MultiHeadAttention(num_heads=2, **kw)


def _init(model, x, kv=None):
    return model.init(jax.random.PRNGKey(0), x, kv)


def test_mha_matches_numpy_per_head():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    model = _mha()
    params = _init(model, x)["params"]
    out, state = model.apply({"params": params}, x, mutable=["intermediates"])
    p = jax.tree.map(np.asarray, params)
    q = np.einsum("bld,dhk->bhlk", x, p["query"]["kernel"]) + p["query"]["bias"][None, :, None]
    k = np.einsum("bld,dhk->bhlk", x, p["key"]["kernel"]) + p["key"]["bias"][None, :, None]
    v = np.einsum("bld,dhk->bhlk", x, p["value"]["kernel"]) + p["value"]["bias"][None, :, None]
    o, w = np_attention(q, k, v)
    ref = np.einsum("bhlk,hkd->bld", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    (sown,) = state["intermediates"]["attention_weights"]
    np.testing.assert_allclose(sown, w, rtol=1e-4, atol=1e-6)


def test_causal_mask_future_does_not_leak():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 8)).astype(np.float32)
    model = _mha()
    params = _init(model, x)
    out1 = model.apply(params, x, causal=True)
    x2 = x.copy()
    x2[:, 4:] = rng.normal(size=(1, 2, 8))
    out2 = model.apply(params, x2, causal=True)
    np.testing.assert_allclose(out1[:, :4], out2[:, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out1[:, 4:], out2[:, 4:])
    # Without the causal mask the change does leak backwards.
    out3 = model.apply(params, x)
    out4 = model.apply(params, x2)
    assert not np.allclose(out3[:, :4], out4[:, :4])


def test_padding_mask_ignores_padded_keys():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    valid = lengths_to_valid(jnp.array([3, 5]), 5)
    model = _mha()
    params = _init(model, x)
    mask = att.make_padding_mask(valid)
    out1 = model.apply(params, x, mask=mask)
    x2 = x.copy()
    x2[0, 3:] = 100.0
    out2 = model.apply(params, x2, mask=mask)
    np.testing.assert_allclose(out1[0, :3], out2[0, :3], rtol=1e-5, atol=1e-6)


def test_cross_attention_shapes():
    x = jnp.ones((2, 4, 8))
    mem = jnp.ones((2, 9, 6))
    model = att.MultiHeadAttention(num_heads=2, qkv_features=8, out_features=8)
    params = model.init(jax.random.PRNGKey(0), x, mem)
    out, st = model.apply(params, x, mem, mutable=["intermediates"])
    assert out.shape == (2, 4, 8)
    assert st["intermediates"]["attention_weights"][0].shape == (2, 2, 4, 9)


def test_fused_equals_plain():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 7, 16)).astype(np.float32)
    valid = lengths_to_valid(jnp.array([5, 7]), 7)
    mask = att.make_padding_mask(valid)
    plain = att.MultiHeadAttention(num_heads=4)
    fused = att.MultiHeadAttention(num_heads=4, use_fused=True)
    params = plain.init(jax.random.PRNGKey(0), x)
    for kw in ({}, {"mask": mask}, {"causal": True}):
        np.testing.assert_allclose(plain.apply(params, x, **kw), fused.apply(params, x, **kw),
                                   rtol=1e-5, atol=1e-5)


def test_fused_rejects_attention_dropout():
    x = jnp.ones((1, 3, 8))
    model = att.MultiHeadAttention(num_heads=2, use_fused=True, dropout_rate=0.1)
    params = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="attention_dropout_rate"):
        model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})


def test_attention_dropout_changes_training_output_only():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 6, 8)), jnp.float32)
    model = att.MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    params = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(params, x)
    b = model.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, model.apply(params, x), rtol=0, atol=0)


def test_heads_must_divide_width():
    model = att.MultiHeadAttention(num_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 8)))
