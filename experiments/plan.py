"""Planner: does a recipe fit an accelerator, and what will it cost? Compiled, not guessed.

    python -m experiments.plan --config=configs/vit_i1k.py:L/16 --devices=64 --accelerator=tpu_v4
    python -m experiments.plan --config=configs/vit_i1k.py:H/14 --devices=512 --accelerator=tpu_v3 \\
        --parallel=fsdp --precision=bfloat16 --num_examples=303000000 --epochs=7 --mfu=0.4
    python -m experiments.plan --config=configs/vit.py --devices=1 --accelerator=h100 --config.batch_size=256

Accelerators: ``tpu_v3`` (one device = one core), ``tpu_v4``, ``tpu_v5e`` (one device =
one chip), ``a100_40g``, ``a100_80g``, ``h100`` (SXM). ``--parallel`` is ``pmap`` /
``mesh`` (state replicated) or ``fsdp`` (state sharded over ``--fsdp_size`` devices,
default all); ``--precision`` is ``float32`` or ``bfloat16``; any ``--config.a.b=v``
overrides the config. Prints one JSON line (``--json_only`` prints nothing else) and a
readable table.

What it does:

1. Builds the real train step of the trainer (task, optimiser, schedule, the driver of
   ``--parallel``) for the config, with the per-device batch of the target run
   (``config.batch_size / devices``).
2. Compiles it ahead of time for ``C = min(devices, --compile_devices)`` simulated CPU
   devices (``--xla_force_host_platform_device_count``, set before jax is imported), from
   shapes only: no parameter is ever allocated (``jax.jit(...).lower(ShapeDtypeStruct...)
   .compile()``).
3. Per-device memory from XLA's ``compiled.memory_analysis()``: arguments (train state and
   batch), outputs, temporaries, and the peak estimate ``arguments + outputs - aliased
   (donated) + temporaries``. **Extrapolation**: when ``C`` is smaller than the target
   device count, the FSDP degree compiled is ``min(fsdp, C)``; the sharded state's share
   is then replaced analytically by its size at the target degree (counted from the
   shapes and the sharding rules by :func:`seqvis.train.sharding.per_device_bytes`), in
   the arguments, outputs and aliased bytes. Activations and temporaries depend on the
   per-device batch only, which is the target's, so they are taken as compiled. With
   replicated state (pmap/mesh) the per-device program does not depend on the device
   count and nothing is extrapolated. The output says which case applies.
4. FLOPs per step from XLA's ``compiled.cost_analysis()`` (the per-device SPMD program:
   multiplied by ``C`` for the global step at ``C`` devices and scaled to the target's
   global batch). Checked against an independent count for ViTs (3 x the analytic forward
   matmul FLOPs of :func:`seqvis.evaluation.flops.vit_forward_flops`); if the two disagree
   by more than 25 % (e.g. XLA counting a scanned layer loop once), the analytic count is
   used and the output says so.
5. Lower-bound step time ``max(FLOPs / (devices x peak x MFU), bytes accessed per device
   / HBM bandwidth)`` from the small table :data:`ACCELERATORS` of published peak dense
   FLOP/s and HBM per device, at ``--mfu`` (default 0.4); steps of the recipe
   (``total_steps``, or ``num_epochs x examples / batch``) give accelerator-hours and
   device-days.
6. Fits if the peak estimate is within ``--hbm_fraction`` (default 0.9: the runtime and
   fragmentation keep some) of the device HBM. Suggests the smallest FSDP degree (a
   divisor of ``devices``) at which the extrapolated peak fits.

XLA's CPU memory figures are those of the CPU backend's buffer assignment: an
accelerator backend fuses and rematerialises differently, so treat the figures as an
estimate within tens of percent, not a guarantee.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import Any

# name: (peak dense bf16 FLOP/s, peak float32-matmul FLOP/s, HBM bytes, HBM bytes/s) per JAX device.
# Published figures. TPU v3: one core (half a chip: 123 TFLOP/s, 32 GiB, 900 GB/s per chip);
# TPUs run float32 matmuls at default precision as one bf16 pass, hence the same peak.
# GPUs: float32 matmuls at JAX's default precision use TF32 tensor cores.
ACCELERATORS: dict[str, dict[str, float]] = {
    "tpu_v3": dict(bf16=61.5e12, f32=61.5e12, hbm=16 * 2**30, bw=450e9),
    "tpu_v4": dict(bf16=275e12, f32=275e12, hbm=32 * 2**30, bw=1228e9),
    "tpu_v5e": dict(bf16=197e12, f32=197e12, hbm=16 * 2**30, bw=819e9),
    "a100_40g": dict(bf16=312e12, f32=156e12, hbm=40e9, bw=1555e9),
    "a100_80g": dict(bf16=312e12, f32=156e12, hbm=80e9, bw=2039e9),
    "h100": dict(bf16=989e12, f32=494e12, hbm=80e9, bw=3350e9),
}

# Train split sizes of the datasets the recipes name (used when --num_examples is not given).
DATASET_SIZES = {"imagenet2012": 1_281_167, "imagenet21k": 14_197_122, "jft300m": 303_000_000,
                 "fashion_mnist_idx": 60_000, "mnist_idx": 60_000, "cifar10": 50_000, "cifar100": 50_000}


class PlanError(ValueError):
    """A planner argument that cannot work; the message names it and the fix."""


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/vit_i1k.py:L/16")
    p.add_argument("--devices", type=int, required=True, help="number of accelerator devices of the run")
    p.add_argument("--accelerator", required=True, help=f"one of {', '.join(ACCELERATORS)}, or all (one row each)")
    p.add_argument("--parallel", default=None, help="pmap | mesh | fsdp (default: the config's)")
    p.add_argument("--precision", default=None, help="float32 | bfloat16 (default: the config's)")
    p.add_argument("--fsdp_size", type=int, default=None, help="FSDP degree (default: all devices)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed for the time")
    p.add_argument("--hbm_fraction", type=float, default=0.9, help="usable fraction of the device HBM")
    p.add_argument("--compile_devices", type=int, default=8, help="simulated devices compiled for (<= devices)")
    p.add_argument("--num_examples", type=int, default=None, help="training examples per epoch")
    p.add_argument("--epochs", type=float, default=None, help="override config.num_epochs")
    p.add_argument("--json_only", action="store_true", help="print only the JSON line")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for a in rest:
        if not a.startswith("--config.") or "=" not in a:
            raise PlanError(f"unknown argument {a!r}; config overrides are written --config.FIELD=VALUE.")
        k, v = a[len("--config."):].split("=", 1)
        overrides.append((k, v))
    if args.accelerator not in ACCELERATORS and args.accelerator != "all":
        raise PlanError(f"--accelerator={args.accelerator!r} is unknown; use one of {', '.join(ACCELERATORS)} "
                        "(or all).")
    if args.devices < 1:
        raise PlanError(f"--devices={args.devices} must be >= 1.")
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu={args.mfu} must be in (0, 1], e.g. --mfu=0.4.")
    if args.compile_devices < 1:
        raise PlanError(f"--compile_devices={args.compile_devices} must be >= 1.")
    return args, overrides


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise PlanError(f"--config={spec!r}: no file {path!r}; e.g. --config=configs/vit_i1k.py:L/16.")
    mod_spec = importlib.util.spec_from_file_location("_plan_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def _apply_override(config, key: str, value: str) -> None:
    import ast

    from seqvis.config_cli import override_problem

    problem = override_problem(config, key, value)
    if problem is not None and not key.startswith("model."):  # model fields are the model's keyword arguments
        raise PlanError(f"--config.{key}={value}: {problem}.")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[leaf] = parsed


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def analytic_train_flops(model, image_shape, batch: int) -> float | None:
    """Independent count of one train step of a ViT: 3 x the analytic forward matmul FLOPs
    (:func:`seqvis.evaluation.flops.vit_forward_flops`: patch embedding, q/k/v/out and MLP
    on every token, the two attention products, pre-logits and head) x the global batch.
    None for models without an analytic count (ResNets, hybrids, captioners, video)."""
    from seqvis.evaluation.flops import TRAIN_FLOPS_PER_FORWARD, vit_forward_flops
    from seqvis.models.vit import ViT

    if not isinstance(model, ViT):
        return None
    fwd = vit_forward_flops(model, image_shape)
    return None if fwd is None else TRAIN_FLOPS_PER_FORWARD * fwd * batch


def plan(args, overrides) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqvis.train import optim, sharding as sharding_lib, step as step_lib
    from seqvis.train.precision import precision_name
    from seqvis.train.tasks import get_task

    config = load_config(args.config)
    with config.unlocked() if hasattr(config, "unlocked") else _null():
        for k, v in overrides:
            _apply_override(config, k, v)
        if args.parallel:
            config.parallel = args.parallel
        if args.precision:
            config.precision = args.precision
        if args.epochs is not None:
            config.num_epochs = float(args.epochs)
            config.total_steps = 0
    parallel = config.get("parallel", "pmap")
    if parallel not in step_lib.DRIVERS:
        raise PlanError(f"--parallel={parallel!r} is unknown; use one of {sorted(step_lib.DRIVERS)}.")
    precision = precision_name(config)
    n = args.devices
    global_batch = int(config.batch_size)
    accum = int(config.get("grad_accum_steps", 1))
    if global_batch % (n * accum):
        raise PlanError(f"config.batch_size={global_batch} is not divisible by --devices={n} x "
                        f"config.grad_accum_steps={accum}; pick a batch size that is (e.g. "
                        f"--config.batch_size={n * accum * max(1, global_batch // (n * accum))}).")
    per_device = global_batch // n
    c = min(n, args.compile_devices, jax.device_count())
    fsdp_target = args.fsdp_size or int(config.get("fsdp_size", 0) or 0) or n
    if parallel == "fsdp" and n % fsdp_target:
        raise PlanError(f"--fsdp_size={fsdp_target} must divide --devices={n}; use one of {_divisors(n)}.")
    if parallel != "fsdp" and args.fsdp_size:
        raise PlanError(f"--fsdp_size={args.fsdp_size} needs --parallel=fsdp (now {parallel!r}).")
    fsdp_c = max(d for d in _divisors(c) if d <= fsdp_target) if parallel == "fsdp" else 1
    with config.unlocked() if hasattr(config, "unlocked") else _null():
        config.fsdp_size = fsdp_c if parallel == "fsdp" else 0

    # ---- the real train step, shapes only
    task = get_task(config)
    if config.get("total_steps"):
        total_steps = int(config.total_steps)
        num_examples = None
    else:
        name = config.data.get("name", "")
        num_examples = args.num_examples or DATASET_SIZES.get(name)
        if num_examples is None:
            raise PlanError(f"the size of config.data.name={name!r} is not known to the planner; pass "
                            "--num_examples=N (training examples per epoch) or --config.total_steps=N.")
        total_steps = int(math.ceil(float(config.num_epochs) * num_examples / global_batch))
    schedule = optim.make_schedule(config.schedule, max(total_steps, 1))
    tx = optim.make_optimizer(config.optimizer, schedule)
    dummy = task.dummy_batch(per_device)
    abstract_state = jax.eval_shape(lambda: step_lib.create_state(task, tx, 0, dummy))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)))
    devices = jax.devices()[:c]
    batch_struct = {k: jax.ShapeDtypeStruct((c * per_device,) + v.shape[1:], v.dtype) for k, v in dummy.items()}
    batch_struct["mask"] = jax.ShapeDtypeStruct((c * per_device,), jnp.float32)
    train_step = step_lib.make_train_step(task, tx, schedule, accum, vary_params=parallel != "fsdp")
    eval_step = step_lib.make_eval_step(task)
    if parallel == "fsdp":
        opts = step_lib.driver_options(config)
        driver = step_lib.FsdpDriver(train_step, eval_step, devices=devices, **opts)
        state_in = driver.abstract(abstract_state)
        batch_in = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=driver.batch_sharding),
                                batch_struct)
        fn = driver.jitted(abstract_state)[0]
        rules, min_el = opts["rules"], opts["min_shard_elements"]
    else:  # pmap and mesh run the same per-device program with replicated state: compile the mesh one
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        mesh = Mesh(np.asarray(devices), (step_lib.AXIS,))
        rep, sh = NamedSharding(mesh, P()), NamedSharding(mesh, P(step_lib.AXIS))
        fn = jax.jit(jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(step_lib.AXIS)), out_specs=(P(), P())),
                     donate_argnums=(0,))
        state_in = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), abstract_state)
        batch_in = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch_struct)
        rules, min_el = sharding_lib.DEFAULT_RULES, sharding_lib.MIN_SHARD_ELEMENTS
    compiled = fn.lower(state_in, batch_in).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost

    # ---- memory per device (extrapolated for the sharded state when c < n)
    args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias_b, temp_b = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)

    def state_bytes(degree: int) -> int:  # degree 1: the whole state (replicated)
        s, r = sharding_lib.per_device_bytes(abstract_state, degree, rules, min_el)
        return s + r

    compiled_state = state_bytes(fsdp_c)

    def at_degree(degree: int) -> dict[str, int]:
        delta = state_bytes(degree) - compiled_state
        a, o, al = args_b + delta, out_b + delta, alias_b + delta if alias_b else 0
        return {"arguments": a, "outputs": o, "aliased": al, "temporaries": temp_b, "peak": a + o - al + temp_b}

    target_degree = fsdp_target if parallel == "fsdp" else 1
    memory = at_degree(target_degree)
    extrapolated = parallel == "fsdp" and target_degree != fsdp_c
    # ---- FLOPs
    xla_flops_device = float(cost.get("flops", 0.0))
    xla_flops = xla_flops_device * c * (n / c)  # global step at c devices, scaled to the target batch
    analytic = analytic_train_flops(task.model, tuple(config.data.image_shape), global_batch)
    source = "xla"
    flops = xla_flops
    if analytic and (not xla_flops or abs(xla_flops / analytic - 1) > 0.25):
        flops, source = analytic, "analytic (XLA's count differs by more than 25%)"
    bytes_dev = float(cost.get("bytes accessed", 0.0))

    # ---- per accelerator: fits, smallest FSDP degree, time
    def on(name: str) -> dict[str, Any]:
        acc = ACCELERATORS[name]
        usable = acc["hbm"] * args.hbm_fraction
        smallest = next((d for d in _divisors(n) if at_degree(d)["peak"] <= usable), None)
        peak = acc["bf16"] if precision == "bfloat16" else acc["f32"]
        compute_s = flops / (n * peak * args.mfu)
        memory_s = bytes_dev / acc["bw"]
        step_s = max(compute_s, memory_s)
        hours = step_s * total_steps * n / 3600.0
        return {"accelerator": name, "hbm_bytes": acc["hbm"], "usable_hbm_bytes": usable,
                "fits": bool(memory["peak"] <= usable), "smallest_fsdp_size_that_fits": smallest,
                "step_seconds_lower_bound": step_s, "compute_bound_seconds": compute_s,
                "memory_bound_seconds": memory_s, "accelerator_hours": hours, "device_days": hours / 24.0}

    names = list(ACCELERATORS) if args.accelerator == "all" else [args.accelerator]
    per = [on(a) for a in names]
    out = {
        "config": args.config, "overrides": dict(overrides), "accelerator": args.accelerator, "devices": n,
        "parallel": parallel, "precision": precision, "fsdp_size": target_degree if parallel == "fsdp" else None,
        "global_batch": global_batch, "per_device_batch": per_device, "grad_accum_steps": accum,
        "params": n_params, "total_steps": total_steps, "num_examples": num_examples,
        "compiled_devices": c, "compiled_fsdp_size": fsdp_c if parallel == "fsdp" else None,
        "memory_extrapolated": extrapolated,
        "memory_bytes": memory,
        "flops_per_step": flops, "flops_source": source, "xla_flops_per_step": xla_flops,
        "analytic_flops_per_step": analytic,
        "xla_vs_analytic": (xla_flops / analytic) if analytic else None,
        "bytes_accessed_per_device": bytes_dev, "mfu": args.mfu,
    }
    if len(per) == 1:
        out.update(per[0])
    else:
        out["per_accelerator"] = per
    return out


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(r: dict) -> str:
    m = r["memory_bytes"]
    rows = [
        ("recipe", f"{r['config']} {' '.join(f'{k}={v}' for k, v in r['overrides'].items())}".strip()),
        ("devices", f"{r['devices']}, {r['parallel']}" + (f" (fsdp {r['fsdp_size']})" if r["fsdp_size"] else "")
                    + f", {r['precision']}"),
        ("batch", f"{r['global_batch']} global, {r['per_device_batch']} per device, accum {r['grad_accum_steps']}"),
        ("parameters", f"{r['params'] / 1e6:.1f} M"),
        ("compiled for", f"{r['compiled_devices']} simulated devices"
                         + (f", fsdp {r['compiled_fsdp_size']}; sharded state extrapolated to fsdp {r['fsdp_size']}"
                            if r["memory_extrapolated"] else "")),
        ("memory / device", f"args {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
                            f"(aliased {_gib(m['aliased'])}), temps {_gib(m['temporaries'])}; peak {_gib(m['peak'])}"),
        ("FLOPs / step", f"{r['flops_per_step']:.3e} ({r['flops_source']}; XLA {r['xla_flops_per_step']:.3e}"
                         + (f", analytic {r['analytic_flops_per_step']:.3e}" if r["analytic_flops_per_step"] else "")
                         + ")"),
        ("steps", f"{r['total_steps']}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    per = r.get("per_accelerator") or [r]
    lines.append("")
    lines.append(f"{'accelerator':<10} {'HBM usable':>11} {'peak/device':>12} {'fits':>12} {'min fsdp':>8} "
                 f"{'step >= (MFU ' + str(r['mfu']) + ')':>18} {'device-hours':>13} {'device-days':>11}")
    for a in per:
        lines.append(f"{a['accelerator']:<10} {_gib(a['usable_hbm_bytes']):>11} {_gib(m['peak']):>12} "
                     f"{'FITS' if a['fits'] else 'DOES NOT FIT':>12} {str(a['smallest_fsdp_size_that_fits'] or '-'):>8} "
                     f"{a['step_seconds_lower_bound'] * 1e3:>15.1f} ms {a['accelerator_hours']:>13.1f} "
                     f"{a['device_days']:>11.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "jax" not in sys.modules:  # simulated devices must be set before jax is imported
        want = min(args.devices, args.compile_devices)
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        result = plan(args, overrides)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    if not args.json_only:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
