"""timm ViT weights in and out: state-dict key mapping and a numpy ``.safetensors`` reader/writer.

timm (``timm.models.vision_transformer.VisionTransformer``) stores a ViT as a flat PyTorch
state dict. The names, shapes (PyTorch layout) and their seqvis counterparts (D width,
H heads, d = D/H, M MLP width, p patch size, C input channels, K classes, N patches)::

    cls_token                  [1, 1, D]          cls                                [1, 1, D]
    pos_embed                  [1, 1+N, D]        Transformer/posembed_input/pos_embedding
                               ([1, N, D] for models without class token or with no_embed_class;
                               the class token then gets no position embedding, i.e. zeros here)
    patch_embed.proj.weight    [D, C, p, p]       embedding/kernel   [p, p, C, D]   (transpose 2,3,1,0)
    patch_embed.proj.bias      [D]                embedding/bias
    blocks.i.norm1.{weight,bias}                  Transformer/encoderblock_i/LayerNorm_0/{scale,bias}
    blocks.i.attn.qkv.weight   [3D, D]            .../MultiHeadDotProductAttention_1/{query,key,value}/kernel
                               rows [q; k; v], each head-major (h, d)       [D, H, d] each
    blocks.i.attn.qkv.bias     [3D]               .../{query,key,value}/bias  [H, d] each
    blocks.i.attn.proj.weight  [D, D]             .../out/kernel [H, d, D]  (= weight.T reshaped)
    blocks.i.attn.proj.bias    [D]                .../out/bias
    blocks.i.norm2.{weight,bias}                  .../LayerNorm_2/{scale,bias}
    blocks.i.mlp.fc1.{weight [M, D], bias}        .../MlpBlock_3/Dense_0/{kernel [D, M], bias}
    blocks.i.mlp.fc2.{weight [D, M], bias}        .../MlpBlock_3/Dense_1/{kernel [M, D], bias}
    norm.{weight,bias}                            Transformer/encoder_norm/{scale,bias}
    pre_logits.fc.{weight,bias}                   pre_logits/{kernel,bias}  (older timm, representation_size)
    head.{weight [K, D], bias}                    head/{kernel [D, K], bias}

Both use LayerNorm epsilon 1e-6. The one numerical difference: timm's MLP uses the exact
(erf) GELU and seqvis the tanh approximation (as the official JAX ViT), so logits of
imported weights differ slightly from timm's (measured in ``tests/test_pretrained.py``).
Keys with no seqvis counterpart (``reg_token``, ``fc_norm``, layer scale ``ls1/ls2``,
``q_norm/k_norm``, ``norm_pre``, a hybrid ``patch_embed.backbone``, ``attn_pool``) are not
mapped: they are reported as unused by :func:`seqvis.interop.pretrained.load_pretrained`.

The ``.safetensors`` format (an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw little-endian bytes) is read and
written here with numpy alone; torch is needed only for ``.pth``/``.bin`` files.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from seqvis.models import transformer as tr

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# ============================================================================ safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (bfloat16 is widened to float32)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a .safetensors file (shorter than its 8-byte header length).")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8:
            raise ValueError(f"{path} is not a .safetensors file (header length {n} > file size {size}); "
                             "is it a PyTorch .pth/.bin pickle renamed to .safetensors?")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path} is not a .safetensors file (its header is not JSON: {e}).") from None
        data = f.read()
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    need = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if need > len(data):
        raise ValueError(f"{path} is truncated: its header describes {need} bytes of tensor data but the file holds "
                         f"{len(data)} ({size} bytes in all). Download or copy it again.")
    out = {}
    for name, info in tensors.items():
        begin, end = info["data_offsets"]
        buf = data[begin:end]
        if info["dtype"] == "BF16":  # bfloat16 = the upper half of a float32
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = np.frombuffer(buf, _DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which seqvis cannot read.")
        if arr.size != math.prod(info["shape"]):
            raise ValueError(f"{path}: tensor {name!r} has {arr.size} values for its shape {info['shape']}; the "
                             "file is damaged. Download or copy it again.")
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write numpy arrays as a ``.safetensors`` file (readable by ``safetensors.torch.load_file``)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16 (what jax uses)
            dtype, b = "BF16", a.view(np.uint16).astype("<u2").tobytes()
        elif a.dtype in _NAMES:
            dtype, b = _NAMES[a.dtype], a.tobytes()
        else:
            raise ValueError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors.")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A PyTorch ``.pth``/``.bin`` state dict as numpy arrays (needs torch)."""
    try:
        import torch  # optional dependency, deferred on purpose: only .pth/.bin files need it
    except ImportError:
        raise ValueError(
            f"{path} is a PyTorch pickle, and reading it needs torch, which is not installed. Install "
            "torch, or convert the file once to .safetensors (safetensors.torch.save_file(state_dict, "
            "'model.safetensors')) and point config.init_from at that.") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v.detach().float().numpy() if v.dtype == torch.bfloat16
            else v.detach().numpy() for k, v in sd.items() if hasattr(v, "detach")}


# ============================================================================ key mapping

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LN = {"weight": "scale", "bias": "bias"}


def is_timm_vit(state_dict: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in state_dict or any(k.startswith("blocks.0.attn") for k in state_dict)


def timm_to_seqvis(state_dict: Mapping[str, np.ndarray], num_heads: int) -> tuple[dict, list[str]]:
    """A timm ViT state dict -> (seqvis parameter tree in the unrolled layout, timm keys not mapped).

    ``num_heads`` is needed to split the fused qkv projection into heads (timm does not store it).
    Models built with ``qkv_bias=False`` get zero query/key/value biases (the same function).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for name, w in state_dict.items():
        w = np.asarray(w)
        m = _BLOCK.match(name)
        if name == "cls_token":
            flat[("cls",)] = w
        elif name == "pos_embed":
            flat[("Transformer", "posembed_input", "pos_embedding")] = w
        elif name == "patch_embed.proj.weight":
            flat[("embedding", "kernel")] = w.transpose(2, 3, 1, 0)
        elif name == "patch_embed.proj.bias":
            flat[("embedding", "bias")] = w
        elif name in ("norm.weight", "norm.bias"):
            flat[("Transformer", "encoder_norm", _LN[name.split(".")[1]])] = w
        elif name in ("head.weight", "pre_logits.fc.weight"):
            flat[(name.split(".")[0], "kernel")] = w.T
        elif name in ("head.bias", "pre_logits.fc.bias"):
            flat[(name.split(".")[0], "bias")] = w
        elif m and _map_block(flat, ("Transformer", f"encoderblock_{m.group(1)}"), m.group(2), w, num_heads):
            pass
        else:
            unused.append(name)
    for i in sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))}):
        mha = ("Transformer", f"encoderblock_{i}", "MultiHeadDotProductAttention_1")
        if f"blocks.{i}.attn.qkv.weight" in state_dict and f"blocks.{i}.attn.qkv.bias" not in state_dict:
            for part in ("query", "key", "value"):  # qkv_bias=False: a zero bias computes the same
                kernel = flat[mha + (part, "kernel")]
                flat[mha + (part, "bias")] = np.zeros(kernel.shape[1:], kernel.dtype)
    return traverse_util.unflatten_dict(flat), unused


def _map_block(flat: dict, prefix: tuple, rest: str, w: np.ndarray, num_heads: int) -> bool:
    mha = prefix + ("MultiHeadDotProductAttention_1",)
    simple = {"norm1": ("LayerNorm_0",), "norm2": ("LayerNorm_2",),
              "mlp.fc1": ("MlpBlock_3", "Dense_0"), "mlp.fc2": ("MlpBlock_3", "Dense_1")}
    module, _, leaf = rest.rpartition(".")
    if module in ("norm1", "norm2"):
        flat[prefix + simple[module] + (_LN[leaf],)] = w
    elif module in ("mlp.fc1", "mlp.fc2"):
        flat[prefix + simple[module] + ("kernel" if leaf == "weight" else "bias",)] = w.T if leaf == "weight" else w
    elif module == "attn.qkv":
        d_model = w.shape[-1] if leaf == "weight" else w.shape[0] // 3
        hd = d_model // num_heads
        for i, part in enumerate(("query", "key", "value")):
            chunk = w[i * d_model:(i + 1) * d_model]
            flat[mha + (part, "kernel" if leaf == "weight" else "bias")] = (
                chunk.T.reshape(-1, num_heads, hd) if leaf == "weight" else chunk.reshape(num_heads, hd))
    elif module == "attn.proj":
        flat[mha + ("out", "kernel" if leaf == "weight" else "bias")] = (
            w.T.reshape(num_heads, -1, w.shape[0]) if leaf == "weight" else w)
    else:
        return False
    return True


def seqvis_to_timm(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A seqvis ViT parameter tree (scanned or unrolled) -> timm state dict (numpy, PyTorch layout).

    Load it into ``timm.create_model('vit_...', num_classes=K, global_pool='token')`` (a
    class-token model) or, for ``pool='gap'``, ``global_pool='avg', class_token=False,
    fc_norm=False``; timm's MLP then uses the exact GELU (see the module docstring).
    """
    params = jax_to_numpy(params)
    if "ResNet" in params:
        raise ValueError("timm export covers plain ViTs; a hybrid's ResNet trunk (timm's ResNetV2 backbone "
                         "naming) is not mapped. Export it to the official .npz layout instead "
                         "(seqvis.interop.pretrained.to_official_layout).")
    if "MAPHead_0" in params:
        raise ValueError("timm export covers class-token and GAP ViTs; a MAP head (pool='map') is not mapped to "
                         "timm's attn_pool. Export it to the .npz layout instead "
                         "(seqvis.interop.pretrained.to_official_layout keeps big_vision's MAPHead_0 names).")
    enc = dict(params["Transformer"])
    if "encoderblock" in enc:
        enc = tr.unstack_layer_params(enc)
    sd: dict[str, np.ndarray] = {}
    if "cls" in params:
        sd["cls_token"] = params["cls"]
    if "posembed_input" in enc:
        sd["pos_embed"] = enc["posembed_input"]["pos_embedding"]
    sd["patch_embed.proj.weight"] = params["embedding"]["kernel"].transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = params["embedding"]["bias"]
    n = sum(1 for k in enc if k.startswith("encoderblock_"))
    for i in range(n):
        b, t = enc[f"encoderblock_{i}"], f"blocks.{i}."
        mha = b["MultiHeadDotProductAttention_1"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[t + name + ".weight"], sd[t + name + ".bias"] = b[ln]["scale"], b[ln]["bias"]
        d = mha["query"]["kernel"].shape[0]
        sd[t + "attn.qkv.weight"] = np.concatenate(
            [mha[p]["kernel"].reshape(d, -1).T for p in ("query", "key", "value")], axis=0)
        sd[t + "attn.qkv.bias"] = np.concatenate([mha[p]["bias"].reshape(-1) for p in ("query", "key", "value")])
        out = mha["out"]["kernel"]
        sd[t + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
        sd[t + "attn.proj.bias"] = mha["out"]["bias"]
        for j, name in ((0, "fc1"), (1, "fc2")):
            dense = b["MlpBlock_3"][f"Dense_{j}"]
            sd[t + f"mlp.{name}.weight"], sd[t + f"mlp.{name}.bias"] = dense["kernel"].T, dense["bias"]
    sd["norm.weight"], sd["norm.bias"] = enc["encoder_norm"]["scale"], enc["encoder_norm"]["bias"]
    for name, timm_name in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if name in params:
            sd[timm_name + ".weight"], sd[timm_name + ".bias"] = params[name]["kernel"].T, params[name]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def export_timm(params: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
    """Write :func:`seqvis_to_timm` of ``params`` to ``path`` (``.safetensors``); returns the state dict."""
    sd = seqvis_to_timm(params)
    write_safetensors(path, sd, {"format": "pt", "source": "seqvis"})
    return sd


def jax_to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
