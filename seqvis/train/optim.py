"""Learning-rate schedules and optax optimisers built from ``config.schedule`` / ``config.optimizer``.

Schedules (``config.schedule.name``), all with a linear warmup from 0 over ``warmup_steps``:

    cosine:  lr(t) = end + (base - end) · ½(1 + cos(π · u))      u = (t - warmup)/(T - warmup)
    linear:  lr(t) = base + (end - base) · u
    rsqrt:   lr(t) = base · sqrt(timescale / max(t, timescale))   (inverse square root, ViT/T5)
    constant: lr(t) = base

Optimisers (``config.optimizer.name``): ``adamw`` (decoupled weight decay, scaled by lr),
``sgd`` (with momentum/nesterov), ``adafactor``. Global-norm clipping comes first when
``grad_clip_norm`` is set. Weight decay skips the parameter kinds listed in
``skip_decay``: ``bias`` (leaves named bias), ``norm`` (norm scales), ``embedding``
(position embeddings, class token, token embedding tables).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SKIP_KINDS = {"bias": {"bias"}, "norm": {"scale"}, "embedding": {"pos_embedding", "cls", "embedding"}}


def make_schedule(cfg: Any, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """``cfg`` = config.schedule: name, base_lr, warmup_steps, end_lr (cosine/linear), timescale (rsqrt)."""
    name = cfg.get("name", "cosine")
    if name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={name!r} is unknown; use one of {SCHEDULES}.")
    base = float(cfg.base_lr)
    warmup = int(cfg.get("warmup_steps", 0))
    end = float(cfg.get("end_lr", 0.0))
    if warmup >= total_steps and name in ("cosine", "linear"):
        raise ValueError(
            f"config.schedule.warmup_steps={warmup} must be smaller than the total number of "
            f"steps ({total_steps}); lower the warmup or train longer.")
    decay_steps = max(total_steps - warmup, 1)
    if name == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps, alpha=end / base if base else 0.0)
    elif name == "linear":
        main = optax.linear_schedule(base, end, decay_steps)
    elif name == "rsqrt":
        timescale = float(cfg.get("timescale", 10_000))

        def main(t):
            t = jnp.asarray(t, jnp.float32) + warmup  # rsqrt is a function of the global step
            return base * jnp.sqrt(timescale / jnp.maximum(t, timescale))
    else:
        main = optax.constant_schedule(base)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def decay_mask(params: Any, skip: tuple[str, ...]) -> Any:
    """Pytree of bools: True where weight decay applies (leaf names not in the skipped kinds)."""
    unknown = set(skip) - set(SKIP_KINDS)
    if unknown:
        raise ValueError(
            f"config.optimizer.skip_decay has unknown kinds {sorted(unknown)}; valid: {sorted(SKIP_KINDS)}.")
    skipped = set().union(*(SKIP_KINDS[k] for k in skip)) if skip else set()

    def keep(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name not in skipped

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Any, schedule: Callable) -> optax.GradientTransformation:
    """``cfg`` = config.optimizer: name, weight_decay, skip_decay, grad_clip_norm, b1, b2, eps, momentum, nesterov."""
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={name!r} is unknown; use one of {OPTIMIZERS}.")
    wd = float(cfg.get("weight_decay", 0.0))
    skip = tuple(cfg.get("skip_decay", ("bias", "norm", "embedding")))
    mask = (lambda p: decay_mask(p, skip)) if skip else None
    chain = []
    clip = cfg.get("grad_clip_norm", None)
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    if name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                 eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=mask))
    elif name == "sgd":
        if wd:
            chain.append(optax.add_decayed_weights(wd, mask=mask))
        chain.append(optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                               nesterov=bool(cfg.get("nesterov", False))))
    else:
        chain.append(optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask))
    return optax.chain(*chain)
