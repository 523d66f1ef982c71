"""Video models: one frame encoder for all frames, order (in)variance, exact masking of padded
frames, readouts against the library layers, numpy references for the mean and tconv heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.models import video as vm
from seqvis.models.recurrent import StackedRNN

B, T, HW = 3, 6, 16
SMALL = dict(backbone_kwargs={"channels": (4, 8)}, embed_dim=12, width=8, num_heads=2, mlp_dim=16, max_frames=T)


def clips(seed=0, b=B, t=T):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, HW, HW, 1)), jnp.float32)


def model(temporal, **kw):
    return vm.VideoClassifier(num_classes=5, temporal=temporal, **{**SMALL, **kw})


def init(m, x, lengths=None):
    return jax.jit(m.init)(jax.random.PRNGKey(1), x, lengths)


def shapes(m, x):
    """Parameter shapes without computing anything."""
    return jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.PRNGKey(1), x))


def forward(m):
    return jax.jit(lambda v, x, lengths=None: m.apply(v, x, lengths))


def randomised(variables, seed=3):
    """The same tree with every leaf random (zero-initialised class tokens and biases exercised)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.3, size=p.shape), p.dtype), variables)


@pytest.mark.parametrize("backbone,kwargs", [
    ("cnn", {"channels": (4, 8)}),
    ("resnet", {"depth": 18, "stage_sizes": (1, 1), "stem": "small", "width": 8, "num_groups": 4}),
    ("vit", {"variant": "mu/8", "width": 16, "num_heads": 2, "mlp_dim": 32}),
])
def test_frame_encoder_is_one_set_of_weights_for_any_length(backbone, kwargs):
    enc = vm.FrameEncoder(backbone=backbone, backbone_kwargs=kwargs, embed_dim=12)
    assert shapes(enc, clips(t=2)) == shapes(enc, clips(t=7))
    v = randomised(init(enc, clips(t=7)))
    x = clips(1, t=7)
    apply = jax.jit(enc.apply)
    f = apply(v, x)
    assert f.shape == (B, 7, 12)
    # Each frame alone (as a batch of one-frame clips) gives the same embedding.
    alone = apply(v, jnp.swapaxes(x, 0, 1).reshape(7 * B, 1, HW, HW, 1)).reshape(7, B, 12)
    np.testing.assert_allclose(jnp.swapaxes(alone, 0, 1), f, rtol=1e-5, atol=1e-5)
    # Inside the classifier the encoder's parameters do not depend on T either.
    m = vm.VideoClassifier(num_classes=5, temporal="lstm", backbone=backbone, backbone_kwargs=kwargs,
                           embed_dim=12, width=8)
    assert shapes(m, clips(t=2))["params"]["frame_encoder"] == shapes(m, clips(t=7))["params"]["frame_encoder"]


@pytest.mark.parametrize("temporal", vm.TEMPORAL_MODELS)
def test_order_invariance_only_for_mean(temporal):
    m = model(temporal)
    x = clips()
    v = randomised(init(m, x))
    perm = np.array([3, 0, 5, 1, 4, 2])
    y, y_perm, y_rev = jnp.split(forward(m)(v, jnp.concatenate([x, x[:, perm], x[:, ::-1]])), 3)
    if temporal == "mean":
        np.testing.assert_allclose(y_perm, y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y_rev, y, rtol=1e-5, atol=1e-5)
    else:
        assert float(jnp.max(jnp.abs(y_perm - y))) > 1e-3
        assert float(jnp.max(jnp.abs(y_rev - y))) > 1e-3


@pytest.mark.parametrize("temporal", vm.TEMPORAL_MODELS)
def test_padded_frames_are_masked(temporal):
    m = model(temporal)
    x = clips()
    lengths = jnp.array([T, 4, 1])
    v = randomised(init(m, x, lengths))
    fwd = forward(m)
    garbage = x.at[1, 4:].set(9.0).at[2, 1:].set(-5.0)
    y, y_garbage = jnp.split(fwd(v, jnp.concatenate([x, garbage]), jnp.concatenate([lengths, lengths])), 2)
    # Whatever sits in the padding does not matter...
    np.testing.assert_allclose(y_garbage, y, rtol=1e-5, atol=1e-5)
    # ...and a padded clip scores exactly like the clip cut to its real frames.
    np.testing.assert_allclose(fwd(v, x[1:2, :4])[0], y[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fwd(v, x[2:3, :1])[0], y[2], rtol=1e-4, atol=1e-5)
    # Without lengths every frame counts.
    np.testing.assert_allclose(fwd(v, x), y_full := fwd(v, x, jnp.full((B,), T)), rtol=1e-6)
    # y came from a batch of 6, y_full from a batch of 3: other kernels, float32 rounding (seen: 1.02e-6).
    np.testing.assert_allclose(y_full[0], y[0], rtol=1e-5, atol=1e-7)


def _gelu(x):  # tanh approximation, as flax's nn.gelu
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_mean_and_tconv_heads_match_numpy():
    x = clips(2)
    lengths = np.array([T, 4, 2])
    for temporal in ("mean", "tconv"):
        m = model(temporal, num_layers=2, kernel_size=3)
        v = randomised(init(m, x, jnp.asarray(lengths)))
        logits, f, z = jax.jit(lambda v, x, n: m.apply(v, x, n, return_features=True))(v, x, jnp.asarray(lengths))
        f, p = np.asarray(f, np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
        for b, n in enumerate(lengths):
            if temporal == "mean":
                want = _gelu(f[b, :n].mean(0) @ p["temporal"]["mlp"]["kernel"] + p["temporal"]["mlp"]["bias"])
            else:
                g = f[b, :n] @ p["temporal"]["embedding"]["kernel"] + p["temporal"]["embedding"]["bias"]
                for layer in range(2):
                    k, bias = p["temporal"][f"conv_{layer}"]["kernel"], p["temporal"][f"conv_{layer}"]["bias"]
                    padded = np.pad(g, ((1, 1), (0, 0)))  # SAME, kernel 3: one zero frame each side
                    g = np.maximum(sum(padded[i:i + n] @ k[i] for i in range(3)) + bias, 0.0)
                want = g.mean(0)
            np.testing.assert_allclose(z[b], want, rtol=1e-4, atol=1e-5)
            head = want @ p["head"]["kernel"] + p["head"]["bias"]
            np.testing.assert_allclose(logits[b], head, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_readout_is_the_final_state(cell, bidirectional):
    f = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, 7)), jnp.float32)
    lengths = jnp.array([T, 3, 1])
    pool = vm.RecurrentPool(cell=cell, width=5, num_layers=2, bidirectional=bidirectional)
    v = randomised(jax.jit(pool.init)(jax.random.PRNGKey(0), f, lengths))
    z = jax.jit(pool.apply)(v, f, lengths)
    # The same stack, read through its final carries (an independent path from the outputs).
    rnn = StackedRNN(features=5, num_layers=2, cell=cell, bidirectional=bidirectional)
    _, carries = jax.jit(rnn.apply)({"params": v["params"]["rnn"]}, f, lengths)
    h = lambda carry: carry[1] if cell == "lstm" else carry  # noqa: E731  LSTM carry is (c, h)
    last = carries[-1]
    want = jnp.concatenate([h(last[0]), h(last[1])], -1) if bidirectional else h(last)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)


def test_transformer_uses_class_token_and_position_embedding():
    m = model("transformer", num_layers=1)
    p = shapes(m, clips())["params"]["temporal"]
    assert p["cls"] == (1, 1, 8) and p["pos_embedding"] == (1, T + 1, 8)
    with pytest.raises(ValueError, match="config.model.max_frames=6"):
        shapes(m, clips(t=T + 1))


def test_named_sizes_of_parameters():
    m = model("lstm")
    p = shapes(m, clips())["params"]
    # cnn: 3x3x1x4 + 4, 3x3x4x8 + 8; flatten 4x4x8 = 128 -> 12; LayerNorm 2x12
    cnn = (9 * 4 + 4) + (9 * 4 * 8 + 8) + (128 * 12 + 12) + 24
    lstm = 12 * 32 + 8 * 32 + 32
    head = 8 * 5 + 5
    assert sum(int(np.prod(a)) for a in jax.tree.leaves(p, is_leaf=lambda a: isinstance(a, tuple))) == \
        cnn + lstm + head


@pytest.mark.parametrize("kwargs,message", [
    (dict(temporal="conv3d"), r"config.model.temporal='conv3d' is unknown"),
    (dict(temporal="transformer", width=10, num_heads=4), r"config.model.width=10 is not divisible"),
    (dict(backbone="resnet", backbone_kwargs={"norm": "batch"}), r"norm='batch' is not supported for video"),
    (dict(backbone="rnn"), r"config.model.backbone='rnn' is unknown"),
    (dict(temporal="mean", bidirectional=True), r"bidirectional=True needs temporal='lstm' or 'gru'"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
    m = vm.VideoClassifier(num_classes=5, **{**SMALL, **kwargs})
    with pytest.raises(ValueError, match=message):
        m.check_config()
    with pytest.raises(ValueError, match=message):
        shapes(m, clips())
