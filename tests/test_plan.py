"""experiments.plan: runs for a small recipe on simulated devices; its accelerator model agrees with
published runs (experiments.plan_published: every run fits, lower bounds below the published times)
and its parts are checked against independent counts (JAX's autodiff residuals, optax's state, hand
counts); its XLA:CPU memory figure for the default ViT on one device agrees with the memory the step
takes when it actually runs here.

Measured memory (XLA:CPU): the process's peak resident set (``VmHWM`` in /proc/self/status, reset
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
    assert "FITS" in p.stdout and "needs" in p.stdout  # the readable table follows the JSON line
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
    m = r["cpu_memory_bytes"]
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    # The accelerator model: its parts add up; the state it counts at the compiled degree is what the
    # compiled step's arguments hold (XLA's own argument size = state + batch, byte for byte).
    a = r["accelerator_memory_bytes"]
    assert a["total"] == sum(v for k, v in a.items() if k != "total")
    chk = r["argument_check"]
    assert chk["compiled_state_bytes"] == chk["counted_state_bytes"]
    assert chk["xla_argument_bytes"] == chk["compiled_state_bytes"] + chk["batch_bytes"]
    assert a["gradients"] == a["params"] and a["fsdp_gather"] > 0  # FSDP 64: one layer gathered
    # 64-way sharded params: the 128x256 MLP kernels are split, arrays under 16k elements replicated
    assert a["params"] < 4 * r["params"] / 8
    src = r["sources"]
    assert src["params"].startswith("measured") and "degree 64" in src["params"]
    assert src["activations"].startswith("modelled") and src["cpu_memory"].startswith("measured")
    lo, hi = r["train_hours_likely"]
    assert r["train_hours_lower_bound"] < lo < hi


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
    from seqvis.tasks.base import get_task

    args, overrides = plan_lib.parse_args(["--config=configs/vit.py", "--devices=1", "--accelerator=h100"])
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
    args_bytes = sum(x.nbytes for x in jax.tree.leaves((state, batch)) if hasattr(x, "nbytes"))
    print("RESULT " + json.dumps({"plan": {"cpu": r["cpu_memory_bytes"]}, "measured_growth": growth,
                                  "live_argument_bytes": args_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_planner_memory_matches_the_measured_peak_of_the_default_vit_on_one_device():
    p = childproc.run([sys.executable, "-c", MEASURE], env=_env(1), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads([l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])
    m = r["plan"]["cpu"]
    # arguments: the train state and the batch, counted independently from the live arrays
    assert r["live_argument_bytes"] == pytest.approx(m["arguments"], rel=0.02)
    # what the step allocates beyond its (donated) arguments
    dynamic = m["outputs"] - m["aliased"] + m["temporaries"]
    assert dynamic > 2**20
    assert 0.6 * dynamic <= r["measured_growth"] <= 1.4 * dynamic + 8 * 2**20, (r["measured_growth"], dynamic)


# ---------------------------------------------------------------------------- the accelerator model


def test_issue_recipe_fits_a_tpu_v3_8_with_a_lower_bound_under_seven_hours():
    """'Better plain ViT baselines': S/16, batch 1024 on a TPUv3-8 (128 per core), in under 7 hours."""
    p = _plan("--config=configs/vit_s16_i1k_baseline.py", "--devices=8", "--accelerator=tpu_v3",
              "--precision=bfloat16", "--no_compile", devices=8)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[0])
    assert r["per_device_batch"] == 128 and r["total_steps"] == -(-1_281_167 * 90 // 1024)
    assert r["fits"] and r["accelerator_memory_bytes"]["total"] < 0.5 * r["usable_hbm_bytes"]
    assert r["train_hours_lower_bound"] < 7.0
    assert r["cpu_memory_bytes"] is None and "not compiled" in r["sources"]["cpu_memory"]
    assert "measured" in p.stdout and "modelled" in p.stdout


def test_every_published_run_fits_and_its_lower_bound_is_below_the_published_time():
    p = childproc.run([sys.executable, "-m", "experiments.plan_published"], env=_env(8), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    runs, summary = lines[:-1], lines[-1]
    names = {r["name"] for r in runs}
    assert {"S/16 i1k 90 ep, TPUv3-8", "DeiT-B 300 ep, 16 x V100", "H/14 JFT-300M, 2.5k core-days",
            "g/14 MAP + Adafactor, TPUv3, 32/core"} <= names
    for r in runs:
        if r["memory_checked"]:
            assert r["fits"], (r["name"], r["memory_bytes"], r["usable_bytes"])
        if r["time_checked"]:
            assert r["lower_bound_below_published"], (r["name"], r["lower_bound"], r["published"])
            # the planner's likely MFU range holds every published run it is calibrated on
            assert summary["mfu_range"][0] <= r["implied_mfu"] <= summary["mfu_range"][1], r
            assert r["implied_mfu"] < summary["mfu_max"]
    assert summary["all_checked_fit"] and summary["all_lower_bounds_below_published"]
    # The S/16 run: float32 activations, 128 images per core, no remat, Adam with a bf16 first moment.
    s16 = next(r for r in runs if r["name"].startswith("S/16 i1k 90"))
    assert s16["per_device_batch"] == 128 and s16["unit"] == "hours" and s16["lower_bound"] < 7.0
    assert 0.2 < s16["implied_mfu"] < 0.35  # FLOPs measured by XLA over 7 h on 8 cores
    # g/14: the published fit needs every recipe piece; its optimiser state is modelled unless the trainer
    # builds a factored second moment itself.
    g = next(r for r in runs if r["name"].startswith("g/14"))
    assert g["per_device_batch"] == 32 and g["memory_bytes"]["optimizer_state"] < 0.6 * g["memory_bytes"]["params"]


def _s16_task(**over):
    import jax
    import jax.numpy as jnp

    from experiments import plan as plan_lib
    from seqvis.tasks.base import get_task

    config = plan_lib.load_config("configs/vit_s16_i1k_baseline.py")
    for k, v in over.items():
        plan_lib._apply_override(config, k, v)
    task = get_task(config)
    params = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), task.dummy_batch(1)))["params"]
    batch = dict(task.dummy_batch(16))
    batch["mask"] = jnp.ones((16,), jnp.float32)
    return task, params, jax.eval_shape(lambda: batch)


@pytest.mark.parametrize("over", [{}, {"precision": "bfloat16"}, {"model.pool": "map"}, {"model.dropout_rate": 0.1}])
def test_activation_model_lies_between_matmul_outputs_and_all_autodiff_residuals(over):
    """A fusing compiler keeps at least the matmul outputs (JAX with the dots_saveable policy) and at most
    everything JAX's autodiff saves; the modelled kept activations of S/16 (16 images) lie in between."""
    import jax

    from experiments import plan as plan_lib

    task, params, batch = _s16_task(**over)
    full = plan_lib.autodiff_residual_bytes(task, params, {}, batch)["total"]
    dots = plan_lib.autodiff_residual_bytes(task, params, {}, batch, policy=jax.checkpoint_policies.dots_saveable)
    model = plan_lib.vit_activation_bytes(task.model, (224, 224, 3), 16, 2 if over.get("precision") else 4)
    assert dots["total"] < model["kept"] < full, (dots["total"], model["kept"], full)
    # the hand count of one block: 16 images x 4 bytes x (8·T·D + 2·T·M + H·T²), T=196, D=384, M=1536, H=6
    if not over:
        assert model["per_block"] == 16 * 4 * (8 * 196 * 384 + 2 * 196 * 1536 + 6 * 196**2)


def test_activation_model_with_remat_keeps_what_autodiff_keeps():
    """With remat JAX's residuals are the block inputs (nothing left to fuse): the model agrees."""
    from experiments import plan as plan_lib

    task, params, batch = _s16_task(**{"model.remat": True, "model.scan_layers": True})
    full = plan_lib.autodiff_residual_bytes(task, params, {}, batch)["total"]
    model = plan_lib.vit_activation_bytes(task.model, (224, 224, 3), 16, 4)
    assert model["remat"] and model["kept"] >= 12 * 16 * 196 * 384 * 4  # 12 block inputs
    # the model also counts the image in the compute dtype, which is an argument (not a residual) in float32
    assert 0.75 * model["kept"] < full < 1.1 * model["kept"], (full, model["kept"])
    assert model["working"] == 2 * model["per_block"]


def test_optimizer_state_model_is_optaxs_state_and_the_trainers():
    """Worked by hand on a [256, 512] kernel and a [512] bias; the same as the trainer's state where the
    trainer builds that optimiser."""
    import jax
    import ml_collections
    import numpy as np

    from experiments import plan as plan_lib
    from seqvis.train import optim

    params = {"w": jax.ShapeDtypeStruct((256, 512), np.float32), "b": jax.ShapeDtypeStruct((512,), np.float32)}
    n = 256 * 512 + 512
    sched = optim.make_schedule(ml_collections.ConfigDict(dict(name="constant", base_lr=1e-3)), 10)

    def nbytes(tree):
        return sum(plan_lib._nbytes(x) for x in jax.tree.leaves(tree))

    def cfg(**kw):
        return ml_collections.ConfigDict(dict(dict(name="adamw", weight_decay=0.1, grad_clip_norm=1.0), **kw))

    assert nbytes(plan_lib.optimizer_state_model(params, cfg(), sched)) == 4 * n + 4 * n + 4  # mu, nu, count
    assert nbytes(plan_lib.optimizer_state_model(params, cfg(mu_dtype="bfloat16"), sched)) == 2 * n + 4 * n + 4
    # factored second moment (min dim 32): per leaf optax keeps (v_row, v_col, v), a (1,) placeholder in the
    # unused slots: the kernel a row (256) and a column (512) statistic, the bias (1-D) its full one; a step
    # count for it and one for the ema momentum (bf16)
    fac = 4 * (256 + 512 + 1) + 4 * (1 + 1 + 512) + 4 + 4 + 2 * n
    got = nbytes(plan_lib.optimizer_state_model(
        params, cfg(name="adafactor_momentum", mu_dtype="bfloat16", min_dim_size_to_factor=32), sched))
    assert got == fac
    # where the trainer builds the optimiser, the model is its state (up to clipping/masking scalars)
    for c in (cfg(), cfg(name="sgd"), cfg(name="adafactor")):
        ours = nbytes(jax.eval_shape(optim.make_optimizer(c, sched).init, params))
        assert abs(ours - nbytes(plan_lib.optimizer_state_model(params, c, sched))) <= 64, c.name


def test_largest_layer_is_one_encoder_block():
    import jax
    import jax.numpy as jnp

    from experiments import plan as plan_lib
    from seqvis.models import vit

    for scan in (False, True):
        model = vit.build("g/14", num_classes=1000, scan_layers=scan)
        params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3))))["params"]
        d, m = 1408, 6144
        block = 4 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
        assert plan_lib.largest_layer_bytes(params) == 4 * block


def test_optimizer_state_the_trainer_does_not_build_is_modelled_and_said_so():
    p = _plan("--config=configs/vit.py", "--devices=4", "--accelerator=tpu_v4", "--no_compile",
              "--config.optimizer.name=adafactor_momentum", "--config.optimizer.mu_dtype=bfloat16", devices=4)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[0])
    src = r["sources"]["optimizer_state"]
    # on a trainer without this optimiser: modelled (a stand-in adamw step is lowered); with it: measured
    assert src.startswith("modelled") or src.startswith("counted"), src
    full = r["params"] * 4
    assert r["accelerator_memory_bytes"]["optimizer_state"] < 0.6 * full  # bf16 momentum + factored statistics
