"""Branching a run off a saved step of another run: ``config.branch_from = {workdir, step}``.

A new workdir (no checkpoint of its own yet) whose config sets ``branch_from.workdir`` starts from the
checkpoint at ``branch_from.step`` = s of that workdir: the whole train state (parameters, optimiser state,
model state such as BatchNorm statistics, the rng and the step counter) and its data position, so from
step s on it sees the batches the other run saw. It then trains to its own ``total_steps`` with its own
schedule, e.g. a linear cooldown (``config.schedule.cooldown_*``): a budget point of Zhai et al. 2022 that
costs only its cooldown. Once it has checkpoints of its own it is an ordinary workdir: it resumes from
them, and ``branch_from`` is only compared (a workdir cannot change the run it branched from).

The guarantee: a branch from step s of run A ends with the parameters, bit for bit, of a run trained in one
go with the branch's config, as long as A's learning rate before s is the branch's (checked, below) and the
two configs differ only in fields that act after s (total_steps, the cooldown, checkpointing, logging).

Refused before anything is written or compiled, each with the fix:

- ``branch_from.workdir`` does not exist or holds no checkpoints;
- no checkpoint at step s (the steps there are listed; ``config.checkpoint_steps`` makes a run keep them);
- the config changes what the checkpoint holds (task, model, classes, image shape, the optimiser-state
  fields of seqvis.train.checkpoint) or the data stream (batch size, seed, data; allowed with
  ``config.resume=allow_data_change``, and recorded);
- ``total_steps`` <= s, or ``init_from`` set as well;
- the learning rate at some step before s differs from the one the other run trained with (e.g. a cosine
  schedule without ``schedule.horizon_steps``, whose shape depends on the run's length): the first such
  step and both rates are named.

Recorded: the workdir's config.json holds ``branch_from``; results.json has ``branch_from`` = ``{workdir
(absolute), step}``; its ``train_seconds`` include the other run's time up to s (the cost of the whole
budget), and its metrics.jsonl starts after s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from seqvis.data import pipeline
from seqvis.errors import CheckpointError, ConfigError
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train import optim


@dataclasses.dataclass
class Branch:
    workdir: str  # absolute
    step: int
    saved_config: dict  # the other run's config, as saved with that step
    saved_meta: dict
    data_changes: list[str]  # data-stream differences allowed by config.resume=allow_data_change


def check_config(config: Any) -> None:
    """Field checks of ``config.checkpoint_steps`` and ``config.branch_from`` (no file is read)."""
    steps = config.get("checkpoint_steps", ()) or ()
    if isinstance(steps, (int, str)) or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in steps):
        raise ConfigError(f"config.checkpoint_steps={steps!r} must be a list of steps > 0, e.g. "
                          "--config.checkpoint_steps='(1000, 4000)'.")
    b = config.get("branch_from", None) or {}
    if b.get("workdir"):
        step = b.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise ConfigError(f"config.branch_from.step={step!r} must be a step > 0 saved in "
                              f"{b['workdir']}/checkpoints.")
        if config.get("init_from"):
            raise ConfigError(f"config.branch_from.workdir and config.init_from={config.init_from!r} are both set; "
                              "a branch starts from the other run's whole train state: unset init_from.")


def check(config: Any, config_dict: dict, *, process_count: int, allow_data_change: bool) -> Branch | None:
    """The branch point of a config, checked against the other run's checkpoint (reads only its JSON and,
    for a duration in epochs, the dataset's size). None when ``config.branch_from`` is not set. Raises
    ConfigError / CheckpointError as listed above."""
    point = ckpt_lib.branch_point(config_dict)
    if point is None:
        return None
    workdir, step = point["workdir"], point["step"]
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        what = "does not exist" if not os.path.isdir(workdir) else "holds no checkpoints/ directory"
        raise ConfigError(f"config.branch_from.workdir={workdir} {what}; name the workdir of the run to branch "
                          "from (train it first).")
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True, async_save=False)
    try:
        steps = ckpt.steps()
        if step not in steps:
            raise ConfigError(
                f"config.branch_from.step={step}: {directory} holds no checkpoint at that step; its steps are "
                f"{steps or 'none'}. Branch from one of those, or re-train that run with the step in "
                f"--config.checkpoint_steps (steps listed there are saved and never deleted by keep_checkpoints).")
        try:
            saved, meta = ckpt.read_json(step, "config"), ckpt.read_json(step, "meta")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"The checkpoint at step {step} in {directory} cannot be read "
                                  f"({type(e).__name__}: {str(e)[:300]}); branch from another step.") from e
    finally:
        ckpt.close(raise_errors=False)
    # The other run may itself be a branch: its own branch_from is not this config's business.
    current = {**config_dict, "branch_from": saved.get("branch_from")}
    structural, stream = ckpt_lib.resume_problems(saved, current, meta, process_count)
    if structural:
        raise CheckpointError(
            f"Cannot branch from step {step} of {workdir}: the config changes what its checkpoint holds (each line "
            "names the value that run was trained with):\n  " + "\n  ".join(structural) +
            "\nUse the model and optimiser fields of that run (its config.json). Nothing was written.")
    if stream and not allow_data_change:
        raise CheckpointError(
            f"Cannot branch exactly from step {step} of {workdir}: the config changes the data stream, so the branch "
            "would not see the batches that run sees:\n  " + "\n  ".join(stream) +
            f"\nTo branch with the new values anyway, add --config.resume={ckpt_lib.ALLOW_DATA_CHANGE} (recorded). "
            "Nothing was written.")
    total = pipeline.num_steps(config)
    if total <= step:
        raise ConfigError(f"config.total_steps={total} must be greater than config.branch_from.step={step}: the "
                          "branch trains from that step to its total_steps.")
    schedule = optim.make_schedule(config.schedule, total)
    other = optim.make_schedule(ml_collections.ConfigDict(saved["schedule"]), pipeline.num_steps(saved, config.data))
    diff = optim.first_difference(other, schedule, step)
    if diff is not None:
        t, a, b = diff
        raise ConfigError(
            f"config.schedule: before the branch step {step} the learning rate must be the one {workdir} trained "
            f"with, but at step {t} it was {a:.6g} there and is {b:.6g} here. A cosine or linear schedule depends "
            "on the run's length unless config.schedule.horizon_steps is set (in both runs); otherwise keep "
            "base_lr, warmup and the schedule's fields of that run, and start the cooldown at or after step "
            f"{step}.")
    return Branch(workdir=workdir, step=step, saved_config=saved, saved_meta=meta, data_changes=list(stream))


def restore(branch: Branch, target: Any) -> tuple[Any, dict]:
    """``(state, meta)`` at the branch point, restored into ``target`` (the driver's restore target)."""
    s = branch.step
    ckpt = ckpt_lib.Checkpointer(branch.workdir, read_only=True, async_save=False)
    try:
        state, meta = ckpt.restore_step(s, target)
    finally:
        ckpt.close(raise_errors=False)
    meta = dict(meta)
    if branch.data_changes:
        meta["data_changes"] = list(meta.get("data_changes", [])) + [{"step": s, "changes": branch.data_changes,
                                                                      "branch_from": branch.workdir}]
    return state, meta
