"""Cooldown branches: a run started from a saved step of another run (``config.branch_from``), kept
checkpoints (``config.checkpoint_steps``), the refusals, and the sweep's budgets as cooldown branches.

All on the toy IDX data of tests/test_train.py (tiny ViT, 8 fake devices, a few steps), with augmentation
and dropout on so that the data position and the rng really matter.
"""

import json
import os

import jax
import numpy as np
import pytest

from experiments import sweep as sweep_lib
from experiments.sweep import Hyper, SweepError
from seqvis.errors import CheckpointError, ConfigError
from seqvis.train import checkpoint as ckpt_lib
from seqvis.trainer import train_and_evaluate

from test_train import idx_dir, tiny_config  # noqa: F401 - fixture

h = Hyper()
BRANCH_STEP = 6


def cooldown_config(idx_dir, tmp_path, total_steps, **kw):  # noqa: F811
    c = tiny_config(idx_dir, tmp_path, total_steps=total_steps, log_every_steps=2, **kw)
    c.data.pp_train = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)"
    c.model.dropout_rate = 0.1
    c.schedule.update(name="rsqrt", base_lr=3e-3, warmup_steps=2, timescale=4, cooldown_steps=4)
    return c


@pytest.fixture(scope="module")
def trunk(idx_dir, tmp_path_factory):  # noqa: F811
    """The long run: 16 steps (its own cooldown over 13..16), step 6 kept although keep_checkpoints=1."""
    tmp = tmp_path_factory.mktemp("trunk")
    config = cooldown_config(idx_dir, tmp, 16, checkpoint_every_steps=100, keep_checkpoints=1,
                             checkpoint_steps=(BRANCH_STEP,))
    train_and_evaluate(config, str(tmp / "long"))
    return str(tmp / "long"), tmp


def nothing_written(workdir) -> bool:
    """Only the run's lock file (WORKDIR/.lock, held while it ran) may exist."""
    return not workdir.exists() or sorted(os.listdir(workdir)) == [".lock"]


def branch_config(idx_dir, tmp_path, trunk_dir, total_steps=10, step=BRANCH_STEP, **kw):  # noqa: F811
    c = cooldown_config(idx_dir, tmp_path, total_steps, **kw)
    c.branch_from.update(workdir=trunk_dir, step=step)
    return c


def test_checkpoint_steps_are_kept(trunk):
    assert ckpt_lib.Checkpointer(trunk[0]).steps() == [BRANCH_STEP, 16]  # keep 1 newest + the kept step


def test_branch_equals_one_go_bit_for_bit_and_resumes(idx_dir, trunk):  # noqa: F811
    trunk_dir, tmp = trunk
    # The branch trains 6 -> 10 with the cooldown over 7..10, checkpointing every 2 steps; it is "killed"
    # after step 9 (last own checkpoint: 8) and restarted with the same command.
    branch = branch_config(idx_dir, tmp, trunk_dir, checkpoint_every_steps=2)
    bdir = str(tmp / "branch")
    assert train_and_evaluate(branch, bdir, stop_at_step=9) is None
    assert ckpt_lib.Checkpointer(bdir).steps() == [8]
    got = train_and_evaluate(branch, bdir)
    one_go = cooldown_config(idx_dir, tmp, 10, checkpoint_every_steps=100)
    want = train_and_evaluate(one_go, str(tmp / "one_go"))

    state_b, meta_b = ckpt_lib.read_checkpoint(bdir)
    state_o, meta_o = ckpt_lib.read_checkpoint(str(tmp / "one_go"))
    assert meta_b["step"] == meta_o["step"] == 10
    leaves_b, leaves_o = jax.tree.leaves(state_b), jax.tree.leaves(state_o)
    assert len(leaves_b) == len(leaves_o) > 10  # parameters, optimiser state, rng, step counter
    for x, y in zip(leaves_b, leaves_o):
        np.testing.assert_array_equal(x, y)
    assert got["accuracy"] == want["accuracy"] and got["loss"] == want["loss"]
    assert got["examples_seen"] == want["examples_seen"] == 10 * 32  # the budget counts all 10 steps

    # What is recorded: the branch point, and the branch's own metrics start after it.
    with open(os.path.join(bdir, "results.json")) as f:
        assert json.load(f)["branch_from"] == {"workdir": os.path.abspath(trunk_dir), "step": BRANCH_STEP}
    with open(os.path.join(bdir, "config.json")) as f:
        assert json.load(f)["branch_from"]["step"] == BRANCH_STEP
    rows = [json.loads(line) for line in open(os.path.join(bdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [8, 10]
    lr_one_go = {r["step"]: r["train/learning_rate"] for r in map(json.loads, open(tmp / "one_go" / "metrics.jsonl"))
                 if "train/loss" in r}
    assert lr_one_go[10] < lr_one_go[6]  # the cooldown really happened

    # The workdir now continues its own run: another branch point is refused.
    other = branch_config(idx_dir, tmp, trunk_dir, step=16, total_steps=20)
    with pytest.raises(CheckpointError, match=r"config.branch_from: saved .*\"step\": 6.*continues the run"):
        train_and_evaluate(other, bdir)


@pytest.mark.parametrize("change,error,message", [
    ({"workdir": "nowhere"}, ConfigError, r"config.branch_from.workdir=.*nowhere does not exist"),
    ({"step": 7}, ConfigError, r"holds no checkpoint at that step; its steps are \[6, 16\].*checkpoint_steps"),
    ({"model.width": 64}, CheckpointError, r"(?s)Cannot branch from step 6 of .*config.model: saved"),
    ({"optimizer.mu_dtype": "bfloat16"}, CheckpointError, r"(?s)Cannot branch.*config.optimizer.mu_dtype: saved"),
    ({"batch_size": 64}, CheckpointError, r"(?s)changes the data stream.*config.batch_size: saved 32, now 64"),
    ({"init_from": "x"}, ConfigError, r"config.branch_from.workdir and config.init_from='x' are both set"),
])
def test_refused_before_anything_is_written(idx_dir, trunk, change, error, message):  # noqa: F811
    trunk_dir, tmp = trunk
    config = branch_config(idx_dir, tmp, str(tmp / change["workdir"]) if "workdir" in change else trunk_dir,
                           step=change.get("step", BRANCH_STEP))
    for k, v in change.items():
        if k not in ("workdir", "step"):
            section, _, field = k.rpartition(".")
            (config[section] if section else config)[field] = v
    workdir = tmp / f"refused-{abs(hash(message))}"
    with pytest.raises(error, match=message):
        train_and_evaluate(config, str(workdir))
    assert nothing_written(workdir)


@pytest.mark.parametrize("schedule,total,message", [
    # A cosine without horizon_steps is stretched over each run's length: the learning rates differ at step 3.
    (dict(name="cosine", cooldown_steps=4), 10, r"before the branch step 6 .* at step 3 .*horizon_steps"),
    # A cooldown that starts before the branch point: the long run trained step 5 at the full rate.
    (dict(cooldown_steps=6), 10, r"at step 5 it was .* there and is .* here"),
    (dict(), 6, r"config.total_steps=6 must be greater than config.branch_from.step=6"),
])
def test_schedule_must_match_before_the_branch(idx_dir, trunk, schedule, total, message):  # noqa: F811
    trunk_dir, tmp = trunk
    config = branch_config(idx_dir, tmp, trunk_dir, total_steps=total)
    config.schedule.update(schedule)
    workdir = tmp / f"sched-{abs(hash(message))}"
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(workdir))
    assert nothing_written(workdir)


def test_checkpoint_steps_config_errors(idx_dir, tmp_path):  # noqa: F811
    config = tiny_config(idx_dir, tmp_path, checkpoint_steps=(4, 0))
    with pytest.raises(ConfigError, match=r"config.checkpoint_steps=\(4, 0\) must be a list of steps > 0"):
        train_and_evaluate(config, str(tmp_path / "x"))
    config = tiny_config(idx_dir, tmp_path)
    config.branch_from.update(workdir=str(tmp_path), step=0)
    with pytest.raises(ConfigError, match=r"config.branch_from.step=0 must be a step > 0"):
        train_and_evaluate(config, str(tmp_path / "x"))


# ============================================================================ sweeps


def test_cooldowns_axis():
    assert h.cooldowns([480, 120, 1920], fraction=0.2) == [
        {"total_steps": 1920, "schedule.cooldown_fraction": 0.2},
        {"total_steps": 120, "schedule.cooldown_fraction": 0.2, "cooldown_of": 1920},
        {"total_steps": 480, "schedule.cooldown_fraction": 0.2, "cooldown_of": 1920}]
    assert h.cooldowns([10], cooldown_steps=3) == [{"total_steps": 10, "schedule.cooldown_steps": 3}]
    with pytest.raises(SweepError, match="exactly one of fraction"):
        h.cooldowns([10, 20], fraction=0.2, cooldown_steps=3)


def _sweep(idx_dir, tmp_path, workdir, points):  # noqa: F811
    base = cooldown_config(idx_dir, tmp_path, 8, checkpoint_every_steps=100)
    base.schedule.cooldown_steps = 0
    return sweep_lib.Sweep("toy", "toy-sweep", workdir, base_config=base, points=points)


def test_sweep_trains_the_long_run_then_its_branches(idx_dir, tmp_path):  # noqa: F811
    # Two budgets (6 and 10 steps, cooldowns of 3) of one model, listed branch first: the runner trains the
    # 10-step run first, keeps its step 3, and branches the 6-step budget off it. The same budget trained
    # from zero in another sweep gives the same row numbers.
    points = h.product(h.fixed("model.depth", 1), h.cooldowns([6, 10], cooldown_steps=3))[::-1]
    s = _sweep(idx_dir, tmp_path, str(tmp_path / "branches"), points)
    s.run()
    long, short = s.points[1], s.points[0]
    assert short.config.branch_from.step == 3 and short.config.branch_from.workdir == s.point_dir(long)
    assert tuple(long.config.checkpoint_steps) == (3,)
    rows = sweep_lib.read_rows(str(tmp_path / "branches" / "results.jsonl"))
    assert [(r["index"], r["status"]) for r in rows] == [(1, "ok"), (0, "ok")]  # the long run first
    assert rows[1]["branch_from_point"] == long.dirname and rows[1]["branch_from_step"] == 3
    assert rows[1]["steps"] == 6 and rows[1]["examples_seen"] == 6 * 32
    assert ckpt_lib.Checkpointer(s.point_dir(long)).steps() == [3, 10]

    scratch = _sweep(idx_dir, tmp_path, str(tmp_path / "scratch"),
                     [{"model.depth": 1, "total_steps": 6, "schedule.cooldown_steps": 3}])
    scratch.run()
    (row,) = sweep_lib.read_rows(str(tmp_path / "scratch" / "results.jsonl"))
    assert row["accuracy"] == rows[1]["accuracy"] and row["loss"] == rows[1]["loss"]


def test_sweep_branch_errors(idx_dir, tmp_path):  # noqa: F811
    orphan = [{"total_steps": 6, "schedule.cooldown_steps": 3, "cooldown_of": 10}]
    with pytest.raises(SweepError, match=r"point 0 .*names the run .*not a point of the sweep"):
        _sweep(idx_dir, tmp_path, str(tmp_path / "a"), orphan).run()
    # a warmup that differs between the budgets: the learning rates before the branch step differ
    points = h.cooldowns([6, 10], cooldown_steps=3)
    points[0]["schedule.warmup_steps"] = 2
    points[1]["schedule.warmup_steps"] = 1
    points[1]["cooldown_of"] = {"total_steps": 10, "schedule.warmup_steps": 2}
    with pytest.raises(SweepError, match=r"branches off point 0 at step 3, but the two learning rates differ at "
                                         r"step 1"):
        _sweep(idx_dir, tmp_path, str(tmp_path / "b"), points).run()
    with pytest.raises(SweepError, match="'cooldown_of' must be the long run's total_steps"):
        _sweep(idx_dir, tmp_path, str(tmp_path / "c"), [{"total_steps": 6, "cooldown_of": "10"}])
    assert not os.path.exists(tmp_path / "a" / "points") and not os.path.exists(tmp_path / "b" / "points")


def test_cooldown_cpu_mini_links_each_budget_to_its_long_run():
    s = sweep_lib.Sweep("configs/vit.py", "configs/sweeps/cooldown_cpu_mini.py", "/nonexistent")
    s.preflight()  # links the branches (and checks their learning rates against the long runs')
    assert len(s.points) == 9 and len(s.trunk_of) == 6
    for p in s.points:
        if p.id in s.trunk_of:
            trunk = next(t for t in s.points if t.id == s.trunk_of[p.id])
            assert trunk.config.total_steps == 1920 and trunk.info["model"] == p.info["model"]
            assert p.config.branch_from.step == {120: 96, 480: 384}[p.config.total_steps]
        else:
            assert p.config.total_steps == 1920 and tuple(p.config.checkpoint_steps) == (96, 384)
    scratch = sweep_lib.Sweep("configs/vit.py", "configs/sweeps/cooldown_cpu_mini.py:scratch", "/nonexistent")
    scratch.preflight()
    assert len(scratch.points) == 9 and not scratch.trunk_of
    # the same nine configurations: a branch point is a scratch point with its long run named
    same = lambda ov: json.dumps({k: v for k, v in ov.items() if k != "cooldown_of"}, sort_keys=True)  # noqa: E731
    assert sorted(same(p.overrides) for p in s.points) == sorted(same(p.overrides) for p in scratch.points)


def test_cooldown_saving_arithmetic():
    from experiments.cooldown_saving import compare

    def row(steps, wall, branch_step=None, acc=0.5):
        return {"model": "m", "params": 10, "steps": steps, "wall_seconds": wall, "accuracy": acc, "loss": 1.0,
                "branch_from_step": branch_step}

    scratch = [row(120, 10), row(480, 20), row(1920, 70)]
    branches = [row(1920, 72), row(120, 4, 96), row(480, 9, 384)]
    (line,), summary = compare({"scratch": scratch, "branches": branches})
    assert line["steps_trained_scratch"] == 2520 and line["steps_trained_branches"] == 1920 + 24 + 96
    assert line["wall_seconds_scratch"] == 100 and line["wall_seconds_branches"] == 85
    assert line["saving"] == pytest.approx(0.15) and line["same_results"]
    assert summary["saving_predicted_from_steps"] == pytest.approx(round(1 - 2040 / 2520, 3))
    assert line["long_run_wall_ratio"] == pytest.approx(72 / 70, abs=1e-3)
    assert summary["saving_same_long_runs"] == pytest.approx(round(1 - (70 + 13) / 100, 3))
    branches[1]["accuracy"] = 0.6
    assert compare({"scratch": scratch, "branches": branches})[1]["same_results"] is False
