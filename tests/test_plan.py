"""experiments.plan: runs for a small recipe on simulated devices, and its memory figure for the
default ViT on one device agrees with the memory the step takes when it actually runs.

Measured memory: the process's peak resident set (``VmHWM`` in /proc/self/status, reset
just before the step by writing 5 to /proc/self/clear_refs) minus the resident set before
it, during the *first* execution of the already compiled step with its inputs already in
memory. That growth is what XLA allocates for the step's outputs and temporaries (its
buffers are plain host memory on CPU); the planner's figure for it is
``outputs - aliased + temporaries`` of ``compiled.memory_analysis()``.
"""

import json
import os
import sys
import textwrap

import pytest

import childproc
from test_multihost import _env  # a subprocess environment with N simulated CPU devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(*args, devices=4):
    return childproc.run([sys.executable, "-m", "experiments.plan", *args], env=_env(devices), cwd=REPO)


def test_planner_small_recipe_on_4_simulated_devices():
    p = _plan("--config=configs/vit.py", "--devices=64", "--compile_devices=4", "--accelerator=tpu_v4",
              "--parallel=fsdp", "--precision=bfloat16", "--config.batch_size=256")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[0])
    assert "FITS" in p.stdout and "peak/device" in p.stdout  # the readable table follows the JSON line
    assert r["compiled_devices"] == 4 and r["compiled_fsdp_size"] == 4 and r["fsdp_size"] == 64
    assert r["memory_extrapolated"] is True and r["per_device_batch"] == 4
    # the default ViT: 16 patches of 7x7 + class token, width 128, depth 2, MLP 256, 10 classes
    d, mlp, depth, t = 128, 256, 2, 17
    block = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    expected = 49 * d + d + d + t * d + depth * block + 2 * d + d * 10 + 10
    assert r["params"] == expected
    # XLA's FLOP count agrees with the independent count of the matmuls
    assert 0.9 < r["xla_vs_analytic"] < 1.25
    # 60k examples x 4.5 epochs / 256
    assert r["total_steps"] == -(-60_000 * 9 // (2 * 256))
    assert r["fits"] and r["smallest_fsdp_size_that_fits"] == 1
    m = r["memory_bytes"]
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]


def test_planner_errors_name_the_flag():
    p = _plan("--config=configs/vit.py", "--devices=8", "--accelerator=tpu_v9", devices=1)
    assert p.returncode == 2 and "--accelerator='tpu_v9' is unknown" in p.stderr and "tpu_v4" in p.stderr
    p = _plan("--config=configs/vit.py", "--devices=3", "--accelerator=h100", devices=1)
    assert p.returncode == 2 and "config.batch_size=128 is not divisible by --devices=3" in p.stderr
    p = _plan("--config=configs/vit.py", "--devices=8", "--accelerator=h100", "--parallel=fsdp", "--fsdp_size=3",
              devices=1)
    assert p.returncode == 2 and "--fsdp_size=3 must divide --devices=8" in p.stderr


MEASURE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from experiments import plan as plan_lib
    from seqvis.train import optim, step as step_lib
    from seqvis.train.tasks import get_task

    args, overrides = plan_lib._parse(["--config=configs/vit.py", "--devices=1", "--accelerator=h100"])
    r = plan_lib.plan(args, overrides)

    # the same step, really run: the default job's config, batch 128 on one device
    config = plan_lib.load_config("configs/vit.py")
    task = get_task(config)
    sched = optim.make_schedule(config.schedule, 1000)
    tx = optim.make_optimizer(config.optimizer, sched)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()), (step_lib.AXIS,))
    train = jax.jit(jax.shard_map(step_lib.make_train_step(task, tx, sched), mesh=mesh,
                                  in_specs=(P(), P(step_lib.AXIS)), out_specs=(P(), P())), donate_argnums=(0,))
    dummy = task.dummy_batch(128)
    state = step_lib.create_state(task, tx, 0, dummy)
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.randn(128, 28, 28, 1).astype(np.float32)),
             "label": jnp.asarray(rng.randint(0, 10, 128).astype(np.int32)), "mask": jnp.ones((128,), jnp.float32)}
    compiled = train.lower(state, batch).compile()
    jax.block_until_ready((state, batch))

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = kib("VmRSS")
    out = compiled(state, batch)
    jax.block_until_ready(out)
    growth = (kib("VmHWM") - before) * 1024
    m = r["memory_bytes"]
    args_bytes = sum(x.nbytes for x in jax.tree.leaves((state, batch)) if hasattr(x, "nbytes"))
    print("RESULT " + json.dumps({"plan": m, "measured_growth": growth, "live_argument_bytes": args_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_planner_memory_matches_the_measured_peak_of_the_default_vit_on_one_device():
    p = childproc.run([sys.executable, "-c", MEASURE], env=_env(1), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    m = r["plan"]
    # arguments: the train state and the batch, counted independently from the live arrays
    assert r["live_argument_bytes"] == pytest.approx(m["arguments"], rel=0.02)
    # what the step allocates beyond its (donated) arguments
    dynamic = m["outputs"] - m["aliased"] + m["temporaries"]
    assert dynamic > 2**20
    assert 0.6 * dynamic <= r["measured_growth"] <= 1.4 * dynamic + 8 * 2**20, (r["measured_growth"], dynamic)
