"""Compile time of small train steps under XLA flag sets: what the test suite's flags buy.

    python -m experiments.compile_time [--flags "" "--xla_backend_optimization_level=0" ...]

The test suite is compile-bound (tiny models, a few steps each), so tests/conftest.py picks the XLA:CPU flags
that compile fastest. This measures them: each flag set runs in a fresh child process with no compilation
cache, which builds a tiny ViT step (mu/7, width 32, depth 2, 28x28x1) and a one-block-per-stage ResNet-18
step (width 8, 32x32x3) -- the shapes the tests use -- and times the first call (compile + one step) and 20
further steps. Prints one JSON line per flag set (``user_s`` is the child's CPU time, imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_FLAGS = ["", "--xla_backend_optimization_level=0",
                 "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"]


def child() -> dict:
    import jax
    import ml_collections
    import numpy as np

    from seqvis.train import optim, step as step_lib
    from seqvis.train.defaults import base_config
    from seqvis.tasks.base import get_task

    def config(model, shape):
        c = base_config()
        c.data = ml_collections.ConfigDict(dict(num_classes=10, image_shape=shape))
        c.model = model
        c.schedule.update(name="cosine", base_lr=0.1, warmup_steps=0)
        return c

    out = {}
    for name, c in [("vit", config(dict(name="vit", variant="mu/7", width=32, depth=2, mlp_dim=64, num_heads=2),
                                   (28, 28, 1))),
                    ("resnet", config(dict(name="resnet", depth=18, width=8, stage_sizes=(1, 1, 1, 1)),
                                      (32, 32, 3)))]:
        task = get_task(c)
        sched = optim.make_schedule(c.schedule, 100)
        tx = optim.make_optimizer(c.optimizer, sched)
        state = step_lib.create_state(task, tx, 0, task.dummy_batch(2))
        devices = jax.local_devices()[:1]
        train_step = jax.pmap(step_lib.make_train_step(task, tx, sched, 1), axis_name=step_lib.AXIS,
                              devices=devices)
        s = step_lib.replicate(state, devices)
        batch = {"image": np.zeros((1, 16) + tuple(c.data.image_shape), np.float32),
                 "label": np.zeros((1, 16), np.int32), "mask": np.ones((1, 16), np.float32)}
        t = time.perf_counter()
        s, _ = train_step(s, batch)
        jax.block_until_ready(s)
        out[f"{name}_first_call_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        for _ in range(20):
            s, _ = train_step(s, batch)
        jax.block_until_ready(s)
        out[f"{name}_20_steps_s"] = round(time.perf_counter() - t, 3)
    out["user_s"] = round(os.times().user, 1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flags", nargs="*", default=DEFAULT_FLAGS, help="XLA flag sets, one per child process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child()))
        return
    for flags in args.flags:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, JAX_ENABLE_COMPILATION_CACHE="false",
                   TF_CPP_MIN_LOG_LEVEL="3")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "experiments.compile_time", "--child"], env=env,
                              capture_output=True, text=True)
        wall = round(time.perf_counter() - t, 1)
        if proc.returncode:
            print(json.dumps({"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}))
            continue
        print(json.dumps({"flags": flags, "wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}))


if __name__ == "__main__":
    main()
