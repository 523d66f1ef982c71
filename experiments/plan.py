"""Planner: does a recipe fit an accelerator, and what will it cost? Before a run costs money.

    python -m experiments.plan --config=configs/vit_s16_i1k_baseline.py --devices=8 --accelerator=tpu_v3 \\
        --precision=bfloat16
    python -m experiments.plan --config=configs/vit_i1k.py:H/14 --devices=512 --accelerator=tpu_v3 \\
        --parallel=fsdp --num_examples=303000000 --epochs=14
    python -m experiments.plan --config=configs/vit.py --devices=1 --accelerator=h100 --config.batch_size=256

Accelerators: ``tpu_v3`` (one device = one core), ``tpu_v4``, ``tpu_v5e`` (one device = one
chip), ``v100`` (16 GB), ``v100_32g``, ``a100_40g``, ``a100_80g``, ``h100`` (SXM), or ``all``.
``--parallel`` is ``pmap`` / ``mesh`` (state replicated) or ``fsdp`` (state sharded over
``--fsdp_size`` devices, default all); ``--precision`` is ``float32`` or ``bfloat16``; any
``--config.a.b=v`` overrides the config. Prints one JSON line (``--json_only``: nothing else)
and a readable table. The published runs the model is calibrated against, and the checks
that it agrees with them: ``python -m experiments.plan_published`` (``docs/planner.md``).

What is measured and what is modelled (the output says the same, per figure):

- **Parameters, optimiser state, the per-device batch** — *measured*: the real train step
  of the trainer (task, optimiser, schedule, the ``--parallel`` driver) is lowered and
  compiled ahead of time, from shapes only (``jax.jit(...).lower(ShapeDtypeStruct...)``), for
  ``C = min(devices, --compile_devices)`` simulated CPU devices; the per-device bytes of its
  arguments are read off their shapes and shardings, which do not depend on the backend.
  For a target FSDP degree larger than the compiled one they are counted from the same
  shapes with the sharding rules (:func:`seqvis.train.sharding.per_device_bytes`), and the
  output says so. ``--no_compile`` skips XLA's compile (shapes and the lowered program only).
- **Optimiser state requested but not built here** — *modelled*: if ``config.optimizer`` asks
  for a state the trainer's optimiser does not keep (``mu_dtype='bfloat16'``, a factored
  second moment with ``name='adafactor_momentum'``), the state is the one optax's own
  transformations give for those settings (:func:`optimizer_state_model`), and the output
  says "modelled".
- **Gradients** — *modelled*: one copy of the parameters in their dtype, sharded like them
  (XLA reduce-scatters them under FSDP); twice that with gradient accumulation (the running
  sum and the micro-batch's).
- **Activations** — *modelled for an accelerator compiler* (:func:`vit_activation_bytes`):
  what a fusing compiler keeps between the forward and the backward pass of a ViT, per
  block and example, in the compute dtype ``a`` (4 bytes float32, 2 bfloat16), T tokens,
  width D, MLP width M, H heads: the block input and the LayerNorm output feeding q/k/v,
  q, k, v, the attention output, the second LayerNorm's input and output (8·T·D), the MLP's
  pre- and post-GELU hidden (2·T·M) and the attention probabilities (H·T²), plus dropout
  masks. Elementwise intermediates (GELU's tanh terms, softmax exponentials, normalised
  values) are recomputed inside fused kernels and not kept. The backward pass needs one
  block's worth more (the cotangents of the block it is in); with ``config.model.remat``
  only each block's input is kept and the block being differentiated is recomputed (two
  blocks' worth transient). Models other than plain ViTs fall back to the residuals JAX's
  autodiff saves (an upper estimate: it counts the elementwise intermediates too).
- **FSDP gathers** — *modelled*: with FSDP one layer's parameters are all-gathered and its
  full gradient exists before the reduce-scatter: 2 x the largest layer's parameter bytes.
- **FLOPs per step** — *measured*: XLA's cost analysis of the step (the compiled program, or
  the lowered one with ``--no_compile``), checked against the analytic ViT count (3 x the
  forward matmul FLOPs, +1 forward of the encoder with remat); the analytic count is used
  when they differ by more than 25 % (XLA counts a scanned layer loop once) and the
  output says so.
- **Time** — *modelled*: ``FLOPs / (devices x peak x MFU)``, peak from :data:`ACCELERATORS`
  (published dense peak per device). The lower bound is at ``--mfu_max`` (default
  :data:`MFU_MAX`); the likely range at ``--mfu_range`` (default :data:`MFU_RANGE`), the
  range of MFUs the published runs of ``experiments.plan_published`` imply. Nothing about
  host input, evaluation or checkpointing is modelled: they are inside the calibrated MFU.
- **XLA:CPU memory** (arguments, outputs, temporaries, peak) — *measured* for this machine:
  the CPU backend's buffer assignment, which ``tests/test_plan.py`` checks against the
  memory the step takes when it runs here. It is *not* an accelerator's: XLA:CPU keeps
  far more temporaries than a TPU or GPU compiler does.

Fits: the modelled accelerator total is within ``--hbm_fraction`` (default 0.9: the runtime
and fragmentation keep some) of the device memory; the output gives the smallest FSDP degree
(a divisor of ``devices``) that fits, and for a ViT without remat the same with remat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

# name: (peak dense 16-bit FLOP/s, peak float32-matmul FLOP/s, memory bytes, memory bytes/s) per JAX device.
# Published figures. TPU v3: one core (half a chip: 123 TFLOP/s, 32 GiB, 900 GB/s per chip);
# TPUs run float32 matmuls at default precision as one bf16 pass, hence the same peak.
# GPUs: float32 matmuls at JAX's default precision use TF32 tensor cores (A100, H100); V100 has no
# TF32 (15.7 TFLOP/s) and its 16-bit peak (125 TFLOP/s) is float16's: 'bfloat16' stands for 16-bit
# mixed precision there (same bytes).
ACCELERATORS: dict[str, dict[str, float]] = {
    "tpu_v3": dict(bf16=61.5e12, f32=61.5e12, hbm=16 * 2**30, bw=450e9),
    "tpu_v4": dict(bf16=275e12, f32=275e12, hbm=32 * 2**30, bw=1228e9),
    "tpu_v5e": dict(bf16=197e12, f32=197e12, hbm=16 * 2**30, bw=819e9),
    "v100": dict(bf16=125e12, f32=15.7e12, hbm=16e9, bw=900e9),
    "v100_32g": dict(bf16=125e12, f32=15.7e12, hbm=32e9, bw=900e9),
    "a100_40g": dict(bf16=312e12, f32=156e12, hbm=40e9, bw=1555e9),
    "a100_80g": dict(bf16=312e12, f32=156e12, hbm=80e9, bw=2039e9),
    "h100": dict(bf16=989e12, f32=494e12, hbm=80e9, bw=3350e9),
}

# Model FLOP utilisation: the likely range is that of the published runs in experiments.plan_published
# (their implied MFUs, rounded outwards); the lower bound assumes a run at MFU_MAX, above every one of them.
MFU_RANGE = (0.15, 0.45)
MFU_MAX = 0.6

# Train split sizes of the datasets the recipes name (used when --num_examples is not given).
DATASET_SIZES = {"imagenet2012": 1_281_167, "imagenet21k": 14_197_122, "jft300m": 303_000_000,
                 "fashion_mnist_idx": 60_000, "mnist_idx": 60_000, "cifar10": 50_000, "cifar100": 50_000}

# Optimiser-state settings the planner models from config.optimizer (names of the trainer's fields).
FACTORED_OPTIMIZERS = ("adafactor", "adafactor_momentum")


class PlanError(ValueError):
    """A planner argument that cannot work; the message names it and the fix."""


def _mfu_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise PlanError(f"--mfu_range={text!r} must be two numbers LOW,HIGH, e.g. --mfu_range=0.15,0.45.") from None
    return lo, hi


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/vit_i1k.py:L/16")
    p.add_argument("--devices", type=int, required=True, help="number of accelerator devices of the run")
    p.add_argument("--accelerator", required=True, help=f"one of {', '.join(ACCELERATORS)}, or all (one row each)")
    p.add_argument("--parallel", default=None, help="pmap | mesh | fsdp (default: the config's)")
    p.add_argument("--precision", default=None, help="float32 | bfloat16 (default: the config's)")
    p.add_argument("--fsdp_size", type=int, default=None, help="FSDP degree (default: all devices)")
    p.add_argument("--mfu_max", type=float, default=MFU_MAX, help="MFU of the lower-bound time")
    p.add_argument("--mfu_range", default=f"{MFU_RANGE[0]},{MFU_RANGE[1]}", help="LOW,HIGH MFU of the likely time")
    p.add_argument("--mfu", type=float, default=None, help="also give the time at this MFU")
    p.add_argument("--hbm_fraction", type=float, default=0.9, help="usable fraction of the device memory")
    p.add_argument("--compile_devices", type=int, default=8, help="simulated devices compiled for (<= devices)")
    p.add_argument("--no_compile", action="store_true", help="shapes and the lowered step only: no XLA:CPU compile")
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
    args.mfu_range = _mfu_pair(args.mfu_range) if isinstance(args.mfu_range, str) else tuple(args.mfu_range)
    for name, v in (("--mfu_max", args.mfu_max), ("--mfu", args.mfu), ("--mfu_range", args.mfu_range[0]),
                    ("--mfu_range", args.mfu_range[1])):
        if v is not None and not 0 < v <= 1:
            raise PlanError(f"{name}={v} must be in (0, 1], e.g. {name}=0.4.")
    if args.mfu_range[0] > args.mfu_range[1]:
        raise PlanError(f"--mfu_range={args.mfu_range[0]},{args.mfu_range[1]}: LOW must not exceed HIGH.")
    if args.compile_devices < 1:
        raise PlanError(f"--compile_devices={args.compile_devices} must be >= 1.")
    return args, overrides


def load_config(spec: str):
    from seqvis.cli.config_cli import load_config as load  # deferred with the planner's other seqvis imports
    from seqvis.errors import ConfigError  # deferred: the same

    try:
        return load(spec)
    except ConfigError as e:
        raise PlanError(str(e)) from None


def _apply_override(config, key: str, value: Any) -> None:
    import ast

    from seqvis.cli.config_cli import override_problem

    problem = override_problem(config, key, value)
    if problem is not None and not key.startswith("model."):  # model fields are the model's keyword arguments
        raise PlanError(f"--config.{key}={value}: {problem}.")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    with node.unlocked() if hasattr(node, "unlocked") else _null():
        node[leaf] = value


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nbytes(x) -> int:
    import numpy as np

    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


# ============================================================================ FLOPs


def analytic_train_flops(model, image_shape, batch: int) -> float | None:
    """Independent count of one train step of a ViT: 3 x the analytic forward matmul FLOPs
    (:func:`seqvis.evaluation.flops.vit_forward_flops`: patch embedding, q/k/v/out and MLP
    on every token, the two attention products, pooling head, pre-logits and head) x the global
    batch, plus one more forward of the encoder blocks with ``remat`` (they are recomputed in
    the backward pass). None for models without an analytic count (ResNets, hybrids, captioners,
    video)."""
    from seqvis.evaluation.flops import TRAIN_FLOPS_PER_FORWARD, vit_flops_breakdown, vit_forward_flops
    from seqvis.models.vit import ViT

    if not isinstance(model, ViT):
        return None
    fwd = vit_forward_flops(model, image_shape)
    if fwd is None:
        return None
    recompute = 0.0
    if model.remat:
        recompute = vit_flops_breakdown(
            image_shape=image_shape, patch_size=model.patch_size, width=model.width, depth=model.depth,
            mlp_dim=model.mlp_dim, num_classes=model.num_classes, pool=model.pool,
            representation_size=model.representation_size)["encoder"]
    return (TRAIN_FLOPS_PER_FORWARD * fwd + recompute) * batch


# ============================================================================ memory model


def vit_activation_bytes(model, image_shape, batch: int, compute_bytes: int, remat: bool | None = None) \
        -> dict[str, Any] | None:
    """Modelled activation memory of one ViT train step on an accelerator (see the module docstring).

    Args:
      model: a :class:`seqvis.models.vit.ViT` (None is returned for hybrids: their ResNet trunk
        has no analytic count).
      image_shape: ``(H, W, C)``; batch: examples per device per micro-step; compute_bytes: 2 or 4.
      remat: override ``model.remat``.
    Returns ``{'per_block', 'kept', 'working', 'total'}`` in bytes: one block's kept activations
    W = batch·a·(8·T·D + 2·T·M + H·T²) (+ dropout masks, 1 byte per element), what is kept over the
    whole forward pass (L·W, or L·batch·a·T·D with remat, plus the stem and the head), and the
    transient of the backward pass (W, or 2·W with remat).
    """
    from seqvis.models.vit import ViT

    if not isinstance(model, ViT) or model.hybrid_stages:
        return None
    remat = model.remat if remat is None else remat
    h, w, c = (int(x) for x in image_shape)
    t, d = model.num_tokens((h, w)), model.width
    m, heads, a = model.mlp_dim or 4 * d, model.num_heads, compute_bytes
    block = a * (8 * t * d + 2 * t * m + heads * t * t)
    if model.dropout_rate > 0:
        block += 2 * t * d  # the two residual-branch dropout masks
    if model.attention_dropout_rate > 0:
        block += heads * t * t
    block *= batch
    stem = batch * a * (h * w * c + 2 * t * d)  # the image in the compute dtype (patch kernel's gradient), embedding
    head = batch * a * 2 * t * d  # encoder_norm input and output
    if model.pool == "map":
        head += batch * a * (2 * t * d + heads * t + 4 * d + 2 * m)  # its k, v, weights, and one token's block
    k = model.num_classes or 0
    head += batch * 4 * 2 * k + batch * a * 2 * (model.representation_size or d)  # logits/probabilities, pooled
    kept_blocks = model.depth * (batch * a * t * d if remat else block)
    return {"per_block": int(block), "kept": int(kept_blocks + stem + head),
            "working": int(2 * block if remat else block),
            "total": int(kept_blocks + stem + head + (2 * block if remat else block)), "remat": bool(remat)}


def autodiff_residual_bytes(task, params, model_state, micro_batch, policy=None) -> dict[str, Any]:
    """The residuals JAX's autodiff saves for the backward pass of ``task.losses`` (shapes only).

    The VJP object of ``jax.vjp`` is a pytree whose leaves are the residuals; the arguments
    themselves (parameters, batch) are left out (they are counted elsewhere). ``policy``: a
    ``jax.checkpoint_policies`` policy applied to the whole loss (e.g. ``dots_saveable``: only
    matmul outputs kept). Returns ``{'total', 'largest', 'count'}`` in bytes.
    """
    import jax
    import jax.numpy as jnp

    def fn(params, model_state, batch, rng):
        def loss(p):
            out, _, _ = task.losses({"params": p, **model_state}, batch, train=True, rng=rng)
            return jnp.sum(out * batch["mask"])

        f = jax.checkpoint(loss, policy=policy) if policy is not None else loss
        _, vjp = jax.vjp(f, params)
        args = {id(x) for x in jax.tree.leaves((params, model_state, batch, rng))}
        return [r for r in jax.tree.leaves(vjp) if id(r) not in args]

    res = jax.eval_shape(fn, params, model_state, micro_batch, jax.random.PRNGKey(0))
    sizes = [_nbytes(r) for r in res]
    return {"total": int(sum(sizes)), "largest": int(max(sizes, default=0)), "count": len(sizes)}


def optimizer_state_model(params, opt_cfg: Any, schedule) -> Any:
    """The optimiser state ``config.optimizer`` asks for, as optax builds it (abstract shapes).

    adamw: ``scale_by_adam(mu_dtype=...)`` (first moment in ``mu_dtype``, second in float32);
    sgd: a momentum ``trace`` in ``mu_dtype`` (none without momentum); adafactor: optax's
    ``adafactor`` (factored second moment, no momentum); adafactor_momentum: the factored
    second moment of ``scale_by_factored_rms(min_dim_size_to_factor=...)`` plus an ``ema``
    momentum in ``mu_dtype`` (big_vision's ``scale_by_adafactor``). Field names: ``name``,
    ``mu_dtype`` ('float32' | 'bfloat16'), ``momentum``, ``b1``, ``min_dim_size_to_factor``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    name = opt_cfg.get("name", "adamw")
    mu = {"float32": None, "bfloat16": jnp.bfloat16, None: None}.get(opt_cfg.get("mu_dtype", None), "bad")
    if mu == "bad":
        raise PlanError(f"config.optimizer.mu_dtype={opt_cfg.get('mu_dtype')!r} is unknown to the planner; use "
                        "'float32' or 'bfloat16'.")
    min_dim = int(opt_cfg.get("min_dim_size_to_factor", 32 if name == "adafactor_momentum" else 128))
    if name == "adamw":
        tx = optax.scale_by_adam(mu_dtype=mu)
    elif name == "sgd":
        tx = optax.trace(decay=0.9, accumulator_dtype=mu) if opt_cfg.get("momentum", 0.9) else optax.identity()
    elif name == "adafactor":
        tx = optax.adafactor(schedule, min_dim_size_to_factor=min_dim)
    elif name == "adafactor_momentum":
        tx = optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim),
                         optax.ema(float(opt_cfg.get("b1", 0.9)), debias=False, accumulator_dtype=mu))
    else:
        raise PlanError(f"config.optimizer.name={name!r} is unknown to the planner; use adamw, sgd, adafactor or "
                        "adafactor_momentum.")
    return jax.eval_shape(tx.init, params)


def _state_part_bytes(state, degree: int, rules, min_el) -> dict[str, int]:
    """Per-device bytes of the train state's parts (params, opt_state, the rest) at an FSDP degree."""
    import jax
    from jax.sharding import PartitionSpec as P

    from seqvis.train import sharding as sharding_lib

    specs = sharding_lib.state_specs(state, degree, rules, min_el)
    out = {"params": 0, "optimizer_state": 0, "other_state": 0}
    flat_x = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_s = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    for (path, x), spec in zip(flat_x, flat_s):
        top = sharding_lib.path_name(path).split("/")[0]
        part = {"params": "params", "opt_state": "optimizer_state"}.get(top, "other_state")
        n = _nbytes(x)
        out[part] += n // degree if any(a is not None for a in spec) else n
    return out


def largest_layer_bytes(params) -> int:
    """Bytes of the largest layer: an encoder block (``encoderblock_i``, or one slice of a scanned
    ``encoderblock`` stack) or any other top-level module (head, embedding, ...)."""
    import jax

    from seqvis.train import sharding as sharding_lib

    groups: dict[str, int] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = sharding_lib.path_name(path).split("/")
        n = _nbytes(x)
        key = parts[0]
        for i, p in enumerate(parts):
            if re.fullmatch(r"encoderblock_\d+", p):
                key = "/".join(parts[:i + 1])
                break
            if p == "encoderblock":  # scanned: leading layer axis
                key, n = "encoderblock", n // max(int(x.shape[0]), 1)
                break
        groups[key] = groups.get(key, 0) + n
    return max(groups.values(), default=0)


# ============================================================================ the plan


def plan(args, overrides) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqvis.train import optim, sharding as sharding_lib, step as step_lib
    from seqvis.train.precision import precision_name
    from seqvis.tasks.base import get_task

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

    # ---- steps of the recipe
    task = get_task(config)
    if config.get("total_steps"):
        total_steps, num_examples = int(config.total_steps), None
    else:
        name = config.data.get("name", "")
        num_examples = args.num_examples or DATASET_SIZES.get(name)
        if num_examples is None:
            raise PlanError(f"the size of config.data.name={name!r} is not known to the planner; pass "
                            "--num_examples=N (training examples per epoch) or --config.total_steps=N.")
        total_steps = int(math.ceil(float(config.num_epochs) * num_examples / global_batch))
    schedule = optim.make_schedule(config.schedule, max(total_steps, 1))

    # ---- the optimiser: the trainer's, or a stand-in for state it does not build yet
    dummy = task.dummy_batch(per_device)
    abstract_params = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), task.dummy_batch(1)))["params"]
    wanted_opt = optimizer_state_model(abstract_params, config.optimizer, schedule)
    try:
        tx = optim.make_optimizer(config.optimizer, schedule)
        opt_note = "the trainer's optimiser"
    except ValueError as e:  # e.g. an optimiser name this trainer does not know yet: compile a stand-in
        name = config.optimizer.get("name")
        stand_in = dict(config.optimizer)
        stand_in["name"] = "adamw"
        tx = optim.make_optimizer(stand_in, schedule)
        opt_note = f"stand-in adamw step (the trainer refused config.optimizer.name={name!r}: {e})"
    abstract_state = jax.eval_shape(lambda: step_lib.create_state(task, tx, 0, dummy))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)))
    built_opt_bytes = sum(_nbytes(x) for x in jax.tree.leaves(abstract_state.opt_state))
    wanted_opt_bytes = sum(_nbytes(x) for x in jax.tree.leaves(wanted_opt))
    # The trainer keeps the requested state when its state is that of optax's transformations for the
    # settings (up to the scalars of clipping and masking wrappers).
    opt_measured = abs(built_opt_bytes - wanted_opt_bytes) <= max(1024, 1e-4 * wanted_opt_bytes)
    model_state_for_bytes = abstract_state if opt_measured else abstract_state.replace(opt_state=wanted_opt)

    # ---- the real train step, lowered (and compiled) from shapes only
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
    lowered = fn.lower(state_in, batch_in)
    compiled = None if args.no_compile else lowered.compile()
    cost = (compiled or lowered).cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})

    # The per-device bytes of the compiled step's arguments, from their shapes and shardings.
    def device_bytes(struct, sharding) -> int:
        shard = sharding.shard_shape(struct.shape)
        return int(math.prod(shard)) * np.dtype(struct.dtype).itemsize

    if compiled is not None:
        state_sh, batch_sh = compiled.input_shardings[0]
    else:
        state_sh = jax.tree.map(lambda s: s.sharding, state_in)
        batch_sh = jax.tree.map(lambda s: s.sharding, batch_in)
    arg_state = sum(jax.tree.leaves(jax.tree.map(device_bytes, abstract_state, state_sh)))
    arg_batch = sum(jax.tree.leaves(jax.tree.map(device_bytes, batch_struct, batch_sh)))

    # ---- accelerator memory per device (state at the target degree; activations modelled)
    model = task.model
    compute_bytes = 2 if precision == "bfloat16" else 4
    image_shape = tuple(config.data.get("image_shape", ()) or ())
    micro = per_device // accum

    def activations(remat=None):
        acts = vit_activation_bytes(model, image_shape, micro, compute_bytes, remat) if image_shape else None
        if acts is not None:
            return acts, ("modelled: ViT activations kept for the backward pass by a fusing compiler, "
                          f"{'per-block remat' if acts['remat'] else 'no remat'}, {micro} examples")
        if remat:
            return None, ""
        variables = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), task.dummy_batch(1)))
        model_state = {k: v for k, v in variables.items() if k in task.mutable_collections}
        mb = dict(task.dummy_batch(micro))
        mb["mask"] = jnp.ones((micro,), jnp.float32)
        mb = jax.eval_shape(lambda: mb)
        res = autodiff_residual_bytes(task, abstract_params, model_state, mb)
        return ({"per_block": res["largest"], "kept": res["total"], "working": 2 * res["largest"],
                 "total": res["total"] + 2 * res["largest"], "remat": False},
                "modelled: the residuals JAX's autodiff saves (upper estimate: elementwise intermediates "
                "included), plus twice the largest as the backward pass's working set")

    acts, acts_source = activations()
    gather_layer = largest_layer_bytes(abstract_state.params)

    def accel_memory(degree: int, act: dict) -> dict[str, int]:
        parts = _state_part_bytes(model_state_for_bytes, degree, rules, min_el)
        grads = parts["params"] * (2 if accum > 1 else 1)
        gather = 2 * gather_layer if degree > 1 else 0
        mem = {**parts, "gradients": grads, "batch": arg_batch, "activations": act["total"], "fsdp_gather": gather}
        mem["total"] = sum(mem.values())
        return mem

    target_degree = fsdp_target if parallel == "fsdp" else 1
    memory = accel_memory(target_degree, acts)
    remat_acts = None
    if not acts["remat"] and getattr(model, "depth", None):
        remat_acts, _ = activations(remat=True)

    # Cross-check: what the compiled step's arguments hold equals the state counted from shapes.
    counted = _state_part_bytes(abstract_state, fsdp_c, rules, min_el)
    args_check = {"compiled_state_bytes": arg_state, "counted_state_bytes": sum(counted.values()),
                  "batch_bytes": arg_batch}
    if compiled is not None:
        args_check["xla_argument_bytes"] = int(compiled.memory_analysis().argument_size_in_bytes)

    # ---- XLA:CPU's own memory figures (this machine), extrapolated to the target degree like the state
    cpu = None
    if compiled is not None:
        mem = compiled.memory_analysis()
        args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        alias_b, temp_b = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
        delta = sum(_state_part_bytes(abstract_state, target_degree, rules, min_el).values()) - sum(counted.values())
        a, o, al = args_b + delta, out_b + delta, alias_b + delta if alias_b else 0
        cpu = {"arguments": a, "outputs": o, "aliased": al, "temporaries": temp_b, "peak": a + o - al + temp_b}

    # ---- FLOPs
    xla_flops_device = float(cost.get("flops", 0.0))
    xla_flops = xla_flops_device * c * (n / c)  # global step at c devices, scaled to the target batch
    analytic = analytic_train_flops(model, image_shape, global_batch) if image_shape else None
    source = "measured: XLA's cost analysis of the " + ("lowered" if compiled is None else "compiled") + " step"
    flops = xla_flops
    if analytic and (not xla_flops or abs(xla_flops / analytic - 1) > 0.25):
        flops, source = analytic, "analytic ViT count (XLA's count differs by more than 25%, e.g. a scanned loop)"

    # ---- per accelerator: fits, smallest FSDP degree, time
    lo_mfu, hi_mfu = args.mfu_range

    def on(name: str) -> dict[str, Any]:
        acc = ACCELERATORS[name]
        usable = acc["hbm"] * args.hbm_fraction
        smallest = next((d for d in _divisors(n) if accel_memory(d, acts)["total"] <= usable), None)
        peak = acc["bf16"] if precision == "bfloat16" else acc["f32"]

        def seconds(mfu):
            return flops / (n * peak * mfu)

        out = {"accelerator": name, "hbm_bytes": acc["hbm"], "usable_hbm_bytes": usable,
               "fits": bool(memory["total"] <= usable), "smallest_fsdp_size_that_fits": smallest,
               "step_seconds_lower_bound": seconds(args.mfu_max),
               "step_seconds_likely": [seconds(hi_mfu), seconds(lo_mfu)],
               "train_hours_lower_bound": seconds(args.mfu_max) * total_steps / 3600.0,
               "train_hours_likely": [seconds(hi_mfu) * total_steps / 3600.0, seconds(lo_mfu) * total_steps / 3600.0],
               "device_hours_lower_bound": seconds(args.mfu_max) * total_steps * n / 3600.0,
               "device_days_likely": [seconds(hi_mfu) * total_steps * n / 86400.0,
                                      seconds(lo_mfu) * total_steps * n / 86400.0]}
        if args.mfu is not None:
            out["train_hours_at_mfu"] = seconds(args.mfu) * total_steps / 3600.0
        if remat_acts is not None:
            out["fits_with_remat"] = bool(accel_memory(target_degree, remat_acts)["total"] <= usable)
            out["smallest_fsdp_size_with_remat"] = next(
                (d for d in _divisors(n) if accel_memory(d, remat_acts)["total"] <= usable), None)
        return out

    names = list(ACCELERATORS) if args.accelerator == "all" else [args.accelerator]
    per = [on(a) for a in names]
    extrapolated = parallel == "fsdp" and target_degree != fsdp_c
    state_src = ("measured: the compiled step's argument shapes" if compiled is not None else
                 "counted: the lowered step's argument shapes (not compiled)")
    if extrapolated:
        state_src += f", counted at FSDP degree {target_degree} from the sharding rules (compiled: {fsdp_c})"
    opt_src = (f"{state_src} ({opt_note})" if opt_measured else
               "modelled: the state optax builds for config.optimizer "
               f"(name={config.optimizer.get('name')!r}, mu_dtype={config.optimizer.get('mu_dtype', 'float32')!r}); "
               f"{opt_note} keeps {built_opt_bytes / 2**30:.2f} GiB instead of {wanted_opt_bytes / 2**30:.2f} GiB")
    out = {
        "config": args.config, "overrides": dict(overrides), "accelerator": args.accelerator, "devices": n,
        "parallel": parallel, "precision": precision, "fsdp_size": target_degree if parallel == "fsdp" else None,
        "global_batch": global_batch, "per_device_batch": per_device, "grad_accum_steps": accum,
        "params": n_params, "total_steps": total_steps, "num_examples": num_examples,
        "compiled": compiled is not None, "compiled_devices": c,
        "compiled_fsdp_size": fsdp_c if parallel == "fsdp" else None, "memory_extrapolated": extrapolated,
        "accelerator_memory_bytes": memory,
        "activations_with_remat_bytes": remat_acts["total"] if remat_acts else None,
        "sources": {
            "params": state_src, "optimizer_state": opt_src, "batch": state_src,
            "gradients": "modelled: one copy of the parameters, sharded like them" + (
                " (x2: gradient accumulation)" if accum > 1 else ""),
            "activations": acts_source,
            "fsdp_gather": "modelled: 2 x the largest layer's parameters (all-gathered, full gradient)",
            "flops": source,
            "time": f"modelled: FLOPs / (devices x peak x MFU); lower bound at MFU {args.mfu_max}, likely at "
                    f"MFU {lo_mfu}-{hi_mfu} (calibrated on published runs: docs/planner.md)",
            "cpu_memory": "measured: XLA:CPU's buffer assignment, what this step takes on this machine (not an "
                          "accelerator's)" if cpu else "not compiled (--no_compile)",
        },
        "argument_check": args_check,
        "cpu_memory_bytes": cpu,
        "flops_per_step": flops, "xla_flops_per_step": xla_flops, "analytic_flops_per_step": analytic,
        "xla_vs_analytic": (xla_flops / analytic) if analytic and xla_flops else None,
        "mfu_max": args.mfu_max, "mfu_range": [lo_mfu, hi_mfu],
    }
    if len(per) == 1:
        out.update(per[0])
    else:
        out["per_accelerator"] = per
    return out


# ============================================================================ output


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def table(r: dict) -> str:
    m = r["accelerator_memory_bytes"]
    rows = [
        ("recipe", f"{r['config']} {' '.join(f'{k}={v}' for k, v in r['overrides'].items())}".strip()),
        ("devices", f"{r['devices']}, {r['parallel']}" + (f" (fsdp {r['fsdp_size']})" if r["fsdp_size"] else "")
                    + f", {r['precision']}"),
        ("batch", f"{r['global_batch']} global, {r['per_device_batch']} per device, accum {r['grad_accum_steps']}"),
        ("parameters", f"{r['params'] / 1e6:.1f} M"),
        ("steps", f"{r['total_steps']}"),
        ("accelerator memory", f"params {_gib(m['params'])}, optimiser {_gib(m['optimizer_state'])}, gradients "
                               f"{_gib(m['gradients'])}, activations {_gib(m['activations'])}, batch "
                               f"{_gib(m['batch'])}, FSDP gathers {_gib(m['fsdp_gather'])}, other "
                               f"{_gib(m['other_state'])}; total {_gib(m['total'])} per device"),
        ("FLOPs / step", f"{r['flops_per_step']:.3e}"
                         + (f" (XLA {r['xla_flops_per_step']:.3e}" if r["xla_flops_per_step"] else " (")
                         + (f", analytic {r['analytic_flops_per_step']:.3e}" if r["analytic_flops_per_step"] else "")
                         + ")"),
    ]
    if r["cpu_memory_bytes"]:
        cm = r["cpu_memory_bytes"]
        rows.append(("XLA:CPU (here)", f"args {_gib(cm['arguments'])}, outputs {_gib(cm['outputs'])} (aliased "
                                       f"{_gib(cm['aliased'])}), temps {_gib(cm['temporaries'])}; peak {_gib(cm['peak'])}"
                                       f" on {r['compiled_devices']} simulated devices"))
    rows += [(f"  {k}", v) for k, v in r["sources"].items()]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    per = r.get("per_accelerator") or [r]
    lines.append("")
    remat = "fits_with_remat" in per[0]
    lines.append(f"{'accelerator':<10} {'usable':>10} {'needs':>10} {'fits':>12} {'min fsdp':>8}"
                 + (f" {'remat: fits/min fsdp':>20}" if remat else "")
                 + f" {'hours >=':>9} {'likely hours':>15} {'device-days':>13}")
    for a in per:
        rm = (f" {('yes' if a['fits_with_remat'] else 'no') + ' / ' + str(a['smallest_fsdp_size_with_remat'] or '-'):>20}"
              if remat else "")
        lh, dd = a["train_hours_likely"], a["device_days_likely"]
        lines.append(f"{a['accelerator']:<10} {_gib(a['usable_hbm_bytes']):>10} {_gib(m['total']):>10} "
                     f"{'FITS' if a['fits'] else 'DOES NOT FIT':>12} {str(a['smallest_fsdp_size_that_fits'] or '-'):>8}"
                     f"{rm} {a['train_hours_lower_bound']:>9.1f} {lh[0]:>7.1f}-{lh[1]:<7.1f} "
                     f"{dd[0]:>6.1f}-{dd[1]:<6.1f}")
    return "\n".join(lines)


def set_device_flags(devices: int, compile_devices: int) -> None:
    """Simulated CPU devices for the compile; must run before jax is imported."""
    if "jax" in sys.modules:
        return
    want = min(devices, compile_devices)
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    set_device_flags(args.devices, args.compile_devices)
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
