"""``train_and_evaluate(config, workdir)``: the one training run every task shares.

It reads top to bottom: setup and the resume check, the model and optimiser, restore (or branch, or
``init_from``), the input's first batch, compile, the loop (log, checkpoint, evaluate), the final
evaluation. What is particular to a task lives in :mod:`seqvis.tasks`; the step and its drivers in
:mod:`seqvis.train.step`, checkpoints in :mod:`seqvis.train.checkpoint`, logs in :mod:`seqvis.train.metrics`,
every field's default in :mod:`seqvis.train.defaults`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from seqvis.data import pipeline
from seqvis.data import subset as subset_lib
from seqvis.data.sources import check_cache_budget
from seqvis.errors import ConfigError
from seqvis.evaluation.flops import forward_flops_per_example
from seqvis.models.common import num_params
from seqvis.train import branch as branch_lib
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train import defaults
from seqvis.train import evaluators as evaluators_lib
from seqvis.train import optim
from seqvis.train import sharding as sharding_lib
from seqvis.train import step as step_lib
from seqvis.train.precision import precision_name
from seqvis.train.preemption import Preemption
from seqvis.train.metrics import MetricWriter, Progress
from seqvis.interop.pretrained import load_pretrained
from seqvis.tasks.base import get_task
from seqvis.train.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class TrainingPreempted(Exception):
    """SIGTERM during training: the state was saved at the current step; ``str()`` says where."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``str()`` says the step reached and where a re-run resumes."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ============================================================================ config checks


def config_to_dict(config: Any) -> dict:
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def check_config(config: Any) -> None:
    """Fail fast, before any data loading or compilation, with one clear message per problem."""
    for field in ("batch_size", "data", "model", "optimizer", "schedule"):
        if field not in config:
            raise ConfigError(f"config.{field} is missing; see configs/vit.py for a complete example.")
    total, epochs = config.get("total_steps") or 0, config.get("num_epochs") or 0
    if int(total) < 0 or float(epochs) < 0 or not math.isfinite(float(epochs)):
        field, value = ("total_steps", total) if int(total) < 0 else ("num_epochs", epochs)
        raise ConfigError(f"config.{field}={value} must not be negative; set config.total_steps or "
                          "config.num_epochs to a positive number.")
    if not (int(total) > 0 or float(epochs) > 0):
        raise ConfigError("Set config.total_steps or config.num_epochs to a positive number.")
    sched = config.get("schedule", None) or {}
    for field in ("base_lr", "end_lr"):
        if field in sched:
            lr = float(sched[field])
            if not math.isfinite(lr) or lr < 0:
                raise ConfigError(f"config.schedule.{field}={sched[field]} must be a finite number >= 0 (a negative "
                                  "learning rate climbs the loss); e.g. --config.schedule.base_lr=1e-3.")
    if int(sched.get("warmup_steps", 0) or 0) < 0:
        raise ConfigError(f"config.schedule.warmup_steps={sched.get('warmup_steps')} must be >= 0.")
    clip = (config.get("optimizer", None) or {}).get("grad_clip_norm", 0) or 0
    if float(clip) < 0:
        raise ConfigError(f"config.optimizer.grad_clip_norm={clip} must be >= 0 (0 turns clipping off).")
    if int(config.get("keep_checkpoints", 3)) < 1:
        raise ConfigError(f"config.keep_checkpoints={config.get('keep_checkpoints')} must be >= 1 (0 would delete "
                          "every checkpoint, including the one to resume from); e.g. --config.keep_checkpoints=1.")
    if int(config.get("eval_every_steps", 0) or 0) < 0:
        raise ConfigError(f"config.eval_every_steps={config.get('eval_every_steps')} must be >= 0 (0: only at the end).")
    evaluators_lib.check_config(config)
    resume = config.get("resume", "") or ""
    if resume not in ("", ckpt_lib.ALLOW_DATA_CHANGE):
        raise ConfigError(f"config.resume={resume!r} is unknown; use '' (resume only when the data stream is "
                          f"unchanged) or {ckpt_lib.ALLOW_DATA_CHANGE!r}.")
    k = (config.get("data", None) or {}).get("num_classes", None)
    if k is not None and int(k) < 1:
        raise ConfigError(f"config.data.num_classes={k} must be >= 1.")
    subset_lib.requested(config.get("data", None))  # train_examples: whole, >= 0, a multiple of the classes
    check_cache_budget(config.data)
    bs = int(config.batch_size)
    devices = jax.device_count()
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise ConfigError(f"config.grad_accum_steps={accum} must be >= 1.")
    if bs <= 0 or bs % (devices * accum):
        raise ConfigError(
            f"config.batch_size={bs} must be a positive multiple of the device count ({devices}) "
            f"times config.grad_accum_steps ({accum}); e.g. --config.batch_size={devices * accum * max(1, bs // (devices * accum))}.")
    ebs = int(config.get("eval_batch_size", bs))
    if ebs <= 0 or ebs % devices:
        raise ConfigError(f"config.eval_batch_size={ebs} must be a positive multiple of the device count ({devices}).")
    if config.get("parallel", "pmap") not in step_lib.DRIVERS:
        raise ConfigError(f"config.parallel={config.parallel!r} is unknown; use one of {sorted(step_lib.DRIVERS)}.")
    sharding_lib.check_config(config, devices)
    precision_name(config)
    branch_lib.check_config(config)
    for field in ("log_every_steps", "checkpoint_every_steps"):
        if int(config.get(field, 1)) <= 0:
            raise ConfigError(f"config.{field}={config.get(field)} must be a positive number of steps.")


def maybe_initialize_distributed(config: Any) -> None:
    """``jax.distributed.initialize`` when ``config.distributed.coordinator_address`` is set."""
    dist = config.get("distributed", None)
    if not dist or not dist.get("coordinator_address"):
        return
    if jax.distributed.is_initialized():  # e.g. by the caller
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.get("num_processes"), process_id=dist.get("process_id"))


# ============================================================================ the run


def train_and_evaluate(config: Any, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any] | None:
    """Train ``config`` in ``workdir`` (resuming from its checkpoints) and evaluate.

    ``stop_at_step`` ends the run right after that step without saving, like a process killed
    there (tests use it to check that resuming is exact); the result is then None. Otherwise the
    results dict, also written to ``workdir/results.json``.

    Ctrl-C raises :class:`TrainingInterrupted` saying the step reached and the step a re-run resumes
    from (after any checkpoint being written has been completed); SIGTERM saves the current step and
    raises :class:`TrainingPreempted`.
    """
    # ---------------------------------------------------------------- setup
    maybe_initialize_distributed(config)  # before anything touches the devices
    check_config(config)
    chief = jax.process_index() == 0
    config_dict = config_to_dict(config)
    seed = int(defaults.value(config, "seed"))
    global_batch = int(config.batch_size)
    allow_data_change = defaults.value(config, "resume") == ckpt_lib.ALLOW_DATA_CHANGE
    step_reached, ckpt = None, None  # for the Ctrl-C message
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(WorkdirLock(workdir, jax.process_index()))  # refuses a workdir another run trains in
            # Opened under the lock: it removes the unfinished writes a killed run left (creates nothing).
            ckpt = stack.enter_context(ckpt_lib.Checkpointer(
                workdir, keep=int(defaults.value(config, "keep_checkpoints")), cleanup=True,
                async_save=bool(defaults.value(config, "async_checkpointing")),
                preserve=tuple(defaults.value(config, "checkpoint_steps"))))

            # ---------------------------------------------------------------- resume check (writes nothing)
            # Checkpoints of another experiment are refused here, before the workdir is touched
            # (config.json, metrics, vocabularies stay as they were).
            data_changes_allowed = _check_resume(ckpt, config_dict, allow_data_change)
            branch = None
            if not ckpt.steps():  # a new workdir may start from another run's step (config.branch_from)
                branch = branch_lib.check(config, config_dict, process_count=jax.process_count(),
                                          allow_data_change=allow_data_change)
            os.makedirs(workdir, exist_ok=True)
            total_steps = pipeline.num_steps(config)
            _refuse_a_shorter_run(ckpt, workdir, total_steps, config)

            # ---------------------------------------------------------------- model and optimiser
            task = get_task(config)
            task.setup(workdir)
            evaluators = evaluators_lib.from_config(config, task)  # datasets and splits checked before compiling
            schedule = optim.make_schedule(config.schedule, total_steps)
            tx = optim.make_optimizer(config.optimizer, schedule)
            dummy = task.dummy_batch(global_batch // jax.device_count())
            # The driver decides where the state lives: host arrays to be replicated (pmap, mesh), or
            # created straight into its shards (fsdp: a model too big for one device is never whole).
            parallel = defaults.value(config, "parallel")
            train_step = step_lib.make_train_step(task, tx, schedule, int(defaults.value(config, "grad_accum_steps")),
                                                  vary_params=step_lib.DRIVERS[parallel].vary_params)
            driver = step_lib.make_driver(parallel, train_step, step_lib.make_eval_step(task),
                                          **step_lib.driver_options(config))
            host_state = driver.create_state(lambda: step_lib.create_state(task, tx, seed, dummy))
            n_params = num_params(host_state.params)

            # ---------------------------------------------------------------- restore or initialise
            # Steps that cannot be read are skipped (and moved aside once an older one is restored); the
            # data position saved with the state is checked against the step.
            meta = {"step": 0, "examples_seen": 0, "train_seconds": 0.0}
            restored = ckpt.restore_latest(driver.restore_target(host_state), config_dict,
                                           process_count=jax.process_count(), allow_data_change=allow_data_change)
            if restored is not None:
                host_state, meta = restored
                finished = _results_of_a_finished_run(workdir, int(meta["step"]), total_steps)
                if finished is not None:
                    return finished
                log.info("Resuming from step %d (%s)", meta["step"], ckpt.directory)
            elif branch is not None:
                host_state, meta = branch_lib.restore(branch, driver.restore_target(host_state))
                log.info("Branching from step %d of %s", meta["step"], branch.workdir)
            elif config.get("init_from"):
                params = load_pretrained(config.init_from, host_state.params,
                                         allow_partial=bool(defaults.value(config, "init_from_allow_partial")))
                host_state = host_state.replace(params=params, opt_state=jax.device_get(tx.init(params)))
            start_step = int(meta["step"])
            data_changes = list(meta.get("data_changes", []))
            if restored is not None and data_changes_allowed:
                data_changes.append({"step": start_step, "changes": data_changes_allowed})
            if chief:  # only now: a refused resume leaves the workdir's config.json as it was
                _write_json(os.path.join(workdir, "config.json"), config_dict)

            # ---------------------------------------------------------------- input (first batch, before compiling)
            it = pipeline.train_iterator(config.data, global_batch_size=global_batch, seed=seed,
                                         start_step=start_step, extra_ops=tuple(task.pp_ops(train=True)))
            first_batch = next(it) if start_step < total_steps else None
            if first_batch is not None:
                task.check_batch(first_batch)

            # ---------------------------------------------------------------- compile
            state = driver.put_state(host_state)
            flops = None
            if defaults.value(config, "count_flops"):
                flops = forward_flops_per_example(
                    task.model,  # shapes only: the count needs no values (and fsdp's state is sharded)
                    jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                 {"params": host_state.params, **host_state.model_state}),
                    task.model_inputs(jax.tree.map(np.asarray, dummy)))
            log_every = int(defaults.value(config, "log_every_steps"))
            ckpt_every = int(defaults.value(config, "checkpoint_every_steps"))
            ckpt_steps = set(defaults.value(config, "checkpoint_steps"))
            if chief and start_step < total_steps:
                log.info("%s %d parameters; training steps %d..%d of %d (batch %d on %d device%s); compiling...",
                         config.model.get("name", task.__class__.__name__), n_params, start_step + 1, total_steps,
                         total_steps, global_batch, jax.device_count(), "s" if jax.device_count() > 1 else "")
            progress = Progress(total_steps, start_step, enabled=chief and bool(defaults.value(config, "progress")),
                                every=log_every)
            prior_seconds = float(meta.get("train_seconds", 0.0))
            t_start = time.time()

            # metrics.jsonl and the TensorBoard files keep the rows up to the restored step: each step is
            # logged once (the dropped TensorBoard events stay in workdir/tensorboard.orphaned/).
            writer = stack.enter_context(MetricWriter(
                workdir, enabled=chief, tensorboard=bool(defaults.value(config, "tensorboard")),
                resume_step=start_step, total_steps=total_steps))

            def save(step: int, state) -> None:
                host = driver.checkpoint_state(state)  # host arrays, or the shards themselves (fsdp)
                bad = int(np.asarray(host.bad_step))
                if bad >= 0:  # never save a state frozen after a non-finite step
                    raise _nonfinite(bad, ckpt, start_step, workdir)
                position = {"step": step, "seed": seed, "batch_size": global_batch,
                            "process_count": jax.process_count(), "examples_seen": step * global_batch}
                writer.flush()  # the rows a resume from this step keeps are on disk before the step is
                ckpt.save(step, host, {**position, "train_seconds": prior_seconds + time.time() - t_start,
                                       "data_position": position, "data_changes": data_changes}, config_dict)

            # ---------------------------------------------------------------- the loop
            history: list[dict] = []
            t_log, last_log_step = time.time(), start_step
            step_reached = start_step
            with Preemption() as preemption:  # SIGTERM: save at the current step, then stop
                for step in range(start_step + 1, total_steps + 1):  # `step`: the steps done after this one
                    batch = first_batch if step == start_step + 1 else next(it)
                    state, metrics = driver.train(state, driver.put_batch(batch))
                    history.append(metrics)
                    step_reached = step
                    if stop_at_step is not None and step >= stop_at_step:  # like a kill: nothing saved
                        it.close()
                        jax.block_until_ready(state)
                        return None
                    if step % log_every == 0 or step == total_steps:
                        history = driver.fetch(history)
                        bad = int(history[-1]["bad_step"])
                        if bad >= 0:
                            raise _nonfinite(bad, ckpt, start_step, workdir)
                        row = _mean_metrics(history)
                        row["img_per_sec"] = (step - last_log_step) * global_batch / max(time.time() - t_log, 1e-9)
                        row["img_per_sec_per_device"] = row["img_per_sec"] / jax.device_count()
                        if flops is not None:
                            row["gflops_per_example"] = flops / 1e9
                        writer.write(step, row, prefix="train/")
                        progress.update(step, {"loss": row["loss"], "lr": row["learning_rate"],
                                               "img/s": row["img_per_sec"]})
                        history, t_log, last_log_step = [], time.time(), step
                    if step % ckpt_every == 0 or step == total_steps or step in ckpt_steps:
                        save(step, state)
                    if step != total_steps:
                        evaluators.run(step, driver, state, writer)  # those due at this step
                    if step < total_steps and preemption.reached(step):  # e.g. SIGTERM: the VM is being preempted
                        if step % ckpt_every and step not in ckpt_steps:
                            save(step, state)
                        progress.close()
                        ckpt.wait()
                        raise TrainingPreempted(f"{preemption.signal_name} at step {step}: saved a checkpoint at "
                                                f"step {step}; re-run the same command to resume "
                                                f"({os.path.abspath(workdir)}).")
            progress.close()
            it.close()  # the input pipeline stops (and frees its buffers) before the final evaluation
            jax.block_until_ready(state)
            ckpt.wait()  # the last checkpoint is complete (or its failure reported) before the results
            seconds = prior_seconds + time.time() - t_start

            # ---------------------------------------------------------------- final evaluation
            results = evaluators.run(total_steps, driver, state, writer, final=True)
            host = driver.get_state(state)
            results.update(task.final_evaluation({"params": host.params, **host.model_state}, config, workdir))
            results.update({"steps": total_steps, "examples_seen": total_steps * global_batch,
                            "train_seconds": seconds, "gflops_per_example": None if flops is None else flops / 1e9,
                            "params": n_params,
                            **({"branch_from": b} if (b := ckpt_lib.branch_point(config_dict)) else {})})
            if chief:
                _write_json(os.path.join(workdir, "results.json"), results)
                log.info("Results -> %s", os.path.join(os.path.abspath(workdir), "results.json"))
            return results
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        # The Checkpointer is closed by now (a checkpoint being written has finished).
        steps = ckpt.steps_on_disk()
        where = f"at step {step_reached}" if step_reached is not None else "before training started"
        resume = (f"re-run the same command to resume from step {max(steps)}" if steps else
                  "re-run the same command to start again (no checkpoint yet)")
        raise TrainingInterrupted(f"interrupted {where}; {resume} ({os.path.abspath(workdir)}).") from None


# ============================================================================ helpers


def _check_resume(ckpt, config_dict: dict, allow_data_change: bool) -> list[str]:
    """Refuse checkpoints ``config_dict`` cannot resume (CheckpointError); log what changed. Returns the
    data-stream changes allowed by ``config.resume``."""
    if not ckpt.steps():
        return []
    saved = ckpt.latest_config()
    allowed = ckpt.check_resume(config_dict, process_count=jax.process_count(),
                                allow_data_change=allow_data_change, saved=saved)
    if allowed:
        log.warning("Resuming with a changed data stream (--config.resume=%s):\n  %s",
                    ckpt_lib.ALLOW_DATA_CHANGE, "\n  ".join(allowed))
    changed = ckpt_lib.config_changes(saved[1], config_dict, skip=ckpt_lib.DATA_STREAM + ("resume",)) \
        if saved else []
    if changed:
        log.warning("Resuming from step %d with a changed config; training goes on with the new values:\n  %s",
                    saved[0], "\n  ".join(changed))
    return allowed


def _mean_metrics(host: list[dict]) -> dict[str, float]:
    keys = [k for k in host[0] if k not in ("count", "bad_step")]
    return {k: float(np.mean([h[k] for h in host])) for k in keys}


def _write_json(path: str, obj: Any) -> None:
    """Written whole or not at all (a temporary file renamed over ``path``)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _nonfinite(bad: int, ckpt, start_step: int, workdir: str) -> FloatingPointError:
    """The error for a non-finite loss or gradient at step ``bad + 1``: where the last good checkpoint is
    and what to change."""
    good = [s for s in ckpt.steps() if s <= bad]
    where = (f"The last good checkpoint is step {good[-1]} in {ckpt.directory}; no checkpoint was written "
             f"after the bad step. Re-run with a lower config.schedule.base_lr to resume from step {good[-1]}, "
             "or check the inputs for NaN. (Turning on config.optimizer.grad_clip_norm changes the optimiser "
             "state: use a new --workdir with --config.init_from=" + os.path.abspath(workdir) + ".)"
             if good else
             "No checkpoint was written before it, so a re-run starts from scratch. Lower "
             "config.schedule.base_lr, set config.optimizer.grad_clip_norm, or check the inputs for NaN.")
    if good and start_step > 0 and bad == start_step and good[-1] == start_step:
        # The first step after resuming was already bad: the saved state itself has (nearly) diverged
        # (finite but huge parameters), so a lower learning rate from the same checkpoint cannot help.
        where = (f"This run resumed from step {start_step} and its first step was not finite: the state saved "
                 f"at step {start_step} has diverged already (finite, but its loss or gradient overflows), or "
                 "the input is bad (check it for NaN). A lower learning rate from the same checkpoint does not "
                 "undo divergence: start again in a new --workdir with a lower config.schedule.base_lr (or "
                 f"config.optimizer.grad_clip_norm > 0). The checkpoints in {ckpt.directory} are kept.")
    return FloatingPointError(f"Non-finite loss or gradient at step {bad + 1}; training stopped. {where}")


def _refuse_a_shorter_run(ckpt, workdir: str, total_steps: int, config: Any) -> None:
    """A workdir trained past ``total_steps`` is refused: going on would rewrite a longer run's results."""
    done = max(ckpt.steps(), default=0)
    if done <= total_steps:
        return
    field = (f"config.total_steps={total_steps}" if config.get("total_steps") else
             f"config.num_epochs={config.get('num_epochs')} ({total_steps} steps)")
    raise ConfigError(
        f"--workdir={workdir} holds a run trained to step {done}, past {field}: going on would overwrite its "
        "results with those of a shorter run. To train it further, raise config.total_steps (or "
        f"config.num_epochs); to train {total_steps} steps, use a new --workdir (--config.init_from="
        f"{os.path.abspath(workdir)} starts from its weights).")


def _results_of_a_finished_run(workdir: str, step: int, total_steps: int) -> dict | None:
    """The results of a run resumed at its last step whose final evaluation is written: it is done, and
    nothing more is written. None when it still needs that evaluation (it stopped during it)."""
    if step != total_steps:
        return None
    path = os.path.join(workdir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if int(results.get("steps", -1)) != total_steps:
        return None
    log.info("Already done: %s was trained to step %d and evaluated; nothing to do (results: %s).",
             os.path.abspath(workdir), total_steps, os.path.abspath(path))
    return results
