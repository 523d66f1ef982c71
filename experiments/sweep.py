"""Run a sweep: every point is an ordinary training run of the shared trainer.

    python -m experiments.sweep --config=configs/vit.py:ARG --sweep=configs/sweeps/NAME.py[:ARG] --workdir=DIR
        [--config.a.b=value ...]   # applied to the base config of every point
        [--dry_run]                # list the points (params, analytic GFLOPs, examples) and exit
        [--only=3,7] [--isolate] [--retry_failed=false]

A sweep file defines ``get_sweep(h, arg=None)`` returning a list of points, each a dict of
config overrides ``{"model.depth": 4, "num_epochs": 2.0}``; ``h`` has the helpers
``h.sweep(key, values)``, ``h.fixed(key, value)``, ``h.product(*axes)``, ``h.zip(*axes)``
and ``h.chain(*axes)``. The reserved key ``"config"`` replaces the base config of that
point (``"configs/resnet.py:18,fashion_mnist"``), so one sweep can mix model families.

Each point trains in ``DIR/points/<label>-<hash>/`` (the hash is a function of the point's
overrides only, so reordering or extending the sweep file keeps finished points finished).
One row per finished point is appended to ``DIR/results.jsonl`` and ``DIR/results.csv``:
the overrides, the model (family, width, depth, MLP, heads, patch, parameters), forward
FLOPs per example (XLA cost analysis, and the analytic count for ViT), training compute
(3 × forward FLOPs × examples seen, in FLOPs and in core-seconds), wall seconds, final
metrics, and the status (``ok`` / ``failed`` with the error).

Restarting the same command skips points with an ``ok`` row, resumes an unfinished point
from the checkpoints in its directory, and retries failed points (``--retry_failed=false``
skips them). Points run in this process one after the other (no TF/JAX start-up per
point); a Python exception in one point is recorded and the sweep goes on. ``--isolate``
runs every point in a child process instead, which also survives hard crashes (OOM kills).
"""

from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import gc
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD_ENV = "SEQVIS_SWEEP_CHILD"  # set for the per-point child processes of --isolate
log = logging.getLogger("seqvis.sweep")


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
        out = []
        for combo in itertools.product(*axes):
            out.append(_merge(combo, "h.product"))
        return out

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


def _merge(dicts: Sequence[dict], where: str) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if k in out and out[k] != v:
                raise SweepError(f"{where}: key {k!r} is set twice with different values ({out[k]!r}, {v!r}).")
            out[k] = v
    return out


# ============================================================================ loading files


def _split_spec(spec: str) -> tuple[str, str | None]:
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
    path, arg = _split_spec(spec)
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
    path, arg = _split_spec(spec)
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
            v = os.path.splitext(os.path.basename(_split_spec(v)[0]))[0] + (":" + (_split_spec(v)[1] or ""))
            k = "cfg"
        else:
            k = k.split(".")[-1]
        parts.append(f"{k}={v if not isinstance(v, (list, tuple)) else 'x'.join(map(str, v))}")
    label = re.sub(r"[^A-Za-z0-9=,.+_-]", "-", ",".join(parts))
    return label[:limit] or "base"


# ============================================================================ overrides


def apply_overrides(config, overrides: dict, where: str):
    """A copy of ``config`` with dotted ``overrides`` set (``config`` key excluded).

    A key must name an existing field, except directly under ``model`` (model keyword
    arguments, which the model builder checks). A value of another type than the field's
    is an error, except int -> float.
    """
    import ml_collections

    c = copy.deepcopy(config)
    for key, value in overrides.items():
        if key == "config":
            continue
        parts = key.split(".")
        node = c
        for j, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], (ml_collections.ConfigDict, dict)):
                have = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
                raise SweepError(f"{where}: override {key!r}: config.{'.'.join(parts[:j + 1])} is not a section "
                                 f"of the config (it has: {have}). Fix the key in the sweep file.")
            node = node[part]
        leaf = parts[-1]
        if leaf not in node and parts[:-1] != ["model"]:
            section = "config" + "".join("." + q for q in parts[:-1])
            raise SweepError(f"{where}: override {key!r} names no field of the config ({section} has: "
                             f"{', '.join(sorted(node.keys()))}). Fix the key in the sweep file.")
        value = list(value) if isinstance(value, tuple) else value
        if leaf in node and node[leaf] is not None and value is not None:
            old = node[leaf]
            ok = isinstance(value, type(old)) or (isinstance(old, float) and isinstance(value, int)) or \
                (isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)))
            if isinstance(old, bool) != isinstance(value, bool):
                ok = False
            if not ok:
                raise SweepError(f"{where}: override {key}={value!r} is a {type(value).__name__} but config.{key} "
                                 f"is a {type(old).__name__} ({old!r}). Give a value of that type in the sweep file.")
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        if isinstance(value, list) and leaf in node and isinstance(node[leaf], tuple):
            value = tuple(value)
        with c.unlocked():
            try:
                node[leaf] = value
            except (TypeError, ValueError, AttributeError) as e:
                raise SweepError(f"{where}: override {key}={value!r}: {e}") from e
    return c


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


# ============================================================================ points


@dataclasses.dataclass
class Point:
    index: int
    id: str
    label: str
    overrides: dict
    config_spec: str
    config: Any  # ml_collections.ConfigDict
    info: dict  # model description, params, analytic FLOPs (from describe())

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.id}"


def describe(config) -> dict:
    """Model family and sizes, parameter count and analytic forward FLOPs, without training.

    Builds the task's model (which checks the model fields), checks the patch size against
    the image size, and counts parameters with ``jax.eval_shape`` (no memory, no compile).
    """
    import jax

    from seqvis.analysis.flops import vit_forward_flops
    from seqvis.models.common import num_params
    from seqvis.train.tasks import get_task

    task = get_task(config)
    model = task.model
    family = config.model.get("name", "vit")
    shape = tuple(config.data.image_shape)
    info: dict[str, Any] = {"family": family}
    if family == "vit":
        model.check_image_size(shape[:2])
        ph, pw = model.patch_size if isinstance(model.patch_size, tuple) else (model.patch_size,) * 2
        info.update(width=model.width, depth=model.depth, mlp_dim=model.mlp_dim or 4 * model.width,
                    heads=model.num_heads, patch=ph if ph == pw else f"{ph}x{pw}")
        flops = vit_forward_flops(model, shape)
        info["analytic_gflops_per_example"] = None if flops is None else flops / 1e9
        info["model"] = f"ViT w{model.width} d{model.depth} p{info['patch']}"
    elif family == "resnet":
        info.update(width=model.width, depth=model.depth, mlp_dim=None, heads=None, patch=None,
                    analytic_gflops_per_example=None, model=f"ResNet-{model.depth} w{model.width}")
    else:
        info.update(width=None, depth=None, mlp_dim=None, heads=None, patch=None, analytic_gflops_per_example=None,
                    model=family)
    dummy = task.dummy_batch(1)
    variables = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), dummy))
    info["params"] = num_params(variables["params"])
    return info


def expand(base_spec: str, base_config, points: list[dict], where: str,
           shared: dict[str, Any] | None = None) -> list[Point]:
    """Apply every point's overrides and check it (model fields, patch vs image, trainer checks).

    ``shared`` (the command line's ``--config.*`` overrides) is applied to the base config of
    points that bring their own ``config``, except under :data:`FAMILY_SECTIONS`.
    """
    from seqvis.train.trainer import check_config

    out = []
    other_bases: dict[str, Any] = {}
    for i, ov in enumerate(points):
        spec = ov.get("config", base_spec)
        if "config" in ov:
            if spec not in other_bases:
                other = load_config(spec, flag=f"{where}: point {i} 'config'")
                keep = {k: v for k, v in (shared or {}).items()
                        if not k.startswith(FAMILY_SECTIONS) and k in flatten(other)}
                other_bases[spec] = apply_overrides(other, keep, f"--config overrides for {spec}")
            base = other_bases[spec]
        else:
            base = base_config
        pw = f"{where}: point {i} ({point_label(ov, 200)})"
        config = apply_overrides(base, ov, pw)
        try:
            check_config(config)
            info = describe(config)
        except (ValueError, TypeError, KeyError) as e:
            raise SweepError(f"{pw}: {type(e).__name__}: {e}") from e
        out.append(Point(index=i, id=point_id(ov), label=point_label(ov), overrides=ov, config_spec=spec,
                         config=config, info=info))
    return out


# ============================================================================ results files

FIXED_COLUMNS = [
    "point", "index", "label", "status", "message", "config", "overrides",
    "family", "model", "width", "depth", "mlp_dim", "heads", "patch", "params",
    "batch_size", "steps", "examples_seen", "epochs",
    "gflops_per_example", "analytic_gflops_per_example", "train_flops", "train_core_seconds", "cores",
    "train_seconds", "wall_seconds", "resumed", "accuracy", "test_error", "loss", "num_examples", "workdir",
]


def override_columns(points: Sequence[Point]) -> list[str]:
    cols: list[str] = []
    for p in points:
        for k in p.overrides:
            if k != "config" and f"ov.{k}" not in cols:
                cols.append(f"ov.{k}")
    return cols


def read_rows(path: str) -> list[dict]:
    """Rows of a results.jsonl (a truncated last line from a kill is ignored)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not valid JSON (a write cut short?); ignoring it.", path, n + 1)
    return rows


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v


class ResultsWriter:
    """Appends rows to ``results.jsonl`` (the record) and ``results.csv`` (same rows, flat)."""

    def __init__(self, workdir: str, columns: list[str]):
        self.jsonl = os.path.join(workdir, "results.jsonl")
        self.csv = os.path.join(workdir, "results.csv")
        self.columns = columns
        header = None
        if os.path.exists(self.csv):
            with open(self.csv, newline="") as f:
                header = next(csv.reader(f), None)
        if header != columns or len(read_rows(self.jsonl)) != self._csv_rows():
            self._rewrite_csv()

    def _csv_rows(self) -> int:
        if not os.path.exists(self.csv):
            return -1
        with open(self.csv, newline="") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)

    def _rewrite_csv(self) -> None:
        rows = read_rows(self.jsonl)
        extra = [k for r in rows for k in r if k not in self.columns]
        self.columns = self.columns + list(dict.fromkeys(extra))
        tmp = self.csv + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for r in rows:
                w.writerow([_csv_value(r.get(c)) for c in self.columns])
        os.replace(tmp, self.csv)

    def append(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if any(k not in self.columns for k in row):
            self._rewrite_csv()
            return
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([_csv_value(row.get(c)) for c in self.columns])


# ============================================================================ running


def compute_units() -> tuple[int, str]:
    """Cores (CPU) or devices (accelerators) a run occupies, for core-seconds."""
    import jax

    if jax.default_backend() == "cpu":
        try:
            return len(os.sched_getaffinity(0)), "cpu-core"
        except AttributeError:
            return os.cpu_count() or 1, "cpu-core"
    return jax.device_count(), jax.default_backend()


def make_row(point: Point, results: dict | None, *, status: str, message: str = "", wall: float | None = None,
             resumed: bool = False, workdir: str = "") -> dict:
    from seqvis.analysis.flops import training_flops

    cores, _ = compute_units()
    row: dict[str, Any] = {
        "point": point.id, "index": point.index, "label": point.label, "status": status, "message": message,
        "config": point.config_spec, "overrides": {k: v for k, v in point.overrides.items() if k != "config"},
        **{k: point.info.get(k) for k in ("family", "model", "width", "depth", "mlp_dim", "heads", "patch",
                                          "params", "analytic_gflops_per_example")},
        "batch_size": int(point.config.batch_size), "cores": cores, "wall_seconds": wall, "resumed": resumed,
        "workdir": workdir,
    }
    for k, v in point.overrides.items():
        if k != "config":
            row[f"ov.{k}"] = v
    if results:
        g = results.get("gflops_per_example")
        ex = results.get("examples_seen")
        row.update(
            params=results.get("params", row["params"]), steps=results.get("steps"), examples_seen=ex,
            gflops_per_example=g, train_seconds=results.get("train_seconds"),
            accuracy=results.get("accuracy"), loss=results.get("loss"), num_examples=results.get("num_examples"))
        row["train_flops"] = None if g is None else training_flops(g * 1e9, ex)
        row["train_core_seconds"] = None if row["train_seconds"] is None else row["train_seconds"] * cores
        if row["accuracy"] is not None:
            row["test_error"] = 1.0 - float(row["accuracy"])
        n_train = point.info.get("num_train_examples")
        row["epochs"] = None if not n_train or ex is None else ex / n_train
    return row


class Sweep:
    """Expanded sweep bound to a workdir: resume bookkeeping and the run loop."""

    def __init__(self, base_spec: str, sweep_spec: str, workdir: str, base_config=None,
                 points: list[dict] | None = None, command: str = "", shared_overrides: dict | None = None):
        """``base_config``: the base config (default: the file's); ``shared_overrides``: the command
        line's ``--config.*`` overrides, also applied to points with their own base config;
        ``points``: the overrides of each point (default: from the sweep file)."""
        self.base_spec, self.sweep_spec, self.workdir = base_spec, sweep_spec, os.path.abspath(workdir)
        self.base_config = base_config if base_config is not None else load_config(base_spec)
        self.command = command
        raw = points if points is not None else load_sweep(sweep_spec)
        self.points = expand(base_spec, self.base_config, check_points(raw, f"--sweep={sweep_spec}"),
                             f"--sweep={sweep_spec}", shared=shared_overrides)

    # -------------------------------------------------------------- bookkeeping
    def _check_workdir(self, write: bool = True) -> None:
        """The workdir remembers its base config; another base config needs another workdir."""
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "sweep.json")
        base = json.loads(self.base_config.to_json_best_effort())
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("base_config") != base:
                diffs = _dict_diff(saved.get("base_config", {}), base)
                raise SweepError(
                    f"{self.workdir} holds a sweep over another base config (--config={saved.get('base_spec')}); "
                    f"differences: {'; '.join(diffs[:8])}. Use a new --workdir, or the same --config and "
                    "--config.* overrides as before.")
            if not write:
                return
        info = {"base_spec": self.base_spec, "sweep_spec": self.sweep_spec, "base_config": base,
                "command": self.command,
                "points": [{"index": p.index, "point": p.id, "label": p.label, "overrides": p.overrides}
                           for p in self.points]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, default=str)
        os.replace(tmp, path)

    def point_dir(self, p: Point) -> str:
        return os.path.join(self.workdir, "points", p.dirname)

    def status(self) -> dict[str, str]:
        """Latest status per point id from results.jsonl."""
        out = {}
        for r in read_rows(os.path.join(self.workdir, "results.jsonl")):
            out[r.get("point")] = r.get("status")
        return out

    # -------------------------------------------------------------- run
    def run(self, *, only: Sequence[str] | None = None, retry_failed: bool = True, isolate: bool = False,
            child_argv: Sequence[str] | None = None) -> list[dict]:
        """Run every unfinished point; returns the rows written by this call."""
        self._add_dataset_sizes()
        self.preflight()
        self._check_workdir(write=not only)
        lock = self._lock()
        try:
            return self._run(only, retry_failed, isolate, child_argv)
        finally:
            if lock is not None:
                lock.close()

    def _lock(self):
        """One sweep process per workdir (a child of ``--isolate`` runs under its parent's lock)."""
        import fcntl

        if os.environ.get(_CHILD_ENV):
            return None
        f = open(os.path.join(self.workdir, "sweep.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise SweepError(f"Another sweep is running in {self.workdir}; wait for it to finish (or stop it) "
                             "before starting this one, or use another --workdir.") from None
        return f

    def _run(self, only, retry_failed, isolate, child_argv) -> list[dict]:
        writer = ResultsWriter(self.workdir, FIXED_COLUMNS + override_columns(self.points))
        done = self.status()
        written = []
        todo = [p for p in self.points if not only or str(p.index) in only or p.id in only]
        t_sweep = time.time()
        for n, p in enumerate(todo):
            state = done.get(p.id)
            if state == "ok":
                log.info("[%d/%d] %s: finished earlier, skipped", n + 1, len(todo), p.dirname)
                continue
            if state == "failed" and not retry_failed:
                log.info("[%d/%d] %s: failed earlier, skipped (--retry_failed=true retries)", n + 1, len(todo),
                         p.dirname)
                continue
            log.info("[%d/%d] %s: %s, %s params (%.1f min into the sweep)", n + 1, len(todo), p.dirname,
                     p.info["model"], f"{p.info['params']:,}", (time.time() - t_sweep) / 60)
            if isolate:
                row = self._run_child(p, child_argv or [])
            else:
                row = self.run_point(p)
            if row is not None:
                writer.append(row)
                written.append(row)
                if row["status"] == "ok":
                    log.info("  -> ok: accuracy %.4f, %.3g train FLOPs, %.0f s", row["accuracy"] or float("nan"),
                             row["train_flops"] or float("nan"), row["wall_seconds"])
                else:
                    log.error("  -> FAILED: %s", row["message"].splitlines()[0] if row["message"] else "")
        return written

    def _add_dataset_sizes(self) -> None:
        """Train-split sizes (for the epochs column); best effort, unprepared data gives None."""
        from seqvis.data import pipeline as data_lib

        cache: dict[str, int | None] = {}
        for p in self.points:
            key = json.dumps([p.config.data.get("name"), p.config.data.get("train_split", "train"),
                              p.config.data.get("data_dir"), p.config.data.get("idx_dir")])
            if key not in cache:
                try:
                    cache[key] = int(data_lib.num_examples(p.config.data, p.config.data.get("train_split", "train")))
                except Exception:  # noqa: BLE001 - the point's own run reports a missing dataset
                    cache[key] = None
            p.info["num_train_examples"] = cache[key]

    def preflight(self) -> None:
        """Build every point's schedule and optimiser, so a bad budget fails now, not at point 20."""
        from seqvis.train import optim

        for p in self.points:
            steps = total_steps(p)
            if steps is None:
                continue
            try:
                optim.make_optimizer(p.config.optimizer, optim.make_schedule(p.config.schedule, steps))
            except (ValueError, TypeError, KeyError) as e:
                raise SweepError(f"--sweep={self.sweep_spec}: point {p.index} ({p.label}): {e}") from e

    def run_point(self, p: Point) -> dict:
        """Train one point in this process (resuming from its checkpoints); exceptions become a failed row."""
        import jax

        from seqvis.train import checkpoint as ckpt_lib
        from seqvis.train.trainer import train_and_evaluate

        wd = self.point_dir(p)
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "point.json"), "w") as f:
            json.dump({"index": p.index, "point": p.id, "config": p.config_spec, "overrides": p.overrides}, f,
                      indent=2, default=str)
        resumed = os.path.isdir(os.path.join(wd, "checkpoints")) and bool(ckpt_lib.Checkpointer(wd).steps())
        t0 = time.time()
        try:
            results = train_and_evaluate(p.config, wd)
        except Exception as e:  # noqa: BLE001 - recorded, and the sweep goes on
            msg = f"{type(e).__name__}: {e}"
            with open(os.path.join(wd, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
            return make_row(p, None, status="failed", message=msg, wall=time.time() - t0, resumed=resumed,
                            workdir=wd)
        finally:
            t1 = time.time()
            jax.clear_caches()  # executables of this point are not needed again
            gc.collect()
            log.info("  run %.1f s, cleanup %.1f s", t1 - t0, time.time() - t1)
        return make_row(p, results, status="ok", wall=time.time() - t0, resumed=resumed, workdir=wd)

    def _run_child(self, p: Point, child_argv: Sequence[str]) -> dict | None:
        """Run one point as ``python -m experiments.sweep ... --only=<id>`` in a child process."""
        before = len(read_rows(os.path.join(self.workdir, "results.jsonl")))
        cmd = [sys.executable, "-m", "experiments.sweep", *child_argv, f"--only={p.id}", "--noisolate"]
        t0 = time.time()
        tail: collections.deque = collections.deque(maxlen=15)
        with subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **{_CHILD_ENV: "1"})) as proc:
            for line in proc.stderr:  # shown as it comes, the end kept for the failure message
                sys.stderr.write(line)
                tail.append(line.rstrip())
        rows = read_rows(os.path.join(self.workdir, "results.jsonl"))[before:]
        if any(r.get("point") == p.id for r in rows):
            return None  # the child wrote its row
        tail = "\n".join(tail)
        return make_row(p, None, status="failed", wall=time.time() - t0, workdir=self.point_dir(p),
                        message=f"child process exited with code {proc.returncode}: {tail}")


def total_steps(p: Point) -> int | None:
    """Training steps of a point, as the trainer computes them (None if the dataset size is unknown)."""
    c = p.config
    if c.get("total_steps"):
        return int(c.total_steps)
    n_train = p.info.get("num_train_examples")
    if not n_train or not c.get("num_epochs"):
        return None
    return int(math.ceil(float(c.num_epochs) * n_train / int(c.batch_size)))


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {json.dumps(a)} -> {json.dumps(b)}"]


# ============================================================================ dry run


def dry_run_table(points: Sequence[Point]) -> str:
    """The points with model, params, analytic GFLOPs/example and training compute where known."""
    from seqvis.analysis.flops import training_flops

    lines = ["index  point       model                      params        GFLOPs/ex  examples     train FLOPs  "
             "overrides"]
    total = 0.0
    for p in points:
        steps = total_steps(p)
        ex = None if steps is None else steps * int(p.config.batch_size)
        g = p.info.get("analytic_gflops_per_example")
        tf = None if g is None or ex is None else training_flops(g * 1e9, ex)
        total += tf or 0.0
        lines.append(f"{p.index:5d}  {p.id}  {p.info['model'][:25]:25s}  {p.info['params']:>12,}  "
                     f"{'?' if g is None else f'{g:.4g}':>9}  {'?' if ex is None else ex:>10}  "
                     f"{'?' if tf is None else f'{tf:.3g}':>12}  {json.dumps({k: v for k, v in p.overrides.items()})}")
    lines.append(f"{len(points)} points; analytic ViT training compute {total:.3g} FLOPs (ResNets: '?', counted by XLA "
                 "when they run)")
    return "\n".join(lines)


# ============================================================================ command line


def main(argv: Sequence[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not FLAGS.sweep or not FLAGS.workdir or FLAGS.config is None:
        sys.exit("usage: python -m experiments.sweep --config=configs/vit.py[:ARG] --sweep=configs/sweeps/NAME.py "
                 "--workdir=DIR")
    del argv  # absl keeps only unparsed arguments; the flags are read from sys.argv
    args = sys.argv[1:]
    try:
        base_spec = _config_spec_from_argv(args)
        command = " ".join(["python -m experiments.sweep", *args])
        sweep = Sweep(base_spec, FLAGS.sweep, FLAGS.workdir, base_config=FLAGS.config, command=command,
                      shared_overrides=command_line_overrides(base_spec, FLAGS.config))
        if FLAGS.dry_run:
            sweep._add_dataset_sizes()
            sweep.preflight()
            print(dry_run_table(sweep.points))
            return
        child_argv = [a for a in args if not a.startswith(("--only", "--isolate", "--noisolate"))]
        rows = sweep.run(only=[s.strip() for s in FLAGS.only.split(",") if s.strip()] if FLAGS.only else None,
                         retry_failed=FLAGS.retry_failed, isolate=FLAGS.isolate, child_argv=child_argv)
    except SweepError as e:
        if os.environ.get("SEQVIS_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    status = sweep.status()
    n_ok = sum(1 for p in sweep.points if status.get(p.id) == "ok")
    n_failed = sum(1 for p in sweep.points if status.get(p.id) == "failed")
    print(json.dumps({"points": len(sweep.points), "ok": n_ok, "failed": n_failed, "run_now": len(rows),
                      "results": os.path.join(sweep.workdir, "results.csv")}))
    if n_failed and not FLAGS.only:
        sys.exit(f"{n_failed} point(s) failed; see the 'message' column of {os.path.join(sweep.workdir, 'results.csv')}"
                 " and error.txt in their directories. Re-run the command to retry them.")


def _config_spec_from_argv(argv: Sequence[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Base config of every point, e.g. configs/vit.py:mu/7.",
                                    lock_config=False)
    flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(h, arg), e.g. configs/sweeps/depth.py[:short].")
    flags.DEFINE_string("workdir", None, "Sweep directory: points/, results.csv, results.jsonl, sweep.json.")
    flags.DEFINE_bool("dry_run", False, "List the points and exit.")
    flags.DEFINE_string("only", "", "Comma-separated point indices or ids to run (default: all).")
    flags.DEFINE_bool("retry_failed", True, "Retry points recorded as failed.")
    flags.DEFINE_bool("isolate", False, "Run each point in a child process.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
