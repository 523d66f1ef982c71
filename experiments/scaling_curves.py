"""Scaling curves and ablation report from sweep results.

    python -m experiments.scaling_curves --results=DIR/results.csv --out=DIR/report
    python -m experiments.scaling_curves --results=A/results.csv,B/results.csv --out=OUT  # several sweeps

Writes to ``--out``:

- ``frontier.{png,svg}``: test error vs training compute (log-log), one colour per model
  size, the compute-error frontier and the fitted saturating power law
  ``E = a (C + d)^(-b) + c`` (Zhai et al. 2022, Fig. 2);
- ``vit_vs_resnet.{png,svg}``: both families and their frontiers vs compute (ViT paper Fig. 5);
- ``ablations.{png,svg}``: error vs forward GFLOPs/example when only depth, only width or
  only the patch size changes, one line per training budget (ViT paper Fig. 8);
- ``report.md``: the table of points, the fitted coefficients with bootstrap intervals and
  each published finding marked holds / does not hold / not testable, with the numbers;
- ``fit.json``: the same numbers, machine-readable.

The frontier and the fit use the ViT points (the object of the scaling papers); ResNets
enter the family comparison. Compute C is the training compute ``3 × forward FLOPs ×
examples seen`` from the sweep rows; error is the test error ``1 − accuracy``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

from experiments.scaling_findings import (  # noqa: F401 - findings and spearman re-exported
    MAX_RMS_LOG_RESIDUAL, MIN_AGREEING_FRACTION, MIN_SPEARMAN, budget_label, findings, spearman)
from seqvis.analysis.powerlaw import fit_saturating_power_law, pareto_frontier


class ReportError(ValueError):
    """A results file that cannot be read; the message names it and the fix."""


NUMERIC = ("index", "width", "depth", "mlp_dim", "heads", "params", "batch_size", "steps", "examples_seen", "epochs",
           "gflops_per_example", "analytic_gflops_per_example", "train_flops", "train_core_seconds", "cores",
           "train_seconds", "wall_seconds", "accuracy", "test_error", "loss", "num_examples")
REQUIRED = ("point", "status", "family", "model", "params", "examples_seen", "gflops_per_example", "train_flops",
            "test_error")


# ============================================================================ reading


def _num(v: Any) -> Any:
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def read_results(paths: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(finished rows, failed rows) from results.csv files; the latest row of each point wins."""
    ok, failed = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise ReportError(f"--results: {path} does not exist. Point it at the results.csv a sweep wrote "
                              "(python -m experiments.sweep ... --workdir=DIR writes DIR/results.csv).")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ReportError(f"--results: {path} lacks the column(s) {missing}; it is not a results.csv written "
                                  "by experiments.sweep (re-run the sweep command to regenerate it).")
            latest: dict[str, dict] = {}
            for row in reader:
                r = {k: (_num(v) if k in NUMERIC else v) for k, v in row.items()}
                bad = [(k, r[k]) for k in NUMERIC if isinstance(r.get(k), str)]
                if bad:
                    k, v = bad[0]
                    raise ReportError(f"--results: {path} line {reader.line_num}, column {k!r}: {v!r} is not a number. "
                                      "Fix or delete that row (or re-run the sweep command to regenerate the file).")
                if isinstance(r.get("patch"), str) and r["patch"].isdigit():
                    r["patch"] = int(r["patch"])
                for c in NUMERIC + ("patch", "config", "overrides", "label", "message"):
                    r.setdefault(c, None)
                r["source"] = path
                latest[r["point"]] = r
        for r in latest.values():
            if r["status"] == "ok" and r.get("train_flops") and r.get("test_error") is not None:
                r["compute"] = float(r["train_flops"])
                r["error"] = float(r["test_error"])
                ok.append(r)
            elif r["status"] != "ok":
                failed.append(r)
    if not ok:
        raise ReportError(f"--results: no finished point with training compute and test error in {', '.join(paths)}"
                          f" ({len(failed)} failed). Run (or finish) the sweep first.")
    for r in ok:
        if r["error"] <= 0:
            r["error"] = 0.5 / max(r.get("num_examples") or 10_000, 1)  # a perfect score: half an example
    return ok, failed


# ============================================================================ analysis


def dedupe(rows: Sequence[dict]) -> tuple[list[dict], int]:
    """One row per (model, settings): the same run reached from two sweeps (e.g. the base model of
    the depth and width sweeps) counts once; the first is kept. Returns (rows, number dropped)."""
    seen, out = set(), []
    for r in rows:
        key = json.dumps([r["family"], r["model"], r.get("width"), r.get("depth"), r.get("mlp_dim"), r.get("heads"),
                          r.get("patch"), _other_settings(r)], default=str)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(rows) - len(out)


def frontier_rows(rows: Sequence[dict]) -> list[dict]:
    idx = pareto_frontier([r["compute"] for r in rows], [r["error"] for r in rows])
    return [rows[i] for i in idx]


def _other_settings(r: dict) -> str:
    """Everything that is not the model description: base config and non-model overrides (budget included)."""
    ov = r.get("overrides") or {}
    if isinstance(ov, str):
        try:
            ov = json.loads(ov)
        except json.JSONDecodeError:
            ov = {"overrides": ov}
    keep = {k: v for k, v in ov.items() if not k.startswith("model.")}
    return json.dumps([r.get("config"), r.get("examples_seen"), keep], sort_keys=True, default=str)


ABLATION_AXES = {  # axis -> (column, model columns held fixed)
    "depth": ("depth", ("width", "mlp_dim", "heads", "patch")),
    "width": ("width", ("depth", "patch")),
    "patch size": ("patch", ("width", "depth", "mlp_dim", "heads")),
}


def ablation_groups(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Per axis, the groups of ViT points that differ only in that axis (same budget and settings)."""
    out: dict[str, list[dict]] = {}
    vit = [r for r in rows if r["family"] == "vit"]
    for axis, (col, fixed) in ABLATION_AXES.items():
        groups: dict[str, list[dict]] = {}
        for r in vit:
            if r.get(col) is None:
                continue
            key = json.dumps([_other_settings(r)] + [r.get(c) for c in fixed], default=str)
            groups.setdefault(key, []).append(r)
        series = []
        for members in groups.values():
            values = {m[col] for m in members}
            if len(values) < 2 or len(values) != len(members):
                continue
            members = sorted(members, key=lambda m: m["gflops_per_example"])
            series.append({"axis": axis, "column": col, "rows": members,
                           "fixed": {c: members[0].get(c) for c in fixed},
                           "examples_seen": members[0]["examples_seen"], "epochs": members[0].get("epochs")})
        out[axis] = sorted(series, key=lambda s: (s["examples_seen"], json.dumps(s["fixed"], default=str)))
    return out


# ============================================================================ report


def _g(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, fmt)


def make_report(results: Sequence[str], out: str, *, bootstrap: int = 1000, seed: int = 0, title: str = "",
                command: str = "") -> dict:
    """Read ``results`` (results.csv paths), write plots, report.md and fit.json to ``out``; returns fit.json's dict."""
    from seqvis.analysis import plots

    rows, failed = read_results(results)
    rows, n_dup = dedupe(rows)
    os.makedirs(out, exist_ok=True)
    vit = [r for r in rows if r["family"] == "vit"]
    fit_rows = vit or rows
    vit_frontier = frontier_rows(fit_rows)
    families = sorted({r["family"] for r in rows})
    family_frontiers = {fam: frontier_rows([r for r in rows if r["family"] == fam]) for fam in families}
    frontier_ids = {r["point"] for r in vit_frontier}

    fit, fit_error = None, None
    try:
        fit = fit_saturating_power_law([r["compute"] for r in vit_frontier], [r["error"] for r in vit_frontier],
                                       bootstrap=bootstrap, seed=seed)
    except (ValueError, RuntimeError) as e:
        fit_error = str(e)
    groups = ablation_groups(rows)
    found = findings(rows, fit, fit_error, vit_frontier, groups, family_frontiers)

    # ---- plots
    written = []
    fit_label = "" if fit is None else (f"fit: {fit.a:.3g}·(C + {fit.d:.2g})^-{fit.b:.3f} + {fit.c:.3f}")
    written += plots.plot_frontier(fit_rows, vit_frontier, None if fit is None else fit.predict,
                                   os.path.join(out, "frontier"), fit_label=fit_label,
                                   asymptote=None if fit is None else fit.c,
                                   title=(title + ": " if title else "") + "compute-error frontier (ViT)")
    if len(families) > 1:
        written += plots.plot_families(rows, family_frontiers, os.path.join(out, "vit_vs_resnet"),
                                       title=(title + ": " if title else "") + "ViT vs ResNet")
    panels = []
    for axis, series in groups.items():
        col = ABLATION_AXES[axis][0]
        many = len({json.dumps(s["fixed"], default=str) for s in series}) > 1
        panels.append({"title": axis, "legend_title": "training budget", "series": [
            {"label": budget_label(s["examples_seen"], s.get("epochs")) + (
                " | " + ",".join(f"{k[0]}{v}" for k, v in s["fixed"].items()) if many else ""),
             "x": [r["gflops_per_example"] for r in s["rows"]], "y": [r["error"] for r in s["rows"]],
             "annotations": [f"{col[0]}{r[col]}" for r in s["rows"]]} for s in series]})
    if any(p["series"] for p in panels):
        written += plots.plot_ablations(panels, os.path.join(out, "ablations"),
                                        title=(title + ": " if title else "") + "one axis at a time")

    # ---- fit.json
    data = {"results": list(results), "points": len(rows), "failed": len(failed),
            "fit": None if fit is None else fit.as_dict(), "fit_error": fit_error,
            "frontier": [r["point"] for r in vit_frontier], "findings": found,
            "plots": [os.path.basename(p) for p in written]}
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(data, f, indent=2)

    # ---- report.md
    L = [f"# {title or 'Scaling curves'}", ""]
    if command:
        L += ["Made by:", "", "```", command, "```", ""]
    for path in results:
        sweep_json = os.path.join(os.path.dirname(path), "sweep.json")
        if os.path.exists(sweep_json):
            with open(sweep_json) as f:
                cmd = json.load(f).get("command")
            if cmd:
                L += [f"Sweep ({os.path.basename(os.path.dirname(os.path.abspath(path)))}):", "", "```", cmd, "```", ""]
    n_total = len(rows) + n_dup + len(failed)
    L += [f"{len(rows)} finished points of {n_total} ({len(failed)} failed"
          + (f"; {n_dup} duplicate runs of the same model and budget from another sweep left out" if n_dup else "")
          + f"); families: {', '.join(families)}. Compute C = 3 × forward FLOPs/example (XLA cost analysis) × "
          "examples seen; error = 1 − test accuracy.", ""]
    L += ["## Findings", "", "| finding | verdict | numbers |", "|---|---|---|"]
    for f_ in found:
        L.append(f"| {f_['finding']} | **{f_['verdict']}** | {f_['numbers']} |")
    L += ["", f"Criteria: the law fits if its RMS relative deviation on the frontier is ≤ "
          f"{100 * MAX_RMS_LOG_RESIDUAL:.0f}%; the optimal model grows if Spearman ρ(compute, params) on the "
          f"frontier ≥ {MIN_SPEARMAN}; an ordering holds if ≥ {MIN_AGREEING_FRACTION:.0%} of the comparisons "
          "agree.", ""]
    L += ["## Saturating power-law fit", ""]
    if fit is None:
        L += [f"No fit: {fit_error}", ""]
    else:
        L += [f"E = a·(C + d)^(−b) + c on the {fit.n} ViT frontier points, C in FLOPs; least squares on log E; "
              f"{int(100 * fit.level)}% {fit.method} bootstrap intervals ({fit.n_boot_ok}/{fit.n_boot} resamples "
              "converged).", "", "| coefficient | value | interval |", "|---|---|---|"]
        for name, meaning in (("a", "scale"), ("b", "exponent"), ("c", "irreducible error"), ("d", "compute offset")):
            lo, hi = fit.intervals.get(name, (float("nan"), float("nan")))
            L.append(f"| {name} ({meaning}) | {getattr(fit, name):.4g} | [{lo:.4g}, {hi:.4g}] |")
        L += ["", f"RMS relative deviation {100 * fit.rms_log_residual:.2f}%, max {100 * fit.max_rel_residual:.2f}%."
              + (f" **Degenerate fit: {', '.join(fit.at_bound)}** — the frontier is too short or too flat to "
                 "determine all four coefficients." if fit.at_bound else ""), ""]
    L += ["## Plots", ""]
    for p in written:
        if p.endswith(".png"):
            L += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    L += ["## Points", "",
          "| model | params | GFLOPs/ex (XLA) | GFLOPs/ex (analytic) | examples | epochs | train FLOPs | "
          "core-seconds | wall s | accuracy | error | frontier |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["params"] or 0, r["model"], r["compute"])):
        L.append(f"| {r['model']} | {r['params']:,} | {_g(r['gflops_per_example'], '.4g')} | "
                 f"{_g(r.get('analytic_gflops_per_example'), '.4g')} | {r['examples_seen']:,} | "
                 f"{_g(r.get('epochs'), '.3g')} | {r['compute']:.3g} | {_g(r.get('train_core_seconds'), '.0f')} | "
                 f"{_g(r.get('wall_seconds'), '.0f')} | {r['accuracy']:.4f} | {100 * r['error']:.2f}% | "
                 f"{'✓' if r['point'] in frontier_ids else ''} |")
    if failed:
        L += ["", "## Failed points", "", "| point | label | message |", "|---|---|---|"]
        for r in failed:
            msg = (r.get("message") or "").replace("|", "\\|").replace("\n", " ")[:300]
            L.append(f"| {r['point']} | {r.get('label', '')} | {msg} |")
    totals = {k: sum(float(r.get(k) or 0) for r in rows) for k in ("train_seconds", "wall_seconds", "train_flops")}
    L += ["", f"Totals over finished points: {totals['train_flops']:.3g} training FLOPs, "
          f"{totals['train_seconds'] / 60:.1f} min training, {totals['wall_seconds'] / 60:.1f} min wall "
          "(including compilation and evaluation).", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L))
    return data


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that made a report, as written into it (arguments with spaces quoted)."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python -m {module} " + " ".join(a if " " not in a else repr(a) for a in args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results.csv of a sweep (comma-separated for several)")
    parser.add_argument("--out", required=True, help="output directory for report.md, fit.json and plots")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.results.split(",") if p.strip()]
    command = command_line("experiments.scaling_curves", argv)
    try:
        data = make_report(paths, args.out, bootstrap=args.bootstrap, seed=args.seed, title=args.title,
                           command=command)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"report": os.path.join(args.out, "report.md"), "plots": data["plots"],
                      "findings": {f["finding"][:50]: f["verdict"] for f in data["findings"]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
