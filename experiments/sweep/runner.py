"""Running a sweep: the :class:`Sweep` bound to a workdir (which remembers its base config),
one process per workdir, points skipped when finished, resumed when unfinished, retried when
failed; each point in this process or (``isolate``) in a child process.
"""

from __future__ import annotations

import collections
import fcntl
import gc
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Sequence

import jax

from experiments.sweep.points import Point, expand, total_steps
from experiments.sweep.results import FIXED_COLUMNS, ResultsWriter, make_row, override_columns, read_rows
from experiments.sweep.spec import REPO, SweepError, check_points, load_config, load_sweep, point_id
from seqvis.data import pipeline as data_lib
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train import optim
from seqvis import trainer as trainer_lib  # looked up per point: tests substitute the trainer

CHILD_ENV = "SEQVIS_SWEEP_CHILD"  # set for the per-point child processes of --isolate
log = logging.getLogger("seqvis.sweep")


class Sweep:
    """Expanded sweep bound to a workdir: resume bookkeeping and the run loop."""

    def __init__(self, base_spec: str, sweep_spec: str, workdir: str, base_config=None,
                 points: list[dict] | None = None, command: str = "", shared_overrides: dict | None = None):
        """``base_config``: the base config (default: the file's); ``shared_overrides``: the command
        line's ``--config.*`` overrides, also applied to points with their own base config;
        ``points``: the overrides of each point (default: from the sweep file)."""
        self.base_spec, self.sweep_spec, self.workdir = base_spec, sweep_spec, os.path.abspath(workdir)
        self.base_config = base_config if base_config is not None else load_config(base_spec)
        self.command = command
        raw = points if points is not None else load_sweep(sweep_spec)
        self.points = expand(base_spec, self.base_config, check_points(raw, f"--sweep={sweep_spec}"),
                             f"--sweep={sweep_spec}", shared=shared_overrides)
        self.trunk_of: dict[str, str] = {}  # cooldown branch id -> id of the long run it branches off

    # -------------------------------------------------------------- bookkeeping
    def _check_workdir(self, write: bool = True) -> None:
        """The workdir remembers its base config; another base config needs another workdir."""
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "sweep.json")
        base = json.loads(self.base_config.to_json_best_effort())
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("base_config") != base:
                diffs = _dict_diff(saved.get("base_config", {}), base)
                raise SweepError(
                    f"{self.workdir} holds a sweep over another base config (--config={saved.get('base_spec')}); "
                    f"differences: {'; '.join(diffs[:8])}. Use a new --workdir, or the same --config and "
                    "--config.* overrides as before.")
            if not write:
                return
        info = {"base_spec": self.base_spec, "sweep_spec": self.sweep_spec, "base_config": base,
                "command": self.command,
                "points": [{"index": p.index, "point": p.id, "label": p.label, "overrides": p.overrides}
                           for p in self.points]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, default=str)
        os.replace(tmp, path)

    def point_dir(self, p: Point) -> str:
        return os.path.join(self.workdir, "points", p.dirname)

    def status(self) -> dict[str, str]:
        """Latest status per point id from results.jsonl."""
        out = {}
        for r in read_rows(os.path.join(self.workdir, "results.jsonl")):
            out[r.get("point")] = r.get("status")
        return out

    # -------------------------------------------------------------- run
    def run(self, *, only: Sequence[str] | None = None, retry_failed: bool = True, isolate: bool = False,
            child_argv: Sequence[str] | None = None) -> list[dict]:
        """Run every unfinished point; returns the rows written by this call."""
        self.add_dataset_sizes()
        self.preflight()
        self._check_workdir(write=not only)
        lock = self._lock()
        try:
            return self._run(only, retry_failed, isolate, child_argv)
        finally:
            if lock is not None:
                lock.close()

    def _lock(self):
        """One sweep process per workdir (a child of ``--isolate`` runs under its parent's lock)."""
        if os.environ.get(CHILD_ENV):
            return None
        f = open(os.path.join(self.workdir, "sweep.lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise SweepError(f"Another sweep is running in {self.workdir}; wait for it to finish (or stop it) "
                             "before starting this one, or use another --workdir.") from None
        return f

    def _run(self, only, retry_failed, isolate, child_argv) -> list[dict]:
        writer = ResultsWriter(self.workdir, FIXED_COLUMNS + override_columns(self.points))
        done = self.status()
        written = []
        todo = self._trunks_first([p for p in self.points if not only or str(p.index) in only or p.id in only])
        t_sweep = time.time()
        for n, p in enumerate(todo):
            state = done.get(p.id)
            if state == "ok":
                log.info("[%d/%d] %s: finished earlier, skipped", n + 1, len(todo), p.dirname)
                continue
            if state == "failed" and not retry_failed:
                log.info("[%d/%d] %s: failed earlier, skipped (--retry_failed=true retries)", n + 1, len(todo),
                         p.dirname)
                continue
            trunk = self.trunk_of.get(p.id)
            if trunk is not None and done.get(trunk) == "failed":
                row = make_row(p, None, status="failed", workdir=self.point_dir(p),
                               message=f"its long run (point {trunk}) failed; fix that point, then re-run the sweep.")
                writer.append(row)
                written.append(row)
                done[p.id] = "failed"
                log.error("[%d/%d] %s: skipped, its long run %s failed", n + 1, len(todo), p.dirname, trunk)
                continue
            log.info("[%d/%d] %s: %s, %s params (%.1f min into the sweep)", n + 1, len(todo), p.dirname,
                     p.info["model"], f"{p.info['params']:,}", (time.time() - t_sweep) / 60)
            if isolate:
                row = self._run_child(p, child_argv or [])
            else:
                row = self.run_point(p)
            if row is None:  # the child process wrote its row
                done[p.id] = self.status().get(p.id)
            else:
                writer.append(row)
                written.append(row)
                done[p.id] = row["status"]
                if row["status"] == "ok":
                    log.info("  -> ok: accuracy %.4f, %.3g train FLOPs, %.0f s", row["accuracy"] or float("nan"),
                             row["train_flops"] or float("nan"), row["wall_seconds"])
                else:
                    log.error("  -> FAILED: %s", row["message"].splitlines()[0] if row["message"] else "")
        return written

    def add_dataset_sizes(self) -> None:
        """Train-split sizes (for the epochs column); best effort, unprepared data gives None."""
        cache: dict[str, int | None] = {}
        for p in self.points:
            key = json.dumps([p.config.data.get("name"), p.config.data.get("train_split", "train"),
                              p.config.data.get("data_dir"), p.config.data.get("idx_dir")])
            if key not in cache:
                try:
                    cache[key] = int(data_lib.num_examples(p.config.data, p.config.data.get("train_split", "train")))
                except Exception:  # noqa: BLE001 - the point's own run reports a missing dataset
                    cache[key] = None
            p.info["num_train_examples"] = cache[key]

    def preflight(self) -> None:
        """Build every point's schedule and optimiser, so a bad budget fails now, not at point 20; link the
        cooldown branches to their long runs (:meth:`link_branches`)."""
        for p in self.points:
            steps = total_steps(p)
            if steps is None:
                continue
            try:
                optim.make_optimizer(p.config.optimizer, optim.make_schedule(p.config.schedule, steps))
            except (ValueError, TypeError, KeyError) as e:
                raise SweepError(f"--sweep={self.sweep_spec}: point {p.index} ({p.label}): {e}") from e
        self.link_branches()

    def link_branches(self) -> None:
        """Points with ``cooldown_of`` (:meth:`Hyper.cooldowns`): find each one's long run among the points,
        compute its branch step s = total_steps - cooldown, check that the two learning rates agree before s,
        and set ``config.branch_from`` = (the long run's point directory, s) on the branch and s in the long
        run's ``config.checkpoint_steps`` (saved and kept). Point ids stay functions of the overrides alone."""
        by_id = {p.id: p for p in self.points}
        keep: dict[str, set] = {}
        for p in self.points:
            if "cooldown_of" not in p.overrides:
                continue
            where = f"--sweep={self.sweep_spec}: point {p.index} ({p.label})"
            ref = p.overrides["cooldown_of"]
            trunk_ov = {k: v for k, v in p.overrides.items() if k != "cooldown_of"}
            trunk_ov.update({"total_steps": ref} if isinstance(ref, int) else ref)
            trunk = by_id.get(point_id(trunk_ov))
            if trunk is None:
                raise SweepError(f"{where}: 'cooldown_of': {ref!r} names the run {trunk_ov}, which is not a point of "
                                 "the sweep; add it (h.cooldowns(...) makes the long run and its branches together).")
            if "cooldown_of" in trunk.overrides:
                raise SweepError(f"{where}: its long run, point {trunk.index}, is itself a cooldown branch; branch off "
                                 "a run trained from the start.")
            steps, trunk_steps = total_steps(p), total_steps(trunk)
            if steps is None or trunk_steps is None:
                raise SweepError(f"{where}: a cooldown branch and its long run need known step counts: set "
                                 "total_steps, or prepare the dataset so num_epochs can be converted.")
            cool = optim.cooldown_steps(p.config.schedule, steps)
            step = steps - cool
            if cool <= 0 or step <= 0:
                raise SweepError(f"{where}: a cooldown branch needs a cooldown shorter than its {steps} steps "
                                 f"(schedule.cooldown_steps / cooldown_fraction give {cool}).")
            diff = optim.first_difference(optim.make_schedule(trunk.config.schedule, trunk_steps),
                                          optim.make_schedule(p.config.schedule, steps), step)
            if diff is not None:
                raise SweepError(
                    f"{where}: branches off point {trunk.index} at step {step}, but the two learning rates differ "
                    f"at step {diff[0]} ({diff[1]:.6g} there, {diff[2]:.6g} here). Use a schedule that does not "
                    "depend on the run's length before the cooldown (rsqrt, constant, or cosine/linear with "
                    "schedule.horizon_steps), a warmup shared by all budgets, and a cooldown that starts inside "
                    "the long run's training (not in its own cooldown).")
            p.config.branch_from.workdir = self.point_dir(trunk)
            p.config.branch_from.step = step
            keep.setdefault(trunk.id, set()).add(step)
            self.trunk_of[p.id] = trunk.id
        for tid, steps_kept in keep.items():
            t = by_id[tid]
            t.config.checkpoint_steps = tuple(sorted(set(t.config.get("checkpoint_steps", ()) or ()) | steps_kept))

    def _trunks_first(self, todo: list[Point]) -> list[Point]:
        """``todo`` in sweep order, each cooldown branch moved to just after its long run."""
        branches: dict[str, list[Point]] = {}
        for p in todo:
            if p.id in self.trunk_of:
                branches.setdefault(self.trunk_of[p.id], []).append(p)
        out, ids = [], {p.id for p in todo}
        for p in todo:
            if p.id not in self.trunk_of:
                out.append(p)
                out += branches.get(p.id, [])
            elif self.trunk_of[p.id] not in ids:  # its long run is not in this call (--only)
                out.append(p)
        return out

    def run_point(self, p: Point) -> dict:
        """Train one point in this process (resuming from its checkpoints); exceptions become a failed row."""
        wd = self.point_dir(p)
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "point.json"), "w") as f:
            json.dump({"index": p.index, "point": p.id, "config": p.config_spec, "overrides": p.overrides}, f,
                      indent=2, default=str)
        resumed = os.path.isdir(os.path.join(wd, "checkpoints")) and bool(ckpt_lib.Checkpointer(wd).steps())
        t0 = time.time()
        try:
            results = trainer_lib.train_and_evaluate(p.config, wd)
        except Exception as e:  # noqa: BLE001 - recorded, and the sweep goes on
            msg = f"{type(e).__name__}: {e}"
            with open(os.path.join(wd, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
            return make_row(p, None, status="failed", message=msg, wall=time.time() - t0, resumed=resumed,
                            workdir=wd)
        finally:
            t1 = time.time()
            jax.clear_caches()  # executables of this point are not needed again
            gc.collect()
            log.info("  run %.1f s, cleanup %.1f s", t1 - t0, time.time() - t1)
        return make_row(p, results, status="ok", wall=time.time() - t0, resumed=resumed, workdir=wd)

    def _run_child(self, p: Point, child_argv: Sequence[str]) -> dict | None:
        """Run one point as ``python -m experiments.sweep ... --only=<id>`` in a child process."""
        before = len(read_rows(os.path.join(self.workdir, "results.jsonl")))
        cmd = [sys.executable, "-m", "experiments.sweep", *child_argv, f"--only={p.id}", "--noisolate"]
        t0 = time.time()
        tail: collections.deque = collections.deque(maxlen=15)
        with subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **{CHILD_ENV: "1"})) as proc:
            for line in proc.stderr:  # shown as it comes, the end kept for the failure message
                sys.stderr.write(line)
                tail.append(line.rstrip())
        rows = read_rows(os.path.join(self.workdir, "results.jsonl"))[before:]
        if any(r.get("point") == p.id for r in rows):
            return None  # the child wrote its row
        tail = "\n".join(tail)
        return make_row(p, None, status="failed", wall=time.time() - t0, workdir=self.point_dir(p),
                        message=f"child process exited with code {proc.returncode}: {tail}")


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {json.dumps(a)} -> {json.dumps(b)}"]
