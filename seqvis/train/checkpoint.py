"""Checkpoints: orbax ``CheckpointManager`` under ``workdir/checkpoints``.

Each checkpoint holds three items: ``state`` (the train state as host arrays), ``meta``
(JSON: step, data position, examples seen, seed, process count, wall time so far) and
``config`` (JSON: the full experiment config). The batch at step s is a function of
(seed, s), so the step *is* the data position: a resumed run continues the same stream.

Restoring tries the newest checkpoint first and falls back to older ones when a
checkpoint cannot be read (a run killed mid-write, a corrupt file); nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Fields of the config that change the shapes of the saved state: resuming with other
# values would fail deep inside orbax, so they are compared first.
_STRUCTURAL = ("task", "model", "data.num_classes", "data.image_shape", "optimizer.name")


class CheckpointError(RuntimeError):
    pass


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta", "config"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, config: dict) -> None:
        """Save host arrays ``state`` at ``step`` (asynchronously; call :meth:`wait`)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(self, target: Any, config: dict) -> tuple[Any, dict] | None:
        """Newest readable checkpoint as ``(state, meta)``, or None if there is none.

        ``target`` is a pytree of host arrays with the expected structure. Raises
        :class:`CheckpointError` if checkpoints exist but none can be read, or if they were
        written by an incompatible config.
        """
        steps = self.steps()
        if not steps:
            return None
        errors = []
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), target)
        for step in reversed(steps):
            try:
                saved_cfg = self.manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))["config"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try an older one
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                log.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, e)
                continue
            self._check_compatible(saved_cfg, config)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                log.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, e)
                continue
            return out["state"], out["meta"]
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be read:\n  " + "\n  ".join(errors) +
            "\nNothing was deleted. Move that directory away (or use another --workdir) to start "
            "fresh, or delete the unreadable step directories to resume from an older one.")

    def _check_compatible(self, saved: dict, current: dict) -> None:
        diffs = [f"{k}: saved {json.dumps(_get(saved, k))} vs now {json.dumps(_get(current, k))}"
                 for k in _STRUCTURAL if _get(saved, k) != _get(current, k)]
        if diffs:
            raise CheckpointError(
                f"The checkpoints in {self.directory} were written by a different experiment:\n  "
                + "\n  ".join(diffs) +
                "\nUse a new --workdir for the new config, or restore the old config values to resume.")
