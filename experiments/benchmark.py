"""Throughput benchmark: train and inference img/s, model GFLOPs per image, achieved GFLOP/s.

    python -m experiments.benchmark [--steps 20] [--models default,ti4_32]
    python -m experiments.benchmark --input=default,jpeg,jpeg_1core,resume   # the input pipeline alone
    python -m experiments.benchmark --compare --peer_python=PEER_VENV/bin/python  # vs timm / torch.nn

Prints one JSON line per (model, mode). The train step is the real seqvis step (pmap over
all local devices, optimiser update included) on synthetic batches, so the input pipeline
is not measured. GFLOPs come from XLA's cost analysis of the compiled forward pass;
achieved GFLOP/s counts a training step as 3x the forward FLOPs (the usual convention).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import ml_collections
import numpy as np

from seqvis.cli.config_cli import load_config
from seqvis.evaluation.flops import forward_flops_per_example
from seqvis.train import optim, step as step_lib
from seqvis.tasks.base import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vit_config(arg: str = "") -> ml_collections.ConfigDict:
    """``configs/vit.py:ARG`` (the default job's config for an empty ``arg``)."""
    return load_config(os.path.join(REPO, "configs", "vit.py") + (f":{arg}" if arg else ""))


def configs() -> dict[str, ml_collections.ConfigDict]:
    """The benchmarked models by name: the default job, and ViT-Ti/4 on 32x32x3 at batch 64."""
    ti4 = vit_config("Ti/4,cifar10")
    ti4.batch_size = 64
    return {"default": vit_config(), "ti4_32": ti4}


def synthetic_setup(config: ml_collections.ConfigDict) -> dict:
    """The real seqvis training step of ``config`` on synthetic batches, ready to run.

    Returns ``task``, ``driver`` (a ``PmapDriver`` over the local devices with the config's
    optimiser and schedule), ``state`` (on the devices), ``host_state``, ``data`` (one batch,
    split over the devices), ``batch``, ``devices`` and ``flops`` (forward FLOPs per example,
    XLA's count). Used by :func:`bench` and ``experiments.profile_step``.
    """
    task = get_task(config)
    sched = optim.make_schedule(config.schedule, 10 * max(config.schedule.warmup_steps, 1) + 10)
    tx = optim.make_optimizer(config.optimizer, sched)
    n_dev = jax.local_device_count()
    batch = int(config.batch_size)
    per_dev = batch // n_dev
    dummy = task.dummy_batch(per_dev)
    host_state = jax.device_get(step_lib.create_state(task, tx, 0, dummy))
    flops = forward_flops_per_example(task.model, {"params": host_state.params, **host_state.model_state},
                                      task.model_inputs(jax.tree.map(np.asarray, dummy)))
    driver = step_lib.PmapDriver(step_lib.make_train_step(task, tx, sched), step_lib.make_eval_step(task))
    rng = np.random.default_rng(0)
    h, w, c = config.data.image_shape
    data = {"image": rng.normal(size=(n_dev, per_dev, h, w, c)).astype(np.float32),
            "label": rng.integers(0, config.data.num_classes, (n_dev, per_dev)).astype(np.int32),
            "mask": np.ones((n_dev, per_dev), np.float32)}
    return dict(task=task, driver=driver, state=driver.put_state(host_state), host_state=host_state, data=data,
                batch=batch, devices=n_dev, flops=flops)


def bench(name: str, config: ml_collections.ConfigDict, steps: int) -> list[dict]:
    setup = synthetic_setup(config)
    task, driver, data, flops = setup["task"], setup["driver"], setup["data"], setup["flops"]
    state, batch, n_dev, s = setup["host_state"], setup["batch"], setup["devices"], setup["state"]
    t = time.time()
    s, m = driver.train(s, data)
    jax.block_until_ready(s)
    compile_s = time.time() - t
    t = time.time()
    for _ in range(steps):
        s, m = driver.train(s, data)
    jax.block_until_ready(s)
    train_ips = steps * batch / (time.time() - t)

    fwd = jax.pmap(lambda v, x: task.model.apply(v, x, train=False))
    variables = step_lib.replicate({"params": state.params, **state.model_state}, jax.local_devices())
    jax.block_until_ready(fwd(variables, data["image"]))
    t = time.time()
    for _ in range(steps):
        out = fwd(variables, data["image"])
    jax.block_until_ready(out)
    infer_ips = steps * batch / (time.time() - t)

    common = {"model": name, "variant": config.model.get("variant"), "image_shape": list(config.data.image_shape),
              "batch": batch, "devices": n_dev, "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
              "gflops_per_image": None if flops is None else flops / 1e9}
    rows = [dict(common, mode="train", img_per_sec=train_ips, compile_seconds=compile_s,
                 achieved_gflops_per_sec=None if flops is None else 3 * flops * train_ips / 1e9),
            dict(common, mode="inference", img_per_sec=infer_ips,
                 achieved_gflops_per_sec=None if flops is None else flops * infer_ips / 1e9)]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="default,ti4_32")
    ap.add_argument("--input", default="", help="measure the input pipeline alone (experiments.input_benchmark)")
    ap.add_argument("--input_batches", type=int, default=40)
    ap.add_argument("--compare", action="store_true",
                    help="seqvis against timm / torch.nn, side by side (experiments.compare)")
    ap.add_argument("--peer_python", default=os.environ.get("SEQVIS_PEER_PYTHON", sys.executable),
                    help="--compare: interpreter with torch (+ timm) for the peer side "
                         "(default $SEQVIS_PEER_PYTHON, else this interpreter)")
    ap.add_argument("--workloads", default="",
                    help="--compare: comma-separated subset of experiments.compare.WORKLOADS (default all)")
    ap.add_argument("--repeats", type=int, default=3, help="--compare: alternating timed runs per side")
    ap.add_argument("--steps_scale", type=float, default=1.0,
                    help="--compare: multiply each workload's steps per timed run")
    args = ap.parse_args()
    if args.compare:
        from experiments import compare

        names = [n for n in args.workloads.split(",") if n] or list(compare.WORKLOADS)
        for n in names:
            compare.workload(n)  # fail early on a bad name
        compare.main(names, args.peer_python, repeats=args.repeats, steps_scale=args.steps_scale)
        return
    if args.input:
        from experiments import input_benchmark

        input_benchmark.main(["--workloads", args.input, "--input_batches", str(args.input_batches)])
        return
    configs = configs()
    for name in args.models.split(","):
        if name not in configs:
            raise SystemExit(f"--models: unknown {name!r}; valid: {', '.join(configs)}")
        for row in bench(name, configs[name], args.steps):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
