"""Device meshes and sharding rules for fully sharded data parallel (FSDP) training.

The mesh has two named axes, ``('data', 'fsdp')``, of sizes ``(devices / fsdp_size,
fsdp_size)``; ``config.fsdp_size`` = 0 puts every device on the ``fsdp`` axis (a 1-D mesh
in effect, ZeRO-3 over all devices), a smaller divisor gives hybrid sharding (parameters
sharded within groups of ``fsdp_size`` devices, replicated across the groups).

- Batches are split over both axes: ``P(('data', 'fsdp'))`` on the leading batch axis.
- Each array of the train state (parameters, optimiser state, model state) gets a spec
  from a small table of rules (:data:`DEFAULT_RULES`): the first rule whose regular
  expression matches the array's path (``params/Transformer/encoderblock_0/...``,
  ``opt_state/...``) decides. ``'fsdp'`` shards the array's largest axis that the
  ``fsdp`` axis size divides (ties: the earlier axis); arrays smaller than
  ``min_shard_elements`` or with no divisible axis are replicated. ``'replicate'`` never
  shards.
- The step itself is the global-view program (``jax.jit`` with these in/out shardings);
  XLA's SPMD partitioner inserts the all-gathers of parameters before use and the
  reduce-scatters of gradients, so no collective is written by hand.

The optimiser state of adam/adamw has the parameters' shapes, so it is sharded the same
way; the per-device bytes of the state are then about ``1/fsdp_size`` of the replicated
figure (:func:`per_device_bytes` counts them from shapes alone, without compiling).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqvis.errors import ConfigError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
MIN_SHARD_ELEMENTS = 2**14  # 16k elements (64 KiB in float32): smaller arrays are replicated
DEFAULT_RULES: tuple[tuple[str, str], ...] = ((r".*", "fsdp"),)
RULE_KINDS = ("fsdp", "replicate")


def fsdp_size(config: Any, num_devices: int) -> int:
    """``config.fsdp_size`` resolved against the device count (0 or absent: all devices)."""
    k = int(config.get("fsdp_size", 0) or 0)
    return num_devices if k <= 0 else k


def check_config(config: Any, num_devices: int) -> None:
    """Raise :class:`ConfigError` for sharding settings that cannot work on ``num_devices``."""
    parallel = config.get("parallel", "pmap")
    k = int(config.get("fsdp_size", 0) or 0)
    if parallel != "fsdp":
        if k:
            raise ConfigError(f"config.fsdp_size={k} only applies with config.parallel='fsdp' (now "
                              f"{parallel!r}); add --config.parallel=fsdp, or remove --config.fsdp_size.")
        if config.get("sharding_rules", None):
            raise ConfigError(f"config.sharding_rules only apply with config.parallel='fsdp' (now {parallel!r}); "
                              "add --config.parallel=fsdp, or remove config.sharding_rules.")
        return
    if k < 0 or (k and num_devices % k):
        divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
        raise ConfigError(f"config.fsdp_size={k} must divide the device count ({num_devices}); use one of "
                          f"{divisors}, or 0 for all devices.")
    for rule in config.get("sharding_rules", None) or ():
        if len(tuple(rule)) != 2 or tuple(rule)[1] not in RULE_KINDS:
            raise ConfigError(f"config.sharding_rules entry {tuple(rule)!r} must be (regex, kind) with kind in "
                              f"{RULE_KINDS}, e.g. ((r'.*/head/.*', 'replicate'), (r'.*', 'fsdp')).")
        try:
            re.compile(tuple(rule)[0])
        except re.error as e:
            raise ConfigError(f"config.sharding_rules: {tuple(rule)[0]!r} is not a regular expression ({e}).") from e


def make_mesh(fsdp: int, devices: Sequence[Any] | None = None) -> Mesh:
    """``('data', 'fsdp')`` mesh of ``devices`` (default: all), ``fsdp`` devices per group."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp <= 0 or n % fsdp:
        raise ConfigError(f"config.fsdp_size={fsdp} must divide the device count ({n}).")
    return Mesh(np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp), BATCH_AXES)


def path_name(path: tuple) -> str:
    """``('params', 'Transformer', 'encoderblock_0', ...)`` key path -> ``'params/Transformer/...'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_elements: int = MIN_SHARD_ELEMENTS) -> P:
    """Shard the largest axis of ``shape`` divisible by ``axis_size`` over ``'fsdp'``; else replicate."""
    if axis_size <= 1 or math.prod(shape) < min_elements:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % axis_size == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP
            return P(*spec)
    return P()


def spec_for(name: str, shape: Sequence[int], axis_size: int, rules: Iterable[tuple[str, str]] = DEFAULT_RULES,
             min_elements: int = MIN_SHARD_ELEMENTS) -> P:
    for pattern, kind in rules:
        if re.fullmatch(pattern, name):
            return fsdp_spec(shape, axis_size, min_elements) if kind == "fsdp" else P()
    return P()


def state_specs(tree: Any, axis_size: int, rules: Iterable[tuple[str, str]] = DEFAULT_RULES,
                min_elements: int = MIN_SHARD_ELEMENTS) -> Any:
    """PartitionSpecs for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    rules = tuple(tuple(r) for r in rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_name(path), np.shape(x), axis_size, rules, min_elements), tree)


def per_device_bytes(tree: Any, axis_size: int, rules: Iterable[tuple[str, str]] = DEFAULT_RULES,
                     min_elements: int = MIN_SHARD_ELEMENTS) -> tuple[int, int]:
    """``(sharded_bytes, replicated_bytes)`` one device holds of ``tree`` under the rules.

    Counted from shapes: an array sharded over the ``fsdp`` axis contributes
    ``nbytes / axis_size``, a replicated one its full ``nbytes``."""
    specs = state_specs(tree, axis_size, rules, min_elements)
    sharded = replicated = 0
    for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        if any(a is not None for a in spec):
            sharded += nbytes // axis_size
        else:
            replicated += nbytes
    return sharded, replicated
