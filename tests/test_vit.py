"""ViT: patch embedding, exact parameter counts of every variant, the MAP head, posemb resampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.models import transformer as tr
from seqvis.models import vit
from seqvis.models.common import count_params
from seqvis.utils import pair

# Published sizes at 224 px, 1000 classes, class token, learned posemb, no pre-logits.
PUBLISHED = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "B/32": 88_224_232,
    "L/16": 304_326_632,
}


def analytic_params(v: vit.Variant, patch: int, image: int = 224, classes: int = 1000, channels: int = 3):
    """Independent count from the architecture's definition."""
    d, m, n = v.width, v.mlp_dim, (image // patch) ** 2
    embed = patch * patch * channels * d + d
    cls, pos = d, (n + 1) * d
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    return embed + cls + pos + v.depth * block + 2 * d + (d * classes + classes)


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, expected):
    assert count_params(vit.build(name, num_classes=1000), (1, 224, 224, 3)) == expected


def test_h14_parameter_count():
    # The ViT-H/14 body is 630,764,800 parameters; the 1000-class head adds 1280*1000+1000.
    assert count_params(vit.build("H/14", num_classes=None), (1, 224, 224, 3)) == 630_764_800
    assert count_params(vit.build("H/14", num_classes=1000), (1, 224, 224, 3)) == 630_764_800 + 1_281_000


@pytest.mark.parametrize("variant", sorted(vit.VARIANTS))
@pytest.mark.parametrize("patch", [14, 16, 32])
def test_every_variant_matches_analytic_count(variant, patch):
    model = vit.build(f"{variant}/{patch}", num_classes=1000)
    assert count_params(model, (1, 224, 224, 3)) == analytic_params(vit.VARIANTS[variant], patch)


def test_variant_table_is_as_published():
    table = {k: (v.width, v.depth, v.mlp_dim, v.num_heads) for k, v in vit.VARIANTS.items()}
    assert table == {
        "mu": (32, 1, 128, 2), "s": (256, 6, 1024, 8), "Ti": (192, 12, 768, 3),
        "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8), "B": (768, 12, 3072, 12),
        "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
        "G": (1664, 48, 8192, 16),
    }


def test_patch_embedding_is_flatten_then_linear():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
    model = vit.build("mu/4", num_classes=None, depth=1)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    kernel = np.asarray(params["embedding"]["kernel"])  # [p, p, C, D]
    bias = np.asarray(params["embedding"]["bias"])
    # The conv output exactly as the model computes it, captured during apply.
    _, st = model.apply({"params": params}, x, mutable=["intermediates"],
                        capture_intermediates=lambda mdl, _: mdl.name == "embedding")
    (conv,) = st["intermediates"]["embedding"]["__call__"]
    conv = np.asarray(conv).reshape(2, -1, conv.shape[-1])
    # Flatten each 4x4x3 patch in (row, col, channel) order, row-major over the grid.
    b, h, w, c = x.shape
    p = 4
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
    linear = patches @ kernel.reshape(p * p * c, -1) + bias
    np.testing.assert_allclose(conv, linear, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {}, {"pool": "gap"}, {"posemb": "sincos2d"}, {"representation_size": 16},
    {"scan_layers": True}, {"scan_layers": True, "remat": True}, {"use_fused_attention": True},
    {"patch_size": (7, 4)}, {"pool": "map"}, {"pool": "map", "scan_layers": True},
])
def test_forward_shapes(kw):
    model = vit.build("mu/4", num_classes=10, depth=2, **kw)
    x = jnp.ones((3, 28, 28, 1))
    params = model.init(jax.random.PRNGKey(0), x)
    logits, tokens = model.apply(params, x, return_features=True)
    assert logits.shape == (3, 10)
    ph, pw = pair(model.patch_size)
    n = (28 // ph) * (28 // pw) + (1 if model.pool == "token" else 0)
    assert tokens.shape == (3, n, 32)
    assert np.all(np.isfinite(logits))


def test_class_token_and_learned_posemb_names():
    model = vit.build("mu/4", num_classes=10)
    p = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))["params"]
    assert p["cls"].shape == (1, 1, 32)
    assert p["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 32)
    assert set(p["Transformer"]) == {"posembed_input", "encoderblock_0", "encoder_norm"}
    assert np.all(np.asarray(p["head"]["kernel"]) == 0)  # zero-init head


def test_scanned_vit_equals_unrolled():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
    a = vit.build("mu/4", num_classes=5, depth=3, head_zero_init=False)
    b = vit.build("mu/4", num_classes=5, depth=3, head_zero_init=False, scan_layers=True)
    pa = a.init(jax.random.PRNGKey(0), x)["params"]
    pb = dict(pa)
    pb["Transformer"] = tr.stack_layer_params(pa["Transformer"], 3)
    np.testing.assert_allclose(a.apply({"params": pa}, x), b.apply({"params": pb}, x), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    x = jnp.ones((2, 8, 8, 3))
    model = vit.build("mu/4", num_classes=5, dropout_rate=0.3, head_zero_init=False)
    params = model.init(jax.random.PRNGKey(0), x)
    ev = model.apply(params, x)
    tr_ = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(ev, tr_)


def test_sincos_posemb_formula():
    pe = vit.sincos_2d_posemb(3, 4, 8)
    assert pe.shape == (1, 12, 8)
    # Token (row 2, col 3) with omega = [1, 1/100]: [sin(3w), cos(3w), sin(2w), cos(2w)].
    w = 1.0 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(3 * w), np.cos(3 * w), np.sin(2 * w), np.cos(2 * w)])
    np.testing.assert_allclose(pe[0, 2 * 4 + 3], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        vit.sincos_2d_posemb(2, 2, 6)


def test_resample_posemb_constant_grid_stays_constant():
    d = 6
    cls = np.arange(d, dtype=np.float32)[None, None]
    grid = np.full((1, 7 * 7, d), 0.25, np.float32)
    out = vit.resample_posemb(np.concatenate([cls, grid], axis=1), 12)
    assert out.shape == (1, 1 + 144, d)
    np.testing.assert_array_equal(out[:, :1], cls)  # class token kept apart
    np.testing.assert_allclose(out[:, 1:], 0.25, rtol=1e-6)


def test_resample_posemb_identity_and_no_prefix():
    pe = np.random.default_rng(2).normal(size=(1, 16, 4)).astype(np.float32)
    np.testing.assert_allclose(vit.resample_posemb(pe, 4), pe, rtol=1e-6)  # inferred: no prefix
    # A linear ramp is reproduced exactly (bilinear) in the interior when upsampling 2x.
    ramp = np.tile(np.arange(4, dtype=np.float32), 4).reshape(1, 16, 1)
    up = np.asarray(vit.resample_posemb(ramp, 8)).reshape(8, 8)
    assert np.all(np.diff(up, axis=1) >= 0) and np.allclose(up[0], up[5])


def test_resampled_posemb_runs_at_new_resolution():
    model = vit.build("mu/4", num_classes=3)
    p = model.init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)))["params"]
    pe = p["Transformer"]["posembed_input"]["pos_embedding"]
    p = jax.tree.map(lambda a: a, p)
    p["Transformer"]["posembed_input"]["pos_embedding"] = vit.resample_posemb(pe, 6)
    assert model.apply({"params": p}, jnp.ones((2, 24, 24, 3))).shape == (2, 3)


def test_error_messages():
    with pytest.raises(ValueError, match=r"Unknown ViT variant 'X'.*valid variants: mu, s, Ti"):
        vit.build("X/16")
    with pytest.raises(ValueError, match="Cannot parse ViT name"):
        vit.build("B16")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        vit.build("B/16", image_size=225)
    with pytest.raises(ValueError, match="width=100 is not divisible by num_heads=3"):
        vit.build("Ti/16", width=100)
    with pytest.raises(ValueError, match="Unknown ViT field"):
        vit.build("Ti/16", widht=10)
    with pytest.raises(ValueError, match="pool='cls' is unknown"):
        vit.build("Ti/16", pool="cls")
    model = vit.build("mu/5", num_classes=2)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 1)))


def test_hybrid_r50_b16_shapes():
    model = vit.build("R50+B/16", num_classes=1000)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    assert "ResNet" in variables["params"] and variables["params"]["embedding"]["kernel"].shape == (1, 1, 1024, 768)
    logits, tokens = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True), variables, x)
    assert logits.shape == (2, 1000) and tokens.shape == (2, 14 * 14 + 1, 768)


def test_tiny_hybrid_forward():
    model = vit.build("R26+mu/16", num_classes=3, hybrid_width=32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    out = model.apply(params, x)
    assert out.shape == (2, 3) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="hybrid trunk stride 16"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 40, 40, 3)))


# ---------------------------------------------------------------------------- MAP head


def map_head_params(d: int, m: int) -> int:
    """Parameters of a MAP head from its definition: probe, q/k/v/out projections with biases,
    the LayerNorm and the D -> M -> D MLP."""
    return d + 4 * (d * d + d) + 2 * d + (d * m + m) + (m * d + d)


@pytest.mark.parametrize("name", ["mu/8", "S/16", "g/14", "G/14"])
def test_map_head_parameter_count(name):
    v = vit.VARIANTS[name.split("/")[0]]
    patch = int(name.split("/")[1])
    body = analytic_params(v, patch, classes=0) - v.width - v.width  # no class token, no class-token posemb
    got = count_params(vit.build(name, num_classes=None, pool="map"), (1, 224, 224, 3))
    assert got == body + map_head_params(v.width, v.mlp_dim)
    if name in ("g/14", "G/14"):
        # Scaling ViT (Zhai et al. 2022), Table 2: g/14 1011M, G/14 1843M parameters without the head.
        encoder = got - map_head_params(v.width, v.mlp_dim)
        assert round(encoder / 1e6) == {"g/14": 1011, "G/14": 1843}[name]


def _gelu(z):  # tanh approximation, flax's nn.gelu default (and big_vision's)
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _ln(z, p, eps=1e-6):
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def numpy_map_head(p, x):
    """The MAP head's forward in float64 numpy from its parameters: ``x [B, L, D] -> [B, D]``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    att = p["MultiHeadDotProductAttention_0"]
    q = np.einsum("d,dhk->hk", p["probe"][0, 0], att["query"]["kernel"]) + att["query"]["bias"]  # [h, k]
    k = np.einsum("bld,dhk->blhk", x, att["key"]["kernel"]) + att["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", x, att["value"]["kernel"]) + att["value"]["bias"]
    logits = np.einsum("hk,blhk->bhl", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhl,blhk->bhk", a, v)
    pooled = np.einsum("bhk,hkd->bd", o, att["out"]["kernel"]) + att["out"]["bias"]
    mlp = p["MlpBlock_0"]
    h = _gelu(_ln(pooled, p["LayerNorm_0"]) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return pooled + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def test_map_head_output_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    model = vit.build("mu/8", num_classes=5, depth=2, pool="map", head_zero_init=False)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    assert "cls" not in params and set(params["MAPHead_0"]) == {
        "probe", "MultiHeadDotProductAttention_0", "LayerNorm_0", "MlpBlock_0"}
    logits, tokens = model.apply({"params": params}, x, return_features=True)
    assert tokens.shape == (3, 4, 32)  # 2x2 patches, no class token
    pooled = numpy_map_head(params["MAPHead_0"], tokens)
    ref = pooled @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"])
    # float32 model vs float64 reference of the same function: a few float32 ulps of values O(10)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-4)
    # the probe attends: changing one token's features changes the pooled output
    x2 = x.copy()
    x2[:, :8, :8] += 1.0
    assert not np.allclose(model.apply({"params": params}, x2), logits)


def test_map_head_sows_its_attention_apart_from_the_encoder():
    model = vit.build("mu/8", num_classes=5, depth=2, pool="map")
    x = jnp.ones((2, 16, 16, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    _, st = model.apply(v, x, mutable=["intermediates"])
    (w,) = st["intermediates"]["MAPHead_0"]["MultiHeadDotProductAttention_0"]["attention_weights"]
    assert w.shape == (2, 2, 1, 4)  # [batch, heads, one probe query, 4 tokens]
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def test_map_head_flops_counted():
    """The analytic FLOP count's MAP term equals what XLA counts for the head (map minus gap models)."""
    from seqvis.evaluation import flops

    x = jnp.ones((2, 64, 64, 3))
    counts = {}
    for pool in ("gap", "map"):
        model = vit.build("S/16", num_classes=10, depth=1, pool=pool)
        variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), x)
        xla = flops.forward_flops_per_example(model, variables, (x,))
        counts[pool] = (xla, flops.vit_forward_flops(model, (64, 64, 3)))
    xla_map = counts["map"][0] - counts["gap"][0]
    analytic_map = counts["map"][1] - counts["gap"][1]
    # 16 tokens, D=384, M=1536: 2D² + 4ND² + 4ND + 2D² + 4DM = 13.2 MFLOPs; XLA also counts softmax/LN/GELU
    # elementwise work, a few percent here.
    assert analytic_map == 2 * 384**2 + 4 * 16 * 384**2 + 4 * 16 * 384 + 2 * 384**2 + 4 * 384 * 1536
    assert xla_map == pytest.approx(analytic_map, rel=0.05)
