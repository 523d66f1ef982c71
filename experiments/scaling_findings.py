"""The published scaling findings, each tested on a sweep's rows: a table of small checks.

Every entry of :data:`FINDINGS` is ``(statement, check)``; ``check(evidence)`` returns
``(verdict, numbers)`` with the verdict ``holds`` / ``does not hold`` / ``not testable`` and
the numbers it rests on. The thresholds are stated in the numbers and set here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from seqvis.analysis.powerlaw import fit_pure_power_law

# Verdict thresholds, stated in the report.
MAX_RMS_LOG_RESIDUAL = 0.05  # the saturating law "fits" the frontier if its RMS relative deviation is <= 5%
MIN_SPEARMAN = 0.5  # "compute-optimal model grows": rank correlation of compute and model size on the frontier
MIN_AGREEING_FRACTION = 2 / 3  # share of comparisons that must agree with a published ordering

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable"


@dataclasses.dataclass
class Evidence:
    """What the checks read: the finished rows (with ``compute`` and ``error``), the fit of the
    ViT frontier (or the reason there is none), the ablation series and each family's frontier."""

    rows: Sequence[dict]
    fit: Any
    fit_error: str | None
    vit_frontier: Sequence[dict]
    groups: dict[str, list[dict]]
    family_frontiers: dict[str, list[dict]]


# ============================================================================ helpers


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation (ties get their average rank); None for fewer than 3 points or a constant."""
    if len(x) < 3:
        return None
    rx, ry = rankdata(x), rankdata(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def budget_label(examples: float, epochs: float | None) -> str:
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


# ============================================================================ the checks


def power_law(ev: Evidence) -> tuple[str, str]:
    """The saturating law describes the ViT frontier within :data:`MAX_RMS_LOG_RESIDUAL`."""
    fit = ev.fit
    if fit is None:
        return UNTESTABLE, ev.fit_error or "no fit"
    _, b_pure, rms_pure = fit_pure_power_law([r["compute"] for r in ev.vit_frontier],
                                             [r["error"] for r in ev.vit_frontier])
    nums = (f"{fit.n} frontier points; RMS relative deviation {100 * fit.rms_log_residual:.2f}% "
            f"(max {100 * fit.max_rel_residual:.2f}%) vs {100 * rms_pure:.2f}% for a pure power law E = aC^-b "
            f"(b = {b_pure:.3f}); b = {fit.b:.3f}, c = {fit.c:.4f}"
            + (f"; fit degenerate: {', '.join(fit.at_bound)}" if fit.at_bound else ""))
    if fit.n <= 4:
        return UNTESTABLE, nums + "; 4 points determine 4 parameters exactly"
    holds = fit.rms_log_residual <= MAX_RMS_LOG_RESIDUAL
    return (HOLDS if holds else FAILS), nums + f" (criterion: RMS deviation <= {100 * MAX_RMS_LOG_RESIDUAL:.0f}%)"


def optimal_model_grows(ev: Evidence) -> tuple[str, str]:
    """Rank correlation of compute and parameters along the frontier, and the last point larger than the first."""
    frontier = ev.vit_frontier
    shapes = {(r.get("width"), r.get("depth"), r.get("mlp_dim")) for r in ev.rows if r["family"] == "vit"}
    if len(shapes) < 3:
        return UNTESTABLE, (f"the ViT points have {len(shapes)} model shape(s) (width, depth, MLP); needs at least "
                            "3 sizes")
    if len(frontier) < 3:
        return UNTESTABLE, f"only {len(frontier)} frontier points"
    rho = spearman([r["compute"] for r in frontier], [r["params"] for r in frontier])
    seq = " → ".join(f"{r['model']} @ {r['compute']:.2g}" for r in frontier)
    first, last = frontier[0], frontier[-1]
    holds = rho is not None and rho >= MIN_SPEARMAN and last["params"] > first["params"]
    return (HOLDS if holds else FAILS), (
        f"Spearman ρ(compute, params) on the frontier = {'n/a' if rho is None else f'{rho:.2f}'} "
        f"(criterion ≥ {MIN_SPEARMAN}); params {first['params']:,} at the lowest-compute frontier point, "
        f"{last['params']:,} at the highest; frontier: {seq}")


def smaller_patches(ev: Evidence) -> tuple[str, str]:
    """Neighbouring patch sizes of one model and budget: the smaller patch has the lower error."""
    pairs = []
    for s in ev.groups.get("patch size", []):
        by_patch = sorted(s["rows"], key=lambda r: -float(r["patch"]))
        pairs += list(zip(by_patch, by_patch[1:]))
    if not pairs:
        return UNTESTABLE, "no points differ only in patch size"
    agree = sum(1 for big, small in pairs if small["error"] < big["error"])
    deltas = [100 * (small["error"] - big["error"]) for big, small in pairs]
    detail = "; ".join(
        f"p{big['patch']}→p{small['patch']} ({budget_label(big['examples_seen'], big.get('epochs'))}): "
        f"{100 * big['error']:.2f}% → {100 * small['error']:.2f}%" for big, small in pairs)
    holds = agree / len(pairs) >= MIN_AGREEING_FRACTION
    return (HOLDS if holds else FAILS), (
        f"smaller patch lower error in {agree}/{len(pairs)} comparisons (criterion ≥ {MIN_AGREEING_FRACTION:.0%}); "
        f"mean change {np.mean(deltas):+.2f} points; {detail}")


def _compare_depth_width(ds: dict, ws: dict) -> tuple[list[float], list[float], str] | None:
    """One depth and one width series through the same model and budget: the mean error difference over
    their shared FLOPs range (interpolated in log FLOPs), scaling up and down from the shared model, each
    signed so that > 0 means depth is ahead. None if they share no model or budget."""
    shared = [r for r in ds["rows"] if r["point"] in {w["point"] for w in ws["rows"]}]
    if ds["examples_seen"] != ws["examples_seen"] or not shared:
        return None
    g0 = shared[0]["gflops_per_example"]
    ups, downs, text = [], [], []
    # Scaling up from the shared model: lower error for the deeper model is "depth helps more".
    hi = min(max(r["gflops_per_example"] for r in ds["rows"]), max(r["gflops_per_example"] for r in ws["rows"]))
    if hi > g0 * 1.01:
        xq = np.geomspace(g0, hi, 8)[1:]
        ups.append(float(np.mean(_interp(ws, xq) - _interp(ds, xq))))
        text.append(f"up to {hi / g0:.2g}× the FLOPs: width − depth error {100 * ups[0]:+.2f} points")
    # Scaling down: a higher error for the shallower model also says depth matters more.
    lo = max(min(r["gflops_per_example"] for r in ds["rows"]), min(r["gflops_per_example"] for r in ws["rows"]))
    if lo < g0 / 1.01:
        xq = np.geomspace(lo, g0, 8)[:-1]
        downs.append(float(np.mean(_interp(ds, xq) - _interp(ws, xq))))
        text.append(f"down to {lo / g0:.2g}×: depth − width error {100 * downs[0]:+.2f} points")
    label = (f"from {shared[0]['model']} at {budget_label(ds['examples_seen'], ds.get('epochs'))}: "
             + ", ".join(text))
    return ups, downs, label


def depth_beats_width(ev: Evidence) -> tuple[str, str]:
    """Every depth series against every width series through the same model and budget."""
    depth_s, width_s = ev.groups.get("depth", []), ev.groups.get("width", [])
    comps, scores, ups, downs = [], [], [], []
    for ds in depth_s:
        for ws in width_s:
            c = _compare_depth_width(ds, ws)
            if c is None or not (c[0] or c[1]):
                continue
            ups += c[0]
            downs += c[1]
            scores.append(float(np.mean(c[0] + c[1])))
            comps.append(c[2])
    if not scores:
        return UNTESTABLE, f"{len(depth_s)} depth and {len(width_s)} width series, none sharing a model and budget"
    sd = [_slope_per_doubling(s) for s in depth_s]
    sw = [_slope_per_doubling(s) for s in width_s]
    agree = sum(1 for d in scores if d > 0)
    holds = agree / len(scores) >= MIN_AGREEING_FRACTION
    return (HOLDS if holds else FAILS), (
        f"depth ahead at matched compute in {agree}/{len(scores)} comparisons of a depth and a width "
        "series through the same model and budget (mean error difference over the shared FLOPs "
        "range, interpolated in log FLOPs); mean advantage of depth: "
        + (f"scaling up {100 * np.mean(ups):+.2f} points ({len(ups)})" if ups else "scaling up n/a")
        + (f", scaling down {100 * np.mean(downs):+.2f} points ({len(downs)})" if downs else "")
        + f"; error change per doubling of forward FLOPs: depth {100 * np.mean(sd):+.2f}, "
        f"width {100 * np.mean(sw):+.2f} points; " + "; ".join(comps[:4]) + ("; …" if len(comps) > 4 else ""))


def resnets_win_small(ev: Evidence) -> tuple[str, str]:
    """Best error of each family within the smallest compute both reached; the same at the largest shared."""
    fv, fr = ev.family_frontiers.get("vit") or [], ev.family_frontiers.get("resnet") or []
    if not fv or not fr:
        return UNTESTABLE, "needs both ViT and ResNet points"
    rows = ev.rows
    c_lo = max(fv[0]["compute"], fr[0]["compute"])
    c_hi = min(max(r["compute"] for r in rows if r["family"] == "vit"),
               max(r["compute"] for r in rows if r["family"] == "resnet"))
    ev_lo, er_lo = _family_best_at(fv, c_lo), _family_best_at(fr, c_lo)
    ev_hi, er_hi = _family_best_at(fv, c_hi), _family_best_at(fr, c_hi)
    overtake = "ViT ahead" if ev_hi < er_hi else "ResNet still ahead"
    return (HOLDS if er_lo < ev_lo else FAILS), (
        f"best error with ≤ {c_lo:.2g} FLOPs: ResNet {100 * er_lo:.2f}%, ViT {100 * ev_lo:.2f}%; "
        f"with ≤ {c_hi:.2g} FLOPs (largest shared budget): ResNet {100 * er_hi:.2f}%, "
        f"ViT {100 * ev_hi:.2f}% ({overtake}); all runs see ≤ "
        f"{max(r['examples_seen'] for r in rows):,} examples of a 60k-image training set")


FINDINGS: tuple[tuple[str, Callable[[Evidence], tuple[str, str]]], ...] = (
    ("The compute-error frontier follows a saturating power law E = a(C+d)^-b + c (Zhai et al.)", power_law),
    ("The compute-optimal model grows with compute (larger models on the frontier at larger budgets)",
     optimal_model_grows),
    ("Smaller patches lower the error at a fixed model (ViT paper)", smaller_patches),
    ("Scaling depth lowers error more than scaling width at matched compute (ViT paper Fig. 8)", depth_beats_width),
    ("At small data and compute ResNets beat ViTs (ViT paper Fig. 5; ViTs need more data/compute)",
     resnets_win_small),
)


def findings(rows: Sequence[dict], fit, fit_error: str | None, vit_frontier: Sequence[dict],
             groups: dict[str, list[dict]], family_frontiers: dict[str, list[dict]]) -> list[dict]:
    """``[{finding, verdict, numbers}]``, one per entry of :data:`FINDINGS`, in that order."""
    ev = Evidence(rows, fit, fit_error, vit_frontier, groups, family_frontiers)
    out = []
    for statement, check in FINDINGS:
        verdict, numbers = check(ev)
        out.append({"finding": statement, "verdict": verdict, "numbers": numbers})
    return out
