"""Data-size study report: does a ViT need more data than a ResNet? (ViT paper Fig. 3 and 4)

    python -m experiments.data_size --results=DIR/results.csv --out=DIR/report [--title=...]

Reads the rows of a sweep over ``config.data.train_examples`` (``configs/sweeps/data_size.py``):
every point is one model trained on a class-balanced subset of the training split, tested on
the whole test split. Writes to ``--out``:

- ``data_size.{png,svg}``: test error vs training-set size per model (log-log, mean ± std
  over seeds), and the ViT − ResNet gap per size (family bests and size-matched pairs);
- ``report.md``: the verdicts with their numbers, the crossover size (where the gap changes
  sign), the table size × model (mean ± std, seeds), the longer-training and augmentation
  checks where the sweep has them, and the commands;
- ``summary.json``: the same numbers, machine-readable.

Which rows are what (no tags needed): the main curve of a model uses the most common
``data.pp_train`` and, per size, the shortest schedule; the same model, size and pp with more
steps is a longer-training check; another ``data.pp_train`` is the augmentation axis.
Family best at a size = the family's model with the lowest mean error there.

Over 400 lines on purpose: one study's report (grouping, gaps with their standard errors, the verdicts as
small functions, plots, the markdown) read in one sitting; reading results and the recorded command line come
from scaling_curves.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from experiments.scaling_curves import ReportError, command_line, read_results

# Verdict thresholds, stated in the report.
NOISE_SIGMAS = 2.0  # a difference counts when it exceeds 2 standard errors (of the difference of seed means)
CONVERGED_POINTS = 1.0  # "trained long enough": doubling the steps changes the mean error by < 1 point

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable"


# ============================================================================ rows -> groups


def _overrides(r: dict) -> dict:
    ov = r.get("overrides") or {}
    if isinstance(ov, str):
        try:
            ov = json.loads(ov)
        except json.JSONDecodeError:
            ov = {}
    return ov


def annotate(rows: Sequence[dict]) -> list[dict]:
    """Each row with ``size`` (training examples), ``seed``, ``pp`` and ``steps`` read off its overrides."""
    out = []
    for r in rows:
        ov = _overrides(r)
        size = int(ov.get("data.train_examples") or 0)
        if not size and r.get("epochs"):
            size = int(round(float(r["examples_seen"]) / float(r["epochs"])))
        if not size:
            raise ReportError(f"point {r['point']} ({r.get('label')}): no data.train_examples override and no epochs "
                              "column to read the training-set size from; is this a data-size sweep?")
        other = {k: v for k, v in ov.items() if k not in PER_POINT and not k.startswith("model.")}
        out.append({**r, "size": size, "seed": int(ov.get("seed", 0) or 0), "pp": str(ov.get("data.pp_train", "")),
                    "steps": int(r.get("steps") or ov.get("total_steps") or 0),
                    "variant": json.dumps(other, sort_keys=True, default=str)})
    return out


# Overrides that vary along the study's axes; any other override (batch size, learning rate...)
# makes a row a different recipe, kept out of the curves.
PER_POINT = ("seed", "data.subset_seed", "data.train_examples", "data.pp_train", "total_steps",
             "schedule.warmup_steps", "config")


def _stats(errors: Sequence[float]) -> dict:
    e = np.asarray(errors, float)
    return {"mean": float(e.mean()), "std": float(e.std(ddof=1)) if len(e) > 1 else None, "seeds": len(e),
            "errors": [float(x) for x in e]}


def split_rows(rows: Sequence[dict]) -> tuple[dict, list[dict], list[dict], str, list[dict]]:
    """(main curves ``{model: {size: stats}}``, longer-training checks, augmentation points, the main pp,
    rows of other recipes). The main recipe is the most common set of other overrides."""
    variant_main = collections.Counter(r["variant"] for r in rows).most_common(1)[0][0]
    others = [r for r in rows if r["variant"] != variant_main]
    rows = [r for r in rows if r["variant"] == variant_main]
    pp_main = collections.Counter(r["pp"] for r in rows).most_common(1)[0][0]
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["model"], r["size"], r["pp"], r["steps"])].append(r)
    main_steps = {}
    for (model, size, pp, steps) in groups:
        if pp == pp_main:
            main_steps[(model, size)] = min(steps, main_steps.get((model, size), steps))
    curves: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    longer, aug = [], []
    for (model, size, pp, steps), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3])):
        st = {**_stats([m["error"] for m in members]), "steps": steps, "family": members[0]["family"],
              "params": members[0]["params"], "by_seed": {m["seed"]: m["error"] for m in members},
              "wall": sum(float(m.get("wall_seconds") or 0) for m in members)}
        if pp == pp_main and steps == main_steps[(model, size)]:
            curves[model][size] = st
        elif pp == pp_main:
            longer.append({"model": model, "size": size, **st})
        else:
            aug.append({"model": model, "size": size, "pp": pp, **st})
    for lst in (longer, aug):
        for x in lst:
            base = curves[x["model"]].get(x["size"])
            shared = sorted(set(x["by_seed"]) & set(base["by_seed"])) if base else []
            x["base"] = None if base is None else {
                "steps": base["steps"], "mean_shared_seeds": float(np.mean([base["by_seed"][s] for s in shared]))
                if shared else base["mean"], "seeds": shared}
    return dict(curves), longer, aug, pp_main, others


def _ordered_models(curves: dict, family: str) -> list[str]:
    return sorted((m for m, c in curves.items() if next(iter(c.values()))["family"] == family),
                  key=lambda m: next(iter(curves[m].values()))["params"] or 0)


def noise_floor(curves: dict) -> float | None:
    """Median seed std over all (model, size) with >= 2 seeds: the spread a single-seed point is given."""
    stds = [s["std"] for c in curves.values() for s in c.values() if s["std"] is not None]
    return float(np.median(stds)) if stds else None


def _se(stat: dict, floor: float | None) -> float | None:
    sd = stat["std"] if stat["std"] is not None else floor
    return None if sd is None else sd / math.sqrt(stat["seeds"])


def gap(v: dict, r: dict, floor: float | None) -> dict:
    """ViT − ResNet mean error and the standard error of that difference."""
    sv, sr = _se(v, floor), _se(r, floor)
    se = None if sv is None or sr is None else math.sqrt(sv ** 2 + sr ** 2)
    return {"gap": v["mean"] - r["mean"], "se": se}


def family_best(curves: dict, family: str, size: int) -> tuple[str, dict] | None:
    cands = [(m, curves[m][size]) for m in _ordered_models(curves, family) if size in curves[m]]
    return min(cands, key=lambda mc: mc[1]["mean"]) if cands else None


def gap_series(curves: dict, floor: float | None) -> dict[str, list[dict]]:
    """Per comparison (family bests, then size-matched pairs), the gap at every size both have."""
    sizes = sorted({s for c in curves.values() for s in c})
    out: dict[str, list[dict]] = {}
    best = []
    for n in sizes:
        v, r = family_best(curves, "vit", n), family_best(curves, "resnet", n)
        if v and r:
            best.append({"size": n, "vit": v[0], "resnet": r[0], **gap(v[1], r[1], floor)})
    out["best ViT − best ResNet"] = best
    for mv, mr in zip(_ordered_models(curves, "vit"), _ordered_models(curves, "resnet")):
        pts = [{"size": n, "vit": mv, "resnet": mr, **gap(curves[mv][n], curves[mr][n], floor)}
               for n in sizes if n in curves[mv] and n in curves[mr]]
        if pts:
            out[f"{mv} − {mr}"] = pts
    return out


def crossover(points: Sequence[dict]) -> float | None:
    """First size where the gap changes sign, interpolated linearly in log size; None if it never does."""
    for a, b in zip(points, points[1:]):
        if a["gap"] == 0:
            return float(a["size"])
        if (a["gap"] > 0) != (b["gap"] > 0):
            t = a["gap"] / (a["gap"] - b["gap"])
            return float(math.exp(math.log(a["size"]) + t * (math.log(b["size"]) - math.log(a["size"]))))
    return None


def slope_per_decade(points: Sequence[dict]) -> float | None:
    """Least-squares change of the gap (absolute error) per tenfold training-set size."""
    if len(points) < 2:
        return None
    return float(np.polyfit(np.log10([p["size"] for p in points]), [p["gap"] for p in points], 1)[0])


# ============================================================================ verdicts


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}"


def _se_text(g: dict) -> str:
    return "" if g["se"] is None else f" ± {100 * g['se']:.2f} (SE)"


def _pairs_text(gaps: dict, pick: Callable[[list[dict]], dict]) -> str:
    return "; ".join(f"{name}: {_pts(pick(pts)['gap'])}{_se_text(pick(pts))} at {pick(pts)['size']:,}"
                     for name, pts in gaps.items() if not name.startswith("best") and pts)


def resnet_wins_small(ev: dict) -> tuple[str, str]:
    best = ev["gaps"].get("best ViT − best ResNet") or []
    if not best:
        return UNTESTABLE, "needs ViT and ResNet points at a shared size"
    g = best[0]
    beyond = g["gap"] > NOISE_SIGMAS * (g["se"] or 0)
    return (HOLDS if beyond else FAILS), (
        f"at {g['size']:,} examples best ViT ({g['vit']}) − best ResNet ({g['resnet']}) = {_pts(g['gap'])} points"
        f"{_se_text(g)}; criterion: > {NOISE_SIGMAS:g} SE; pairs: {_pairs_text(ev['gaps'], lambda p: p[0])}")


def gap_shrinks(ev: dict) -> tuple[str, str]:
    best = ev["gaps"].get("best ViT − best ResNet") or []
    if len(best) < 2:
        return UNTESTABLE, "needs both families at two or more sizes"
    a, b = best[0], best[-1]
    se = math.sqrt((a["se"] or 0) ** 2 + (b["se"] or 0) ** 2)
    slope = slope_per_decade(best)
    holds = (a["gap"] - b["gap"]) > NOISE_SIGMAS * se and slope < 0
    per_size = ", ".join(f"{p['size']:,}: {_pts(p['gap'])}" for p in best)
    pair_slopes = "; ".join(f"{name}: {100 * s:+.2f}/decade" for name, pts in ev["gaps"].items()
                            if not name.startswith("best") and (s := slope_per_decade(pts)) is not None)
    return (HOLDS if holds else FAILS), (
        f"ViT − ResNet (family bests) from {_pts(a['gap'])} at {a['size']:,} to {_pts(b['gap'])} at {b['size']:,} "
        f"(change {_pts(b['gap'] - a['gap'])} ± {100 * se:.2f}); least-squares slope {100 * slope:+.2f} points per "
        f"tenfold data; per size: {per_size}; pairs: {pair_slopes}; criterion: the gap falls by > "
        f"{NOISE_SIGMAS:g} SE and the slope is negative")


def vit_passes_full(ev: dict) -> tuple[str, str]:
    best = ev["gaps"].get("best ViT − best ResNet") or []
    if not best:
        return UNTESTABLE, "needs ViT and ResNet points at a shared size"
    g = best[-1]
    cross = crossover(best)
    where = (f"the family bests cross at ≈ {cross:,.0f} examples" if cross is not None
             else "the family bests do not cross within the sizes run")
    beyond = -g["gap"] > NOISE_SIGMAS * (g["se"] or 0)
    return (HOLDS if beyond else FAILS), (
        f"at {g['size']:,} examples best ViT ({g['vit']}) − best ResNet ({g['resnet']}) = {_pts(g['gap'])} points"
        f"{_se_text(g)}; {where}; pairs: {_pairs_text(ev['gaps'], lambda p: p[-1])}; criterion: ViT ahead by > "
        f"{NOISE_SIGMAS:g} SE")


def longer_gaps(longer: Sequence[dict]) -> list[dict]:
    """Per size where both families have longer-training points: the family-best ViT − ResNet gap on
    those seeds at the main budget and at the longer one (does the gap depend on the training length?)."""
    out = []
    for size in sorted({c["size"] for c in longer}):
        at = [c for c in longer if c["size"] == size and c["base"] is not None]
        fams = {f: [c for c in at if c["family"] == f] for f in ("vit", "resnet")}
        if not fams["vit"] or not fams["resnet"]:
            continue
        base = {f: min(c["base"]["mean_shared_seeds"] for c in cs) for f, cs in fams.items()}
        long = {f: min(c["mean"] for c in cs) for f, cs in fams.items()}
        out.append({"size": size, "steps": sorted({c["base"]["steps"] for c in at}),
                    "longer_steps": sorted({c["steps"] for c in at}), "gap": base["vit"] - base["resnet"],
                    "gap_longer": long["vit"] - long["resnet"]})
    return out


def trained_long_enough(ev: dict) -> tuple[str, str]:
    checks = [c for c in ev["longer"] if c["base"] is not None]
    if not checks:
        return UNTESTABLE, "the sweep has no longer-training points"
    deltas = [c["mean"] - c["base"]["mean_shared_seeds"] for c in checks]
    worst = max(abs(d) for d in deltas)
    detail = "; ".join(f"{c['model']} at {c['size']:,}: {c['base']['steps']} → {c['steps']} steps "
                       f"{100 * c['base']['mean_shared_seeds']:.2f}% → {100 * c['mean']:.2f}% ({_pts(d)})"
                       for c, d in zip(checks, deltas))
    return (HOLDS if worst < CONVERGED_POINTS / 100 else FAILS), (
        f"largest change {100 * worst:.2f} points (criterion < {CONVERGED_POINTS:g}); {detail}")


FINDINGS: tuple[tuple[str, Callable[[dict], tuple[str, str]]], ...] = (
    ("ResNet beats ViT at small data (ViT paper Fig. 3/4: inductive bias wins when data is scarce)",
     resnet_wins_small),
    ("The gap shrinks with data (ViT − ResNet error falls as the training set grows)", gap_shrinks),
    ("ViT passes ResNet at full data (60k Fashion-MNIST)", vit_passes_full),
    ("Small sets are trained long enough (doubling the steps changes the error by < 1 point)", trained_long_enough),
)


def findings(ev: dict) -> list[dict]:
    return [{"finding": s, "verdict": v, "numbers": n} for s, check in FINDINGS for v, n in [check(ev)]]


# ============================================================================ report


def _ms(st: dict | None) -> str:
    if st is None:
        return "–"
    sd = "" if st["std"] is None else f" ± {100 * st['std']:.2f}"
    return f"{100 * st['mean']:.2f}{sd} ({st['seeds']})"


def make_report(results: Sequence[str], out: str, *, title: str = "", command: str = "", note: str = "") -> dict:
    from seqvis.analysis import plots

    ok, failed = read_results(results)
    rows = annotate(ok)
    curves, longer, aug, pp_main, others = split_rows(rows)
    floor = noise_floor(curves)
    gaps = gap_series(curves, floor)
    ev = {"curves": curves, "gaps": gaps, "longer": longer, "aug": aug, "floor": floor}
    found = findings(ev)
    lg = longer_gaps(longer)  # before the plot: drawn there
    best = gaps.get("best ViT − best ResNet") or []
    cross = crossover(best)
    os.makedirs(out, exist_ok=True)

    models = _ordered_models(curves, "resnet") + _ordered_models(curves, "vit")
    series = [{"label": f"{m} ({_params(next(iter(curves[m].values()))['params'])})",
               "family": next(iter(curves[m].values()))["family"], "x": sorted(curves[m]),
               "mean": [curves[m][n]["mean"] for n in sorted(curves[m])],
               "std": [curves[m][n]["std"] for n in sorted(curves[m])],
               "seeds": [curves[m][n]["seeds"] for n in sorted(curves[m])]} for m in models]
    gap_plot = [{"label": name, "x": [p["size"] for p in pts], "mean": [p["gap"] for p in pts],
                 "std": [p["se"] for p in pts]} for name, pts in gaps.items()]
    written = plots.plot_data_size(series, gap_plot, os.path.join(out, "data_size"), crossover=cross,
                                   longer=[{"family": c["family"], "x": c["size"], "y": c["mean"]} for c in longer],
                                   longer_gaps=[{"x": g["size"], "y": g["gap_longer"]} for g in lg],
                                   title=title or "Error vs training-set size")

    sizes = sorted({n for c in curves.values() for n in c})
    summary = {"results": list(results), "points": len(rows), "failed": len(failed), "pp_train": pp_main,
               "noise_floor": floor, "crossover_best": cross, "findings": found,
               "curves": {m: {str(n): {k: v for k, v in st.items() if k != "by_seed"} for n, st in c.items()}
                          for m, c in curves.items()},
               "gaps": gaps, "longer": longer, "longer_gaps": lg, "augmentation": aug,
               "plots": [os.path.basename(p) for p in written]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)

    L = [f"# {title or 'Data-size study'}", ""]
    if command:
        L += ["Made by:", "", "```", command, "```", ""]
    for path in results:
        sj = os.path.join(os.path.dirname(path), "sweep.json")
        if os.path.exists(sj):
            with open(sj) as f:
                cmd = json.load(f).get("command")
            if cmd:
                L += ["Sweep:", "", "```", cmd, "```", ""]
    if note:
        L += [note, ""]
    L += [f"{len(rows)} finished points ({len(failed)} failed). Every point trains one model from scratch on a "
          "class-balanced subset of the Fashion-MNIST training split (`config.data.train_examples`; the subsets of "
          "one `subset_seed` are nested) and is tested on all 10,000 test images. Error = 1 − test accuracy; "
          f"augmentation of the main curves: `{pp_main}`.", ""]
    L += ["## Findings", "", "| finding | verdict | numbers |", "|---|---|---|"]
    L += [f"| {f_['finding']} | **{f_['verdict']}** | {f_['numbers']} |" for f_ in found]
    if any(f_["finding"].startswith("Small sets are trained long enough") and f_["verdict"] == FAILS for f_ in found):
        L += ["", "**The longer-training check fails: doubling the steps still lowers the error by more than "
              f"{CONVERGED_POINTS:g} point, so these models are not trained to convergence and the verdicts above "
              "describe this training budget (see the steps per size below), not converged models.**"
              + (" With the longer budget the family-best gap is " + "; ".join(
                  f"{_pts(g['gap_longer'])} instead of {_pts(g['gap'])} at {g['size']:,} examples" for g in lg) + "."
                 if lg else "")]
    L += ["", f"Gaps are ViT − ResNet test error in percentage points (> 0: ResNet ahead); SE = standard error of "
          f"the difference of the seed means; a single-seed point is given the study's median seed std "
          f"({'–' if floor is None else f'{100 * floor:.2f} points'}). A difference counts when it exceeds "
          f"{NOISE_SIGMAS:g} SE. Family best = the family's model with the lowest mean error at that size.", ""]
    L += ["## Plot", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in written if p.endswith(".png")]
    L += ["", "## Test error (%) by training-set size: mean ± std (seeds)", "",
          "| examples | steps (epochs) | " + " | ".join(models) + " | best ViT − best ResNet |",
          "|---|---|" + "---|" * (len(models) + 1)]
    for n in sizes:
        steps = sorted({curves[m][n]["steps"] for m in models if n in curves[m]})
        g = next((p for p in best if p["size"] == n), None)
        L.append(f"| {n:,} | " + ", ".join(f"{s:,} ({s * _batch(rows) / n:.3g})" for s in steps) + " | "
                 + " | ".join(_ms(curves[m].get(n)) for m in models)
                 + f" | {'–' if g is None else _pts(g['gap']) + _se_text(g)} |")
    if cross is not None:
        L += ["", f"Crossover of the family bests (gap = 0, interpolated in log size): ≈ {cross:,.0f} examples."]
    if longer:
        L += ["", "## Longer training (same seeds, twice the steps or more)", "",
              "| model | examples | steps | error | longer: steps | error | change (points) |",
              "|---|---|---|---|---|---|---|"]
        for c in longer:
            b = c["base"]
            L.append(f"| {c['model']} | {c['size']:,} | {b['steps']:,} | {100 * b['mean_shared_seeds']:.2f}% | "
                     f"{c['steps']:,} | {100 * c['mean']:.2f}% | {_pts(c['mean'] - b['mean_shared_seeds'])} |")
        if lg:
            L += ["", "Family-best gap (ViT − ResNet, points) on the same seeds at the main and the longer budget: "
                  + "; ".join(f"{g['size']:,} examples: {_pts(g['gap'])} at {'/'.join(map(str, g['steps']))} steps, "
                              f"{_pts(g['gap_longer'])} at {'/'.join(map(str, g['longer_steps']))}" for g in lg) + "."]
    if aug:
        L += ["", "## Augmentation axis (same steps as the main curve at that size)", "",
              f"Main curves: `{pp_main}`.", "",
              "| model | examples | pp_train | error (seeds) | main curve, same seeds | change (points) |",
              "|---|---|---|---|---|---|"]
        for a in aug:
            b = a["base"]
            base = "–" if b is None else f"{100 * b['mean_shared_seeds']:.2f}%"
            change = "–" if b is None else _pts(a["mean"] - b["mean_shared_seeds"])
            L.append(f"| {a['model']} | {a['size']:,} | `{a['pp']}` | {_ms(a)} | {base} | {change} |")
    if others:
        L += ["", "## Other recipes (left out of the curves)", "", "| model | examples | seed | steps | overrides | error |",
              "|---|---|---|---|---|---|"]
        for r in sorted(others, key=lambda r: (r["model"], r["size"], r["seed"])):
            L.append(f"| {r['model']} | {r['size']:,} | {r['seed']} | {r['steps']:,} | `{r['variant']}` | "
                     f"{100 * r['error']:.2f}% |")
    if failed:
        L += ["", "## Failed points", "", "| point | label | message |", "|---|---|---|"]
        for r in failed:
            msg = (r.get("message") or "").replace("|", "\\|").replace("\n", " ")[:300]
            L.append(f"| {r['point']} | {r.get('label', '')} | {msg} |")
    wall = sum(float(r.get("wall_seconds") or 0) for r in rows)
    train = sum(float(r.get("train_seconds") or 0) for r in rows)
    L += ["", f"Totals over finished points: {train / 60:.1f} min training, {wall / 60:.1f} min wall (sum of the "
          "points' runs, including compilation and evaluation).", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L))
    return summary


def _params(n: int | None) -> str:
    return "?" if not n else f"{n / 1e6:.2g}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _batch(rows: Sequence[dict]) -> int:
    return int(rows[0].get("batch_size") or 128)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="results.csv of a data-size sweep (comma-separated for several)")
    parser.add_argument("--out", required=True, help="output directory for report.md, summary.json and the plot")
    parser.add_argument("--title", default="")
    parser.add_argument("--note", default="", help="a paragraph for the report (how the sweep was run, its wall time)")
    args = parser.parse_args(argv)
    command = command_line("experiments.data_size", argv)
    try:
        data = make_report([p.strip() for p in args.results.split(",") if p.strip()], args.out, title=args.title,
                           command=command, note=args.note)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"report": os.path.join(args.out, "report.md"), "crossover": data["crossover_best"],
                      "findings": {f["finding"][:45]: f["verdict"] for f in data["findings"]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
