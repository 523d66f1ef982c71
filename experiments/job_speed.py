"""Does the default job train at its step's speed? The job's img/s against the synthetic step's, one run.

    python -m experiments.job_speed [--steps 600] [--config configs/vit.py] [--rounds 2] [--config.X=Y ...]

Per round, in turn: the real job (``python -m seqvis.cli.train --config=CONFIG`` for ``--steps``
steps in a temporary workdir: input pipeline, logging, checkpoints and all) and the same
model's training step on synthetic batches (``experiments.benchmark.bench``: no input
pipeline). The job's figure is the median ``train/img_per_sec`` of its metrics.jsonl rows
after the first logged row (which includes compilation); the step's is the benchmark's
train img/s. Prints one JSON line with both medians and ``ratio`` = job / step (the issue's
bar: >= 0.9). Only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_img_per_sec(config: str, steps: int, overrides: list[str]) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="seqvis_job_speed_") as wd:
        cmd = [sys.executable, "-m", "seqvis.cli.train", f"--config={config}", f"--workdir={wd}",
               f"--config.total_steps={steps}", "--config.progress=False", *overrides]
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"job_speed: the job failed: {done.stderr.strip().splitlines()[-2:]}")
        rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    speeds = [r["train/img_per_sec"] for r in rows if "train/img_per_sec" in r]
    return speeds[1:]  # the first logged interval includes compilation


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vit.py")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bench_steps", type=int, default=30)
    args, extra = ap.parse_known_args(argv)  # the rest: --config.X=Y overrides for both sides
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides are written --config.X=Y)")
    args.override = extra

    from experiments import benchmark
    from experiments.sweep import spec

    overrides = {}
    for o in args.override:
        key, _, value = o.removeprefix("--config.").partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a string such as a pp spec
    config = spec.apply_overrides(spec.load_config(args.config), overrides, where="job_speed")

    job, step = [], []
    for _ in range(args.rounds):
        job += job_img_per_sec(args.config, args.steps, args.override)
        step += [r["img_per_sec"] for r in benchmark.bench("job", config, args.bench_steps) if r["mode"] == "train"]
    out = {"config": args.config, "overrides": args.override, "steps": args.steps, "rounds": args.rounds,
           "job_img_per_sec": statistics.median(job), "step_img_per_sec": statistics.median(step),
           "job_rows": [round(x, 1) for x in job], "step_runs": [round(x, 1) for x in step]}
    out["ratio"] = out["job_img_per_sec"] / out["step_img_per_sec"]
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
