"""Upstream and few-shot scaling curves from a sweep: frontiers, saturating power-law fits, verdicts.

    python -m experiments.fewshot_study --results=DIR/results.csv --out=DIR/report [--shots=10]

Reads a sweep's ``results.csv`` whose points ran few-shot evaluators (columns
``fewshot/<dataset>/<k>shot``, e.g. from ``configs/sweeps/fewshot_cpu.py``) and writes to ``--out``:

- ``upstream.{png,svg}`` and ``fewshot_<dataset>.{png,svg}``: error against training compute
  (log-log), one line per model, the compute-error frontier and the fitted law
  ``E = a (C + d)^(-b) + c`` (Zhai et al. 2022, Fig. 2 upstream, the 10-shot panels for transfer);
- ``report.md``: the points, each fit with bootstrap intervals, and the verdicts;
- ``fit.json``: the same numbers.

Verdicts (thresholds those of :mod:`experiments.scaling_findings`):

- the saturating law describes the frontier (RMS relative deviation <= 5%), for the upstream error and
  for each few-shot error;
- larger models are more sample-efficient in transfer: at the same number of pre-training examples,
  a larger model has the lower few-shot error in at least two thirds of the (smaller, larger) pairs.

Error is ``1 - accuracy``; compute is the training compute of each budget (``3 x forward FLOPs x
examples seen``; a cooldown branch counts the steps of the run it branched from).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

import numpy as np

from experiments.scaling_curves import ReportError, command_line, frontier_rows, read_results
from experiments.scaling_findings import (FAILS, HOLDS, MAX_RMS_LOG_RESIDUAL, MIN_AGREEING_FRACTION, UNTESTABLE,
                                          spearman)
from seqvis.analysis.powerlaw import fit_saturating_power_law

FEWSHOT_COLUMN = re.compile(r"^fewshot/(?P<dataset>[^/]+)/(?P<shots>\d+)shot$")


def fewshot_columns(rows: Sequence[dict], shots: int) -> dict[str, str]:
    """``{dataset: column}`` of the ``shots``-shot results present in every row."""
    cols = {}
    for key in rows[0]:
        m = FEWSHOT_COLUMN.match(key)
        if m and int(m["shots"]) == shots and all(_number(r.get(key)) is not None for r in rows):
            cols[m["dataset"]] = key
    return cols


def _number(v) -> float | None:
    try:
        out = float(v)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def curve(rows: Sequence[dict], error_of) -> list[dict]:
    """The rows with ``error`` replaced by ``error_of(row)`` (a perfect score: half an example)."""
    out = []
    for r in rows:
        e = error_of(r)
        out.append(dict(r, error=max(e, 0.5 / max(r.get("num_examples") or 10_000, 1))))
    return out


def fit_frontier(rows: Sequence[dict], *, bootstrap: int, seed: int) -> dict:
    """Frontier, fit and the law verdict of one error curve."""
    front = frontier_rows(rows)
    out = {"frontier": [r["point"] for r in front], "fit": None}
    try:
        fit = fit_saturating_power_law([r["compute"] for r in front], [r["error"] for r in front],
                                       bootstrap=bootstrap, seed=seed)
    except (ValueError, RuntimeError) as e:
        out.update(verdict=UNTESTABLE, numbers=f"no fit: {e}")
        return out
    out["fit"] = fit
    nums = (f"{fit.n} frontier points; RMS relative deviation {100 * fit.rms_log_residual:.2f}% (max "
            f"{100 * fit.max_rel_residual:.2f}%); b = {fit.b:.3f}, c = {fit.c:.4f}"
            + (f"; fit degenerate: {', '.join(fit.at_bound)}" if fit.at_bound else ""))
    if fit.n <= 4:
        out.update(verdict=UNTESTABLE, numbers=nums + "; 4 points determine 4 parameters exactly")
    else:
        ok = fit.rms_log_residual <= MAX_RMS_LOG_RESIDUAL
        out.update(verdict=HOLDS if ok else FAILS,
                   numbers=nums + f" (criterion: RMS deviation <= {100 * MAX_RMS_LOG_RESIDUAL:.0f}%)")
    return out


def sample_efficiency(rows: Sequence[dict]) -> tuple[str, str, list[dict]]:
    """At each pre-training budget (examples seen), compare every (smaller, larger) pair of models."""
    by_budget: dict[int, list[dict]] = {}
    for r in rows:
        by_budget.setdefault(int(r["examples_seen"]), []).append(r)
    pairs, agree, table = 0, 0, []
    for ex, group in sorted(by_budget.items()):
        group = sorted(group, key=lambda r: r["params"])
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if group[i]["params"] == group[j]["params"]:
                    continue
                pairs += 1
                agree += group[j]["error"] < group[i]["error"]
        table.append({"examples_seen": ex, "errors": {g["model"]: g["error"] for g in group},
                      "spearman_params_error": spearman([g["params"] for g in group], [g["error"] for g in group])})
    if pairs == 0:
        return UNTESTABLE, "no budget has two model sizes", table
    frac = agree / pairs
    verdict = HOLDS if frac >= MIN_AGREEING_FRACTION else FAILS
    return verdict, (f"the larger model has the lower error in {agree} of {pairs} (smaller, larger) pairs at equal "
                     f"examples seen ({100 * frac:.0f}%; criterion >= {100 * MIN_AGREEING_FRACTION:.0f}%)"), table


def _fit_dict(fit) -> dict | None:
    return None if fit is None else fit.as_dict()


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def make_report(paths: Sequence[str], out: str, *, shots: int = 10, bootstrap: int = 1000, seed: int = 0,
                command: str = "") -> dict:
    rows, failed = read_results(paths)
    rows = [r for r in rows if r.get("family", "vit") == "vit"]
    cols = fewshot_columns(rows, shots)
    if not cols:
        raise ReportError(f"--results: no column fewshot/<dataset>/{shots}shot with a value in every finished row of "
                          f"{', '.join(paths)}. Run the sweep with few-shot evaluators (configs/sweeps/fewshot_cpu.py) "
                          "or pass --shots=K for the shots it measured.")
    os.makedirs(out, exist_ok=True)
    from seqvis.analysis.plots import plot_frontier  # matplotlib only when reporting

    curves = {"upstream": (f"upstream test error ({rows[0].get('dataset') or 'pre-training set'})",
                           list(rows))}  # read_results' error: 1 - accuracy
    for ds, col in cols.items():
        curves[f"fewshot_{ds}"] = (f"{shots}-shot linear transfer error, {ds}",
                                   curve(rows, lambda r, c=col: 1.0 - float(r[c])))
    results, plots, lines = {}, [], []
    for name, (label, pts) in curves.items():
        res = fit_frontier(pts, bootstrap=bootstrap, seed=seed)
        fit = res["fit"]
        plots += plot_frontier(pts, [p for p in pts if p["point"] in res["frontier"]],
                               None if fit is None else fit.predict, os.path.join(out, name),
                               asymptote=None if fit is None else fit.c, title=label, ylabel=f"{label} (log scale)")
        eff = sample_efficiency(pts) if name != "upstream" else None
        results[name] = {"label": label, "law": {"verdict": res["verdict"], "numbers": res["numbers"]},
                         "fit": _fit_dict(fit), "frontier": res["frontier"],
                         "points": [{"point": p["point"], "model": p["model"], "params": p["params"],
                                     "examples_seen": p["examples_seen"], "compute": p["compute"], "error": p["error"],
                                     "branch": bool(p.get("branch_from_point"))} for p in pts]}
        if eff is not None:
            results[name]["sample_efficiency"] = {"verdict": eff[0], "numbers": eff[1], "by_budget": eff[2]}
    data = {"command": command, "shots": shots, "points": len(rows), "failed": len(failed), "curves": results,
            "plots": plots}
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(data, f, indent=1, default=float)

    models = sorted({r["model"] for r in rows}, key=lambda m: min(r["params"] for r in rows if r["model"] == m))
    budgets = sorted({int(r["examples_seen"]) for r in rows})
    lines += ["# Upstream and few-shot scaling", "", f"Made by `{command}`." if command else "", "",
              f"{len(rows)} finished ViT points ({len(failed)} failed); {shots}-shot transfer to "
              f"{', '.join(cols)}. Error = 1 - accuracy.", "",
              "## Verdicts", "", "| finding | verdict | numbers |", "|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| the saturating power law describes the {r['label']} frontier | **{r['law']['verdict']}** | "
                     f"{r['law']['numbers']} |")
    for name, r in results.items():
        if "sample_efficiency" in r:
            s = r["sample_efficiency"]
            lines.append(f"| larger models are more sample-efficient in transfer ({r['label']}) | **{s['verdict']}** "
                         f"| {s['numbers']} |")
    lines += ["", "## Fits", "", "| curve | a | b | c | d | points | RMS dev. | b interval | c interval |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f = r["fit"]
        if f is None:
            lines.append(f"| {r['label']} | | | | | | {r['law']['numbers']} | | |")
            continue
        iv = f["intervals"]
        lines.append(f"| {r['label']} | {f['a']:.3g} | {f['b']:.3f} | {f['c']:.4f} | {f['d']:.3g} | {f['n']} | "
                     f"{100 * f['rms_log_residual']:.2f}% | {_interval(iv.get('b'), '.3f')} | "
                     f"{_interval(iv.get('c'), '.4f')} |")
    lines += ["", "## Points (error by model and budget)", "",
              "| model | params | examples seen | " + " | ".join(r["label"] for r in results.values()) + " |",
              "|---|---|---|" + "---|" * len(results)]
    for m in models:
        for ex in budgets:
            per = {name: next((p for p in r["points"] if p["model"] == m and p["examples_seen"] == ex), None)
                   for name, r in results.items()}
            if not any(per.values()):
                continue
            first = next(p for p in per.values() if p)
            lines.append(f"| {m}{' (branch)' if first['branch'] else ''} | {first['params']:,} | {ex:,} | "
                         + " | ".join("" if p is None else _pct(p["error"]) for p in per.values()) + " |")
    lines += ["", "Plots: " + ", ".join(f"[{os.path.basename(p)}]({os.path.basename(p)})" for p in plots
                                        if p.endswith(".png")), ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return data


def _interval(iv, fmt: str) -> str:
    return "" if not iv else f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results.csv of a sweep (comma-separated for several)")
    parser.add_argument("--out", required=True, help="output directory for report.md, fit.json and plots")
    parser.add_argument("--shots", type=int, default=10, help="which k-shot columns to fit")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = [p.strip() for p in args.results.split(",") if p.strip()]
    try:
        data = make_report(paths, args.out, shots=args.shots, bootstrap=args.bootstrap, seed=args.seed,
                           command=command_line("experiments.fewshot_study", argv))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdicts = {name: [c["law"]["verdict"]] + ([c["sample_efficiency"]["verdict"]] if "sample_efficiency" in c else [])
                for name, c in data["curves"].items()}
    print(json.dumps({"report": os.path.join(args.out, "report.md"), "verdicts": verdicts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
