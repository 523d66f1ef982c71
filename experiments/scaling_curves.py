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

from seqvis.analysis.powerlaw import fit_pure_power_law, fit_saturating_power_law, pareto_frontier


class ReportError(ValueError):
    """A results file that cannot be read; the message names it and the fix."""


NUMERIC = ("index", "width", "depth", "mlp_dim", "heads", "params", "batch_size", "steps", "examples_seen", "epochs",
           "gflops_per_example", "analytic_gflops_per_example", "train_flops", "train_core_seconds", "cores",
           "train_seconds", "wall_seconds", "accuracy", "test_error", "loss", "num_examples")
REQUIRED = ("point", "status", "family", "model", "params", "examples_seen", "gflops_per_example", "train_flops",
            "test_error")

# Verdict thresholds, stated in the report.
MAX_RMS_LOG_RESIDUAL = 0.05  # the saturating law "fits" the frontier if its RMS relative deviation is <= 5%
MIN_SPEARMAN = 0.5  # "compute-optimal model grows": rank correlation of compute and model size on the frontier
MIN_AGREEING_FRACTION = 2 / 3  # share of comparisons that must agree with a published ordering


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


def _rank(x: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = _rank(x), _rank(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


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


def _budget_label(examples: float, epochs: float | None) -> str:
    ex = f"{examples / 1e3:.0f}k" if examples < 1e6 else f"{examples / 1e6:.3g}M"
    return f"{ex} examples" + (f" ({epochs:.2g} ep)" if epochs else "")


def _slope_per_doubling(series: dict) -> float:
    """Least-squares change of test error (absolute) per doubling of forward FLOPs/example."""
    x = np.log2([r["gflops_per_example"] for r in series["rows"]])
    y = np.array([r["error"] for r in series["rows"]])
    return float(np.polyfit(x, y, 1)[0])


def _interp(series: dict, xq: np.ndarray) -> np.ndarray:
    x = np.log([r["gflops_per_example"] for r in series["rows"]])
    y = np.array([r["error"] for r in series["rows"]])
    return np.interp(np.log(xq), x, y)


def _family_best_at(frontier: Sequence[dict], c: float) -> float | None:
    """Lowest error a family reached with compute <= c (its frontier as a step function)."""
    errs = [r["error"] for r in frontier if r["compute"] <= c * (1 + 1e-9)]
    return min(errs) if errs else None


def findings(rows: Sequence[dict], fit, fit_error: str | None, vit_frontier: Sequence[dict],
             groups: dict[str, list[dict]], family_frontiers: dict[str, list[dict]]) -> list[dict]:
    out = []

    # 1. the frontier follows the saturating power law
    f = {"finding": "The compute-error frontier follows a saturating power law E = a(C+d)^-b + c (Zhai et al.)"}
    if fit is None:
        f.update(verdict="not testable", numbers=fit_error or "no fit")
    else:
        _, b_pure, rms_pure = fit_pure_power_law([r["compute"] for r in vit_frontier],
                                                 [r["error"] for r in vit_frontier])
        nums = (f"{fit.n} frontier points; RMS relative deviation {100 * fit.rms_log_residual:.2f}% "
                f"(max {100 * fit.max_rel_residual:.2f}%) vs {100 * rms_pure:.2f}% for a pure power law E = aC^-b "
                f"(b = {b_pure:.3f}); b = {fit.b:.3f}, c = {fit.c:.4f}"
                + (f"; fit degenerate: {', '.join(fit.at_bound)}" if fit.at_bound else ""))
        if fit.n <= 4:
            f.update(verdict="not testable", numbers=nums + "; 4 points determine 4 parameters exactly")
        else:
            holds = fit.rms_log_residual <= MAX_RMS_LOG_RESIDUAL
            f.update(verdict="holds" if holds else "does not hold",
                     numbers=nums + f" (criterion: RMS deviation <= {100 * MAX_RMS_LOG_RESIDUAL:.0f}%)")
    out.append(f)

    # 2. the compute-optimal model grows with compute
    f = {"finding": "The compute-optimal model grows with compute (larger models on the frontier at larger budgets)"}
    shapes = {(r.get("width"), r.get("depth"), r.get("mlp_dim")) for r in rows if r["family"] == "vit"}
    if len(shapes) < 3:
        f.update(verdict="not testable", numbers=f"the ViT points have {len(shapes)} model shape(s) (width, depth, "
                 "MLP); needs at least 3 sizes")
    elif len(vit_frontier) < 3:
        f.update(verdict="not testable", numbers=f"only {len(vit_frontier)} frontier points")
    else:
        rho = spearman([r["compute"] for r in vit_frontier], [r["params"] for r in vit_frontier])
        seq = " → ".join(f"{r['model']} @ {r['compute']:.2g}" for r in vit_frontier)
        first, last = vit_frontier[0], vit_frontier[-1]
        holds = rho is not None and rho >= MIN_SPEARMAN and last["params"] > first["params"]
        f.update(verdict="holds" if holds else "does not hold",
                 numbers=(f"Spearman ρ(compute, params) on the frontier = "
                          f"{'n/a' if rho is None else f'{rho:.2f}'} (criterion ≥ {MIN_SPEARMAN}); "
                          f"params {first['params']:,} at the lowest-compute frontier point, {last['params']:,} at "
                          f"the highest; frontier: {seq}"))
    out.append(f)

    # 3. smaller patches lower the error of a fixed model
    f = {"finding": "Smaller patches lower the error at a fixed model (ViT paper)"}
    pairs = []
    for s in groups.get("patch size", []):
        by_patch = sorted(s["rows"], key=lambda r: -float(r["patch"]))
        for big, small in zip(by_patch, by_patch[1:]):
            pairs.append((big, small))
    if not pairs:
        f.update(verdict="not testable", numbers="no points differ only in patch size")
    else:
        agree = sum(1 for big, small in pairs if small["error"] < big["error"])
        deltas = [100 * (small["error"] - big["error"]) for big, small in pairs]
        detail = "; ".join(
            f"p{big['patch']}→p{small['patch']} ({_budget_label(big['examples_seen'], big.get('epochs'))}): "
            f"{100 * big['error']:.2f}% → {100 * small['error']:.2f}%" for big, small in pairs)
        holds = agree / len(pairs) >= MIN_AGREEING_FRACTION
        f.update(verdict="holds" if holds else "does not hold",
                 numbers=(f"smaller patch lower error in {agree}/{len(pairs)} comparisons (criterion ≥ "
                          f"{MIN_AGREEING_FRACTION:.0%}); mean change {np.mean(deltas):+.2f} points; {detail}"))
    out.append(f)

    # 4. depth helps more than width at matched compute
    f = {"finding": "Scaling depth lowers error more than scaling width at matched compute (ViT paper Fig. 8)"}
    depth_s, width_s = groups.get("depth", []), groups.get("width", [])
    comps, scores, ups, downs = [], [], [], []
    for ds in depth_s:
        for ws in width_s:
            shared = [r for r in ds["rows"] if r["point"] in {w["point"] for w in ws["rows"]}]
            if ds["examples_seen"] != ws["examples_seen"] or not shared:
                continue
            g0 = shared[0]["gflops_per_example"]
            parts, text = [], []
            # Scaling up from the shared model: lower error for the deeper model is "depth helps more".
            hi = min(max(r["gflops_per_example"] for r in ds["rows"]), max(r["gflops_per_example"] for r in ws["rows"]))
            if hi > g0 * 1.01:
                xq = np.geomspace(g0, hi, 8)[1:]
                up = float(np.mean(_interp(ws, xq) - _interp(ds, xq)))
                parts.append(up)
                ups.append(up)
                text.append(f"up to {hi / g0:.2g}× the FLOPs: width − depth error {100 * up:+.2f} points")
            # Scaling down: a higher error for the shallower model also says depth matters more.
            lo = max(min(r["gflops_per_example"] for r in ds["rows"]), min(r["gflops_per_example"] for r in ws["rows"]))
            if lo < g0 / 1.01:
                xq = np.geomspace(lo, g0, 8)[:-1]
                down = float(np.mean(_interp(ds, xq) - _interp(ws, xq)))
                parts.append(down)
                downs.append(down)
                text.append(f"down to {lo / g0:.2g}×: depth − width error {100 * down:+.2f} points")
            if parts:
                scores.append(float(np.mean(parts)))
                comps.append(f"from {shared[0]['model']} at {_budget_label(ds['examples_seen'], ds.get('epochs'))}: "
                             + ", ".join(text))
    if not scores:
        f.update(verdict="not testable",
                 numbers=f"{len(depth_s)} depth and {len(width_s)} width series, none sharing a model and budget")
    else:
        sd = [_slope_per_doubling(s) for s in depth_s]
        sw = [_slope_per_doubling(s) for s in width_s]
        agree = sum(1 for d in scores if d > 0)
        holds = agree / len(scores) >= MIN_AGREEING_FRACTION
        f.update(verdict="holds" if holds else "does not hold",
                 numbers=(f"depth ahead at matched compute in {agree}/{len(scores)} comparisons of a depth and a width "
                          "series through the same model and budget (mean error difference over the shared FLOPs "
                          "range, interpolated in log FLOPs); mean advantage of depth: "
                          + (f"scaling up {100 * np.mean(ups):+.2f} points ({len(ups)})" if ups else "scaling up n/a")
                          + (f", scaling down {100 * np.mean(downs):+.2f} points ({len(downs)})" if downs else "")
                          + f"; error change per doubling of forward FLOPs: depth {100 * np.mean(sd):+.2f}, "
                          f"width {100 * np.mean(sw):+.2f} points; " + "; ".join(comps[:4])
                          + ("; …" if len(comps) > 4 else "")))
    out.append(f)

    # 5. ResNets do better at small data and compute
    f = {"finding": "At small data and compute ResNets beat ViTs (ViT paper Fig. 5; ViTs need more data/compute)"}
    fv, fr = family_frontiers.get("vit") or [], family_frontiers.get("resnet") or []
    if not fv or not fr:
        f.update(verdict="not testable", numbers="needs both ViT and ResNet points")
    else:
        c_lo = max(fv[0]["compute"], fr[0]["compute"])
        c_hi = min(max(r["compute"] for r in rows if r["family"] == "vit"),
                   max(r["compute"] for r in rows if r["family"] == "resnet"))
        ev_lo, er_lo = _family_best_at(fv, c_lo), _family_best_at(fr, c_lo)
        ev_hi, er_hi = _family_best_at(fv, c_hi), _family_best_at(fr, c_hi)
        holds = er_lo < ev_lo
        overtake = "ViT ahead" if ev_hi < er_hi else "ResNet still ahead"
        f.update(verdict="holds" if holds else "does not hold",
                 numbers=(f"best error with ≤ {c_lo:.2g} FLOPs: ResNet {100 * er_lo:.2f}%, ViT {100 * ev_lo:.2f}%; "
                          f"with ≤ {c_hi:.2g} FLOPs (largest shared budget): ResNet {100 * er_hi:.2f}%, "
                          f"ViT {100 * ev_hi:.2f}% ({overtake}); all runs see ≤ "
                          f"{max(r['examples_seen'] for r in rows):,} examples of a 60k-image training set"))
    out.append(f)
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
            {"label": _budget_label(s["examples_seen"], s.get("epochs")) + (
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
    command = "python -m experiments.scaling_curves " + " ".join(
        a if " " not in a else repr(a) for a in (argv if argv is not None else sys.argv[1:]))
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
