"""One precision policy for every model, set by ``config.precision``.

``"float32"`` (the default) computes everything in float32. ``"bfloat16"`` is mixed
precision in the usual TPU/GPU sense:

- matmuls and convolutions (dense layers, attention projections and products, patch
  embedding, ResNet convolutions, recurrent cells' input/recurrent products) take and
  produce bfloat16 activations (``dtype=bfloat16`` on every module);
- parameters stay float32 (``param_dtype=float32``), so gradients and the optimiser state
  (built from the parameters) are float32 too, and updates are applied in float32;
- normalisation statistics (LayerNorm, BatchNorm, GroupNorm: flax reduces in float32),
  the attention softmax (computed in float32 in :mod:`seqvis.models.attention`), recurrent
  cell carries (float32 state, see :mod:`seqvis.models.recurrent`), BatchNorm running
  averages, logits and the loss are float32.

Models are built by the tasks (``seqvis.tasks``: classification, captioning, video); each asks
:func:`compute_dtype` for the ``dtype`` to give its modules. Nothing here is
hardware-specific: on CPU bfloat16 is emulated (slower), on TPU and recent GPUs it halves
activation memory and runs the matrix units at full rate.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from seqvis.errors import ConfigError

POLICIES = {"float32": None, "bfloat16": jnp.bfloat16}


def precision_name(config: Any) -> str:
    """``config.precision`` checked ('float32' when absent)."""
    name = config.get("precision", "float32") or "float32"
    if name not in POLICIES:
        raise ConfigError(f"config.precision={name!r} is unknown; use 'float32' (the default) or 'bfloat16' "
                          "(bfloat16 compute, float32 parameters, optimiser state, statistics and loss), "
                          "e.g. --config.precision=bfloat16.")
    return name


def compute_dtype(config: Any):
    """The module ``dtype`` for ``config.precision``: None (float32, the modules' default) or bfloat16.

    A ``config.model.dtype`` set by hand must agree with the policy (one place decides)."""
    name = precision_name(config)
    model = config.get("model", None) or {}
    explicit = model.get("dtype", None) if hasattr(model, "get") else None
    if explicit not in (None, "", name) and not (explicit in ("float32",) and name == "float32"):
        raise ConfigError(f"config.model.dtype={explicit!r} disagrees with config.precision={name!r}; remove "
                          f"config.model.dtype and set --config.precision={explicit} instead.")
    return POLICIES[name]


def model_kwargs(config: Any) -> dict:
    """``{'dtype': ...}`` to pass to a model built from ``config`` (empty for float32, so
    float32 models are built exactly as before the policy existed)."""
    dtype = compute_dtype(config)
    return {} if dtype is None else {"dtype": dtype}
