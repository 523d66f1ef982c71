"""Run a sweep: every point is an ordinary training run of the shared trainer.

    python -m experiments.sweep --config=configs/vit.py:ARG --sweep=configs/sweeps/NAME.py[:ARG] --workdir=DIR
        [--config.a.b=value ...]   # applied to the base config of every point
        [--dry_run]                # list the points (params, analytic GFLOPs, examples) and exit
        [--only=3,7] [--isolate] [--retry_failed=false]

A sweep file defines ``get_sweep(h, arg=None)`` returning a list of points, each a dict of
config overrides ``{"model.depth": 4, "num_epochs": 2.0}``; ``h`` has the helpers
``h.sweep(key, values)``, ``h.fixed(key, value)``, ``h.product(*axes)``, ``h.zip(*axes)``
and ``h.chain(*axes)``. The reserved key ``"config"`` replaces the base config of that
point (``"configs/resnet.py:18,fashion_mnist"``), so one sweep can mix model families.
``h.cooldowns(steps, fraction=0.2)`` makes training budgets that branch a linear cooldown off
one long run (reserved key ``"cooldown_of"``): the long run is trained first and keeps the
branch steps; each shorter budget starts from its step B - cooldown and trains only the
cooldown (``config.branch_from``, seqvis/train/branch.py). Its row is a budget point like any
other, with ``branch_from_point`` and ``branch_from_step`` added.

Each point trains in ``DIR/points/<label>-<hash>/`` (the hash is a function of the point's
overrides only, so reordering or extending the sweep file keeps finished points finished).
One row per finished point is appended to ``DIR/results.jsonl`` and ``DIR/results.csv``:
the overrides, the model (family, width, depth, MLP, heads, patch, parameters), forward
FLOPs per example (XLA cost analysis, and the analytic count for ViT), training compute
(3 × forward FLOPs × examples seen, in FLOPs and in core-seconds), wall seconds, final
metrics, and the status (``ok`` / ``failed`` with the error).

Restarting the same command skips points with an ``ok`` row, resumes an unfinished point
from the checkpoints in its directory, and retries failed points (``--retry_failed=false``
skips them). Points run in this process one after the other (no TF/JAX start-up per
point); a Python exception in one point is recorded and the sweep goes on. ``--isolate``
runs every point in a child process instead, which also survives hard crashes (OOM kills).

Rooms: :mod:`.spec` (sweep algebra, loading files, point ids and labels, overrides),
:mod:`.points` (each point's config, checked and described), :mod:`.results` (the rows and
files written, the dry-run table), :mod:`.runner` (the :class:`Sweep` and its run loop) and
``__main__`` (the command line). Everything is importable from ``experiments.sweep``.
"""

from experiments.sweep.points import Point, describe, expand, total_steps  # noqa: F401
from experiments.sweep.results import (  # noqa: F401
    FIXED_COLUMNS, ResultsWriter, compute_units, dry_run_table, make_row, override_columns, read_rows)
from experiments.sweep.runner import CHILD_ENV, Sweep  # noqa: F401
from experiments.sweep.spec import (  # noqa: F401
    FAMILY_SECTIONS, REPO, Hyper, SweepError, apply_overrides, check_points, command_line_overrides, flatten,
    load_config, load_sweep, point_id, point_label, split_spec)
