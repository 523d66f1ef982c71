"""What each evaluator of a config costs per evaluation: every one run ``--repeats`` times on one state.

    python -m experiments.eval_cost [--config configs/vit.py:fewshot] [--init_from WORKDIR] [--repeats 3]
                                    [--config.X=Y ...]

Builds the config's task, its evaluators (:mod:`seqvis.train.evaluators`: ``config.evals`` plus the
default ``eval`` one when it has no classification evaluator) and its driver as the trainer does,
takes the parameters of ``--init_from`` (a finished run's workdir; without it the initial ones: the
time does not depend on their values, the few-shot accuracies do), and runs the evaluators in
turn. Prints one JSON line per run (``evaluator``, ``run``, ``seconds``, its results; run 0
includes compiling the evaluator's function, as the first evaluation of a training run does), one
line with the time to build them all (the trainer pays it once, before compiling), and one summary
line per evaluator (``first_seconds``, ``median_seconds`` of the later runs). The time
includes reading and preprocessing the data. Measure under ``flock /tmp/seqvis_cpu.lock``.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vit.py:fewshot")
    ap.add_argument("--init_from", default="", help="a finished run's workdir (its parameters are evaluated)")
    ap.add_argument("--repeats", type=int, default=3)
    args, extra = ap.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (overrides are written --config.X=Y)")

    import jax
    import numpy as np

    from experiments.sweep import spec
    from seqvis.data import pipeline as data_lib
    from seqvis.train import evaluators as evaluators_lib
    from seqvis.train import optim
    from seqvis.train import step as step_lib
    from seqvis.interop.pretrained import load_pretrained
    from seqvis.tasks.base import get_task
    from seqvis.trainer import check_config

    config = spec.load_config(args.config)
    overrides = {}
    for o in extra:
        key, _, value = o.removeprefix("--config.").partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    config = spec.apply_overrides(config, overrides, "--config.*")
    check_config(config)

    task = get_task(config)
    data_lib.get_builder(config.data)  # TensorFlow imported and the training set prepared, as in the trainer by now
    t0 = time.time()
    evaluators = evaluators_lib.from_config(config, task)
    print(json.dumps({"build_seconds": round(time.time() - t0, 3), "evaluators": [ev.name for ev in evaluators],
                      "note": "from_config: datasets opened, splits checked, k-shot sets drawn, features traced"}),
          flush=True)
    schedule = optim.make_schedule(config.schedule, 10**6)  # only the optimiser state's structure matters
    tx = optim.make_optimizer(config.optimizer, schedule)
    parallel = config.get("parallel", "pmap")
    driver = step_lib.make_driver(parallel, step_lib.make_train_step(task, tx, schedule,
                                                                    vary_params=step_lib.DRIVERS[parallel].vary_params),
                                  step_lib.make_eval_step(task), **step_lib.driver_options(config))
    dummy = task.dummy_batch(int(config.batch_size) // jax.device_count())
    host = driver.create_state(lambda: step_lib.create_state(task, tx, int(config.get("seed", 0)), dummy))
    if args.init_from:
        host = host.replace(params=load_pretrained(args.init_from, jax.device_get(host.params)))
    state = driver.put_state(host)

    class Discard:
        def write(self, *a, **k):
            pass

    out = []
    for ev in evaluators:
        for i in range(args.repeats):
            t0 = time.time()
            results = evaluators_lib.Evaluators([ev]).run(0, driver, state, Discard(), final=True)
            row = {"evaluator": ev.name, "prefix": ev.prefix, "run": i, "seconds": round(time.time() - t0, 3),
                   "devices": jax.device_count(),
                   **{k: v for k, v in results.items() if np.ndim(v) == 0}}
            print(json.dumps(row), flush=True)
            out.append(row)
        later = [r["seconds"] for r in out if r["evaluator"] == ev.name and r["run"] > 0]
        summary = {"evaluator": ev.name, "config": args.config, "init_from": args.init_from or None,
                   "first_seconds": out[-args.repeats]["seconds"],
                   "median_seconds": statistics.median(later) if later else None, "repeats": args.repeats}
        if ev.prefix.startswith("fewshot/"):
            summary.update(pool_examples=int(len(ev.pool)), feature_dim=ev.dim, shots=list(ev.shots), seeds=ev.seeds)
        print(json.dumps(summary), flush=True)
    return out


if __name__ == "__main__":
    main()
