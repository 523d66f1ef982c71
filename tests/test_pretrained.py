"""Pretrained weights in and out: official ViT .npz layouts, timm state dicts, posemb, StdConv."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from seqvis.models import resnet, vit
from seqvis.interop import pretrained, timm_io

# ---------------------------------------------------------------------------- golden layouts
# Written by hand from the published model definition (google-research/vision_transformer
# vit_jax/models_vit.py + models_resnet.py, configs/models.py), at 224 px and 1000 classes.


def _golden_encoder(width, mlp, heads, depth, tokens):
    hd = width // heads
    keys = {"Transformer/posembed_input/pos_embedding": (1, tokens, width),
            "Transformer/encoder_norm/scale": (width,), "Transformer/encoder_norm/bias": (width,),
            "cls": (1, 1, width), "head/kernel": (width, 1000), "head/bias": (1000,)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        keys.update({
            b + "LayerNorm_0/scale": (width,), b + "LayerNorm_0/bias": (width,),
            b + "MultiHeadDotProductAttention_1/query/kernel": (width, heads, hd),
            b + "MultiHeadDotProductAttention_1/query/bias": (heads, hd),
            b + "MultiHeadDotProductAttention_1/key/kernel": (width, heads, hd),
            b + "MultiHeadDotProductAttention_1/key/bias": (heads, hd),
            b + "MultiHeadDotProductAttention_1/value/kernel": (width, heads, hd),
            b + "MultiHeadDotProductAttention_1/value/bias": (heads, hd),
            b + "MultiHeadDotProductAttention_1/out/kernel": (heads, hd, width),
            b + "MultiHeadDotProductAttention_1/out/bias": (width,),
            b + "LayerNorm_2/scale": (width,), b + "LayerNorm_2/bias": (width,),
            b + "MlpBlock_3/Dense_0/kernel": (width, mlp), b + "MlpBlock_3/Dense_0/bias": (mlp,),
            b + "MlpBlock_3/Dense_1/kernel": (mlp, width), b + "MlpBlock_3/Dense_1/bias": (width,),
        })
    return keys


GOLDEN_TI16 = {"embedding/kernel": (16, 16, 3, 192), "embedding/bias": (192,),
               **_golden_encoder(192, 768, 3, 12, 14 * 14 + 1)}

# R26+ViT-S/32: ResNet root + 4 stages of 2 bottleneck units (width 64), 1x1 patches, S width.
# (stage, unit) -> (input channels, bottleneck width); outputs are 4x the width.
_R26_UNITS = {(1, 1): (64, 64), (1, 2): (256, 64), (2, 1): (256, 128), (2, 2): (512, 128),
              (3, 1): (512, 256), (3, 2): (1024, 256), (4, 1): (1024, 512), (4, 2): (2048, 512)}
GOLDEN_R26_S32 = {"conv_root/kernel": (7, 7, 3, 64), "gn_root/scale": (64,), "gn_root/bias": (64,),
                  "embedding/kernel": (1, 1, 2048, 384), "embedding/bias": (384,),
                  **_golden_encoder(384, 1536, 6, 12, 7 * 7 + 1)}
for (_s, _u), (_cin, _m) in _R26_UNITS.items():
    _p = f"block{_s}/unit{_u}/"
    GOLDEN_R26_S32.update({
        _p + "conv1/kernel": (1, 1, _cin, _m), _p + "gn1/scale": (_m,), _p + "gn1/bias": (_m,),
        _p + "conv2/kernel": (3, 3, _m, _m), _p + "gn2/scale": (_m,), _p + "gn2/bias": (_m,),
        _p + "conv3/kernel": (1, 1, _m, 4 * _m), _p + "gn3/scale": (4 * _m,), _p + "gn3/bias": (4 * _m,)})
    if _u == 1:  # the first unit of a stage changes the channel count: projection shortcut
        GOLDEN_R26_S32.update({_p + "conv_proj/kernel": (1, 1, _cin, 4 * _m),
                               _p + "gn_proj/scale": (4 * _m,), _p + "gn_proj/bias": (4 * _m,)})


def _layout(name, **kw):
    model = vit.build(name, num_classes=1000, **kw)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
    return {k: tuple(v.shape) for k, v in pretrained.to_official_layout(params).items()}


@pytest.mark.parametrize("name,golden", [("Ti/16", GOLDEN_TI16), ("R26+S/32", GOLDEN_R26_S32)])
def test_golden_official_layout(name, golden):
    got = _layout(name)
    assert sorted(set(golden) - set(got)) == [] and sorted(set(got) - set(golden)) == []
    assert {k: got[k] for k in golden} == golden
    if name == "Ti/16":
        assert _layout(name, scan_layers=True) == golden  # the scanned model exports the same file


# ---------------------------------------------------------------------------- official .npz


def _tiny(seed=0, image=16, **kw):
    """A tiny ViT, random params of its exact tree (numpy, no init compile) and a batch."""
    kw = {"depth": 2, **kw}
    model = vit.build(kw.pop("name", "mu/8"), num_classes=kw.pop("num_classes", 5), **kw)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, image, image, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
    return model, params, x


def _logits(model, params, x):
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_official_npz_loads_exactly(tmp_path):
    model, src, x = _tiny(seed=1)
    _, template, _ = _tiny(seed=0)
    path = str(tmp_path / "ViT-mu_8.npz")
    np.savez(path, **pretrained.to_official_layout(src))
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    _assert_same(params, src)
    assert report.fresh == [] and report.unused == [] and report.reset == []
    np.testing.assert_array_equal(_logits(model, params, x), _logits(model, src, x))


def test_npz_with_extra_and_missing_key_is_reported(tmp_path):
    _, src, _ = _tiny(seed=1)
    _, template, _ = _tiny(seed=0)
    flat = pretrained.to_official_layout(src)
    del flat["Transformer/encoder_norm/scale"]
    flat["Transformer/encoderblock_0/Extra_9/kernel"] = np.ones((3, 3), np.float32)
    path = str(tmp_path / "partial.npz")
    np.savez(path, **flat)
    with pytest.raises(ValueError) as e:
        pretrained.load_pretrained(path, template)
    msg = str(e.value)
    assert "partial.npz" in msg and "Transformer/encoder_norm/scale" in msg
    assert "Transformer/encoderblock_0/Extra_9/kernel" in msg and "init_from_allow_partial=True" in msg
    params, report = pretrained.load_pretrained(path, template, allow_partial=True, return_report=True)
    assert report.fresh == ["Transformer/encoder_norm/scale"]
    assert report.unused == ["Transformer/encoderblock_0/Extra_9/kernel"]
    np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["scale"],
                                  template["Transformer"]["encoder_norm"]["scale"])
    np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["bias"], src["Transformer"]["encoder_norm"]["bias"])


def test_fine_tuning_drops_pre_logits_and_resets_head(tmp_path):
    _, src, _ = _tiny(seed=1, num_classes=7, representation_size=16)
    _, template, _ = _tiny(seed=0, num_classes=5)
    path = str(tmp_path / "i21k.npz")
    np.savez(path, **pretrained.to_official_layout(src))
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    assert report.unused == ["pre_logits/bias", "pre_logits/kernel"]
    assert sorted(report.reset) == ["head/bias", "head/kernel"] and report.fresh == []
    np.testing.assert_array_equal(params["head"]["kernel"], template["head"]["kernel"])
    np.testing.assert_array_equal(params["embedding"]["kernel"], src["embedding"]["kernel"])
    # With the same representation size the pre-logits layer is kept.
    _, template2, _ = _tiny(seed=0, num_classes=5, representation_size=16)
    p2, r2 = pretrained.load_pretrained(path, template2, return_report=True)
    np.testing.assert_array_equal(p2["pre_logits"]["kernel"], src["pre_logits"]["kernel"])
    assert r2.unused == []


def test_big_vision_layout_gap_and_token(tmp_path):
    """big_vision: params/ prefix, linen names, top-level posemb without class entry, scanned blocks."""
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
               "MlpBlock_3": "MlpBlock_0"}
    for pool in ("token", "gap"):
        _, src, _ = _tiny(seed=1, pool=pool)
        pe = src["Transformer"]["posembed_input"]["pos_embedding"]
        if pool == "token":  # big_vision adds no posemb to the class token: zero entry in seqvis
            pe[:, :1] = 0.0
        bv = {}
        for k, v in pretrained.to_official_layout(src).items():
            if k == "Transformer/posembed_input/pos_embedding":
                k, v = "pos_embedding", np.asarray(v)[:, (1 if pool == "token" else 0):]
            parts = [renames.get(p, p) for p in k.split("/")]
            bv["params/" + "/".join(parts)] = np.asarray(v)
        # big_vision's scanned encoder: Transformer/encoderblock/<module> with a leading layer axis.
        stacked = {}
        for k, v in bv.items():
            if "/encoderblock_" in k:
                head, rest = k.split("/encoderblock_", 1)
                i, rest = rest.split("/", 1)
                stacked.setdefault(f"{head}/encoderblock/{rest}", {})[int(i)] = v
            else:
                stacked[k] = v
        stacked = {k: (np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v) for k, v in stacked.items()}
        for layout in (bv, stacked):
            _, template, _ = _tiny(seed=0, pool=pool)
            path = str(tmp_path / f"bv_{pool}_{len(layout)}.npz")
            np.savez(path, **layout)
            params, report = pretrained.load_pretrained(path, template, return_report=True)
            assert report.fresh == [] and report.unused == [], report.summary()
            _assert_same(params, src)  # incl. the zero class-token posemb: big_vision's computation


# big_vision's ViT with pool_type='map' (big_vision/models/vit.py: _Model, Encoder1DBlock, MAPHead),
# written by hand: names and shapes as its checkpoints store them, under the params/ prefix.
BV_D, BV_H, BV_M, BV_P, BV_DEPTH, BV_K = 32, 2, 128, 8, 2, 5


def _bv_attention(prefix, d, h):
    hd = d // h
    return {prefix + "query/kernel": (d, h, hd), prefix + "query/bias": (h, hd),
            prefix + "key/kernel": (d, h, hd), prefix + "key/bias": (h, hd),
            prefix + "value/kernel": (d, h, hd), prefix + "value/bias": (h, hd),
            prefix + "out/kernel": (h, hd, d), prefix + "out/bias": (d,)}


def _bv_mlp(prefix, d, m):
    return {prefix + "Dense_0/kernel": (d, m), prefix + "Dense_0/bias": (m,),
            prefix + "Dense_1/kernel": (m, d), prefix + "Dense_1/bias": (d,)}


def big_vision_map_shapes(grid):
    d, m = BV_D, BV_M
    shapes = {"params/embedding/kernel": (BV_P, BV_P, 3, d), "params/embedding/bias": (d,),
              "params/pos_embedding": (1, grid * grid, d),
              "params/Transformer/encoder_norm/scale": (d,), "params/Transformer/encoder_norm/bias": (d,),
              "params/MAPHead_0/probe": (1, 1, d),
              "params/MAPHead_0/LayerNorm_0/scale": (d,), "params/MAPHead_0/LayerNorm_0/bias": (d,),
              **_bv_attention("params/MAPHead_0/MultiHeadDotProductAttention_0/", d, BV_H),
              **_bv_mlp("params/MAPHead_0/MlpBlock_0/", d, m),
              "params/head/kernel": (d, BV_K), "params/head/bias": (BV_K,)}
    for i in range(BV_DEPTH):
        b = f"params/Transformer/encoderblock_{i}/"
        shapes.update({b + "LayerNorm_0/scale": (d,), b + "LayerNorm_0/bias": (d,),
                       b + "LayerNorm_1/scale": (d,), b + "LayerNorm_1/bias": (d,),
                       **_bv_attention(b + "MultiHeadDotProductAttention_0/", d, BV_H), **_bv_mlp(b + "MlpBlock_0/", d, m)})
    return shapes


def big_vision_map_forward(w, images):
    """big_vision's ViT (pool_type='map', learned posemb added before the blocks) in float64 numpy."""
    w = {k[len("params/"):]: np.asarray(v, np.float64) for k, v in w.items()}
    x = np.asarray(images, np.float64)
    b, hh, ww, c = x.shape
    gh, gw = hh // BV_P, ww // BV_P
    patches = x.reshape(b, gh, BV_P, gw, BV_P, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    t = patches @ w["embedding/kernel"].reshape(-1, BV_D) + w["embedding/bias"] + w["pos_embedding"]

    def ln(z, name):
        mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * w[name + "/scale"] + w[name + "/bias"]

    def attend(q_in, kv_in, name):
        proj = lambda z, n: np.einsum("bld,dhk->blhk", z, w[f"{name}/{n}/kernel"]) + w[f"{name}/{n}/bias"]  # noqa
        q, k, v = proj(q_in, "query"), proj(kv_in, "key"), proj(kv_in, "value")
        logits = np.einsum("bqhk,blhk->bhql", q, k) / np.sqrt(q.shape[-1])
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        return np.einsum("bhql,blhk,hkd->bqd", a, v, w[f"{name}/out/kernel"]) + w[f"{name}/out/bias"]

    def mlp(z, name):
        return gelu_tanh(z @ w[name + "/Dense_0/kernel"] + w[name + "/Dense_0/bias"]) @ w[name + "/Dense_1/kernel"] \
            + w[name + "/Dense_1/bias"]

    for i in range(BV_DEPTH):
        blk = f"Transformer/encoderblock_{i}"
        y = ln(t, blk + "/LayerNorm_0")
        t = t + attend(y, y, blk + "/MultiHeadDotProductAttention_0")
        t = t + mlp(ln(t, blk + "/LayerNorm_1"), blk + "/MlpBlock_0")
    t = ln(t, "Transformer/encoder_norm")
    probe = np.broadcast_to(w["MAPHead_0/probe"], (b, 1, BV_D))
    p = attend(probe, t, "MAPHead_0/MultiHeadDotProductAttention_0")
    p = p + mlp(ln(p, "MAPHead_0/LayerNorm_0"), "MAPHead_0/MlpBlock_0")
    return p[:, 0] @ w["head/kernel"] + w["head/bias"]


def test_big_vision_map_head_checkpoint_loads_and_computes_the_same(tmp_path):
    rng = np.random.default_rng(5)
    npz = {k: (0.3 * rng.normal(size=s)).astype(np.float32) for k, s in big_vision_map_shapes(grid=2).items()}
    for k in npz:
        if k.endswith("/scale"):
            npz[k] += 1.0
    path = str(tmp_path / "bv_map.npz")
    np.savez(path, **npz)
    model, template, x = _tiny(seed=0, pool="map", num_classes=BV_K, head_zero_init=False)
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    assert report.fresh == [] and report.unused == [] and report.reset == [], report.summary()
    np.testing.assert_array_equal(params["MAPHead_0"]["probe"], npz["params/MAPHead_0/probe"])
    ref = big_vision_map_forward(npz, x)
    # float32 vs float64 of the same function (logits O(10))
    np.testing.assert_allclose(_logits(model, params, x), ref, rtol=1e-5, atol=1e-4)

    # The early big_vision MAP layout (its fix_old_checkpoints): the head's modules at the top level.
    inlined = {k.replace("params/MAPHead_0/", "params/"): v for k, v in npz.items()}
    assert "params/probe" in inlined and "params/MlpBlock_0/Dense_0/kernel" in inlined
    np.savez(str(tmp_path / "bv_map_old.npz"), **inlined)
    params_old = pretrained.load_pretrained(str(tmp_path / "bv_map_old.npz"), template)
    _assert_same(params_old, params)

    # A class-token model cannot take it; the message says which pool would.
    _, token_template, _ = _tiny(seed=0, pool="token", num_classes=BV_K)
    with pytest.raises(ValueError, match="config.model.pool='map'"):
        pretrained.load_pretrained(path, token_template)
    # timm has no MAP-head mapping here: the export refuses instead of dropping the head.
    with pytest.raises(ValueError, match="MAP head"):
        timm_io.seqvis_to_timm(params)


def test_posemb_resampled_like_official_zoom(tmp_path):
    ndimage = pytest.importorskip("scipy.ndimage")
    _, src, _ = _tiny(seed=1, image=24)  # 3x3 grid
    model, template, x = _tiny(seed=0, image=40)  # 5x5 grid
    path = str(tmp_path / "lowres.npz")
    np.savez(path, **pretrained.to_official_layout(src))
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    assert report.resampled == ["Transformer/posembed_input/pos_embedding"]
    old = np.asarray(src["Transformer"]["posembed_input"]["pos_embedding"])
    new = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    np.testing.assert_array_equal(new[:, :1], old[:, :1])  # class token entry kept
    ref = ndimage.zoom(old[0, 1:].reshape(3, 3, -1), (5 / 3, 5 / 3, 1), order=1)  # vit_jax/checkpoint.py
    np.testing.assert_allclose(new[0, 1:].reshape(5, 5, -1), ref, rtol=1e-6, atol=1e-7)
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (2, 5)


def test_hybrid_official_layout_with_old_groupnorm_shapes(tmp_path):
    _, src, _ = _tiny(seed=1, name="R26+mu/16", image=32, hybrid_width=32)
    _, template, _ = _tiny(seed=0, name="R26+mu/16", image=32, hybrid_width=32)
    flat = pretrained.to_official_layout(src)
    assert "conv_root/kernel" in flat and "block1/unit1/conv_proj/kernel" in flat and "ResNet" not in str(list(flat))
    # Old linen checkpoints stored GroupNorm scale/bias as [1, 1, 1, C] (vit_jax _fix_groupnorm).
    flat = {k: (np.asarray(v).reshape(1, 1, 1, -1) if "/gn" in "/" + k and k.endswith(("scale", "bias")) else v)
            for k, v in flat.items()}
    assert flat["gn_root/scale"].shape == (1, 1, 1, 32)
    path = str(tmp_path / "R26_mu.npz")
    np.savez(path, **flat)
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    assert report.fresh == [] and report.unused == []
    _assert_same(params, src)  # bit-identical parameters, hence identical logits


def test_text_file_as_npz_gets_one_clear_message(tmp_path):
    path = tmp_path / "ViT-B_16.npz"
    path.write_text("<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>\n")
    with pytest.raises(ValueError) as e:
        pretrained.load_pretrained(str(path), {})
    msg = str(e.value)
    assert str(path) in msg and "text file" in msg and "download it again" in msg
    assert "allow_pickle" not in msg and "pickle" not in msg.lower()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_pretrained(str(tmp_path / "missing.npz"), {})


def test_std_conv_epsilon_is_the_official_one():
    # (W - mean) / (std + 1e-5) as vit_jax/models_resnet.py; visible for a small-norm kernel.
    w = np.random.default_rng(0).normal(0.0, 1e-3, (3, 3, 4, 5)).astype(np.float32)
    mean, std = w.astype(np.float64).mean((0, 1, 2)), w.astype(np.float64).std((0, 1, 2))
    got = np.asarray(resnet.standardize_weight(jnp.asarray(w)))
    np.testing.assert_allclose(got, (w - mean) / (std + 1e-5), rtol=1e-5, atol=1e-6)
    assert np.abs(got - (w - mean) / np.sqrt(std**2 + 1e-8)).max() > 1e-3  # the old formula differs


def test_resample_posemb_matches_scipy_zoom_for_shrinking_too():
    ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.default_rng(3).normal(size=(7, 7, 4)).astype(np.float32)
    for new in (1, 3, 12):
        out = np.asarray(vit.resample_posemb(grid.reshape(1, 49, 4), new)).reshape(new, new, 4)
        np.testing.assert_allclose(out, ndimage.zoom(grid, (new / 7, new / 7, 1), order=1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- timm
# A timm ViT state dict (timm.models.vision_transformer.VisionTransformer, PyTorch layout):
#   cls_token [1,1,D]; pos_embed [1,1+N,D]; patch_embed.proj.weight [D,C,p,p], .bias [D];
#   blocks.i.norm1.{weight,bias} [D]; blocks.i.attn.qkv.weight [3D,D] (rows q;k;v, head-major),
#   .bias [3D]; blocks.i.attn.proj.weight [D,D], .bias; blocks.i.norm2.*; blocks.i.mlp.fc1.weight
#   [M,D], .bias [M]; blocks.i.mlp.fc2.weight [D,M], .bias [D]; norm.{weight,bias}; head.weight [K,D], .bias.
# nn.Linear computes y = x W^T + b; the patch conv is a p x p stride-p conv over CHW.

D, H, M, P, C, K, DEPTH = 32, 2, 128, 8, 3, 5, 2  # seqvis "mu" variant: width 32, 2 heads, MLP 128


def _timm_state_dict(seed, n_patches):
    rng = np.random.default_rng(seed)
    r = lambda *s, scale=0.2: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + n_patches, D), "patch_embed.proj.weight": r(D, C, P, P),
          "patch_embed.proj.bias": r(D), "norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(K, D),
          "head.bias": r(K)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D), b + "mlp.fc1.weight": r(M, D),
                   b + "mlp.fc1.bias": r(M), b + "mlp.fc2.weight": r(D, M), b + "mlp.fc2.bias": r(D)})
    return sd


def _reference_forward(sd, images, gelu):
    """timm's ViT forward in float64 numpy, written from the definition (class-token pooling)."""
    x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)  # NCHW
    b, _, hh, ww = x.shape
    gh, gw = hh // P, ww // P
    patches = x.reshape(b, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, C * P * P)
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    t = patches @ w["patch_embed.proj.weight"].reshape(D, -1).T + w["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(w["cls_token"], (b, 1, D)), t], axis=1) + w["pos_embed"]

    def ln(z, name):
        mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * w[name + ".weight"] + w[name + ".bias"]

    for i in range(DEPTH):
        p = f"blocks.{i}."
        qkv = ln(t, p + "norm1") @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]  # [b, T, 3D]
        q, k, v = (qkv[..., j * D:(j + 1) * D].reshape(b, -1, H, D // H).transpose(0, 2, 1, 3) for j in range(3))
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // H)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, D)
        t = t + o @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = gelu(ln(t, p + "norm2") @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        t = t + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    return ln(t, "norm")[:, 0] @ w["head.weight"].T + w["head.bias"]


def gelu_tanh(z):  # seqvis / flax nn.gelu default (approximate=True), as the official JAX ViT
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def gelu_exact(z):  # torch.nn.GELU() default, what timm computes
    from scipy.special import erf

    return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def _mu_template(image=16, **kw):
    model, params, _ = _tiny(seed=9, image=image, num_classes=K, depth=DEPTH, **kw)
    return model, params


def test_timm_safetensors_logits_match_numpy_reference(tmp_path):
    sd = _timm_state_dict(0, n_patches=4)
    path = str(tmp_path / "model.safetensors")
    timm_io.write_safetensors(path, sd, {"format": "pt"})
    model, template = _mu_template()
    params, report = pretrained.load_pretrained(path, template, return_report=True)
    assert report.fresh == [] and report.unused == [] and report.reset == []
    x = np.random.default_rng(1).normal(size=(3, 16, 16, C)).astype(np.float32)
    logits = _logits(model, params, x)
    ref = _reference_forward(sd, x, gelu_tanh)
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-5)  # same function, float32 vs float64
    # qkv_bias=False models store no qkv bias: zero biases, same function.
    nobias = {k: (np.zeros_like(v) if k.endswith("attn.qkv.bias") else v) for k, v in sd.items()}
    timm_io.write_safetensors(path, {k: v for k, v in sd.items() if not k.endswith("attn.qkv.bias")})
    params_nb, report_nb = pretrained.load_pretrained(path, template, return_report=True)
    assert report_nb.fresh == [] and report_nb.unused == []
    np.testing.assert_allclose(_logits(model, params_nb, x), _reference_forward(nobias, x, gelu_tanh),
                               atol=2e-5, rtol=1e-5)
    # Against timm's own exact-erf GELU the difference is small but not zero (README: measured).
    pytest.importorskip("scipy")
    diff = np.abs(logits - _reference_forward(sd, x, gelu_exact)).max()
    assert 1e-6 < diff < 1e-2, diff


def test_timm_export_import_round_trip_is_bit_exact(tmp_path):
    for kw in ({}, {"scan_layers": True}, {"representation_size": 16}, {"pool": "gap"}):
        _, src, _ = _tiny(seed=3, **kw)
        path = str(tmp_path / "export.safetensors")
        sd = timm_io.export_timm(src, path)
        assert sd["blocks.1.attn.qkv.weight"].shape == (3 * 32, 32) and sd["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
        assert ("cls_token" in sd) == (kw.get("pool") != "gap")
        _, template, _ = _tiny(seed=0, **kw)
        params, report = pretrained.load_pretrained(path, template, return_report=True)
        assert report.fresh == [] and report.unused == []
        _assert_same(params, src)


def test_timm_reference_agrees_with_exported_seqvis_model(tmp_path):
    """seqvis -> timm export computes the same logits in the (timm-layout) numpy reference."""
    model, src, x = _tiny(seed=4)
    sd = timm_io.seqvis_to_timm(src)
    np.testing.assert_allclose(_logits(model, src, x), _reference_forward(sd, x, gelu_tanh),
                               atol=2e-5, rtol=1e-5)


def test_timm_unsupported_keys_and_torch_files(tmp_path):
    sd = _timm_state_dict(0, n_patches=4)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    path = str(tmp_path / "gap_fcnorm.safetensors")
    timm_io.write_safetensors(path, sd)
    _, template = _mu_template()
    with pytest.raises(ValueError, match="fc_norm") as e:
        pretrained.load_pretrained(path, template)
    assert "Transformer/encoder_norm/scale" in str(e.value)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"\x80\x02}q\x00.")  # an (empty) pickle
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs torch, which is not installed.*safetensors"):
            pretrained.load_pretrained(str(pth), template)


def test_safetensors_files_interoperate_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    ours = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
            "c": np.ones((2, 2, 1), np.float16)}
    timm_io.write_safetensors(str(tmp_path / "ours.safetensors"), ours, {"format": "pt"})
    back = st.load_file(str(tmp_path / "ours.safetensors"))
    st.save_file(ours, str(tmp_path / "theirs.safetensors"))
    mine = timm_io.read_safetensors(str(tmp_path / "theirs.safetensors"))
    for k, v in ours.items():
        np.testing.assert_array_equal(back[k], v)
        np.testing.assert_array_equal(mine[k], v)
        assert mine[k].dtype == v.dtype
