"""``python -m experiments.sweep --config=... --sweep=... --workdir=DIR`` (see :mod:`experiments.sweep`)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.sweep.results import dry_run_table
from experiments.sweep.runner import Sweep
from experiments.sweep.spec import SweepError, command_line_overrides

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
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
        base_spec = config_spec_from_argv(args)
        command = " ".join(["python -m experiments.sweep", *args])
        sweep = Sweep(base_spec, FLAGS.sweep, FLAGS.workdir, base_config=FLAGS.config, command=command,
                      shared_overrides=command_line_overrides(base_spec, FLAGS.config))
        if FLAGS.dry_run:
            sweep.add_dataset_sizes()
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


def config_spec_from_argv(argv: Sequence[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Base config of every point, e.g. configs/vit.py:mu/7.",
                                    lock_config=False)
    flags.DEFINE_string("sweep", None, "Sweep file with get_sweep(h, arg), e.g. configs/sweeps/depth.py[:short].")
    flags.DEFINE_string("workdir", None, "Sweep directory: points/, results.csv, results.jsonl, sweep.json.")
    flags.DEFINE_bool("dry_run", False, "List the points and exit.")
    flags.DEFINE_string("only", "", "Comma-separated point indices or ids to run (default: all).")
    flags.DEFINE_bool("retry_failed", True, "Retry points recorded as failed.")
    flags.DEFINE_bool("isolate", False, "Run each point in a child process.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
