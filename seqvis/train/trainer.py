"""``train_and_evaluate(config, workdir)``: the one trainer every task shares.

Read top to bottom: config checks, devices and hosts, input, model and optimiser,
checkpoint restore, compile, the loop (log, checkpoint, evaluate), final evaluation.

Over 400 lines on purpose: it is the one trainer, read top to bottom as the steps above; the task-specific
parts live in the tasks, the step and its drivers in step.py, checkpoints in checkpoint.py, logs in metrics.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqvis.data import subset as subset_lib
from seqvis.data.sources import check_cache_budget
from seqvis.errors import ConfigError
from seqvis.evaluation.flops import forward_flops_per_example
from seqvis.models.common import num_params
from seqvis.train import branch as branch_lib
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train import evaluators as evaluators_lib
from seqvis.train import optim
from seqvis.train import sharding as sharding_lib
from seqvis.train import step as step_lib
from seqvis.train.precision import precision_name
from seqvis.train.preemption import Preemption
from seqvis.train.metrics import MetricWriter, Progress
from seqvis.train.pretrained import load_pretrained
from seqvis.train.tasks import get_task
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


# ============================================================================ helpers


def _mean_metrics(host: list[dict]) -> dict[str, float]:
    keys = [k for k in host[0] if k not in ("count", "bad_step")]
    return {k: float(np.mean([h[k] for h in host])) for k in keys}


def _refuse_a_shorter_run(ckpt, workdir: str, total_steps: int, config: Any) -> None:
    """A workdir trained past ``total_steps`` is refused: going on would rewrite a longer run's results."""
    done = max(ckpt.steps(), default=0) if ckpt is not None else 0
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


# ============================================================================ main entry


def train_and_evaluate(config: Any, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its checkpoints) and evaluate.

    ``stop_at_step`` ends the run right after that step without saving, like a process
    killed there (tests use it to check that resuming is exact). Returns the results dict
    (also written to ``workdir/results.json``), or None when stopped early.

    Ctrl-C raises :class:`TrainingInterrupted` saying the step reached and the step a
    re-run resumes from (after any checkpoint being written has been completed).
    """
    maybe_initialize_distributed(config)  # before anything touches the devices
    check_config(config)
    run: dict[str, Any] = {"step": None, "ckpt": None}
    try:
        with WorkdirLock(workdir, jax.process_index()):  # refuses a workdir another run is training in
            return _train_and_evaluate(config, workdir, stop_at_step, run)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        ckpt = run["ckpt"]
        steps = []
        if ckpt is not None:
            try:
                ckpt.close(raise_errors=False)  # lets a checkpoint being written finish
                steps = ckpt.steps_on_disk()
            except BaseException:  # noqa: BLE001 - a second Ctrl-C: report what we know
                pass
        where = f"at step {run['step']}" if run["step"] is not None else "before training started"
        resume = f"re-run the same command to resume from step {max(steps)}" if steps else \
            "re-run the same command to start again (no checkpoint yet)"
        raise TrainingInterrupted(f"interrupted {where}; {resume} ({os.path.abspath(workdir)}).") from None


def _train_and_evaluate(config: Any, workdir: str, stop_at_step: int | None, run: dict) -> dict[str, Any] | None:
    from seqvis.data import pipeline as data_lib  # tensorflow only when training

    chief = jax.process_index() == 0
    config_dict = config_to_dict(config)
    seed = int(config.get("seed", 0))
    allow_data_change = (config.get("resume", "") or "") == ckpt_lib.ALLOW_DATA_CHANGE

    # ---------------------------------------------------------------- resume check (writes nothing)
    # A workdir with checkpoints from another experiment is refused here, before the
    # workdir is touched (config.json, metrics, vocabularies stay as they were).
    ckpt = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)),
                                     async_save=bool(config.get("async_checkpointing", True)), cleanup=True,
                                     preserve=tuple(config.get("checkpoint_steps", ()) or ()))
        run["ckpt"] = ckpt
        try:
            saved = ckpt.latest_config()
            allowed = ckpt.check_resume(config_dict, process_count=jax.process_count(),
                                        allow_data_change=allow_data_change, saved=saved)
        except BaseException:
            ckpt.close(raise_errors=False)
            raise
        if allowed:
            log.warning("Resuming with a changed data stream (--config.resume=%s):\n  %s",
                        ckpt_lib.ALLOW_DATA_CHANGE, "\n  ".join(allowed))
            run["data_changes_allowed"] = allowed
        changed = ckpt_lib.config_changes(saved[1], config_dict, skip=ckpt_lib.DATA_STREAM + ("resume",)) \
            if saved else []
        if changed:
            log.warning("Resuming from step %d with a changed config; training goes on with the new values:\n  %s",
                        saved[0], "\n  ".join(changed))
    if ckpt is None or not ckpt.steps():  # a new workdir may start from another run's step (config.branch_from)
        run["branch"] = branch_lib.check(config, config_dict, data_lib, process_count=jax.process_count(),
                                         allow_data_change=allow_data_change)

    os.makedirs(workdir, exist_ok=True)
    try:
        return _run(config, workdir, stop_at_step, run, data_lib, config_dict, chief, seed, allow_data_change)
    except BaseException:
        # A failing run still lets the checkpoint being written finish; that write's own
        # error (if any) would only hide the one being reported.
        if run.get("writer") is not None:
            run["writer"].close()
        if run["ckpt"] is not None:
            run["ckpt"].close(raise_errors=False)
        raise


def _run(config, workdir, stop_at_step, run, data_lib, config_dict, chief, seed, allow_data_change):
    # ---------------------------------------------------------------- input
    global_batch = int(config.batch_size)
    if config.get("total_steps"):
        total_steps = int(config.total_steps)
    else:
        n_train = data_lib.num_examples(config.data, config.data.get("train_split", "train"))
        total_steps = int(math.ceil(float(config.num_epochs) * n_train / global_batch))

    _refuse_a_shorter_run(run["ckpt"], workdir, total_steps, config)

    # ---------------------------------------------------------------- model and optimiser
    task = get_task(config)
    task.setup(workdir, data_lib)
    evaluators = evaluators_lib.from_config(config, task, data_lib)  # datasets and splits checked before compiling
    schedule = optim.make_schedule(config.schedule, total_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    per_device = global_batch // jax.device_count()
    dummy = task.dummy_batch(per_device)
    # The driver decides where the state lives: host arrays to be replicated (pmap, mesh), or
    # created straight into its shards (fsdp: a model too big for one device is never whole).
    accum = int(config.get("grad_accum_steps", 1))
    parallel = config.get("parallel", "pmap")
    driver = step_lib.make_driver(parallel,
                                  step_lib.make_train_step(task, tx, schedule, accum,
                                                           vary_params=step_lib.DRIVERS[parallel].vary_params),
                                  step_lib.make_eval_step(task), **step_lib.driver_options(config))
    host_state = driver.create_state(lambda: step_lib.create_state(task, tx, seed, dummy))
    n_params = num_params(host_state.params)

    # ---------------------------------------------------------------- checkpoint restore
    # Steps that cannot be read are skipped (and moved aside once an older one is restored);
    # the data position saved with the state is checked against the step.
    ckpt = run["ckpt"]
    meta = {"step": 0, "examples_seen": 0, "train_seconds": 0.0}
    restored = None
    if ckpt is not None:
        restored = ckpt.restore_latest(driver.restore_target(host_state), config_dict,
                                       process_count=jax.process_count(), allow_data_change=allow_data_change)
    if restored is not None:
        host_state, meta = restored
        finished = _results_of_a_finished_run(workdir, int(meta["step"]), total_steps)
        if finished is not None:
            return finished
        log.info("Resuming from step %d (%s)", meta["step"], ckpt.directory)
    elif run.get("branch") is not None:
        host_state, meta = branch_lib.restore(run["branch"], driver.restore_target(host_state))
        log.info("Branching from step %d of %s", meta["step"], run["branch"].workdir)
    elif config.get("init_from"):
        params = load_pretrained(config.init_from, host_state.params,
                                 allow_partial=bool(config.get("init_from_allow_partial", False)))
        host_state = host_state.replace(params=params, opt_state=jax.device_get(tx.init(params)))
    if ckpt is None:  # a new workdir: created only now, after config, data, model and init_from have been checked
        ckpt = run["ckpt"] = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)),
                                                   async_save=bool(config.get("async_checkpointing", True)),
                                                   cleanup=True,
                                                   preserve=tuple(config.get("checkpoint_steps", ()) or ()))
    start_step = int(meta["step"])
    data_changes = list(meta.get("data_changes", []))
    if restored is not None and run.get("data_changes_allowed"):
        data_changes.append({"step": start_step, "changes": run["data_changes_allowed"]})
    if chief:  # only now: a refused resume leaves the workdir's config.json as it was
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config_dict, f, indent=2)
        os.replace(tmp, os.path.join(workdir, "config.json"))

    # ---------------------------------------------------------------- input (first batch, before compiling)
    it = data_lib.train_iterator(config.data, global_batch_size=global_batch, seed=seed,
                                 start_step=start_step, extra_ops=tuple(task.pp_ops(train=True)))
    first_batch = next(it) if start_step < total_steps else None
    if first_batch is not None:
        task.check_batch(first_batch)

    # ---------------------------------------------------------------- compile
    state = driver.put_state(host_state)
    flops = None
    if config.get("count_flops", True):
        flops = forward_flops_per_example(
            task.model,  # shapes only: the count needs no values (and fsdp's state is sharded)
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                         {"params": host_state.params, **host_state.model_state}),
            task.model_inputs(jax.tree.map(np.asarray, dummy)))

    # metrics.jsonl and the TensorBoard files keep the rows up to the restored step: each step is logged
    # once (the dropped TensorBoard events stay in workdir/tensorboard.orphaned/).
    writer = MetricWriter(workdir, enabled=chief, tensorboard=bool(config.get("tensorboard", True)),
                          resume_step=start_step, total_steps=total_steps)
    run["writer"] = writer
    log_every = int(config.get("log_every_steps", 50))
    ckpt_every = int(config.get("checkpoint_every_steps", 1000))
    ckpt_steps = set(config.get("checkpoint_steps", ()) or ())
    if chief and start_step < total_steps:
        log.info("%s %d parameters; training steps %d..%d of %d (batch %d on %d device%s); compiling...",
                 config.model.get("name", task.__class__.__name__), n_params, start_step + 1, total_steps,
                 total_steps, global_batch, jax.device_count(), "s" if jax.device_count() > 1 else "")
    progress = Progress(total_steps, start_step, enabled=chief and bool(config.get("progress", True)),
                        every=log_every)

    t_start = time.time()
    prior_seconds = float(meta.get("train_seconds", 0.0))

    def train_seconds() -> float:
        return prior_seconds + time.time() - t_start

    def nonfinite(bad: int) -> FloatingPointError:
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

    def save(step_done: int, state_) -> None:
        host = driver.checkpoint_state(state_)  # host arrays, or the shards themselves (fsdp)
        bad = int(np.asarray(host.bad_step))
        if bad >= 0:  # never save a state frozen after a non-finite step
            raise nonfinite(bad)
        pos = {"step": step_done, "seed": seed, "batch_size": global_batch, "process_count": jax.process_count(),
               "examples_seen": step_done * global_batch}
        meta_ = {"step": step_done, "examples_seen": step_done * global_batch, "seed": seed,
                 "process_count": jax.process_count(), "train_seconds": train_seconds(),
                 "data_position": pos, "data_changes": data_changes}
        writer.flush()  # the rows a resume from this step keeps are on disk before the step is
        ckpt.save(step_done, host, meta_, config_dict)

    # ---------------------------------------------------------------- loop
    history: list[dict] = []
    t_log, last_log_step = time.time(), start_step
    run["step"] = start_step
    with Preemption() as preemption:  # SIGTERM: save at the current step, then stop
        for step in range(start_step, total_steps):
            batch = first_batch if step == start_step else next(it)
            state, metrics = driver.train(state, driver.put_batch(batch))
            history.append(metrics)
            done = step + 1
            run["step"] = done
            if stop_at_step is not None and done >= stop_at_step:
                it.close()
                jax.block_until_ready(state)
                ckpt.close()
                writer.close()
                return None
            if done % log_every == 0 or done == total_steps:
                history = driver.fetch(history)
                bad = int(history[-1]["bad_step"])
                if bad >= 0:
                    raise nonfinite(bad)
                row = _mean_metrics(history)
                elapsed = time.time() - t_log
                row["img_per_sec"] = (done - last_log_step) * global_batch / max(elapsed, 1e-9)
                row["img_per_sec_per_device"] = row["img_per_sec"] / jax.device_count()
                if flops is not None:
                    row["gflops_per_example"] = flops / 1e9
                writer.write(done, row, prefix="train/")
                progress.update(done, {"loss": row["loss"], "lr": row["learning_rate"],
                                       "img/s": row["img_per_sec"]})
                history, t_log, last_log_step = [], time.time(), done
            if done % ckpt_every == 0 or done == total_steps or done in ckpt_steps:
                save(done, state)
            if done != total_steps:
                evaluators.run(done, driver, state, writer)  # those due at this step
            if done < total_steps and preemption.reached(done):  # e.g. SIGTERM: the VM is being preempted
                if done % ckpt_every and done not in ckpt_steps:
                    save(done, state)
                progress.close()
                ckpt.wait()
                raise TrainingPreempted(f"{preemption.signal_name} at step {done}: saved a checkpoint at step "
                                        f"{done}; re-run the same command to resume ({os.path.abspath(workdir)}).")
    progress.close()
    it.close()  # the input pipeline stops (and frees its buffers) before the final evaluation
    jax.block_until_ready(state)
    ckpt.wait()  # the last checkpoint is complete (or its failure reported) before the results
    seconds = train_seconds()

    # ---------------------------------------------------------------- final evaluation
    try:
        ev = evaluators.run(total_steps, driver, state, writer, final=True)
        host = driver.get_state(state)
        extra = task.final_evaluation({"params": host.params, **host.model_state}, config, workdir, data_lib)
        results = {**ev, **extra, "steps": total_steps, "examples_seen": total_steps * global_batch,
                   "train_seconds": seconds,
                   "gflops_per_example": None if flops is None else flops / 1e9, "params": n_params,
                   **({"branch_from": b} if (b := ckpt_lib.branch_point(config_dict)) else {})}
        if chief:
            tmp = os.path.join(workdir, "results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2)
            os.replace(tmp, os.path.join(workdir, "results.json"))
            log.info("Results -> %s", os.path.join(os.path.abspath(workdir), "results.json"))
        return results
    finally:
        ckpt.close()
        writer.close()
