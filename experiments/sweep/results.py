"""What a sweep writes: one row per finished point in ``results.jsonl`` (the record) and
``results.csv`` (the same rows, flat), and the dry-run table.

Columns: :data:`FIXED_COLUMNS`, then one ``ov.<key>`` per override key of the sweep, then
any key a row brings that the header lacks (the CSV is rewritten with the wider header), such as
the named evaluators' results (``fewshot/<dataset>/<k>shot``; seqvis.train.evaluators).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any, Sequence

import jax

from experiments.sweep.points import Point, total_steps
from seqvis.evaluation.flops import training_flops

log = logging.getLogger("seqvis.sweep")

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


# ============================================================================ rows


def compute_units() -> tuple[int, str]:
    """Cores (CPU) or devices (accelerators) a run occupies, for core-seconds."""
    if jax.default_backend() == "cpu":
        try:
            return len(os.sched_getaffinity(0)), "cpu-core"
        except AttributeError:
            return os.cpu_count() or 1, "cpu-core"
    return jax.device_count(), jax.default_backend()


def make_row(point: Point, results: dict | None, *, status: str, message: str = "", wall: float | None = None,
             resumed: bool = False, workdir: str = "") -> dict:
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
    branch = point.config.get("branch_from", None) or {}
    if branch.get("workdir"):  # a cooldown branch: the long run's point directory and the step it starts from
        row.update(branch_from_point=os.path.basename(branch.workdir), branch_from_step=int(branch.step))
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
        # The named evaluators' results (fewshot/<dataset>/<k>shot, <name>/accuracy, ...): one column each.
        row.update({k: v for k, v in results.items() if "/" in k})
    return row


# ============================================================================ dry run


def dry_run_table(points: Sequence[Point]) -> str:
    """The points with model, params, analytic GFLOPs/example and training compute where known."""
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
