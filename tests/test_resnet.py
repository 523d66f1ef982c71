"""ResNet v1.5 / BiT-style: shapes of every configuration, exact sizes, blocks against numpy,
weight standardisation, BatchNorm statistics (incl. across devices), errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqvis.models import resnet
from seqvis.models.common import abstract_variables, count_params

DEPTHS = sorted(resnet.ARCHS)

# torchvision's sizes at 1000 classes (BatchNorm scale and bias counted, running stats not).
TORCHVISION = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160}


def shapes(model, *input_shapes, **kwargs):
    """(outputs, variables) of ``model.init_with_output`` as shapes only: nothing allocated."""
    inputs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in input_shapes]
    return jax.eval_shape(
        lambda *xs: model.init_with_output(jax.random.PRNGKey(0), *xs, **kwargs), *inputs)


def analytic_params(block: str, stage_sizes, width=64, classes=1000, channels=3, stem_kernel=7):
    """Independent count from the architecture's definition (convs have no bias; 2 per norm)."""
    total = stem_kernel**2 * channels * width + 2 * width
    cin = width
    for i, n in enumerate(stage_sizes):
        f = width * 2**i
        for j in range(n):
            if block == "basic":
                out = f
                total += 9 * cin * f + 2 * f + 9 * f * f + 2 * f
            else:
                out = 4 * f
                total += cin * f + 2 * f + 9 * f * f + 2 * f + f * out + 2 * out
            if cin != out or (i > 0 and j == 0):
                total += cin * out + 2 * out
            cin = out
    return total + cin * classes + classes


def np_conv(x, w, stride=1):
    """Cross-correlation with (k-1)/2 zero padding on every side: [B,H,W,C] * [k,k,C,O]."""
    k = w.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for di in range(k):
        for dj in range(k):
            patch = xp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
            out += patch @ w[di, dj]
    return out


def np_bn(x, v, stats, eps=1e-5):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + eps) * v["scale"] + v["bias"]


def randomize(tree, seed, positive=False):
    """Random values for every leaf (so that no zero-init hides a term)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    new = [rng.uniform(0.5, 1.5, x.shape) if positive else rng.normal(0, 0.5, x.shape) for x in leaves]
    return jax.tree.unflatten(treedef, [np.asarray(x, np.float32) for x in new])


# ---------------------------------------------------------------------- table and sizes


def test_depth_table_is_as_published():
    table = {d: (a.block, a.stage_sizes) for d, a in resnet.ARCHS.items()}
    assert table == {
        18: ("basic", (2, 2, 2, 2)), 26: ("bottleneck", (2, 2, 2, 2)),
        34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
        101: ("bottleneck", (3, 4, 23, 3)),
    }


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_parameter_counts(depth):
    # The two numbers the brief pins: ResNet-18 11,689,512 and ResNet-50 v1.5 25,557,032.
    assert count_params(resnet.ResNet(depth=depth, num_classes=1000), (1, 224, 224, 3)) == TORCHVISION[depth]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_every_depth_matches_analytic_count(depth, norm):
    arch = resnet.ARCHS[depth]
    n = count_params(resnet.ResNet(depth=depth, norm=norm, num_classes=1000), (1, 224, 224, 3))
    assert n == analytic_params(arch.block, arch.stage_sizes)
    if depth in TORCHVISION:
        assert n == TORCHVISION[depth]


def test_running_stats_are_not_params_and_group_norm_has_none():
    v = abstract_variables(resnet.ResNet(depth=18, num_classes=1000), (1, 224, 224, 3))
    stats = jax.tree.leaves(v["batch_stats"])
    # mean and var for each of the 4,800 BatchNorm channels (= the 9,600 scale/bias params).
    assert sum(x.size for x in stats) == 2 * 4800
    vg = abstract_variables(resnet.ResNet(depth=18, norm="group"), (1, 224, 224, 3))
    assert set(vg) == {"params"}


def test_small_stem_and_width_change_the_count_as_expected():
    model = resnet.ResNet(depth=18, stem="small", width=16, num_classes=10)
    assert count_params(model, (1, 32, 32, 3)) == analytic_params(
        "basic", (2, 2, 2, 2), width=16, classes=10, stem_kernel=3)


def test_parameter_names_follow_the_bit_layout():
    p = abstract_variables(resnet.ResNet(depth=50, norm="group"), (1, 64, 64, 3))["params"]
    assert set(p) == {"conv_root", "gn_root", "block1", "block2", "block3", "block4", "head"}
    assert set(p["block3"]) == {f"unit{j}" for j in range(1, 7)}
    assert set(p["block2"]["unit1"]) == {"conv1", "gn1", "conv2", "gn2", "conv3", "gn3",
                                         "conv_proj", "gn_proj"}
    assert set(p["block2"]["unit2"]) == {"conv1", "gn1", "conv2", "gn2", "conv3", "gn3"}
    assert p["block2"]["unit1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    pb = abstract_variables(resnet.ResNet(depth=18), (1, 64, 64, 3))["params"]
    assert set(pb["block1"]["unit1"]) == {"conv1", "bn1", "conv2", "bn2"}  # identity shortcut
    assert set(pb["block2"]["unit1"]) == {"conv1", "bn1", "conv2", "bn2", "conv_proj", "bn_proj"}


def test_encoder_params_are_the_classifier_params_without_head():
    kw = dict(depth=26, norm="batch", stem="small", width=16)
    enc = abstract_variables(resnet.ResNetEncoder(**kw), (1, 32, 32, 3))
    cls = abstract_variables(resnet.ResNet(num_classes=7, **kw), (1, 32, 32, 3))
    head = cls["params"].pop("head")
    assert head["kernel"].shape == (16 * 8 * 4, 7)
    assert jax.tree.map(lambda x: x.shape, enc) == jax.tree.map(lambda x: x.shape, cls)


# ---------------------------------------------------------------------- shapes

# (stem, image size, expected feature grid) with 4 stages: H/32 or H/8, rounded up.
GRIDS = [("imagenet", (64, 64), (2, 2)), ("imagenet", (65, 97), (3, 4)),
         ("small", (32, 32), (4, 4)), ("small", (28, 28), (4, 4))]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("stem,size,grid", GRIDS)
def test_shapes_of_logits_and_feature_maps(depth, norm, stem, size, grid):
    channels = {"basic": 512, "bottleneck": 2048}[resnet.ARCHS[depth].block]
    model = resnet.ResNet(depth=depth, norm=norm, stem=stem, num_classes=10)
    (logits, fmap), _ = shapes(model, (2, *size, 3), return_features=True)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert fmap.shape == (2, *grid, channels)
    assert model.num_features() == channels
    enc, _ = shapes(resnet.ResNetEncoder(depth=depth, norm=norm, stem=stem), (2, *size, 3))
    assert enc.shape == (2, *grid, channels)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_padding_modes_give_the_same_shapes(padding):
    model = resnet.ResNetEncoder(depth=18, width=8, padding=padding)
    out, _ = shapes(model, (1, 65, 97, 3))
    assert out.shape == (1, 3, 4, 64)


def test_hybrid_trunk_has_stride_16():
    # The ViT paper's R50 hybrid trunk: stages (3, 4, 9), GroupNorm + WS, 1024 channels.
    model = resnet.ResNetEncoder(stage_sizes=(3, 4, 9), norm="group", stem="imagenet")
    out, v = shapes(model, (2, 224, 224, 3))
    assert out.shape == (2, 14, 14, 1024)
    assert model.output_stride() == 16
    assert set(v["params"]) == {"conv_root", "gn_root", "block1", "block2", "block3"}
    assert len(v["params"]["block3"]) == 9


def test_compute_dtype_bfloat16_keeps_float32_params_and_logits():
    model = resnet.ResNet(depth=18, width=8, stem="small", num_classes=3, dtype=jnp.bfloat16)
    (logits, fmap), v = shapes(model, (2, 16, 16, 3), return_features=True)
    assert logits.dtype == jnp.float32 and fmap.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(v["params"])} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------- real forwards


@pytest.mark.parametrize("norm,extra", [("batch", {}), ("group", {"num_groups": 4})])
def test_small_forward_and_head_is_mean_pool_then_dense(norm, extra):
    model = resnet.ResNet(depth=18, width=8, stem="small", norm=norm, num_classes=5, **extra)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    logits, fmap = model.apply(variables, x, return_features=True)
    assert logits.shape == (2, 5) and fmap.shape == (2, 4, 4, 64)
    assert np.all(np.isfinite(logits)) and np.all(np.asarray(fmap) >= 0)  # post-relu
    head = variables["params"]["head"]
    expected = np.asarray(fmap).mean(axis=(1, 2)) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert np.std(np.asarray(logits)) > 0
    # The encoder with the same weights gives the same feature map.
    enc = resnet.ResNetEncoder(depth=18, width=8, stem="small", norm=norm, **extra)
    enc_vars = {k: {n: t for n, t in v.items() if n != "head"} for k, v in variables.items()}
    np.testing.assert_allclose(enc.apply(enc_vars, x), fmap, rtol=1e-6, atol=1e-6)


def test_imagenet_stem_bottleneck_forward_and_zero_head():
    model = resnet.ResNet(depth=26, width=8, num_classes=4, head_zero_init=True)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    logits, fmap = model.apply(variables, x, return_features=True)
    assert fmap.shape == (2, 1, 1, 256)
    np.testing.assert_array_equal(logits, np.zeros((2, 4)))  # zero kernel, zero bias
    assert np.abs(np.asarray(fmap)).sum() > 0


# ---------------------------------------------------------------------- blocks


def test_zero_initialised_residual_branch_passes_relu_of_input():
    # Identity shortcut (input already has 4*features channels, stride 1): y = relu(x + 0).
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 6, 16))
    for norm, groups in [("batch", 32), ("group", 4)]:
        layers = resnet.Layers(norm=norm, num_groups=groups)
        block = resnet.BottleneckBlock(features=4, layers=layers)
        v = block.init(jax.random.PRNGKey(0), x)
        for train in (False, True):
            y = block.apply(v, x, train=train, mutable=["batch_stats"])[0]
            np.testing.assert_allclose(y, np.maximum(np.asarray(x), 0), atol=1e-6)
        # Without zero-init the branch contributes.
        block2 = resnet.BottleneckBlock(features=4, layers=resnet.Layers(norm=norm, num_groups=groups,
                                                                          zero_init_residual=False))
        y2 = block2.apply(block2.init(jax.random.PRNGKey(0), x), x)
        assert np.abs(np.asarray(y2) - np.maximum(np.asarray(x), 0)).max() > 1e-2


def _np_basic(x, p, s, stride):
    y = np.maximum(np_bn(np_conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"]), 0)
    y = np_bn(np_conv(y, p["conv2"]["kernel"]), p["bn2"], s["bn2"])
    short = x if "conv_proj" not in p else np_bn(np_conv(x, p["conv_proj"]["kernel"], stride),
                                                  p["bn_proj"], s["bn_proj"])
    return np.maximum(short + y, 0)


def _np_bottleneck(x, p, s, stride):
    y = np.maximum(np_bn(np_conv(x, p["conv1"]["kernel"]), p["bn1"], s["bn1"]), 0)
    y = np.maximum(np_bn(np_conv(y, p["conv2"]["kernel"], stride), p["bn2"], s["bn2"]), 0)  # v1.5
    y = np_bn(np_conv(y, p["conv3"]["kernel"]), p["bn3"], s["bn3"])
    short = x if "conv_proj" not in p else np_bn(np_conv(x, p["conv_proj"]["kernel"], stride),
                                                  p["bn_proj"], s["bn_proj"])
    return np.maximum(short + y, 0)


@pytest.mark.parametrize("kind,features,cin,stride", [
    ("basic", 6, 6, 1),        # identity shortcut
    ("basic", 6, 3, 2),        # projection shortcut, stride on conv1
    ("bottleneck", 3, 12, 1),  # identity shortcut
    ("bottleneck", 3, 5, 2),   # projection shortcut, stride on the 3x3 conv2 (v1.5)
])
def test_block_is_relu_of_shortcut_plus_branch_numpy(kind, features, cin, stride):
    block = resnet.BLOCKS[kind](features=features, strides=stride)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (2, 7, 6, cin)))
    v = block.init(jax.random.PRNGKey(0), x)
    params = randomize(v["params"], seed=1)
    stats = {n: {"mean": randomize(t["mean"], 2), "var": randomize(t["var"], 3, positive=True)}
             for n, t in v["batch_stats"].items()}
    assert ("conv_proj" in params) == (stride != 1)
    y = block.apply({"params": params, "batch_stats": stats}, x, train=False)
    ref = (_np_basic if kind == "basic" else _np_bottleneck)(
        x.astype(np.float64), jax.tree.map(np.float64, params), jax.tree.map(np.float64, stats), stride)
    assert y.shape == ref.shape == (2, math.ceil(7 / stride), math.ceil(6 / stride),
                                    features * resnet.EXPANSION[kind])
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------------- weight standardisation


def _effective_kernel(conv, variables, k, cin):
    """Read the kernel a conv really uses by feeding one-hot k x k patches (VALID padding)."""
    eye = np.eye(k * k * cin, dtype=np.float32).reshape(k * k * cin, k, k, cin)
    out = conv.apply(variables, eye)  # [k*k*cin, 1, 1, cout]
    return np.asarray(out).reshape(k, k, cin, -1)


def test_std_conv_uses_zero_mean_unit_variance_kernel():
    k, cin, cout = 3, 4, 5
    conv = resnet.StdConv(cout, (k, k), padding="VALID", use_bias=False)
    raw = np.random.default_rng(0).normal(0.3, 2.0, (k, k, cin, cout)).astype(np.float32)
    variables = {"params": {"kernel": raw}}
    w = _effective_kernel(conv, variables, k, cin)
    # Independent numpy formula: per output channel over (kh, kw, cin), biased variance.
    mean = raw.astype(np.float64).mean(axis=(0, 1, 2))
    var = raw.astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(w, (raw - mean) / np.sqrt(var + 1e-8), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), np.zeros(cout), atol=1e-5)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)), np.ones(cout), rtol=1e-4)
    # Hence invariant to W -> a W + b per output channel; a plain conv is not.
    x = np.random.default_rng(1).normal(size=(2, 5, 5, cin)).astype(np.float32)
    a, b = np.float32(3.0), np.arange(cout, dtype=np.float32)
    y1 = conv.apply(variables, x)
    y2 = conv.apply({"params": {"kernel": a * raw + b}}, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    plain = nn.Conv(cout, (k, k), padding="VALID", use_bias=False)
    assert np.abs(plain.apply(variables, x) - plain.apply({"params": {"kernel": a * raw + b}}, x)).max() > 1


def test_group_norm_model_standardises_every_conv_and_batch_model_none():
    x = np.ones((1, 16, 16, 3), np.float32)
    calls = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
            calls.append(type(context.module))
        return next_fun(*args, **kwargs)

    for norm, groups in [("group", 8), ("batch", 32)]:
        calls.clear()
        model = resnet.ResNetEncoder(depth=18, width=8, stem="small", norm=norm, num_groups=groups)
        with nn.intercept_methods(spy):
            model.init(jax.random.PRNGKey(0), x)
        assert len(calls) == 1 + 16 + 3  # stem, 2 per basic block, 3 projections
        assert set(calls) == ({resnet.StdConv} if norm == "group" else {nn.Conv})


# ---------------------------------------------------------------------- BatchNorm


def _tiny(**kw):
    return resnet.ResNet(depth=18, stage_sizes=(1, 1), width=4, stem="small", num_classes=3, **kw)


def test_batchnorm_train_updates_stats_with_momentum_and_eval_does_not():
    model = _tiny()
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 8, 2)) * 2.0 + 1.0
    v = model.init(jax.random.PRNGKey(0), x)
    _, new = model.apply(v, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           v["batch_stats"], new["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # Running average with torchvision's momentum: new = 0.9 old + 0.1 batch (flax momentum 0.9).
    root = model.apply(v, x, capture_intermediates=lambda m, _: m.name == "conv_root",
                       mutable=["intermediates"])[1]["intermediates"]["conv_root"]["__call__"][0]
    root = np.asarray(root, np.float64)
    np.testing.assert_allclose(new["batch_stats"]["bn_root"]["mean"], 0.1 * root.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn_root"]["var"],
                               0.9 + 0.1 * root.var(axis=(0, 1, 2)), rtol=1e-4)
    # Evaluation reads the running statistics and leaves them alone.
    _, same = model.apply(v, x, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], same["batch_stats"])


def test_eval_is_per_example_and_train_uses_the_batch():
    model = _tiny(zero_init_residual=False)
    x = jax.random.normal(jax.random.PRNGKey(6), (4, 8, 8, 2))
    v = model.init(jax.random.PRNGKey(0), x)
    full = model.apply(v, x, train=False)
    np.testing.assert_allclose(model.apply(v, x[:1], train=False), full[:1], rtol=1e-5, atol=1e-6)
    tfull, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    thalf, _ = model.apply(v, x[:2], train=True, mutable=["batch_stats"])
    assert np.abs(np.asarray(tfull[:2]) - np.asarray(thalf)).max() > 1e-4


def test_bn_axis_name_averages_batch_statistics_across_devices():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 2)))
    v = _tiny(zero_init_residual=False).init(jax.random.PRNGKey(0), x)
    single, single_stats = _tiny().apply(v, x, train=True, mutable=["batch_stats"])

    def per_device(model):
        f = lambda v, xs: model.apply(v, xs, train=True, mutable=["batch_stats"])  # noqa: E731
        rep = jax.tree.map(lambda a: np.stack([a, a]), v)
        out, stats = jax.pmap(f, axis_name="batch")(rep, x.reshape(2, 2, 8, 8, 2))
        return np.asarray(out).reshape(4, 3), stats

    synced, synced_stats = per_device(_tiny(bn_axis_name="batch"))
    np.testing.assert_allclose(synced, single, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6),
                 synced_stats, single_stats)
    local, _ = per_device(_tiny())
    assert np.abs(local - np.asarray(single)).max() > 1e-4


# ---------------------------------------------------------------------- errors


def test_unknown_depth_lists_valid_ones():
    with pytest.raises(ValueError, match=r"depth=19 .*18, 26, 34, 50, 101"):
        resnet.ResNet(depth=19)


def test_unknown_norm_and_stem_list_valid_ones():
    with pytest.raises(ValueError, match=r"norm='layer'.*'batch', 'group'"):
        resnet.ResNetEncoder(norm="layer")
    with pytest.raises(ValueError, match=r"stem='cifar'.*'imagenet', 'small'"):
        resnet.ResNet(stem="cifar")
    with pytest.raises(ValueError, match=r"padding='valid'"):
        resnet.ResNet(padding="valid")


def test_bad_stage_sizes_and_group_width():
    with pytest.raises(ValueError, match="stage_sizes"):
        resnet.ResNet(stage_sizes=())
    with pytest.raises(ValueError, match="stage_sizes"):
        resnet.ResNet(stage_sizes=(2, 0))
    with pytest.raises(ValueError, match=r"num_groups=32.*width=8 is not a multiple"):
        resnet.ResNet(norm="group", width=8)


def test_input_must_be_4d_float():
    model = resnet.ResNet(depth=18, width=8, stem="small", num_classes=2)
    with pytest.raises(ValueError, match=r"\[batch, H, W, C\].*\(32, 32, 3\)"):
        shapes(model, (32, 32, 3))
    with pytest.raises(ValueError, match="float images"):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8))


def test_small_images_with_imagenet_stem_say_use_small_stem():
    with pytest.raises(ValueError, match=r"28x28.*stride 32.*stem='small'"):
        shapes(resnet.ResNet(depth=18), (2, 28, 28, 1))
    with pytest.raises(ValueError, match=r"at least 32 px"):
        shapes(resnet.ResNet(depth=18), (2, 4, 4, 1))
    with pytest.raises(ValueError, match=r"stride 8.*at least 8 px"):
        shapes(resnet.ResNet(depth=18, stem="small"), (2, 6, 6, 1))
    # Exactly the stride is fine: a 1x1 feature map.
    (logits, fmap), _ = shapes(resnet.ResNet(depth=18), (2, 32, 32, 1), return_features=True)
    assert fmap.shape == (2, 1, 1, 512)
