"""What cooldown branches save: the same budget points trained as branches of one long run per model and
trained each from zero, wall time against wall time.

    flock /tmp/seqvis_cpu.lock python -m experiments.cooldown_saving --workdir=DIR \
        [--sweep=configs/sweeps/cooldown_cpu_mini.py] [--config=configs/vit.py] [--config.a.b=v ...]

Runs ``python -m experiments.sweep`` twice, with the sweep's argument ``scratch`` (every point from zero)
into ``DIR/scratch``, then ``branches`` (a long run per model, the shorter budgets branched off it) into
``DIR/branches``; each in a fresh process with JAX's persistent compilation cache off, so neither reuses the
other's compiled steps. Extra ``--config.*`` flags go to both. A finished sweep is not re-run (its rows
are read again), so the command can be repeated to re-print the numbers.

Prints JSON lines: one per model (budgets; steps trained; summed per-point wall seconds, which include
each point's compilation and final evaluation; the saving 1 - branches/scratch; whether every budget's
accuracy and loss are the same in both, as they must be), then a summary line with the totals, the
saving predicted from the steps alone, and each sweep process's wall time in this call.

The longest budget is the same run in both sweeps, so the ratio of its two wall times shows how much the
machine's load moved between them (``long_run_wall_ratio``, 1.0 on a quiet machine);
``saving_same_long_runs`` counts the scratch sweep's long runs in both totals, so it is the saving of the
branches alone, free of that drift. ``--first`` picks which sweep runs first.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

from experiments.sweep import read_rows
from experiments.sweep.spec import REPO

VARIANTS = ("scratch", "branches")


def run_sweep(variant: str, args, extra: list[str]) -> float:
    """Wall seconds of one ``python -m experiments.sweep`` process (which skips points finished earlier)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, "-m", "experiments.sweep", f"--config={args.config}", f"--sweep={args.sweep}:{variant}",
           f"--workdir={os.path.join(args.workdir, variant)}", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} exited with code {proc.returncode}")
    return time.time() - t0


def ok_rows(workdir: str) -> list[dict]:
    latest = {}
    for r in read_rows(os.path.join(workdir, "results.jsonl")):
        latest[r["point"]] = r
    return [r for r in latest.values() if r["status"] == "ok"]


def compare(by_variant: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """Per model: budgets, steps trained, wall seconds and the saving; and the totals."""
    models: dict[str, dict[str, dict[int, dict]]] = collections.defaultdict(lambda: {v: {} for v in VARIANTS})
    for variant, rows in by_variant.items():
        for r in rows:
            models[r["model"]][variant][int(r["steps"])] = r
    lines = []
    total = {v: {"wall_seconds": 0.0, "steps_trained": 0} for v in VARIANTS}
    long_scratch = 0.0
    for model, per in models.items():
        budgets = sorted(per["scratch"])
        if sorted(per["branches"]) != budgets:
            raise SystemExit(f"error: {model}: the two sweeps have different budgets ({budgets} vs "
                             f"{sorted(per['branches'])}); let both finish.")
        line = {"model": model, "params": per["scratch"][budgets[0]]["params"], "budgets": budgets}
        for v in VARIANTS:
            trained = sum(b - int(r.get("branch_from_step") or 0) for b, r in per[v].items())
            wall = sum(float(r["wall_seconds"]) for r in per[v].values())
            line[f"steps_trained_{v}"] = trained
            line[f"wall_seconds_{v}"] = round(wall, 1)
            total[v]["wall_seconds"] += wall
            total[v]["steps_trained"] += trained
        line["saving"] = round(1 - line["wall_seconds_branches"] / line["wall_seconds_scratch"], 3)
        longest = budgets[-1]
        line["long_run_wall_ratio"] = round(float(per["branches"][longest]["wall_seconds"])
                                            / float(per["scratch"][longest]["wall_seconds"]), 3)
        line["wall_seconds_short_budgets"] = {v: round(sum(float(r["wall_seconds"]) for b, r in per[v].items()
                                                           if b != longest), 1) for v in VARIANTS}
        line["accuracy"] = {b: per["scratch"][b]["accuracy"] for b in budgets}
        line["same_results"] = all(per["scratch"][b]["accuracy"] == per["branches"][b]["accuracy"]
                                   and per["scratch"][b]["loss"] == per["branches"][b]["loss"] for b in budgets)
        long_scratch += float(per["scratch"][longest]["wall_seconds"])
        lines.append(line)
    summary = {
        "models": len(lines),
        "points": sum(len(line["budgets"]) for line in lines),
        **{f"steps_trained_{v}": total[v]["steps_trained"] for v in VARIANTS},
        **{f"wall_seconds_{v}": round(total[v]["wall_seconds"], 1) for v in VARIANTS},
        "saving": round(1 - total["branches"]["wall_seconds"] / max(total["scratch"]["wall_seconds"], 1e-9), 3),
        "saving_predicted_from_steps": round(
            1 - total["branches"]["steps_trained"] / max(total["scratch"]["steps_trained"], 1), 3),
        "saving_same_long_runs": round(1 - (long_scratch + sum(line["wall_seconds_short_budgets"]["branches"]
                                                                 for line in lines))
                                       / max(total["scratch"]["wall_seconds"], 1e-9), 3),
        "long_run_wall_ratio": round(sum(line["long_run_wall_ratio"] for line in lines) / max(len(lines), 1), 3),
        "same_results": all(line["same_results"] for line in lines),
    }
    return lines, summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sweep", default="configs/sweeps/cooldown_cpu_mini.py")
    ap.add_argument("--config", default="configs/vit.py")
    ap.add_argument("--first", choices=VARIANTS, default="scratch", help="the sweep that runs first")
    args, extra = ap.parse_known_args(argv)
    order = VARIANTS if args.first == VARIANTS[0] else VARIANTS[::-1]
    process_seconds = {v: round(run_sweep(v, args, extra), 1) for v in order}
    lines, summary = compare({v: ok_rows(os.path.join(args.workdir, v)) for v in VARIANTS})
    for line in lines:
        print(json.dumps(line))
    print(json.dumps({**summary, "process_wall_seconds_this_call": process_seconds,
                      "command": " ".join(["python -m experiments.cooldown_saving", *(argv or sys.argv[1:])])}))


if __name__ == "__main__":
    main()
