"""The sweep runner: expansion of sweep files, overrides, resume, failures, rows, command line.

Training points run on the toy IDX data of tests/test_train.py (tiny ViTs, a few steps).
"""

import csv
import json
import os
import sys

import pytest

from experiments import sweep as sweep_lib
from experiments.sweep import Hyper, SweepError
from seqvis.train import checkpoint as ckpt_lib
from seqvis import trainer as trainer_lib

import childproc
from test_train import idx_dir, tiny_config  # noqa: F401 - fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
h = Hyper()


# ============================================================================ expansion


def test_sweep_algebra():
    depth = h.sweep("model.depth", [1, 2, 4])
    budget = h.zip(h.sweep("num_epochs", [0.5, 2.0]), h.sweep("schedule.warmup_steps", [50, 100]))
    assert budget == [{"num_epochs": 0.5, "schedule.warmup_steps": 50},
                      {"num_epochs": 2.0, "schedule.warmup_steps": 100}]
    grid = h.product(depth, budget, h.fixed("seed", 3))
    assert len(grid) == 6 and grid[0] == {"model.depth": 1, "num_epochs": 0.5, "schedule.warmup_steps": 50, "seed": 3}
    assert [p["model.depth"] for p in grid] == [1, 1, 2, 2, 4, 4]  # first axis varies slowest
    assert h.chain(depth, h.sweep("model.width", [8])) == depth + [{"model.width": 8}]
    with pytest.raises(SweepError, match="different lengths"):
        h.zip(depth, budget)
    with pytest.raises(SweepError, match="set twice"):
        h.product(h.fixed("seed", 1), h.fixed("seed", 2))


def test_point_ids_are_stable_and_order_independent():
    a = {"model.depth": 4, "num_epochs": 2.0}
    assert sweep_lib.point_id(a) == sweep_lib.point_id({"num_epochs": 2.0, "model.depth": 4})
    assert sweep_lib.point_id(a) != sweep_lib.point_id({"model.depth": 4, "num_epochs": 2.5})
    assert sweep_lib.point_label(a) == "depth=4,num_epochs=2.0"


@pytest.mark.parametrize("name,arg,count", [
    ("depth", None, 18), ("depth", "short", 10), ("width", None, 18), ("width", "short", 8),
    ("patch_size", None, 12), ("patch_size", "short", 8)])
def test_shipped_ablation_sweeps_expand(name, arg, count):
    spec = f"configs/sweeps/{name}.py" + (f":{arg}" if arg else "")
    points = sweep_lib.load_sweep(spec)
    assert len(points) == count
    s = sweep_lib.Sweep("configs/vit.py", spec, "/nonexistent")  # expansion only: builds and checks every point
    axis = {"depth": "depth", "width": "width", "patch_size": "patch"}[name]
    values = {p.info[axis] for p in s.points}
    assert len(values) == count // (3 if arg is None else 2)
    # only the swept axis (and, for width, MLP and heads with it) differs from the base model
    base = sweep_lib.describe(sweep_lib.load_config("configs/vit.py"))
    base["depth"] = 6  # the ablation sweeps pin the 6-block base their committed studies ran on
    for p in s.points:
        for k in ("width", "depth", "patch", "mlp_dim", "heads"):
            if k != axis and not (name == "width" and k in ("mlp_dim", "heads")):
                assert p.info[k] == base[k], (p.overrides, k)


def test_scaling_cpu_mini_expands():
    s = sweep_lib.Sweep("configs/vit.py", "configs/sweeps/scaling_cpu_mini.py", "/nonexistent")
    fams = [p.info["family"] for p in s.points]
    assert fams.count("resnet") >= 2 and fams.count("vit") >= 12
    vit = [p for p in s.points if p.info["family"] == "vit"]
    assert max(p.info["params"] for p in vit) == pytest.approx(5.5e6, rel=0.05)  # up to about ViT-Ti
    assert len({p.info["model"] for p in vit}) >= 5


# ============================================================================ bad input


def _sweep_file(tmp_path, body):
    path = tmp_path / "s.py"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("body,message", [
    ("x = 1\n", r"defines no get_sweep\(h, arg=None\)"),
    ("def get_sweep(h, arg=None):\n    return []\n", "non-empty list of dicts"),
    ("def get_sweep(h, arg=None):\n    return [1]\n", "point 0 is a int"),
    ("def get_sweep(h, arg=None):\n    return [{'model depth': 1}]\n", "keys are dotted config paths"),
    ("def get_sweep(h, arg=None):\n    return [{'seed': 1}, {'seed': 1}]\n", "points 0 and 1 are identical"),
    ("def get_sweep(h, arg=None):\n    return h.zip(h.sweep('a', [1]), h.sweep('b', [1, 2]))\n", "different lengths"),
    ("def get_sweep(h, arg=None):\n    raise KeyError('boom')\n", r"get_sweep\(h, None\) failed: KeyError"),
    ("def get_sweep(h, arg=None):\n    return [{'seed': object()}]\n", "not JSON-serialisable"),
    ("import nonexistent_module_xyz\n", "importing .* failed: ModuleNotFoundError"),
])
def test_bad_sweep_files(tmp_path, body, message):
    with pytest.raises(SweepError, match=message):
        sweep_lib.load_sweep(_sweep_file(tmp_path, body))


def test_missing_files():
    with pytest.raises(SweepError, match=r"--sweep: sweep file 'configs/sweeps/nope.py' not found"):
        sweep_lib.load_sweep("configs/sweeps/nope.py")
    with pytest.raises(SweepError, match=r"--config: config file 'configs/nope.py' not found"):
        sweep_lib.load_config("configs/nope.py:mu/7")


@pytest.mark.parametrize("override,message", [
    ({"schedule.base_lrr": 1e-3}, r"override 'schedule.base_lrr' names no field of the config \(config.schedule has:"),
    ({"scheduler.base_lr": 1e-3}, r"config.scheduler is not a section"),
    ({"batch_size": "big"}, r"override batch_size='big' is a str but config.batch_size is a int"),
    ({"total_steps": 2.5}, r"is a float but config.total_steps is a int"),
    ({"model.num_heads": 3}, r"point 0 .*not divisible by num_heads=3"),
    ({"model.patch_size": 5}, r"point 0 .*not divisible by the patch size"),
    ({"model.widht": 64}, r"Unknown ViT field\(s\) \['widht'\]"),
    ({"config": "configs/nope.py"}, r"point 0 'config': config file 'configs/nope.py' not found"),
    ({"batch_size": 12}, r"config.batch_size=12 must be a positive multiple of the device count"),
    # What ConfigDict's typed override would let through: a bool into a number, a dict over a section.
    ({"seed": True}, r"override seed=True is a bool but config.seed is a int"),
    ({"data": {"name": "mnist"}}, r"override 'data' names a section of the config, not a field"),
])
def test_bad_overrides_fail_before_training(tmp_path, override, message):
    with pytest.raises(SweepError, match=message):
        sweep_lib.Sweep("configs/vit.py:mu/7", "test", str(tmp_path / "w"), points=[override])
    assert not os.path.exists(tmp_path / "w")


def test_overrides_apply_and_convert():
    base = sweep_lib.load_config("configs/vit.py:mu/7")
    c = sweep_lib.apply_overrides(base, {"model.width": 64, "num_epochs": 2, "model.patch_size": (4, 4)}, "t")
    assert c.model.width == 64 and c.num_epochs == 2.0 and isinstance(c.num_epochs, float)
    assert "width" not in base.model  # the base config is not modified


# ============================================================================ running


def _toy_sweep(idx_dir, tmp_path, workdir, points):  # noqa: F811
    base = tiny_config(idx_dir, tmp_path, total_steps=8, checkpoint_every_steps=4, log_every_steps=4)
    return sweep_lib.Sweep("toy", "toy-sweep", workdir, base_config=base, points=points)


POINTS = [
    {"model.depth": 1},
    # diverges: a recorded failure, not the end of the sweep
    {"model.depth": 2, "optimizer.name": "sgd", "optimizer.grad_clip_norm": 0.0, "schedule.name": "constant",
     "schedule.base_lr": 1e12, "schedule.warmup_steps": 0},
    {"model.depth": 2},
]


def test_resume_skips_finished_and_resumes_unfinished(idx_dir, tmp_path, monkeypatch):  # noqa: F811
    workdir = str(tmp_path / "sweep")
    calls = []
    real = trainer_lib.train_and_evaluate

    def spy(config, wd, stop_at_step=None):
        steps = ckpt_lib.Checkpointer(wd).steps() if os.path.isdir(os.path.join(wd, "checkpoints")) else []
        calls.append((os.path.basename(wd), steps))
        if kill_at is not None and int(config.model.depth) == 2 and config.schedule.base_lr < 1:
            real(config, wd, stop_at_step=kill_at)  # the process is "killed" after step 6
            raise KeyboardInterrupt
        return real(config, wd)

    monkeypatch.setattr(trainer_lib, "train_and_evaluate", spy)
    kill_at = 6
    with pytest.raises(KeyboardInterrupt):
        _toy_sweep(idx_dir, tmp_path, workdir, POINTS).run()
    rows = sweep_lib.read_rows(os.path.join(workdir, "results.jsonl"))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "FloatingPointError: Non-finite loss" in rows[1]["message"]
    assert os.path.isfile(os.path.join(rows[1]["workdir"], "error.txt"))

    # Restarted: point 0 is not run again, point 1 is retried, point 2 resumes from its step-4 checkpoint.
    kill_at, calls[:] = None, []
    s = _toy_sweep(idx_dir, tmp_path, workdir, POINTS)
    s.run(retry_failed=False)
    names = [p.dirname for p in s.points]
    assert calls == [(names[2], [4])]
    rows = sweep_lib.read_rows(os.path.join(workdir, "results.jsonl"))
    assert [(r["index"], r["status"]) for r in rows] == [(0, "ok"), (1, "failed"), (2, "ok")]
    assert rows[2]["resumed"] is True and rows[2]["steps"] == 8

    # Every row is complete and consistent.
    for r in (rows[0], rows[2]):
        assert r["train_flops"] == pytest.approx(3 * r["gflops_per_example"] * 1e9 * r["examples_seen"])
        assert r["train_core_seconds"] == pytest.approx(r["train_seconds"] * r["cores"])
        assert r["test_error"] == pytest.approx(1 - r["accuracy"])
        assert r["examples_seen"] == 8 * 32 and r["params"] > 0
        assert r["analytic_gflops_per_example"] <= r["gflops_per_example"] <= 1.1 * r["analytic_gflops_per_example"]
        with open(os.path.join(r["workdir"], "results.json")) as f:
            assert json.load(f)["accuracy"] == r["accuracy"]
    with open(os.path.join(workdir, "results.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["ok", "failed", "ok"]
    assert table[1]["ov.schedule.base_lr"] == "1000000000000.0" and table[0]["ov.model.depth"] == "1"

    # A third run has nothing to do; with retries, only the failed point runs (and fails again).
    calls[:] = []
    _toy_sweep(idx_dir, tmp_path, workdir, POINTS).run(retry_failed=False)
    assert calls == []
    _toy_sweep(idx_dir, tmp_path, workdir, POINTS).run(retry_failed=True)
    assert [c[0] for c in calls] == [names[1]]


def test_bad_budget_fails_before_any_training(idx_dir, tmp_path):  # noqa: F811
    s = _toy_sweep(idx_dir, tmp_path, str(tmp_path / "w"), [{"seed": 1}, {"schedule.warmup_steps": 8}])
    with pytest.raises(SweepError, match=r"point 1 \(warmup_steps=8\): config.schedule.warmup_steps=8 must be smaller"):
        s.run()
    assert not os.path.exists(tmp_path / "w" / "points")


def test_workdir_refuses_another_base_config(idx_dir, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "sweep")
    _toy_sweep(idx_dir, tmp_path, workdir, [{"seed": 1}])._check_workdir()
    other = tiny_config(idx_dir, tmp_path, total_steps=9)
    with pytest.raises(SweepError, match=r"another base config .*total_steps: 8 -> 9"):
        sweep_lib.Sweep("toy", "toy-sweep", workdir, base_config=other, points=[{"seed": 1}])._check_workdir()


def test_command_line_isolated_points_and_shared_overrides(idx_dir, tmp_path):  # noqa: F811
    """The real command: --config.* overrides reach a point with its own base config; --isolate."""
    sweep_file = _sweep_file(tmp_path, (
        "def get_sweep(h, arg=None):\n"
        "    return h.chain(h.fixed('model.depth', 1),\n"
        "                   [{'config': 'configs/resnet.py:18,fashion_mnist', 'model.width': 4,\n"
        "                     'model.stage_sizes': (1, 1, 1, 1),\n"
        "                     'schedule.warmup_steps': 0}])\n"))
    workdir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "experiments.sweep", "--config=configs/vit.py:mu/7", f"--sweep={sweep_file}",
           f"--workdir={workdir}", f"--config.data.idx_dir={idx_dir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
           "--config.data.shuffle_buffer=1000", "--config.total_steps=3", "--config.batch_size=16",
           "--config.eval_batch_size=64", "--config.schedule.warmup_steps=0", "--config.progress=False", "--isolate"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f] +
        ["--xla_force_host_platform_device_count=2"]))
    proc = childproc.run(cmd, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == 2
    rows = sweep_lib.read_rows(str(workdir / "results.jsonl"))
    assert [r["family"] for r in rows] == ["vit", "resnet"]
    # the ResNet point got the data and duration overrides of the command line, not the ViT's model
    assert rows[1]["steps"] == 3 and rows[1]["num_examples"] == 203 and rows[1]["model"] == "ResNet-18 w4"
    # the dry run lists both points
    proc = childproc.run(cmd[:-1] + ["--dry_run"], cwd=REPO, env=env)
    assert proc.returncode == 0 and "2 points" in proc.stdout
