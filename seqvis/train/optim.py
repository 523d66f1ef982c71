"""Learning-rate schedules and optax optimisers built from ``config.schedule`` / ``config.optimizer``.

Schedules (``config.schedule.name``), with η₀ = ``base_lr``, W = ``warmup_steps``, T = the run's total
steps, H = ``horizon_steps`` (0: H = T) and u = min((t - W)/(H - W), 1):

    warmup:   η(t) = η₀ · t / W                                   for t < W (every schedule)
    cosine:   η(t) = end + (η₀ - end) · ½(1 + cos(π · u))         for t >= W
    linear:   η(t) = η₀ + (end - η₀) · u
    rsqrt:    η(t) = η₀ · sqrt(timescale / max(t, timescale))     (inverse square root, ViT/T5)
    constant: η(t) = η₀

Linear cooldown (Zhai et al. 2022, "Scaling Vision Transformers"; big_vision's ``cooldown_steps``): with
C = ``cooldown_steps``, or round(``cooldown_fraction`` · T), the schedule above is multiplied by

    c(t) = min(1, (T - t) / C)

so it falls linearly to 0 over the last C steps (the last update, t = T - 1, gets η(T-1)/C). C = 0 (the
default) leaves the schedule as it is. Before T - C the schedule does not depend on T for ``rsqrt`` and
``constant``, nor for ``cosine``/``linear`` when ``horizon_steps`` is set: then the run of T steps and a run
of T' > T steps share their first T - C learning rates exactly, which is what lets a shorter budget branch
its cooldown off a saved step of the longer run (``config.branch_from``; see seqvis.train.branch).

Optimisers (``config.optimizer.name``), after global-norm clipping when ``grad_clip_norm`` is set:

- ``adamw``: Adam (b1, b2, eps) with weight decay applied to the parameters outside Adam's moments;
- ``sgd``: with momentum/nesterov; weight decay (if any) is added to the gradient before the momentum;
- ``adafactor``: optax's Adafactor (its own defaults: relative step size, update clipping, no momentum);
- ``adafactor_momentum``: the Adafactor variant of Zhai et al. 2022 (big_vision's
  ``scale_by_adafactor``): a factored second moment (per matrix one vector of row means and one of column
  means of g², over the two largest axes of a parameter with at least two axes of size >=
  ``min_dim_size_to_factor``; a full v otherwise) with decay β₂(t) = min(b2, 1 - (t+1)^-adafactor_decay_rate),
  then a momentum (first moment, decay b1 > 0, not debiased) of the normalised gradient g/√v̂. No parameter
  scaling and no update clipping. Learning rate and weight decay as for ``adamw``.

``mu_dtype`` = ``"bfloat16"`` stores the first moment (adamw's mu, adafactor_momentum's momentum, sgd's
momentum trace) in bfloat16; the arithmetic stays in float32. The second moment stays float32.

Weight decay skips the parameter kinds listed in ``skip_decay``: ``bias`` (leaves named bias), ``norm``
(norm scales), ``embedding`` (position embeddings, class token, the MAP head's probe, token embedding
tables).

Per-parameter multipliers (``adamw``, ``sgd``, ``adafactor_momentum``): ``lr_mults`` and ``wd_mults`` are
sequences of ``(regex, multiplier)`` pairs. A parameter's name is its path in the params tree joined with
``/`` (``head/kernel``, ``Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel``); the first regex that
matches the whole name (``re.fullmatch``) gives its multiplier, and a name no regex matches gets 1.0.
Every regex must match at least one parameter (a typo is an error). With mᵢ the lr multiplier, wᵢ the wd
multiplier (0 for the ``skip_decay`` kinds), λ = ``weight_decay``, uᵢ the optimiser's direction (Adam's
m̂/(√v̂+eps), the momentum, ...) and pᵢ the parameter, one step is

    decoupled_wd=False:  Δpᵢ = -η(t) · mᵢ · (uᵢ + λ·wᵢ·pᵢ)                  (optax.adamw's form)
    decoupled_wd=True:   Δpᵢ = -η(t) · mᵢ · uᵢ  -  (η(t)/η₀) · λ·wᵢ·pᵢ       (big_vision's form)

In both the decay is decoupled from the gradient (it never enters the moments). With ``decoupled_wd`` it is
also decoupled from the learning rate: it follows the schedule's shape η(t)/η₀ (warmup, decay, cooldown)
but neither η₀ nor the lr multipliers, so λ is the decay per step at the schedule's peak (λ = 1e-4 shrinks
a parameter by 1e-4 per step at the peak, whatever η₀); a parameter with mᵢ = 0 still decays unless wᵢ = 0.
Without it the lr multiplier scales the whole step: mᵢ = 0 freezes the parameter.

The multipliers and ``decoupled_wd`` do not change the optimiser state's tree (the checkpoints of a run
resume with other multipliers); ``mu_dtype``, ``skip_decay`` on/off and ``min_dim_size_to_factor`` do (see
seqvis.train.checkpoint, which refuses such a resume with the fix).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from seqvis.errors import ConfigError

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
OPTIMIZERS = ("adamw", "sgd", "adafactor", "adafactor_momentum")
MU_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
SKIP_KINDS = {"bias": {"bias"}, "norm": {"scale"}, "embedding": {"pos_embedding", "cls", "embedding", "probe"}}


# ============================================================================ schedules


def cooldown_steps(cfg: Any, total_steps: int) -> int:
    """C: ``cfg.cooldown_steps``, or ``cfg.cooldown_fraction`` of ``total_steps`` rounded to a step (0: none)."""
    steps = cfg.get("cooldown_steps", 0) or 0
    frac = float(cfg.get("cooldown_fraction", 0.0) or 0.0)
    if int(steps) != steps or steps < 0:
        raise ConfigError(f"config.schedule.cooldown_steps={steps} must be a whole number of steps >= 0.")
    if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
        raise ConfigError(f"config.schedule.cooldown_fraction={frac} must be in [0, 1].")
    if steps and frac:
        raise ConfigError(f"config.schedule.cooldown_steps={steps} and cooldown_fraction={frac} are both set; set "
                          "one of them (the other to 0).")
    return int(steps) if steps else int(round(frac * total_steps))


def make_schedule(cfg: Any, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """``cfg`` = config.schedule: name, base_lr, warmup_steps, end_lr (cosine/linear), horizon_steps
    (cosine/linear), timescale (rsqrt), cooldown_steps / cooldown_fraction. The formulas: module docstring.

    The returned function carries ``base_lr`` (η₀, which ``decoupled_wd`` divides by)."""
    name = cfg.get("name", "cosine")
    if name not in SCHEDULES:
        raise ConfigError(f"config.schedule.name={name!r} is unknown; use one of {SCHEDULES}.")
    base = float(cfg.base_lr)
    warmup = int(cfg.get("warmup_steps", 0))
    end = float(cfg.get("end_lr", 0.0))
    horizon = int(cfg.get("horizon_steps", 0) or 0)
    if horizon < 0:
        raise ConfigError(f"config.schedule.horizon_steps={horizon} must be >= 0 (0: the run's total steps).")
    if horizon and name not in ("cosine", "linear"):
        raise ConfigError(f"config.schedule.horizon_steps={horizon} applies to the cosine and linear schedules "
                          f"only; {name!r} does not depend on the run's length. Set it to 0.")
    span = horizon or total_steps
    if warmup >= span and name in ("cosine", "linear"):
        what = f"config.schedule.horizon_steps ({horizon})" if horizon else \
            f"the total number of steps ({total_steps})"
        raise ConfigError(
            f"config.schedule.warmup_steps={warmup} must be smaller than {what}; lower the warmup or "
            f"{'raise the horizon' if horizon else 'train longer'}.")
    decay_steps = max(span - warmup, 1)
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
    sched = main if warmup == 0 else optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main],
                                                          [warmup])
    cool = cooldown_steps(cfg, total_steps)
    if cool > total_steps - warmup:
        raise ConfigError(f"config.schedule: the cooldown of {cool} steps would start inside the warmup "
                          f"({warmup} steps) of a run of {total_steps} steps; lower cooldown_steps / "
                          "cooldown_fraction or the warmup.")
    if cool:
        sched = _with_cooldown(sched, total_steps, cool)
    return _with_base(sched, base)


def _with_cooldown(sched: Callable, total: int, cool: int) -> Callable:
    def schedule(t):
        left = jnp.asarray(total, jnp.float32) - jnp.asarray(t, jnp.float32)
        return sched(t) * jnp.clip(left / cool, 0.0, 1.0)

    return schedule


def _with_base(sched: Callable, base: float) -> Callable:
    def schedule(t):
        return sched(t)

    schedule.base_lr = base
    return schedule


def first_difference(a: Callable, b: Callable, steps: int) -> tuple[int, float, float] | None:
    """``(t, a(t), b(t))`` for the first t in [0, steps) where two schedules differ (exactly), or None."""
    if steps <= 0:
        return None
    t = jnp.arange(steps, dtype=jnp.int32)
    va, vb = jax.device_get(jnp.broadcast_to(a(t), t.shape)), jax.device_get(jnp.broadcast_to(b(t), t.shape))
    bad = (va != vb).nonzero()[0]
    if not len(bad):
        return None
    i = int(bad[0])
    return i, float(va[i]), float(vb[i])


# ============================================================================ parameter names and rules


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_names(params: Any) -> Any:
    """Pytree of ``'/'``-joined path names, e.g. ``'Transformer/encoder_norm/scale'``."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(_key_name(e) for e in path), params)


def decay_mask(params: Any, skip: tuple[str, ...]) -> Any:
    """Pytree of bools: True where weight decay applies (leaf names not in the skipped kinds)."""
    unknown = set(skip) - set(SKIP_KINDS)
    if unknown:
        raise ConfigError(
            f"config.optimizer.skip_decay has unknown kinds {sorted(unknown)}; valid: {sorted(SKIP_KINDS)}.")
    skipped = set().union(*(SKIP_KINDS[k] for k in skip)) if skip else set()

    def keep(path, _):
        return _key_name(path[-1]) not in skipped

    return jax.tree_util.tree_map_with_path(keep, params)


def parse_rules(rules: Any, field: str) -> tuple[tuple[re.Pattern, float], ...]:
    """``((regex, multiplier), ...)`` checked: regexes compile, multipliers are finite numbers >= 0."""
    out = []
    for i, rule in enumerate(rules or ()):
        if isinstance(rule, str) or not hasattr(rule, "__len__") or len(rule) != 2 or not isinstance(rule[0], str) \
                or isinstance(rule[1], bool) or not isinstance(rule[1], (int, float)):
            raise ConfigError(f"config.optimizer.{field}[{i}]={rule!r} is not a (regex, multiplier) pair; write e.g. "
                              f"--config.optimizer.{field}='((\"head/kernel\", 0.1), (\".*\", 1.0))'.")
        pattern, mult = rule
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config.optimizer.{field}[{i}]: {pattern!r} is not a regular expression ({e}).") from e
        if not math.isfinite(mult) or mult < 0:
            raise ConfigError(f"config.optimizer.{field}[{i}]: the multiplier {mult} of {pattern!r} must be a "
                              "finite number >= 0.")
        out.append((compiled, float(mult)))
    return tuple(out)


def multipliers(params: Any, rules: tuple[tuple[re.Pattern, float], ...], field: str) -> Any:
    """Pytree of floats: the multiplier of the first rule matching each parameter's name (1.0 if none).

    Raises :class:`ConfigError` for a rule that matches no parameter name."""
    names = param_names(params)
    used = [False] * len(rules)

    def mult(name):
        for i, (pattern, m) in enumerate(rules):
            if pattern.fullmatch(name):
                used[i] = True
                return m
        return 1.0

    out = jax.tree.map(mult, names)
    unused = [rules[i][0].pattern for i, u in enumerate(used) if not u]
    if unused:
        # A rule whose names all matched an earlier rule first is shadowed, not a typo: not reported.
        all_names = jax.tree.leaves(names)
        shadowed = [p for p in unused if any(re.fullmatch(p, n) for n in all_names)]
        unused = [p for p in unused if p not in shadowed]
    if unused:
        examples = ", ".join(all_names[:4])
        raise ConfigError(f"config.optimizer.{field}: {unused} match no parameter name. Names are '/'-joined paths "
                          f"matched whole (re.fullmatch), e.g. {examples}; fix the pattern or remove it.")
    return out


# ============================================================================ optimisers


def _decay(rates_fn: Callable[[Any], Any], masked: bool) -> optax.GradientTransformation:
    """uᵢ + rᵢ·pᵢ with per-leaf rates ``rates_fn(params)`` (Python floats, 0 where no decay applies).

    Its state is the tree optax's ``add_decayed_weights(wd, mask)`` has (``MaskedState(EmptyState())`` with a
    mask, ``EmptyState()`` without), so the two are interchangeable in a checkpoint; a test checks that the
    trees agree. ``init`` evaluates the rates once, so a bad ``wd_mults`` pattern fails there."""

    def init(params):
        rates_fn(params)
        return optax.MaskedState(inner_state=optax.EmptyState()) if masked else optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: pass them to tx.update(grads, state, params).")
        rates = rates_fn(params)
        return jax.tree.map(lambda u, p, r: u if r == 0.0 else u + r * p, updates, params, rates), state

    return optax.GradientTransformation(init, update)


def _scale_by_schedule(schedule: Callable, lr_mults_fn: Callable[[Any], Any],
                       decoupled_fn: Callable[[Any], Any] | None, base_lr: float) -> optax.GradientTransformation:
    """-η(t)·mᵢ·uᵢ [- (η(t)/η₀)·rᵢ·pᵢ]; state: optax.ScaleByScheduleState, as ``scale_by_learning_rate``."""

    def init(params):
        lr_mults_fn(params)  # a bad lr_mults / wd_mults pattern fails here, not when the step is traced
        if decoupled_fn is not None:
            decoupled_fn(params)
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        lr = schedule(state.count)
        mults = lr_mults_fn(updates)
        out = jax.tree.map(lambda u, m: jnp.array(-lr * m if m != 1.0 else -lr, dtype=u.dtype) * u, updates, mults)
        if decoupled_fn is not None:
            if params is None:
                raise ValueError("weight decay needs the parameters: pass them to tx.update(grads, state, params).")
            shape = lr / base_lr
            rates = decoupled_fn(params)
            out = jax.tree.map(lambda u, p, r: u if r == 0.0 else u - (shape * r) * p, out, params, rates)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _mu_dtype(cfg: Any):
    name = cfg.get("mu_dtype", "float32") or "float32"
    if name not in MU_DTYPES:
        raise ConfigError(f"config.optimizer.mu_dtype={name!r} is unknown; use one of {sorted(MU_DTYPES)}.")
    return MU_DTYPES[name]


def make_optimizer(cfg: Any, schedule: Callable) -> optax.GradientTransformation:
    """``cfg`` = config.optimizer: name, weight_decay, skip_decay, grad_clip_norm, b1, b2, eps, momentum, nesterov,
    mu_dtype, lr_mults, wd_mults, decoupled_wd, and for adafactor_momentum adafactor_decay_rate,
    min_dim_size_to_factor, adafactor_eps. See the module docstring for what each does."""
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer.name={name!r} is unknown; use one of {OPTIMIZERS}.")
    wd = float(cfg.get("weight_decay", 0.0))
    skip = tuple(cfg.get("skip_decay", ("bias", "norm", "embedding")))
    mask = (lambda p: decay_mask(p, skip)) if skip else None
    mu_dtype = _mu_dtype(cfg)
    lr_rules = parse_rules(cfg.get("lr_mults", ()), "lr_mults")
    wd_rules = parse_rules(cfg.get("wd_mults", ()), "wd_mults")
    decoupled = bool(cfg.get("decoupled_wd", False))
    custom = bool(lr_rules or wd_rules or decoupled)
    if wd_rules and not wd:
        raise ConfigError("config.optimizer.wd_mults multiply config.optimizer.weight_decay, which is 0; set "
                          "weight_decay (e.g. --config.optimizer.weight_decay=1e-4) or remove wd_mults.")
    if name == "adafactor" and (custom or mu_dtype is not None):
        raise ConfigError("config.optimizer.name='adafactor' (optax's Adafactor: no first moment, its own weight "
                          "decay) takes no lr_mults, wd_mults, decoupled_wd or mu_dtype; use "
                          "name='adafactor_momentum' for those.")
    base_lr = getattr(schedule, "base_lr", None)
    if decoupled and wd and not base_lr:
        raise ConfigError("config.optimizer.decoupled_wd=True scales the decay by η(t)/η₀ and needs "
                          "config.schedule.base_lr > 0 (and a schedule made by seqvis.train.optim.make_schedule).")

    chain = []
    clip = cfg.get("grad_clip_norm", None)
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    if not custom:  # the plain optax optimisers (their numbers and state trees as they always were)
        if name == "adamw":
            chain.append(optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                     eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=mask, mu_dtype=mu_dtype))
        elif name == "sgd":
            if wd:
                chain.append(optax.add_decayed_weights(wd, mask=mask))
            chain.append(optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                                   nesterov=bool(cfg.get("nesterov", False)), accumulator_dtype=mu_dtype))
        elif name == "adafactor":
            chain.append(optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask))
        if name != "adafactor_momentum":
            return optax.chain(*chain)

    # Per-parameter rates λ·wᵢ (0 for the skipped kinds), evaluated on the parameter tree at trace time.
    def rates(params):
        mults = multipliers(params, wd_rules, "wd_mults")
        keep = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda w, k: wd * w if k else 0.0, mults, keep)

    def no_rates(params):
        return jax.tree.map(lambda _: 0.0, params)

    coupled = _decay(no_rates if decoupled else rates, masked=mask is not None)

    def lr_mults(tree):
        return multipliers(tree, lr_rules, "lr_mults")

    scale = _scale_by_schedule(schedule, lr_mults, rates if decoupled and wd else None, base_lr or 1.0)
    if name == "adamw":  # optax.adamw's chain, with the decay and the lr scaling per parameter
        chain.append(optax.chain(
            optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                                mu_dtype=mu_dtype), coupled, scale))
    elif name == "sgd":  # optax.sgd's chain, likewise
        if wd:
            chain.append(coupled)
        momentum = cfg.get("momentum", 0.9) or None
        chain.append(optax.chain(
            optax.trace(decay=momentum, nesterov=bool(cfg.get("nesterov", False)), accumulator_dtype=mu_dtype)
            if momentum is not None else optax.identity(), scale))
    else:
        b1 = float(cfg.get("b1", 0.9))
        if not 0.0 < b1 < 1.0:
            raise ConfigError(f"config.optimizer.b1={b1} is adafactor_momentum's momentum and must be in (0, 1).")
        cap = float(cfg.get("b2", 0.999))
        exponent = float(cfg.get("adafactor_decay_rate", 0.8))

        def beta2(step, decay_rate):  # Adafactor's 1 - (t+1)^-0.8, capped at b2 (Zhai et al. 2022)
            t = jnp.asarray(step, jnp.float32) + 1.0
            return jnp.minimum(cap, 1.0 - t ** (-decay_rate))

        chain.append(optax.chain(
            optax.scale_by_factored_rms(factored=True, decay_rate=exponent,
                                        min_dim_size_to_factor=int(cfg.get("min_dim_size_to_factor", 32)),
                                        epsilon=float(cfg.get("adafactor_eps", 1e-30)), decay_rate_fn=beta2),
            optax.ema(b1, debias=False, accumulator_dtype=mu_dtype), coupled, scale))
    return optax.chain(*chain)
