"""Start from pretrained parameters (``config.init_from``): fine-tuning.

Sources (by file name):

- a seqvis workdir (its newest checkpoint) or one checkpoint step directory;
- ``.npz`` in a published JAX ViT layout: google-research/vision_transformer (keys such as
  ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``, which seqvis'
  names follow; R50/R26 hybrids keep their ResNet at the top level: ``conv_root``,
  ``gn_root``, ``block1/unit1/conv1`` ...) or big_vision (``params/`` prefix, linen names
  ``LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0``, a top-level
  ``pos_embedding`` without a class-token entry, optionally a scanned ``encoderblock``, and
  for ``pool_type='map'`` models a ``MAPHead_0`` that loads into ``pool='map'``; the early
  layout with the MAP head's modules at the top level is regrouped under ``MAPHead_0``);
- a timm ViT state dict: ``.safetensors`` (numpy only) or ``.pth``/``.bin`` (needs torch);
  see :mod:`seqvis.interop.timm_io`.

Everything is first brought to seqvis' layout, then merged into the freshly initialised
parameters (the template):

- same path and shape: taken from the checkpoint (GroupNorm params stored as ``[1,1,1,C]``
  by old checkpoints are squeezed);
- ``pos_embedding`` of another grid: resampled (:func:`seqvis.models.vit.resample_posemb`,
  linear zoom as the official code); a checkpoint without a class-token entry (big_vision,
  timm ``no_embed_class``) gets a zero one, which computes exactly what the source computed;
- the classifier ``head`` of another size: kept at its fresh (zero) init (the fine-tuning case);
- a scanned model loading an unrolled checkpoint (or the reverse): layers restacked.

A :class:`LoadReport` lists what happened to every key; checkpoint keys not used (e.g. a
``pre_logits`` layer dropped for fine-tuning, as the official code does) are logged, and
model parameters left at their init (other than the head) are an error unless
``allow_partial`` (``config.init_from_allow_partial``) is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from seqvis.models import transformer as tr
from seqvis.models import vit
from seqvis.train import checkpoint as ckpt_lib
from seqvis.interop import timm_io

log = logging.getLogger(__name__)

_GN = ("gn_root", "gn_proj", "gn1", "gn2", "gn3")
_RESNET_TOP = ("conv_root", "gn_root")
_PREFIXES = ("params/img/", "params/", "opt/target/")
_MAP_INLINED = ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")
_LINEN_BLOCK = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_pretrained` did with every key (``/``-joined seqvis paths)."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    resampled: list[str] = dataclasses.field(default_factory=list)  # also counted in loaded
    reset: list[str] = dataclasses.field(default_factory=list)  # head params kept at init
    fresh: list[str] = dataclasses.field(default_factory=list)  # other model params not in the checkpoint
    unused: list[str] = dataclasses.field(default_factory=list)  # checkpoint keys no parameter took

    def summary(self) -> str:
        def names(xs):
            return ", ".join(xs) if xs else "none"

        return (f"init_from={self.source}: {len(self.loaded)} tensors loaded ({len(self.resampled)} resampled: "
                f"{names(self.resampled)}); head kept at init: {names(self.reset)}; model parameters not in "
                f"the checkpoint: {names(self.fresh)}; checkpoint keys not used: {names(self.unused)}")


# ============================================================================ reading


def _read_npz(path: str) -> dict:
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile):
        with open(path, "rb") as f:
            head = f.read(64)
        kind = "a text file" if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "not a zip archive"
        raise ValueError(
            f"config.init_from={path!r} is not a numpy .npz archive of weights ({kind}). "
            "Point config.init_from at the downloaded .npz weights "
            "(e.g. ViT-B_16.npz), a .safetensors file, or a seqvis workdir; if this is a partial or "
            "failed download (an HTML/XML error page), download it again.") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"config.init_from={path!r} holds a single array (.npy), not a .npz archive of named "
                         "weights; point it at the checkpoint .npz.")
    with z:
        flat = {tuple(k.split("/")): z[k] for k in z.files}
    return traverse_util.unflatten_dict(flat)


def _read_seqvis(path: str) -> dict:
    # Through the trainer's Checkpointer, read only: the newest usable step (unreadable ones skipped),
    # restored as host numpy arrays from the checkpoint's own metadata, so a checkpoint saved sharded
    # (fsdp) on another device count reads here too.
    read = ckpt_lib.read_checkpoint(path)
    if read is None:
        raise FileNotFoundError(
            f"config.init_from={os.path.abspath(path)!r}: no checkpoint found (expected a seqvis workdir, a "
            "checkpoint step directory containing 'state/', a .npz, .safetensors, .pth or .bin file).")
    state, _ = read
    return state["params"]


def read_tree(path: str) -> dict:
    """The parameter tree stored at ``path`` (seqvis checkpoint or .npz), before layout conversion."""
    if path.endswith(".npz"):
        return _read_npz(path)
    return _read_seqvis(path)


def read_params(path: str, template: Any | None = None) -> tuple[dict, list[str]]:
    """Read ``path`` in seqvis' layout: ``(tree, source keys that have no seqvis counterpart)``.

    ``template`` (the model's params) gives the number of heads a timm qkv is split into.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.init_from={path!r} does not exist.")
    if path.endswith((".safetensors", ".pth", ".bin", ".pt")):
        sd = timm_io.read_safetensors(path) if path.endswith(".safetensors") else timm_io.read_torch(path)
        if not timm_io.is_timm_vit(sd):
            raise ValueError(f"config.init_from={path!r} is not a timm ViT state dict (no 'patch_embed.proj.weight'"
                             f"; first keys: {sorted(sd)[:5]}).")
        heads = _num_heads(template)
        if heads is None:
            raise ValueError(f"config.init_from={path!r}: timm weights load into a ViT (config.model.name='vit').")
        return timm_io.timm_to_seqvis(sd, heads)
    tree = read_tree(path)
    return (normalize_layout(tree) if path.endswith(".npz") else tree), []


def _num_heads(template: Any) -> int | None:
    for path, v in traverse_util.flatten_dict(dict(template or {})).items():
        if path[-2:] == ("query", "kernel"):
            return int(v.shape[-2])
    return None


# ============================================================================ layouts


def normalize_layout(tree: dict) -> dict:
    """Published JAX layouts (vision_transformer, big_vision) -> seqvis names (see module docstring)."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}
    for p in _PREFIXES:  # big_vision saves under params/ (image tower: params/img/), old trainers opt/target/
        if any(k.startswith(p) for k in flat) and not any(k.startswith(("Transformer/", "embedding/")) for k in flat):
            flat = {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}
            break
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    if "probe" in tree and "MAPHead_0" not in tree:  # big_vision's early MAP layout: head modules at the top
        tree["MAPHead_0"] = {k: tree.pop(k) for k in _MAP_INLINED if k in tree}
    # R+ViT hybrids: the ResNet trunk sits at the top level in the official checkpoints.
    if "embedding" in tree and any(k in tree for k in _RESNET_TOP) and "ResNet" not in tree:
        trunk = {k: tree.pop(k) for k in list(tree) if k in _RESNET_TOP or
                 (k.startswith("block") and k[5:].isdigit())}
        tree["ResNet"] = trunk
    enc = tree.get("Transformer")
    if isinstance(enc, dict):
        if "pos_embedding" in enc:  # big_vision before 2022 kept it in the encoder
            tree["pos_embedding"] = enc.pop("pos_embedding")
        if "encoderblock" in enc and "block" not in enc["encoderblock"]:  # big_vision scanned layout
            enc["encoderblock"] = {"block": enc["encoderblock"]}
        for name in list(enc):
            if name == "encoderblock":
                enc[name]["block"] = _rename_linen(enc[name]["block"])
            elif name.startswith("encoderblock_"):
                enc[name] = _rename_linen(enc[name])
    if "pos_embedding" in tree:  # big_vision: posemb at the top level
        tree.setdefault("Transformer", {}).setdefault("posembed_input", {})["pos_embedding"] = tree.pop("pos_embedding")
    return tree


def _rename_linen(block: dict) -> dict:
    if "MultiHeadDotProductAttention_0" not in block:
        return block
    return {_LINEN_BLOCK.get(k, k): v for k, v in block.items()}


def to_official_layout(params: Any) -> dict[str, np.ndarray]:
    """seqvis ViT params -> flat ``{key: array}`` in the vision_transformer ``.npz`` layout.

    Layers unrolled (``encoderblock_i``), a hybrid's ``ResNet/*`` moved to the top level.
    ``np.savez(path, **to_official_layout(params))`` writes a file the official code loads.
    Leaves are returned as given (arrays, or shapes from ``jax.eval_shape``).
    """
    params = dict(params)
    enc = dict(params.get("Transformer", {}))
    if "encoderblock" in enc:  # scanned: split the leading layer axis
        stacked = enc.pop("encoderblock")["block"]
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            enc[f"encoderblock_{i}"] = jax.tree.map(
                lambda a, i=i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if isinstance(a, jax.ShapeDtypeStruct)
                else a[i], stacked)
        params["Transformer"] = enc
    params.update(params.pop("ResNet", {}))
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _restack(loaded: dict, template: dict) -> dict:
    """Convert encoder layer layout (scanned <-> unrolled) to match the template."""
    out = dict(loaded)
    for key, sub in template.items():
        if not isinstance(sub, dict) or key not in loaded or not isinstance(loaded[key], dict):
            continue
        lsub = loaded[key]
        if "encoderblock" in sub and "encoderblock_0" in lsub:
            n = sum(1 for k in lsub if k.startswith("encoderblock_"))
            out[key] = tr.stack_layer_params(lsub, n)
        elif "encoderblock_0" in sub and "encoderblock" in lsub:
            out[key] = tr.unstack_layer_params(lsub)
        else:
            out[key] = _restack(lsub, sub)
    return out


# ============================================================================ merging


def _posemb(src: np.ndarray, value: Any, has_cls: bool) -> np.ndarray:
    """Checkpoint posemb -> the model's ``[1, P + gh*gw, D]`` (class-token entry, grid size)."""
    src = np.asarray(src)
    n_src = src.shape[1]
    src_prefix = 0 if math.isqrt(n_src) ** 2 == n_src else 1
    want_prefix = 1 if has_cls else 0
    if src_prefix < want_prefix:  # source added no posemb to its class token: a zero entry is the same
        src, src_prefix = np.concatenate([np.zeros_like(src[:, :1]), src], axis=1), 1
    elif src_prefix > want_prefix:
        src, src_prefix = src[:, 1:], 0
    n_grid = value.shape[1] - want_prefix
    g = math.isqrt(n_grid)
    if src.shape[1] - src_prefix != n_grid:
        if g * g != n_grid:
            raise ValueError(f"config.init_from: cannot resample position embeddings to a non-square grid of "
                             f"{n_grid} patches; use square images.")
        src = np.asarray(vit.resample_posemb(src, g, num_prefix_tokens=src_prefix))
    return src


def merge_pretrained(template: Any, loaded: dict, *, allow_partial: bool = False, source: str = "",
                     unused: tuple[str, ...] | list[str] = ()) -> tuple[Any, LoadReport]:
    """Fresh ``template`` params with every compatible leaf replaced by the loaded one, and the report."""
    loaded = _restack(loaded, template)
    flat_t = traverse_util.flatten_dict(dict(template))
    flat_l = traverse_util.flatten_dict(loaded)
    report = LoadReport(source=source, unused=list(unused))
    has_cls = ("cls",) in flat_t
    out, used = {}, set()
    for path, value in flat_t.items():
        src = flat_l.get(path)
        name = "/".join(path)
        if src is None:
            (report.reset if path[0] == "head" else report.fresh).append(name)
            out[path] = value
            continue
        used.add(path)
        src = np.asarray(src)
        if path[-1] == "pos_embedding":
            new = _posemb(src, value, has_cls)
            if new.shape != src.shape:
                report.resampled.append(name)
                log.info("Resampled %s from %s to %s", name, src.shape, new.shape)
            src = new
        elif src.shape != tuple(value.shape) and src.size == value.size and \
                tuple(d for d in src.shape if d != 1) == tuple(d for d in value.shape if d != 1):
            src = src.reshape(value.shape)  # old GroupNorm params [1, 1, 1, C]
        if tuple(src.shape) == tuple(value.shape):
            out[path] = np.asarray(src, dtype=value.dtype)
            report.loaded.append(name)
        elif path[0] == "head":
            report.reset.append(name)
            out[path] = value
        else:
            raise ValueError(
                f"config.init_from={source!r}: parameter {name} has shape {tuple(src.shape)} in the checkpoint "
                f"but {tuple(value.shape)} in the model; use the model variant of the checkpoint "
                "(width, depth, heads, MLP size, patch size and representation_size must match).")
    report.unused += sorted("/".join(p) for p in flat_l if p not in used)
    log.info("%s", report.summary())
    if not report.loaded:
        raise ValueError(f"config.init_from={source!r}: no parameter of the checkpoint matches the model; "
                         f"wrong file or model? {report.summary()}")
    if report.fresh and not allow_partial:
        hint = ""
        if any(k.startswith("MAPHead") for k in report.unused):
            hint = (" The checkpoint has a MAP (attention-pooling) head: set config.model.pool='map' (no class "
                    "token) to load it.")
        elif any(k.startswith("attn_pool") for k in report.unused):
            hint = " The timm model uses an attention-pooling head (attn_pool), which seqvis' timm reader does not map."
        elif any(k.startswith(("fc_norm", "reg_token")) or ".ls1." in k for k in report.unused):
            hint = " The timm model uses fc_norm / register tokens / layer scale, which seqvis' ViT does not have."
        raise ValueError(
            f"config.init_from={source!r}: {len(report.fresh)} model parameters are not in the checkpoint and "
            f"would stay at their random init: {', '.join(report.fresh)}. Checkpoint keys not used: "
            f"{', '.join(report.unused) or 'none'}.{hint} Use the model that matches the checkpoint (pool, "
            "representation_size, hybrid trunk), or set config.init_from_allow_partial=True to train the "
            "missing parameters from their init.")
    return traverse_util.unflatten_dict(out), report


def load_pretrained(path: str, template: Any, allow_partial: bool = False, return_report: bool = False):
    """``template`` (fresh params) with the weights of ``path``; see the module docstring.

    Returns the params, or ``(params, LoadReport)`` with ``return_report``.
    """
    loaded, unused = read_params(path, template)
    params, report = merge_pretrained(template, loaded, allow_partial=allow_partial, source=path, unused=unused)
    return (params, report) if return_report else params
