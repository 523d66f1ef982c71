"""``train_and_evaluate(config, workdir)``: the one trainer every task shares.

Read top to bottom: config checks, devices and hosts, input, model and optimiser,
checkpoint restore, compile, the loop (log, checkpoint, evaluate), final evaluation.
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

from seqvis.analysis.flops import forward_flops_per_example  # noqa: F401 - also re-exported here
from seqvis.models.common import num_params
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train import optim
from seqvis.train import step as step_lib
from seqvis.train.metrics import MetricWriter, Progress
from seqvis.train.tasks import get_task

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


# ============================================================================ config checks


def config_to_dict(config: Any) -> dict:
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def check_config(config: Any) -> None:
    """Fail fast, before any data loading or compilation, with one clear message per problem."""
    for field in ("batch_size", "data", "model", "optimizer", "schedule"):
        if field not in config:
            raise ConfigError(f"config.{field} is missing; see configs/vit.py for a complete example.")
    if not (config.get("total_steps") or config.get("num_epochs")):
        raise ConfigError("Set config.total_steps or config.num_epochs to a positive number.")
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


def evaluate(task, driver, state, config, data_lib) -> dict[str, float]:
    """Masked sums over every example of the eval split exactly once."""
    totals: dict[str, float] = {}
    it = data_lib.eval_iterator(config.data, global_batch_size=int(config.get("eval_batch_size", config.batch_size)),
                                extra_ops=tuple(task.pp_ops(train=False)))
    for batch in it:
        sums = driver.fetch(driver.evaluate(state, driver.put_batch(batch)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    out = {k: v / max(count, 1.0) for k, v in totals.items()}
    out["num_examples"] = int(count)
    return out


# ============================================================================ main entry


def train_and_evaluate(config: Any, workdir: str, *, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its checkpoints) and evaluate.

    ``stop_at_step`` ends the run right after that step without saving, like a process
    killed there (tests use it to check that resuming is exact). Returns the results dict
    (also written to ``workdir/results.json``), or None when stopped early.
    """
    from seqvis.data import pipeline as data_lib  # tensorflow only when training

    maybe_initialize_distributed(config)  # before anything touches the devices
    check_config(config)
    chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    config_dict = config_to_dict(config)
    if chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_dict, f, indent=2)

    # ---------------------------------------------------------------- input
    global_batch = int(config.batch_size)
    if config.get("total_steps"):
        total_steps = int(config.total_steps)
    else:
        n_train = data_lib.num_examples(config.data, config.data.get("train_split", "train"))
        total_steps = int(math.ceil(float(config.num_epochs) * n_train / global_batch))

    # ---------------------------------------------------------------- model and optimiser
    task = get_task(config)
    task.setup(workdir, data_lib)
    schedule = optim.make_schedule(config.schedule, total_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    per_device = global_batch // jax.device_count()
    dummy = task.dummy_batch(per_device)
    host_state = jax.device_get(step_lib.create_state(task, tx, int(config.get("seed", 0)), dummy))
    n_params = num_params(host_state.params)

    # ---------------------------------------------------------------- checkpoint restore
    ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)),
                                 async_save=bool(config.get("async_checkpointing", True)))
    meta = {"step": 0, "examples_seen": 0, "train_seconds": 0.0}
    restored = ckpt.restore_latest(host_state, config_dict)
    if restored is not None:
        host_state, meta = restored
        log.info("Resumed from step %d in %s", meta["step"], ckpt.directory)
    elif config.get("init_from"):
        from seqvis.train.pretrained import load_pretrained

        params = load_pretrained(config.init_from, host_state.params)
        host_state = host_state.replace(params=params, opt_state=jax.device_get(tx.init(params)))
    start_step = int(meta["step"])

    # ---------------------------------------------------------------- compile
    accum = int(config.get("grad_accum_steps", 1))
    driver = step_lib.make_driver(config.get("parallel", "pmap"),
                                  step_lib.make_train_step(task, tx, schedule, accum),
                                  step_lib.make_eval_step(task))
    state = driver.put_state(host_state)
    flops = None
    if config.get("count_flops", True):
        flops = forward_flops_per_example(
            task, {"params": host_state.params, **host_state.model_state}, jax.tree.map(np.asarray, dummy))

    writer = MetricWriter(workdir, enabled=chief, tensorboard=bool(config.get("tensorboard", True)))
    log_every = int(config.get("log_every_steps", 50))
    ckpt_every = int(config.get("checkpoint_every_steps", 1000))
    eval_every = int(config.get("eval_every_steps", 0) or 0)
    progress = Progress(total_steps, start_step, enabled=chief and bool(config.get("progress", True)),
                        every=log_every)

    def save(step_done: int, state_) -> None:
        meta_ = {"step": step_done, "examples_seen": step_done * global_batch, "seed": int(config.get("seed", 0)),
                 "process_count": jax.process_count(), "train_seconds": train_seconds(),
                 "data_position": {"step": step_done, "seed": int(config.get("seed", 0))}}
        ckpt.save(step_done, driver.get_state(state_), meta_, config_dict)

    t_start = time.time()
    prior_seconds = float(meta.get("train_seconds", 0.0))

    def train_seconds() -> float:
        return prior_seconds + time.time() - t_start

    # ---------------------------------------------------------------- loop
    it = data_lib.train_iterator(config.data, global_batch_size=global_batch, seed=int(config.get("seed", 0)),
                                 start_step=start_step, extra_ops=tuple(task.pp_ops(train=True)))
    history: list[dict] = []
    t_log, last_log_step = time.time(), start_step
    try:
        for step in range(start_step, total_steps):
            batch = next(it)
            state, metrics = driver.train(state, driver.put_batch(batch))
            history.append(metrics)
            done = step + 1
            if stop_at_step is not None and done >= stop_at_step:
                jax.block_until_ready(state)
                return None
            if done % log_every == 0 or done == total_steps:
                history = driver.fetch(history)
                bad = int(history[-1]["bad_step"])
                if bad >= 0:
                    good = [s for s in ckpt.steps() if s <= bad]
                    raise FloatingPointError(
                        f"Non-finite loss or gradient at step {bad + 1}; training stopped. "
                        f"The last good checkpoint (step {good[-1] if good else 'none'}) in {ckpt.directory} "
                        "is kept. Lower config.schedule.base_lr, set config.optimizer.grad_clip_norm, "
                        "or check the inputs for NaN.")
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
            if done % ckpt_every == 0 or done == total_steps:
                save(done, state)
            if eval_every and done % eval_every == 0 and done != total_steps:
                ev = evaluate(task, driver, state, config, data_lib)
                writer.write(done, ev, prefix="eval/")
        progress.close()
        jax.block_until_ready(state)
        seconds = train_seconds()

        # ------------------------------------------------------------ final evaluation
        ev = evaluate(task, driver, state, config, data_lib)
        writer.write(total_steps, ev, prefix="eval/")
        host = driver.get_state(state)
        extra = task.final_evaluation({"params": host.params, **host.model_state}, config, workdir, data_lib)
        results = {**ev, **extra, "steps": total_steps, "examples_seen": total_steps * global_batch,
                   "train_seconds": seconds,
                   "gflops_per_example": None if flops is None else flops / 1e9, "params": n_params}
        if chief:
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results
    finally:
        ckpt.close()
        writer.close()
