"""What a sweep is: the sweep algebra (``h.sweep/fixed/product/zip/chain``), loading config and
sweep files, checking and naming points, and applying a point's overrides to a config.

A point is a dict of dotted config overrides ``{"model.depth": 4, "num_epochs": 2.0}``; the
reserved key ``"config"`` replaces the base config of that point, and the reserved key
``"cooldown_of"`` makes it a cooldown branch of another point (see :meth:`Hyper.cooldowns`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SweepError(ValueError):
    """A sweep file, override or workdir that cannot work; the message names it and the fix."""


# ============================================================================ sweep algebra


class Hyper:
    """Helpers a sweep file's ``get_sweep(h, arg)`` builds its list of points with."""

    @staticmethod
    def sweep(key: str, values: Iterable[Any]) -> list[dict]:
        """One axis: ``[{key: v} for v in values]``."""
        values = list(values)
        if not values:
            raise SweepError(f"h.sweep({key!r}, ...) got no values.")
        return [{key: v} for v in values]

    @staticmethod
    def fixed(key: str, value: Any) -> list[dict]:
        """An axis of one value (a setting shared by all points)."""
        return [{key: value}]

    @staticmethod
    def product(*axes: Sequence[dict]) -> list[dict]:
        """Cartesian product; the first axis varies slowest."""
        return [_merge(combo, "h.product") for combo in itertools.product(*axes)]

    @staticmethod
    def zip(*axes: Sequence[dict]) -> list[dict]:
        """Element-wise combination of axes of equal length."""
        lengths = [len(a) for a in axes]
        if len(set(lengths)) > 1:
            raise SweepError(f"h.zip got axes of different lengths {lengths}; zipped axes must have equal length.")
        return [_merge(combo, "h.zip") for combo in zip(*axes)]

    @staticmethod
    def chain(*axes: Sequence[dict]) -> list[dict]:
        """Concatenation: the points of each argument, one after the other."""
        return [dict(p) for a in axes for p in a]

    @staticmethod
    def cooldowns(steps: Iterable[int], *, fraction: float = 0.0, cooldown_steps: int = 0) -> list[dict]:
        """Training budgets as linear-cooldown branches of one run (Zhai et al. 2022), an axis like ``h.sweep``.

        The longest budget T is one point trained in full, with its cooldown at its end; every shorter budget
        B is a point with ``"cooldown_of": T`` that starts from the long run's checkpoint at step B - C and
        trains only its cooldown of C steps (``cooldown_steps``, or round(``fraction`` · B)). The runner trains
        the long run first and makes it keep those steps. Before its cooldown the schedule must not depend
        on the run's length (rsqrt, constant, or cosine/linear with ``schedule.horizon_steps``), and the
        warmup must be shared: set both with ``h.fixed`` (the runner checks the learning rates agree).

        A point ``{..., "cooldown_of": T}`` is a branch of the point with the same overrides but
        ``total_steps`` = T; ``"cooldown_of": {"total_steps": T, "schedule.cooldown_steps": 500}`` names every
        override in which the long run differs.
        """
        steps = sorted({int(s) for s in steps})
        if not steps or steps[0] <= 0:
            raise SweepError(f"h.cooldowns got steps {steps}; give training budgets > 0.")
        if bool(fraction) == bool(cooldown_steps):
            raise SweepError("h.cooldowns: give exactly one of fraction= (of each budget) or cooldown_steps=.")
        key, value = ("schedule.cooldown_fraction", float(fraction)) if fraction else \
            ("schedule.cooldown_steps", int(cooldown_steps))
        longest = steps[-1]
        return [{"total_steps": longest, key: value}] + [
            {"total_steps": b, key: value, "cooldown_of": longest} for b in steps[:-1]]


def _merge(dicts: Sequence[dict], where: str) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if k in out and out[k] != v:
                raise SweepError(f"{where}: key {k!r} is set twice with different values ({out[k]!r}, {v!r}).")
            out[k] = v
    return out


# ============================================================================ loading files


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"configs/vit.py:mu/7"`` -> ``("configs/vit.py", "mu/7")``."""
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def _resolve_path(path: str, what: str, flag: str) -> str:
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise SweepError(f"{flag}: {what} file {path!r} not found (looked in {os.getcwd()} and {REPO}). "
                     f"Pass a path such as {'configs/sweeps/depth.py' if 'sweep' in flag else 'configs/vit.py:mu/7'}.")


def _load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(spec: str, flag: str = "--config"):
    """``"configs/vit.py:mu/7"`` -> the ConfigDict its ``get_config(arg)`` returns."""
    path, arg = split_spec(spec)
    path = _resolve_path(path, "config", flag)
    try:
        mod = _load_module(path, "sweep_base_config")
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"{flag}={spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    if not hasattr(mod, "get_config"):
        raise SweepError(f"{flag}={spec}: {path} defines no get_config(arg).")
    try:
        return mod.get_config(arg) if arg is not None else mod.get_config()
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"{flag}={spec}: get_config({arg!r}) failed: {type(e).__name__}: {e}") from e


def load_sweep(spec: str) -> list[dict]:
    """``"configs/sweeps/depth.py[:arg]"`` -> the list of points (dicts of overrides), checked."""
    path, arg = split_spec(spec)
    path = _resolve_path(path, "sweep", "--sweep")
    try:
        mod = _load_module(path, "sweep_file")
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"--sweep={spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(mod, "get_sweep", None)
    if fn is None:
        raise SweepError(f"--sweep={spec}: {path} defines no get_sweep(h, arg=None) returning a list of "
                         "override dicts.")
    try:
        points = fn(Hyper(), arg)
    except SweepError as e:
        raise SweepError(f"--sweep={spec}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"--sweep={spec}: get_sweep(h, {arg!r}) failed: {type(e).__name__}: {e}") from e
    return check_points(points, f"--sweep={spec}")


# ============================================================================ points: checks, ids, labels


RESERVED = ("config", "cooldown_of")  # point keys that are not config overrides
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_points(points: Any, where: str) -> list[dict]:
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"{where}: get_sweep must return a non-empty list of dicts, got {type(points).__name__}"
                         f"{'' if points else ' (empty)'}.")
    seen: dict[str, int] = {}
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, dict):
            raise SweepError(f"{where}: point {i} is a {type(p).__name__}, not a dict of overrides.")
        for k in p:
            if not isinstance(k, str) or not _KEY.match(k):
                raise SweepError(f"{where}: point {i} has the key {k!r}; keys are dotted config paths such as "
                                 "'model.depth'.")
        if "config" in p and not isinstance(p["config"], str):
            raise SweepError(f"{where}: point {i}: 'config' must be a config spec string such as "
                             "'configs/resnet.py:18,fashion_mnist'.")
        ref = p.get("cooldown_of")
        if "cooldown_of" in p and not ((isinstance(ref, int) and not isinstance(ref, bool) and ref > 0) or (
                isinstance(ref, dict) and ref and all(isinstance(k, str) and _KEY.match(k) for k in ref))):
            raise SweepError(f"{where}: point {i}: 'cooldown_of' must be the long run's total_steps (an int > 0) or "
                             f"a dict of the overrides in which it differs, got {ref!r}.")
        try:
            pid = point_id(p)
        except TypeError as e:
            raise SweepError(f"{where}: point {i} has a value that is not JSON-serialisable ({e}); use numbers, "
                             "strings, booleans, None, lists or tuples.") from e
        if pid in seen:
            raise SweepError(f"{where}: points {seen[pid]} and {i} are identical ({p}); remove the duplicate.")
        seen[pid] = i
        out.append(dict(p))
    return out


def point_id(overrides: dict) -> str:
    """Stable 10-hex id of a point: a hash of its overrides (order-independent)."""
    blob = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def point_label(overrides: dict, limit: int = 60) -> str:
    """Readable, filesystem-safe summary: ``depth=4,num_epochs=2.0``."""
    parts = []
    for k, v in overrides.items():
        if k == "config":
            v = os.path.splitext(os.path.basename(split_spec(v)[0]))[0] + (":" + (split_spec(v)[1] or ""))
            k = "cfg"
        else:
            k = k.split(".")[-1]
        parts.append(f"{k}={v if not isinstance(v, (list, tuple)) else 'x'.join(map(str, v))}")
    label = re.sub(r"[^A-Za-z0-9=,.+_-]", "-", ",".join(parts))
    return label[:limit] or "base"


# ============================================================================ overrides


def apply_overrides(config, overrides: dict, where: str):
    """A copy of ``config`` with dotted ``overrides`` set (the :data:`RESERVED` keys excluded).

    The assignment is ConfigDict's own typed override on a locked copy: a key must name an
    existing field (except directly under ``model``: model keyword arguments, which the model
    builder checks), int -> float and list <-> tuple convert to the field's type, and any other
    change of type is refused. Two rules are added on top: a bool only replaces a bool
    (ConfigDict lets one into an int or float field), and a whole section is never replaced
    (ConfigDict would swap it for the value, dropping its other fields). Errors are re-worded
    to name the override and the fix.
    """
    c = copy.deepcopy(config)
    was_locked = c.is_locked
    c.lock()
    for key, value in overrides.items():
        if key in RESERVED:
            continue
        parts = key.split(".")
        node = c
        for j, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                have = ", ".join(sorted(node.keys()))
                raise SweepError(f"{where}: override {key!r}: config.{'.'.join(parts[:j + 1])} is not a section "
                                 f"of the config (it has: {have}). Fix the key in the sweep file.")
            node = node[part]
        leaf = parts[-1]
        # Tuples are written as lists (a new model field holds a list, as in a JSON config);
        # ConfigDict turns the value back into a tuple where the field is one.
        value = list(value) if isinstance(value, tuple) else value
        old = node[leaf] if leaf in node else None
        if isinstance(old, ml_collections.ConfigDict):  # ConfigDict would swap the whole section
            raise SweepError(f"{where}: override {key!r} names a section of the config, not a field; set its "
                             f"fields one by one ('{key}.{next(iter(sorted(old.keys())), 'name')}': ...) in the "
                             "sweep file.")
        if old is not None and value is not None and isinstance(old, bool) != isinstance(value, bool):
            raise _type_error(where, key, value, old)
        try:
            if leaf not in node and parts[:-1] == ["model"]:
                with c.unlocked():
                    node[leaf] = value
            else:
                node[leaf] = value
        except KeyError:
            section = "config" + "".join("." + q for q in parts[:-1])
            raise SweepError(f"{where}: override {key!r} names no field of the config ({section} has: "
                             f"{', '.join(sorted(node.keys()))}). Fix the key in the sweep file.") from None
        except TypeError as e:
            if old is not None:
                raise _type_error(where, key, value, old) from e
            raise SweepError(f"{where}: override {key}={value!r}: {e}") from e
        except (ValueError, AttributeError) as e:
            raise SweepError(f"{where}: override {key}={value!r}: {e}") from e
    if not was_locked:
        c.unlock()
    return c


def _type_error(where: str, key: str, value: Any, old: Any) -> SweepError:
    return SweepError(f"{where}: override {key}={value!r} is a {type(value).__name__} but config.{key} "
                      f"is a {type(old).__name__} ({old!r}). Give a value of that type in the sweep file.")


def flatten(config, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a ConfigDict / dict."""
    out = {}
    for k in config.keys():
        v = config[k]
        key = f"{prefix}{k}"
        if hasattr(v, "keys"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Command-line --config.* overrides are also applied to points with their own base config,
# except for these sections, which belong to one model family's recipe.
FAMILY_SECTIONS = ("model.", "optimizer.", "schedule.")


def command_line_overrides(base_spec: str, base_config) -> dict[str, Any]:
    """The ``--config.a.b=v`` overrides: leaves where ``base_config`` differs from its file."""
    pristine = flatten(load_config(base_spec))
    return {k: v for k, v in flatten(base_config).items() if k not in pristine or pristine[k] != v}
