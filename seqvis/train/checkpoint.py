"""Checkpoints: orbax ``CheckpointManager`` under ``workdir/checkpoints``.

Each checkpoint holds three items: ``state`` (the train state as host arrays), ``meta``
(JSON: step, data position, examples seen, seed, process count, wall time so far) and
``config`` (JSON: the full experiment config). The batch at step s is a function of
(seed, s, batch size, process count, data config), so the step *is* the data position
as long as those are unchanged: :func:`resume_problems` compares them before anything
is restored or written.

What can go wrong on disk, and what happens:

- a run killed mid-write leaves ``<step>.orbax-checkpoint-tmp*``: an unfinished write,
  removed when the next run opens the directory (it never was a checkpoint);
- a step that cannot be read (corrupt file, truncated write on a full disk) is moved
  aside to ``workdir/checkpoints.unreadable/`` (renamed, never deleted) once an older
  step has been restored instead, so the re-trained step can be saved again;
- a save that fails (disk full...) stops training with one message; the failed step's
  unfinished directory is removed, earlier checkpoints are untouched.

Every restore goes through :class:`Checkpointer`: resuming (:meth:`Checkpointer.restore_latest`)
and reading a checkpoint as saved for evaluation or ``config.init_from`` (:func:`read_checkpoint`,
:func:`restore_variables`; :meth:`Checkpointer.read` skips unusable steps the same way, and
moves nothing).

Over 400 lines on purpose: the one place that writes and reads checkpoints, so the resume checks, the NaN
rule, moving unreadable steps aside and the failed-write cleanup sit next to the restore they protect.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from seqvis.errors import CheckpointError

log = logging.getLogger(__name__)

UNREADABLE_DIR = "checkpoints.unreadable"

# Fields of the config that change the shapes of the saved state.
_STRUCTURAL = ("task", "model", "data.num_classes", "data.image_shape", "optimizer.name")
# Fields that change the data stream: the batch at step s would not be the one an
# uninterrupted run sees. Compared unless config.resume == "allow_data_change".
# config.data.cache is not here: the in-memory and random-access sources give the same stream.
DATA_STREAM = ("batch_size", "seed", "data.name", "data.train_split", "data.pp_train", "data.shuffle_buffer",
               "data.mixup", "data.builder_kwargs", "data.num_frames", "data.random_access",
               "data.train_examples", "data.subset_seed")
ALLOW_DATA_CHANGE = "allow_data_change"


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _opt_structure(cfg: dict) -> dict:
    """The parts of config.optimizer that decide the optimiser state's tree structure and dtypes
    (see seqvis.train.optim.make_optimizer): clipping on/off; skip_decay on/off wherever a decay
    transform exists (its mask adds a node); for sgd momentum and weight decay on/off; the first
    moment's dtype where there is one; for adafactor_momentum which leaves are factored. Values such
    as the clip norm, the decay rate or the lr/wd multipliers can change freely."""
    opt = _get(cfg, "optimizer") or {}
    name = opt.get("name")
    out = {"optimizer.grad_clip_norm": "on" if opt.get("grad_clip_norm") else "off"}
    momentum = bool(opt.get("momentum", 0.9))
    if name == "sgd":
        out["optimizer.momentum"] = "on" if momentum else "off"
        out["optimizer.weight_decay"] = "on" if opt.get("weight_decay") else "off"
    elif name == "adafactor":
        out["optimizer.weight_decay"] = "on" if opt.get("weight_decay") else "off"
    if name in ("adamw", "adafactor_momentum") or (name in ("sgd", "adafactor") and opt.get("weight_decay")):
        out["optimizer.skip_decay"] = "on" if opt.get("skip_decay", ("bias",)) else "off"
    if name in ("adamw", "adafactor_momentum") or (name == "sgd" and momentum):
        out["optimizer.mu_dtype"] = opt.get("mu_dtype") or "float32"
    if name == "adafactor_momentum":
        out["optimizer.min_dim_size_to_factor"] = int(opt.get("min_dim_size_to_factor", 32))
    return out


def branch_point(cfg: dict) -> dict | None:
    """``{'workdir': absolute path, 'step': s}`` of ``config.branch_from``, or None when it is not set."""
    b = _get(cfg, "branch_from") or {}
    if not b.get("workdir"):
        return None
    return {"workdir": os.path.abspath(str(b["workdir"])), "step": int(b.get("step", 0) or 0)}


def _saved_value(saved: dict, field: str, structure: str) -> Any:
    """The saved value of an optimiser-structure field (a config without it: the value it implied)."""
    value = _get(saved, field)
    return structure if value is None and structure not in ("on", "off") else value


def _flag(field: str, value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"--config.{field}='{json.dumps(value)}'"
    return f"--config.{field}={value}"


def _unset_dropped(value: Any) -> Any:
    """A config value with its unset (None) fields left out: a field a newer config adds as "not set"
    changes nothing a checkpoint holds."""
    if isinstance(value, dict):
        return {k: _unset_dropped(v) for k, v in value.items() if v is not None}
    return value


def _structural_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for each field that changes the shapes of the saved state."""
    return [(k, _get(saved, k), _get(current, k)) for k in _STRUCTURAL
            if _unset_dropped(_get(saved, k)) != _unset_dropped(_get(current, k))]


def _leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix[:-1]: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def config_changes(saved: dict, current: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """``"config.FIELD: SAVED -> NOW"`` for every field whose value differs from the checkpoint's config
    (fields only one side sets count when they are set), leaving out the fields under ``skip``."""
    a, b = _leaves(_unset_dropped(saved)), _leaves(_unset_dropped(current))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in skip):
            out.append(f"config.{k}: {json.dumps(a.get(k)) if k in a else '(not set)'} -> "
                       f"{json.dumps(b.get(k)) if k in b else '(not set)'}")
    return out


def resume_problems(saved: dict, current: dict, saved_meta: dict | None, process_count: int,
                    ) -> tuple[list[str], list[str]]:
    """``(structural, data_stream)`` differences between the config a checkpoint was written
    with and the current one: one line per field, each saying the fix."""
    structural, stream = [], []
    for k, a, b in _structural_differences(saved, current):
        structural.append(f"config.{k}: saved {json.dumps(a)}, now {json.dumps(b)} (changes the shapes of the "
                          f"saved state). To resume: {_flag(k, a) if not isinstance(a, dict) else 'restore the saved values'}.")
    if _get(saved, "optimizer.name") == _get(current, "optimizer.name"):
        sa, sb = _opt_structure(saved), _opt_structure(current)
        for k in sa:
            if sa[k] != sb.get(k):
                structural.append(
                    f"config.{k}: saved {json.dumps(_get(saved, k))} ({k.split('.')[-1]} {sa[k]}), now "
                    f"{json.dumps(_get(current, k))} ({sb.get(k)}): this changes the structure of the optimiser state. "
                    f"To resume: {_flag(k, _saved_value(saved, k, sa[k]))}; to train with the new value, use a new "
                    "--workdir with --config.init_from=THIS_WORKDIR (parameters kept, fresh optimiser).")
    if branch_point(saved) != branch_point(current):
        a = branch_point(saved)
        fix = (f"--config.branch_from.workdir={a['workdir']} --config.branch_from.step={a['step']}" if a else
               "--config.branch_from.workdir=''")
        structural.append(f"config.branch_from: saved {json.dumps(a)}, now {json.dumps(branch_point(current))}: this workdir "
                          f"continues the run it was started as. To resume: {fix}; for another branch point use a "
                          "new --workdir.")
    for k in DATA_STREAM:
        a, b = _get(saved, k), _get(current, k)
        if a != b and not (a is None and k.startswith("data.") and k not in ("data.name", "data.pp_train")):
            stream.append(f"config.{k}: saved {json.dumps(a)}, now {json.dumps(b)}. To resume exactly: {_flag(k, a)}.")
    saved_pc = (saved_meta or {}).get("process_count")
    if saved_pc is not None and int(saved_pc) != int(process_count):
        # Stricter than needed for some runs, on purpose: a split read by index (in-memory or array_record)
        # gives the same global batches on any process count, but a split read sequentially (per-process
        # shards and shuffle seeds) or mixup (mixed within each process's share) does not, and which source a
        # run used is not recorded in the checkpoint. A refusal that names the override beats a silent change.
        stream.append(f"process count: saved {saved_pc}, now {process_count}. The global batches stay the same only "
                      "when the training split is read by index (cached in memory or array_record files) and "
                      "mixup is off; a split read sequentially is sharded and shuffled per process. To resume "
                      f"exactly: run on {saved_pc} processes (or, for a split read by index without mixup, add "
                      f"--config.resume={ALLOW_DATA_CHANGE}).")
    return structural, stream


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _structure_difference(saved: Any, target: Any) -> str | None:
    """None when the saved state's tree (from its metadata) has the paths and shapes of ``target``, or when
    the metadata holds no tree (a corrupt step); else which differ, in words. Both are flattened by orbax's own tree functions, as it stores the tree."""
    def flat(tree):
        return {"/".join(map(str, k)): tuple(np.shape(v))
                for k, v in ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True)).items()}

    a, b = flat(saved), flat(target)
    if a == b or not a:  # no tree at all: the metadata itself is unreadable, not another structure
        return None
    only_saved, only_here = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    reshaped = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = ([f"only in the checkpoint: {', '.join(only_saved[:3])}" + (" ..." if len(only_saved) > 3 else "")]
             if only_saved else []) + \
            ([f"only in this config's state: {', '.join(only_here[:3])}" + (" ..." if len(only_here) > 3 else "")]
             if only_here else []) + \
            [f"{k} is {a[k]} there, {b[k]} here" for k in reshaped[:3]]
    return "; ".join(parts)


class Checkpointer:
    """``keep`` >= 1 newest checkpoints are kept, and the steps in ``preserve`` (``config.checkpoint_steps``)
    are never deleted; ``chief`` renames and removes directories.

    ``cleanup=True`` (the trainer) removes unfinished writes left by a killed run; a
    Checkpointer opened only to list or read steps leaves them alone. ``read_only=True``
    never creates, writes, renames or removes anything (:func:`read_checkpoint`); it is
    opened on ``directory`` (default ``workdir/checkpoints``).

    Opening one creates nothing: the directory is made by the first save, so a run refused at its
    checks leaves a new workdir without ``checkpoints/``. As a context manager it is closed on exit;
    after an exception a write in flight is completed and its own error (if any) not raised, since it
    would only hide the one being reported."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, chief: bool | None = None,
                 cleanup: bool = False, read_only: bool = False, directory: str | None = None,
                 preserve: Sequence[int] = ()):
        if int(keep) < 1:
            raise CheckpointError(f"config.keep_checkpoints={keep} must be >= 1 (0 would delete every checkpoint).")
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.abspath(directory) if directory else os.path.join(self.workdir, "checkpoints")
        self.read_only = bool(read_only)
        self.chief = (jax.process_index() == 0 if chief is None else chief) and not self.read_only
        if cleanup and self.chief and os.path.isdir(self.directory):
            # Here, synchronously, rather than orbax's cleanup_tmp_directories: that lists the directory in
            # a background thread, which can race with anything else touching the file system at start-up.
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        if preserve and not self.read_only:  # the `keep` newest, and the steps in `preserve` for good
            keep_policy = dict(preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
                ocp.checkpoint_managers.LatestN(int(keep)),
                ocp.checkpoint_managers.CustomSteps(sorted(int(s) for s in preserve))]))
        else:
            keep_policy = dict(max_to_keep=int(keep))
        self._options = ocp.CheckpointManagerOptions(**keep_policy, create=not self.read_only,
                                                     enable_async_checkpointing=async_save and not self.read_only)
        self._manager: ocp.CheckpointManager | None = None
        self._pending: int | None = None  # step of a save not yet known to be complete
        self._closed = False
        self.moved_aside: list[str] = []

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(raise_errors=kind is None)

    @property
    def manager(self) -> ocp.CheckpointManager:
        """orbax's manager, opened on first use (opening it makes the directory unless read-only)."""
        if self._manager is None:
            self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                                  item_names=("state", "meta", "config"))
        return self._manager

    def steps(self) -> list[int]:
        if self._manager is None and not os.path.isdir(self.directory):
            return []
        return sorted(self.manager.all_steps())

    def steps_on_disk(self) -> list[int]:
        """Committed steps as the directory shows them (a save interrupted inside orbax may
        be committed by its background thread without the manager knowing)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, meta: dict, config: dict) -> None:
        """Save host arrays ``state`` at ``step`` (asynchronously when enabled).

        Raises :class:`CheckpointError` naming the step and the cause if this or the
        previous (asynchronous) save failed: the error is reported once, here."""
        self._check_previous()
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config)))
        except Exception as e:  # noqa: BLE001 - disk full, permissions...
            self._failed(step, e)
        if not saved:
            raise CheckpointError(f"Checkpoint for step {step} was not written: {self.directory} already holds "
                                  f"step {self.manager.latest_step()}. Nothing was overwritten.")
        self._pending = step

    def _check_previous(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._failed(step, e)
        if self.chief and not os.path.isdir(os.path.join(self.directory, str(step))):
            self._failed(step, RuntimeError("the write did not complete"))

    def _failed(self, step: int, e: BaseException):
        self._remove_unfinished(step)
        self.manager.reload()
        good = [s for s in self.manager.all_steps() if s != step]
        # An OSError carries its errno. tensorstore (orbax's writer) raises a plain ValueError with no errno
        # attribute, so its status text is the only way to tell a full disk: test_reliability.py's case 9
        # (a file size limit during a real write) fails if that text changes.
        text, errno = str(e), getattr(e, "errno", None)
        full = "RESOURCE_EXHAUSTED" in text or "No space left" in text or errno == 28 or "os_error_code='28'" in text
        # EFBIG (tensorstore's own words for it: "File too large", os_error_code 27): a file size limit.
        too_big = not full and ("File too large" in text or errno == 27 or "os_error_code='27'" in text)
        why = ("the disk is full" if full else "a file reached the file size limit (File too large; see ulimit -f)"
               if too_big else _short(e))
        raise CheckpointError(
            f"Could not write the checkpoint for step {step} in {self.directory}: {why}. Its unfinished files "
            f"were removed; the other checkpoints are untouched. "
            + ("Free some disk space (df -h " + self.directory + "), then re-run the same command"
               if full else "Raise the file size limit (ulimit -f unlimited), then re-run the same command"
               if too_big else "Fix the cause, then re-run the same command")
            + (f" to resume from step {max(good)}." if good else " (no complete checkpoint yet: it starts over).")
        ) from e

    def _remove_unfinished(self, step: int) -> None:
        if not self.chief or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def wait(self) -> None:
        self._check_previous()

    def close(self, raise_errors: bool = True) -> None:
        if self._closed:
            return
        if self._manager is None:  # never opened: nothing to finish
            self._closed = True
            return
        try:
            if raise_errors:
                self._check_previous()
            else:
                try:
                    self.manager.wait_until_finished()
                except Exception:  # noqa: BLE001 - already failing for another reason
                    pass
        finally:
            self._closed = True
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ restoring

    def _read_json(self, step: int, item: str):
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def latest_config(self) -> tuple[int, dict, dict] | None:
        """``(step, config, meta)`` of the newest step whose config and meta can be read."""
        for step in reversed(self.steps()):
            try:
                return step, self._read_json(step, "config"), self._read_json(step, "meta")
            except Exception:  # noqa: BLE001 - unreadable: restore_latest reports it
                continue
        return None

    def check_resume(self, config: dict, *, process_count: int, allow_data_change: bool = False,
                     saved: tuple[int, dict, dict] | None = None) -> list[str]:
        """Raise :class:`CheckpointError` if the newest checkpoint cannot be resumed with ``config``.

        Returns the data-stream differences that were allowed (to be logged)."""
        saved = saved or self.latest_config()
        if saved is None:
            return []
        step, saved_cfg, saved_meta = saved
        structural, stream = resume_problems(saved_cfg, config, saved_meta, process_count)
        if structural:
            raise CheckpointError(
                f"Cannot resume from step {step} in {self.directory}: the checkpoints were written by a different "
                "experiment (the config changes what the checkpoint holds):\n  " + "\n  ".join(structural) +
                "\nOr use a new --workdir for the new config. Nothing was changed.")
        if stream and not allow_data_change:
            raise CheckpointError(
                f"Cannot resume exactly from step {step} in {self.directory}: the config changes the data stream, "
                "so the run would not see the batches an uninterrupted run sees:\n  " + "\n  ".join(stream) +
                f"\nTo continue with the new values anyway, add --config.resume={ALLOW_DATA_CHANGE} (recorded in "
                "the log and the checkpoint), or use a new --workdir. Nothing was changed.")
        return stream

    def restore_latest(self, target: Any, config: dict, *, process_count: int = 1,
                       allow_data_change: bool = False) -> tuple[Any, dict] | None:
        """Newest usable checkpoint as ``(state, meta)``, or None if there is none.

        ``target`` is a pytree of host arrays with the expected structure. Steps that cannot
        be read are skipped; once an older one is restored they are moved aside (so the
        re-trained steps can be saved). Raises :class:`CheckpointError` if checkpoints exist
        but none can be read (nothing is moved then), or if they were written by an
        incompatible config.
        """
        steps = self.steps()
        if not steps:
            return None
        errors: list[tuple[int, str]] = []
        abstract = _abstract(target)

        def structure_error(step: int, why: str) -> CheckpointError:
            return CheckpointError(
                f"Cannot resume from step {step} in {self.directory}: the saved train state has another "
                f"structure than the one this config builds ({why}). The checkpoint is intact; "
                "restore the config it was written with (see its config.json), or use a new --workdir "
                "(--config.init_from=THIS_WORKDIR keeps the parameters). Nothing was changed.")

        def check(step: int, saved_cfg: dict, meta: dict) -> None:
            self.check_resume(config, process_count=process_count, allow_data_change=allow_data_change,
                              saved=(step, saved_cfg, meta))

        found = self._first_usable(reversed(steps), check, lambda step: abstract, errors, structure_error)
        if found is not None:
            for bad_step, why in errors:
                self._move_aside(bad_step, why)
            if errors:
                self.manager.reload()
            return found
        raise CheckpointError(
            f"No checkpoint in {self.directory} can be used:\n  "
            + "\n  ".join(f"step {s}: {why}" for s, why in errors)
            + f"\nNothing was changed. To start this run from scratch, move that directory away "
            f"(mv {self.directory} {self.directory}.old) or use another --workdir.")

    def restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` restored into ``target`` (as :meth:`restore_latest` restores), for a
        run that starts from another run's step (no config check here: the caller has made it). Raises
        :class:`CheckpointError` naming the step and why if it cannot be used. Nothing is moved or removed."""
        errors: list[tuple[int, str]] = []
        abstract = _abstract(target)

        def structure_error(step: int, why: str) -> CheckpointError:
            return CheckpointError(
                f"Cannot start from step {step} of {self.workdir}: its train state has another structure than the "
                f"one this config builds ({why}). Use the model and optimiser fields of the config it was "
                "written with (that workdir's config.json). Nothing was written.")

        found = self._first_usable([int(step)], lambda *_: None, lambda _: abstract, errors, structure_error)
        if found is None:
            raise CheckpointError(f"The checkpoint at step {step} in {self.directory} cannot be used: "
                                  + "; ".join(why for _, why in errors) + ". Nothing was changed.")
        return found

    def read_json(self, step: int, item: str) -> dict:
        """The ``config`` or ``meta`` item saved at ``step``."""
        return self._read_json(step, item)

    def read(self, step: int | None = None, config: dict | None = None) -> tuple[Any, dict] | None:
        """A checkpoint as it was saved: ``(state, meta)``, or None if there is none.

        The state comes back as host numpy arrays in the saved tree (a dict), whatever
        device layout wrote it (a sharded fsdp checkpoint reads on any device count): the
        target is built from the checkpoint's own metadata. Without ``step`` the newest
        usable step, skipping unreadable or inconsistent ones as :meth:`restore_latest`
        does, but moving nothing aside (reading changes nothing). With ``config``, a step
        whose config differs in a field that changes the state's shapes raises
        :class:`CheckpointError` (the data stream does not matter when only reading).
        """
        steps = [int(step)] if step is not None else list(reversed(self.steps()))
        if not steps:
            return None
        errors: list[tuple[int, str]] = []

        def check(step: int, saved_cfg: dict, meta: dict) -> None:
            diffs = _structural_differences(saved_cfg, config) if config is not None else []
            if diffs:
                raise CheckpointError(
                    f"The checkpoint at step {step} in {self.directory} was written by another experiment than the "
                    "config it is read with:\n  " + "\n  ".join(
                        f"config.{k}: saved {json.dumps(a)}, here {json.dumps(b)}" for k, a, b in diffs)
                    + "\nRead it with the config it was written with (its workdir's config.json).")

        found = self._first_usable(steps, check, self._saved_layout, errors)
        if found is not None:
            return found
        raise CheckpointError(
            f"No checkpoint in {self.directory} can be used:\n  "
            + "\n  ".join(f"step {s}: {why}" for s, why in errors) + "\nNothing was changed.")

    def _first_usable(self, steps, check, target, errors: list, structure_error=None) -> tuple[Any, dict] | None:
        """``(state, meta)`` of the first of ``steps`` that reads and is consistent, or None.

        Per step: read its config and meta, ``check(step, saved_cfg, meta)`` (raises to refuse),
        restore the state into ``target(step)``, check it against its meta. A step that fails
        one of these is logged, appended to ``errors`` as ``(step, why)`` and skipped. A restore that
        fails because the saved tree differs from the target's (paths or shapes, read from the step's
        metadata) raises ``structure_error(step, difference)`` instead: that checkpoint is intact, the
        config is what differs.
        """
        for step in steps:
            try:
                saved_cfg = self._read_json(step, "config")
                meta = self._read_json(step, "meta")
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try an older one
                errors.append((step, _short(e)))
                log.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, _short(e))
                continue
            check(step, saved_cfg, meta)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target(step))))["state"]
            except Exception as e:  # noqa: BLE001
                if structure_error is not None:
                    try:
                        difference = _structure_difference(self._saved_layout(step), target(step))
                    except Exception:  # noqa: BLE001 - its metadata is unreadable too: the step is
                        difference = None
                    if difference:
                        raise structure_error(step, difference) from e
                errors.append((step, _short(e)))
                log.warning("Checkpoint at step %d is unreadable (%s); trying an older one.", step, _short(e))
                continue
            problem = self._check_consistent(step, state, meta)
            if problem:
                errors.append((step, problem))
                log.warning("Checkpoint at step %d is not usable (%s); trying an older one.", step, problem)
                continue
            return state, meta
        return None

    def _saved_layout(self, step: int) -> Any:
        """The saved state's tree as empty numpy arrays (``np.empty``: no memory is touched until read)."""
        with ocp.StandardCheckpointer() as reader:
            meta = reader.metadata(os.path.join(self.directory, str(step), "state"))
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

    @staticmethod
    def _check_consistent(step: int, state: Any, meta: dict) -> str | None:
        """The data position in ``meta`` must be the step; the state must be finite and at that step."""
        pos = meta.get("data_position", {}) or {}
        if int(meta.get("step", step)) != step or int(pos.get("step", step)) != step:
            return (f"its data position (meta step {meta.get('step')}, data_position {pos}) does not match the "
                    f"step directory {step}")
        bad = int(np.asarray(getattr(state, "bad_step", -1) if not isinstance(state, dict)
                             else state.get("bad_step", -1)))
        at = int(np.asarray(getattr(state, "step", step) if not isinstance(state, dict) else state.get("step", step)))
        if bad >= 0 or at != step:
            return (f"it holds a state frozen after a non-finite step (update {bad + 1}), written by an older "
                    "seqvis")
        return None

    def _move_aside(self, step: int, why: str) -> None:
        if not self.chief:
            return
        src = os.path.join(self.directory, str(step))
        if not os.path.isdir(src):
            return
        dest_root = os.path.join(self.workdir, UNREADABLE_DIR)
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, str(step))
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(dest_root, f"{step}.{n}")
            n += 1
        os.rename(src, dest)
        with open(os.path.join(dest_root, "README.txt"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} step {step} -> {os.path.basename(dest)}: {why}\n")
        self.moved_aside.append(dest)
        log.warning("Checkpoint at step %d moved aside to %s (%s); an older step was restored instead.",
                    step, dest, why)


def _abstract(target: Any) -> Any:
    """The restore target: ShapeDtypeStructs with a sharding (the fsdp driver's target) restore straight into
    those shards, whatever device count wrote them; anything else restores as numpy."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                        else np.zeros(np.shape(x), np.asarray(x).dtype), target)


# ============================================================================ reading, not resuming


def read_checkpoint(path: str, config: dict | None = None) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the checkpoint at ``path``, read as saved (:meth:`Checkpointer.read`).

    ``path``: a workdir (its newest usable step), its ``checkpoints`` directory (the same), or
    one step directory (``.../checkpoints/<step>``, that step only). None if it holds no
    checkpoint. Nothing is created, moved or removed.
    """
    path = os.path.abspath(path)
    step = None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        directory = os.path.join(path, "checkpoints")
    elif os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    elif os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
        directory = path
    else:
        return None
    ckpt = Checkpointer(os.path.dirname(directory), directory=directory, read_only=True, async_save=False)
    try:
        return ckpt.read(step, config)
    finally:
        ckpt.close(raise_errors=False)


def restore_variables(workdir: str, config: dict | None = None) -> dict:
    """``{'params', **model_state}`` of the newest usable checkpoint in a workdir (host numpy arrays).

    With ``config`` (a dict), the checkpoint must have been written by the same model (see
    :meth:`Checkpointer.read`)."""
    read = read_checkpoint(workdir, config)
    if read is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(os.path.abspath(workdir), 'checkpoints')}; train "
                                f"first with python -m seqvis.cli.train --config=configs/FILE.py --workdir={workdir}.")
    state, _ = read
    return {"params": state["params"], **(state.get("model_state") or {})}
