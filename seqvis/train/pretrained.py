"""Start from pretrained parameters (``config.init_from``): fine-tuning.

Sources: a seqvis workdir (its newest checkpoint), one checkpoint step directory, or a
``.npz`` in the published ViT layout (keys like ``Transformer/encoderblock_0/...``,
which seqvis' parameter names follow). The loaded tree is merged into the freshly
initialised parameters:

- same path and shape: taken from the checkpoint;
- ``pos_embedding`` of another grid: resampled (:func:`seqvis.models.vit.resample_posemb`);
- the classifier ``head`` of another size: kept at its fresh (zero) init;
- a scanned model loading an unrolled checkpoint (or the reverse): layers restacked.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)


def _read(path: str) -> dict:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            flat = {tuple(k.split("/")): z[k] for k in z.files}
        return traverse_util.unflatten_dict(flat)
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if steps:
        path = os.path.join(path, str(max(steps)))
    state_dir = os.path.join(path, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(
            f"config.init_from={path!r}: no checkpoint found (expected a seqvis workdir, a "
            "checkpoint step directory containing 'state/', or a .npz file).")
    state = ocp.StandardCheckpointer().restore(state_dir)
    return state["params"]


def _restack(loaded: dict, template: dict) -> dict:
    """Convert encoder layer layout (scanned <-> unrolled) to match the template."""
    from seqvis.models import transformer as tr

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


def merge_pretrained(template: Any, loaded: dict) -> Any:
    """Fresh ``template`` params with every compatible leaf replaced by the loaded one."""
    from seqvis.models import vit

    loaded = _restack(loaded, template)
    flat_t = traverse_util.flatten_dict(template)
    flat_l = traverse_util.flatten_dict(loaded)
    out, taken, fresh = {}, 0, []
    for path, value in flat_t.items():
        src = flat_l.get(path)
        name = "/".join(path)
        if src is None:
            fresh.append(name)
            out[path] = value
        elif tuple(src.shape) == tuple(value.shape):
            out[path] = np.asarray(src, dtype=value.dtype)
            taken += 1
        elif path[-1] == "pos_embedding":
            n_new = value.shape[1]
            prefix = 0 if math.isqrt(n_new) ** 2 == n_new else 1
            g = math.isqrt(n_new - prefix)
            out[path] = np.asarray(vit.resample_posemb(src, g, num_prefix_tokens=prefix), value.dtype)
            log.info("Resampled %s from %s to %s", name, src.shape, value.shape)
            taken += 1
        elif path[0] in ("head",):
            fresh.append(name)
            out[path] = value
        else:
            raise ValueError(
                f"config.init_from: parameter {name} has shape {tuple(src.shape)} in the checkpoint but "
                f"{tuple(value.shape)} in the model; use the same model variant as the checkpoint.")
    log.info("init_from: %d tensors loaded, %d kept fresh (%s)", taken, len(fresh), ", ".join(fresh[:8]))
    if taken == 0:
        raise ValueError("config.init_from: no parameter of the checkpoint matches the model; wrong file?")
    return traverse_util.unflatten_dict(out)


def load_pretrained(path: str, template: Any) -> Any:
    return merge_pretrained(template, _read(path))
