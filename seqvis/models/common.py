"""Small helpers shared by the models: lengths -> validity masks and parameter counting
without allocating memory."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np



def lengths_to_valid(lengths: jax.Array, max_length: int) -> jax.Array:
    """Per-example lengths ``[batch]`` -> validity ``[batch, max_length]`` (True for t < length)."""
    return jnp.arange(max_length)[None, :] < jnp.asarray(lengths)[:, None]


def num_params(tree: Any) -> int:
    """Total number of elements in a pytree of arrays or ``jax.ShapeDtypeStruct``s."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def abstract_variables(model: nn.Module, *input_shapes: tuple[int, ...], dtype=jnp.float32, **kwargs) -> Any:
    """The variables ``model.init`` would create, as shapes only (``jax.eval_shape``: no memory, no compile)."""
    inputs = [jax.ShapeDtypeStruct(s, dtype) for s in input_shapes]
    return jax.eval_shape(lambda *xs: model.init(jax.random.PRNGKey(0), *xs, **kwargs), *inputs)


def count_params(model: nn.Module, *input_shapes: tuple[int, ...], **kwargs) -> int:
    """Number of trainable parameters (the ``params`` collection) for the given input shapes."""
    return num_params(abstract_variables(model, *input_shapes, **kwargs)["params"])
