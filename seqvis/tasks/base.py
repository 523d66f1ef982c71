"""Tasks: what a trainer needs to know about one kind of problem.

A task builds the model from ``config.model``, says what a dummy input looks like, and turns
a batch into per-example losses and metrics. The trainer does everything else (devices,
optimiser, masking, checkpoints, logging), so captioning and video are small tasks, not
forks of the trainer. Register a task with :func:`register_task`; the config picks it
with ``config.task``.

Per-example outputs let the trainer mask padded examples exactly: the reported loss is
``Σ_i mask_i · loss_i / Σ_i mask_i`` over every device.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


TASKS: dict[str, Callable[[Any], "Task"]] = {}
# Tasks that live in their own module, imported when a config asks for them.
TASK_MODULES = {"classification": "seqvis.tasks.classification", "captioning": "seqvis.tasks.captioning",
                "video": "seqvis.tasks.video"}


def register_task(name: str):
    def deco(cls):
        TASKS[name] = cls
        return cls

    return deco


def get_task(config: Any) -> "Task":
    name = config.get("task", "classification")
    if name not in TASKS and name in TASK_MODULES:
        importlib.import_module(TASK_MODULES[name])
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is unknown; valid tasks: {sorted(set(TASKS) | set(TASK_MODULES))}.")
    return TASKS[name](config)


class Task:
    """Interface. Batches are dicts of arrays with a leading per-device batch axis."""

    #: Variable collections other than params that the model keeps (e.g. 'batch_stats').
    mutable_collections: tuple[str, ...] = ()

    def __init__(self, config: Any):
        self.config = config
        self.model = self.build_model()

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        raise NotImplementedError

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> dict[str, Any]:
        raise NotImplementedError

    def losses(self, variables, batch, *, train: bool, rng: jax.Array | None):
        """-> (per-example loss [B], per-example metrics {name: [B]}, updated mutable collections)."""
        raise NotImplementedError

    def model_inputs(self, batch: dict[str, jax.Array]) -> tuple:
        """The positional inputs of the forward pass (used for FLOP counting)."""
        raise NotImplementedError

    # ---- optional hooks (defaults do nothing) ----

    def setup(self, workdir: str) -> None:
        """Called once before any data is read, on every process (e.g. build or load a vocabulary
        kept in ``workdir``, so that it is restored with the checkpoints)."""

    def pp_ops(self, train: bool) -> list[Callable[[dict], dict]]:
        """Extra tf.data ops (example dict -> example dict) run after ``config.data.pp_*``."""
        return []

    def final_evaluation(self, variables: dict, config: Any, workdir: str) -> dict[str, Any]:
        """Task-specific evaluation after training (host-side ``variables``: params and model
        state, one copy). Its dict is merged into ``results.json``."""
        return {}

    def check_batch(self, batch: dict) -> None:
        """Called on the first training batch (host arrays ``[devices, B, ...]``), before
        compiling: raise ValueError naming the field and the fix if the data cannot fit the
        config. The default checks integer ``label`` against ``self.num_classes`` when the
        task has one; soft ``labels`` must have ``num_classes`` columns."""
        k = getattr(self, "num_classes", None)
        if k is None:
            return
        label = batch.get("label")
        if label is not None and np.asarray(label).dtype.kind in "iu" and np.asarray(label).size:
            lo, hi = int(np.min(label)), int(np.max(label))
            if lo < 0 or hi >= k:
                name = self.config.data.get("name", "the data set")
                raise ValueError(
                    f"config.data.num_classes={k}, but the first training batch of {name} has labels from {lo} "
                    f"to {hi}: labels must lie in [0, {k}). Set --config.data.num_classes={max(hi + 1, k)} "
                    "(or the number of classes of the data set).")
        soft = batch.get("labels")
        if soft is not None and np.ndim(soft) >= 3 and np.shape(soft)[-1] != k:  # [devices, B, K]
            raise ValueError(f"config.data.num_classes={k}, but the soft labels of the first training batch have "
                             f"{np.shape(soft)[-1]} columns; set --config.data.num_classes={np.shape(soft)[-1]}.")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy; ``labels`` are ints ``[B]`` or soft labels ``[B, K]``."""
    if labels.ndim == logits.ndim:
        targets = labels.astype(jnp.float32)
    else:
        targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
