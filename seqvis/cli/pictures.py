"""What the picture commands share: ``--workdir``, ``--out``, a number of images and ``--split``, then one
path per written PNG on stdout, or one ``error:`` line."""

from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence


def run(argv: Sequence[str] | None, description: str, render: Callable, out_name: str, count_flag: str) -> None:
    """Parse the command line and call ``render(workdir, out, count, split)``, which returns the paths."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help=f"output directory (default WORKDIR/{out_name})")
    p.add_argument(f"--{count_flag}", type=int, default=8, help="number of eval images")
    p.add_argument("--split", default=None, help="default: config.data.eval_split")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        paths = render(a.workdir, a.out, getattr(a, count_flag), a.split)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    for path in paths:
        print(path)
