"""Issue 13: nothing lost, nothing silent. One test per numbered case of the issue: the case
is the input; the message and the files left on disk are the assertion.

All runs are tiny (a 1-layer ViT of width 32 on 256 toy 28x28 images) so the file stays fast.
"""

import gzip
import json
import os
import resource
import struct

import jax
import numpy as np
import pytest

from seqvis.data.builders import idx as idx_lib
from seqvis.data.presets import data_config
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train.defaults import base_config
from seqvis.train.metrics import truncate_jsonl
from seqvis.interop.pretrained import read_tree as read_checkpoint_params
from seqvis.errors import CheckpointError, ConfigError, IdxError
from seqvis.trainer import TrainingInterrupted, train_and_evaluate

N_TRAIN, N_TEST = 256, 64


def write_idx(path, array, compress=True):
    magic = {1: 0x00000801, 3: 0x00000803}[array.ndim]
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + \
        array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 3: 2 * c + 5, 4:24] = 250
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(d)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))  # prepared once for the whole module


def tiny(idx_dir, data_dir, **kw):
    c = base_config()
    c.data = data_config("fashion_mnist", idx_dir=idx_dir, data_dir=data_dir,
                         pp_train="decode|value_range(-1, 1)", shuffle_buffer=256)
    c.model = dict(name="vit", variant="mu/7", width=32, depth=1, mlp_dim=64, num_heads=2)
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 6
    c.schedule.update(name="cosine", base_lr=3e-3, warmup_steps=1)
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    c.progress = False
    c.tensorboard = False
    c.count_flops = False
    c.update(kw)
    return c


def listing(root):
    """{relative path: size} of every file under root: what 'nothing was written' compares."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


def read_meta(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
        return json.load(f)


def write_meta(workdir, step, meta):
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata"), "w") as f:
        json.dump(meta, f)


def metric_steps(workdir, prefix="train/"):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["step"] for r in rows if any(k.startswith(prefix) for k in r)]


def assert_finite_tree(tree):
    leaves = jax.tree.leaves(tree)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


# ---------------------------------------------------------------------------- case 1


def test_case1_nan_saves_no_frozen_state_and_resumes_from_last_good(idx_dir, data_dir, tmp_path, monkeypatch):
    """A NaN at step 5 (bad input) with a checkpoint every step and logging every 10: no
    checkpoint after step 4, the good ones are not rotated out, the message names step 4,
    and the workdir resumes from it once the input is fixed."""
    from seqvis.data import pipeline

    real = pipeline.train_iterator

    def poisoned(cfg, **kw):
        for step, batch in enumerate(real(cfg, **kw), start=kw.get("start_step", 0)):
            if step == 4:  # the 5th update sees a NaN image
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    config = tiny(idx_dir, data_dir, total_steps=10, checkpoint_every_steps=1, log_every_steps=10,
                  keep_checkpoints=2)
    config.optimizer.grad_clip_norm = 0.0
    workdir = str(tmp_path / "nan")
    monkeypatch.setattr(pipeline, "train_iterator", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step 5.*last good checkpoint is step 4"):
        train_and_evaluate(config, workdir)
    assert ckpt_lib.Checkpointer(workdir).steps() == [3, 4]  # nothing written after the bad step
    for step in (3, 4):
        assert read_meta(workdir, step)["data_position"]["step"] == step
    assert_finite_tree(read_checkpoint_params(workdir))
    # Resumed, and the very first step is bad again (here: the input is still broken; in practice a state
    # that diverged before it was saved): the message says so instead of advising the same resume.
    with pytest.raises(FloatingPointError, match=r"resumed from step 4 and its first step was not finite.*"
                                                 r"new --workdir"):
        train_and_evaluate(config, workdir)
    assert ckpt_lib.Checkpointer(workdir).steps() == [3, 4]

    monkeypatch.setattr(pipeline, "train_iterator", real)  # the input is fixed: resume
    results = train_and_evaluate(config, workdir)
    assert results["steps"] == 10
    assert read_meta(workdir, 10)["data_position"]["step"] == 10
    assert_finite_tree(read_checkpoint_params(workdir))


# ---------------------------------------------------------------------------- case 2


def test_case2_keep_checkpoints_zero_is_refused(idx_dir, data_dir, tmp_path):
    workdir = tmp_path / "keep0"
    with pytest.raises(ConfigError, match=r"config.keep_checkpoints=0 must be >= 1"):
        train_and_evaluate(tiny(idx_dir, data_dir, keep_checkpoints=0), str(workdir))
    assert not workdir.exists()
    with pytest.raises(CheckpointError, match="keep_checkpoints=0"):
        ckpt_lib.Checkpointer(str(tmp_path / "direct"), keep=0)


# ---------------------------------------------------------------------------- case 3


def test_case3_corrupt_newest_is_moved_aside_and_retrained_step_saved(idx_dir, data_dir, tmp_path):
    workdir = tmp_path / "corrupt"
    config = tiny(idx_dir, data_dir, total_steps=6, checkpoint_every_steps=3)
    train_and_evaluate(config, str(workdir))
    for root, _, files in os.walk(workdir / "checkpoints" / "6" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    results = train_and_evaluate(config, str(workdir))  # same command: resumes from 3
    assert results["steps"] == 6
    assert ckpt_lib.Checkpointer(str(workdir)).steps() == [3, 6]
    aside = workdir / ckpt_lib.UNREADABLE_DIR
    assert sorted(os.listdir(aside)) == ["6", "README.txt"]  # renamed, never deleted
    assert "step 6 -> 6" in (aside / "README.txt").read_text()
    # The re-trained step 6 is the newest and readable, so init_from=WORKDIR works.
    assert_finite_tree(read_checkpoint_params(str(workdir)))
    assert metric_steps(str(workdir)) == [2, 4, 6]


def test_a_checkpoint_of_another_structure_is_refused_naming_the_paths_and_kept(idx_dir, data_dir, tmp_path):
    """A state tree that differs from the saved one (here one leaf more, as a code change would make) is told
    from the step's metadata: refused with the differing path, nothing moved aside; a corrupt step is not."""
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny(idx_dir, data_dir, total_steps=2), workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    ckpt = ckpt_lib.Checkpointer(workdir)
    state, _ = ckpt.read()
    grown = {**state, "extra": np.zeros((3,), np.float32)}
    with pytest.raises(CheckpointError, match=r"another structure.*only in this config's state: extra"):
        ckpt.restore_latest(grown, config)
    with pytest.raises(CheckpointError, match=r"Cannot start from step 2 .*another structure.*state: extra"):
        ckpt.restore_step(2, grown)  # the same for a run branched off this one
    restored, meta = ckpt.restore_latest(state, config)  # the checkpoint itself was never touched
    assert meta["step"] == 2 and int(restored["step"]) == 2
    ckpt.close()
    assert ckpt_lib.Checkpointer(workdir).steps() == [2] and not os.path.exists(
        os.path.join(workdir, ckpt_lib.UNREADABLE_DIR))


# ---------------------------------------------------------------------------- case 4


def test_case4_refused_resume_writes_nothing(idx_dir, data_dir, tmp_path):
    workdir = str(tmp_path / "x")
    train_and_evaluate(tiny(idx_dir, data_dir, total_steps=2), workdir)
    before = listing(workdir)
    config_json = open(os.path.join(workdir, "config.json")).read()
    other = tiny(idx_dir, data_dir, total_steps=4)
    other.model.width = 64
    with pytest.raises(CheckpointError, match=r"(?s)different experiment.*config.model: saved"):
        train_and_evaluate(other, workdir)
    assert listing(workdir) == before
    assert open(os.path.join(workdir, "config.json")).read() == config_json


# ---------------------------------------------------------------------------- case 5


@pytest.mark.parametrize("overrides,error,message", [
    ({"data.num_classes": 5}, ValueError,
     r"config.data.num_classes=5, but the first training batch .* labels from 0 to 9.*--config.data.num_classes=10"),
    ({"schedule.base_lr": -0.01}, ConfigError, r"config.schedule.base_lr=-0.01 must be a finite number >= 0"),
    ({"total_steps": -5}, ConfigError, r"config.total_steps=-5 must not be negative"),
])
def test_case5_silent_nonsense_is_refused(idx_dir, data_dir, tmp_path, overrides, error, message):
    config = tiny(idx_dir, data_dir)
    for k, v in overrides.items():
        parent, _, leaf = k.rpartition(".")
        (config[parent] if parent else config)[leaf] = v
    workdir = tmp_path / "w"
    with pytest.raises(error, match=message):
        train_and_evaluate(config, str(workdir))
    assert not (workdir / "results.json").exists()
    assert not ckpt_lib.Checkpointer(str(workdir)).steps()


# ---------------------------------------------------------------------------- case 7


@pytest.fixture(scope="module")
def trained(idx_dir, data_dir, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4) that the case 7 tests copy."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    train_and_evaluate(tiny(idx_dir, data_dir, total_steps=4), workdir)
    return workdir


def copy_of(workdir, tmp_path):
    import shutil

    dest = str(tmp_path / "copy")
    shutil.copytree(workdir, dest)
    return dest


def test_case7_optimizer_structure_change_is_named_not_called_unreadable(idx_dir, data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    before = listing(workdir)
    config = tiny(idx_dir, data_dir, total_steps=6)
    config.optimizer.grad_clip_norm = 0.0  # saved with clipping on (1.0)
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(config, workdir)
    msg = str(e.value)
    assert "config.optimizer.grad_clip_norm: saved 1.0 (grad_clip_norm on), now 0.0 (off)" in msg
    assert "structure of the optimiser state" in msg and "--config.optimizer.grad_clip_norm=1.0" in msg
    assert "delete" not in msg and "unreadable" not in msg
    assert listing(workdir) == before


def test_case7_data_stream_change_is_refused_with_one_line_per_field(idx_dir, data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    before = listing(workdir)
    config = tiny(idx_dir, data_dir, total_steps=6, batch_size=64, seed=3)
    config.data.pp_train = "decode|flip_lr|value_range(-1, 1)"
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(config, workdir)
    msg = str(e.value)
    assert "config.batch_size: saved 32, now 64. To resume exactly: --config.batch_size=32." in msg
    assert "config.seed: saved 0, now 3. To resume exactly: --config.seed=0." in msg
    assert "config.data.pp_train: saved" in msg
    assert "--config.resume=allow_data_change" in msg
    assert listing(workdir) == before


def test_case7_allow_data_change_resumes_and_records_it(idx_dir, data_dir, trained, tmp_path, caplog):
    workdir = copy_of(trained, tmp_path)
    config = tiny(idx_dir, data_dir, total_steps=6, seed=3, resume="allow_data_change")
    with caplog.at_level("WARNING", logger="seqvis"):
        results = train_and_evaluate(config, workdir)
    assert results["steps"] == 6
    assert "config.seed: saved 0, now 3" in caplog.text
    changes = read_meta(workdir, 6)["data_changes"]
    assert changes == [{"step": 4, "changes": ["config.seed: saved 0, now 3. To resume exactly: --config.seed=0."]}]


def test_case7_process_count_and_data_position_are_read_back(idx_dir, data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    config = tiny(idx_dir, data_dir, total_steps=6)
    meta = read_meta(workdir, 4)
    write_meta(workdir, 4, dict(meta, process_count=2))
    with pytest.raises(CheckpointError, match=r"process count: saved 2, now 1"):
        train_and_evaluate(config, workdir)
    # A data position that disagrees with its step: that checkpoint is not used (moved
    # aside), the older one is.
    write_meta(workdir, 4, dict(meta, data_position=dict(meta["data_position"], step=3)))
    results = train_and_evaluate(config, workdir)
    assert results["steps"] == 6
    assert os.listdir(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR, "4"))
    assert "data position" in open(os.path.join(workdir, ckpt_lib.UNREADABLE_DIR, "README.txt")).read()
    assert metric_steps(workdir) == [2, 4, 6]


# ---------------------------------------------------------------------------- case 8


def test_case8_all_checkpoints_unreadable_is_one_message_and_nothing_moves(idx_dir, data_dir, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in ("2", "4"):
        for root, _, files in os.walk(os.path.join(workdir, "checkpoints", step, "state")):
            for name in files:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    before = listing(workdir)
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(tiny(idx_dir, data_dir, total_steps=6), workdir)
    msg = str(e.value)
    assert msg.startswith(f"No checkpoint in {workdir}/checkpoints can be used")
    assert "step 4:" in msg and "step 2:" in msg and "Nothing was changed" in msg and "mv " in msg
    assert listing(workdir) == before


def test_case8_reading_for_init_from_and_evaluation_skips_an_unreadable_step_and_moves_nothing(trained, tmp_path):
    # init_from=WORKDIR and the re-evaluation read through the trainer's Checkpointer: the newest
    # step corrupt, the older one is read (values as orbax itself restores them), and reading
    # leaves the workdir as it was (nothing moved aside: it may be someone else's run).
    import orbax.checkpoint as ocp

    workdir = copy_of(trained, tmp_path)
    want = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))["params"]
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    before = listing(workdir)
    got = read_checkpoint_params(workdir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert set(ckpt_lib.restore_variables(workdir, config)) == {"params"}
    config["model"]["width"] = 2 * config["model"]["width"]
    with pytest.raises(CheckpointError, match=r"another experiment.*\n  config.model: saved"):
        ckpt_lib.restore_variables(workdir, config)
    assert listing(workdir) == before


@pytest.mark.parametrize("content,message", [
    (b"not gzip and not idx", r"is not an IDX file, gzipped or not \(it starts with bytes 6e6f7420\)"),
    ("truncated-gzip", r"the gzip data is truncated or corrupt"),
    ("truncated-raw", r"header says shape \(10,\) .* truncated or corrupt"),
    (b"", r"it is empty"),
])
def test_case8_bad_idx_file_gives_one_message_naming_it(tmp_path, content, message):
    labels = np.arange(10, dtype=np.uint8)
    raw = struct.pack(">I", 0x801) + struct.pack(">I", 10) + labels.tobytes()
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    if content == "truncated-gzip":
        content = gzip.compress(raw)[:-8]
    elif content == "truncated-raw":
        content = raw[:-3]
    path.write_bytes(content)
    with pytest.raises(IdxError, match=message) as e:
        idx_lib.read_idx(str(path))
    assert str(path) in str(e.value)


def test_case8_uncompressed_idx_named_gz_is_read(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, labels, compress=False)
    np.testing.assert_array_equal(idx_lib.read_idx(str(path)), labels)


def test_case8_non_numeric_results_csv_is_a_message(tmp_path):
    from experiments import scaling_curves

    header = list(scaling_curves.REQUIRED)
    row = ["p1", "ok", "vit", "m", "100", "1000", "0.001", "1e9", "n/a"]
    path = tmp_path / "results.csv"
    path.write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    with pytest.raises(scaling_curves.ReportError, match=r"results.csv line 2, column 'test_error': 'n/a' is not a number"):
        scaling_curves.read_results([str(path)])
    assert scaling_curves.main([f"--results={path}", f"--out={tmp_path / 'out'}"]) == 2


def test_case8_ctrl_c_says_step_and_resume_point(idx_dir, data_dir, tmp_path, monkeypatch):
    from seqvis.data import pipeline

    real = pipeline.train_iterator

    def interrupted(cfg, **kw):
        for step, batch in enumerate(real(cfg, **kw), start=kw.get("start_step", 0)):
            if step == 5:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(pipeline, "train_iterator", interrupted)
    workdir = str(tmp_path / "int")
    with pytest.raises(TrainingInterrupted) as e:
        train_and_evaluate(tiny(idx_dir, data_dir, total_steps=8), workdir)
    assert str(e.value) == f"interrupted at step 5; re-run the same command to resume from step 4 ({workdir})."
    assert isinstance(e.value, KeyboardInterrupt)


def test_case8_checkpoint_writer_echoes_are_dropped_on_the_console():
    """tensorstore reports a failed write's closed event loop as unraisable exceptions, one per
    pending callback (~2,000 lines on a full disk); the CLI drops exactly those."""
    import childproc
    import sys

    code = "\n".join([
        "from seqvis.cli import console",
        "console.setup(False)",
        "class Echo:",
        "    def __del__(self): raise RuntimeError('Event loop is closed')",
        "class Other:",
        "    def __del__(self): raise RuntimeError('something else')",
        "Echo(); Echo(); Other()",
    ])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = childproc.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=root),
                        timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Event loop is closed" not in out.stderr
    assert "something else" in out.stderr  # other errors still show


def test_error_after_the_input_started_exits_on_the_command_line(idx_dir, data_dir, tmp_path):
    """An error raised once the input pipeline runs (labels checked on the first batch) must end the
    process: tearing down a running tf.data stream with a Python generator during interpreter
    shutdown used to hang it after printing the message."""
    import childproc
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = {"model.width": 32, "model.depth": 1, "model.mlp_dim": 64, "model.num_heads": 2, "batch_size": 32,
            "total_steps": 4, "schedule.warmup_steps": 1, "progress": False, "data.idx_dir": idx_dir,
            "data.data_dir": data_dir, "data.num_classes": 5}
    cmd = [sys.executable, "-m", "seqvis.cli.train", "--config=configs/vit.py", f"--workdir={tmp_path / 'w'}",
           *[f"--config.{k}={v}" for k, v in args.items()]]
    out = childproc.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=root), timeout=240)
    assert out.returncode == 1, out.stderr
    assert "error: config.data.num_classes=5, but the first training batch" in out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------- case 9 (and orbax errors once)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's echoes of the error
def test_case9_full_disk_cleans_up_and_resume_logs_each_step_once(idx_dir, data_dir, tmp_path, monkeypatch):
    """The second checkpoint write fails (file size limit: EFBIG, like ENOSPC); the error is
    raised once with the step and the resume point, the unfinished directory is removed,
    and the resumed run writes every metrics step once."""
    workdir = str(tmp_path / "full")
    real_save = ckpt_lib.Checkpointer.save
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    calls = []

    def save(self, step, *a, **kw):
        calls.append(step)
        if len(calls) == 2:  # once step 2 is on disk, no file may grow past 16 kB: the state does not fit
            self.wait()
            resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    config = tiny(idx_dir, data_dir, total_steps=6, log_every_steps=1, async_checkpointing=True)
    try:
        with pytest.raises(CheckpointError) as e:
            train_and_evaluate(config, workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(e.value)
    assert msg.startswith(f"Could not write the checkpoint for step 4 in {workdir}/checkpoints")
    assert msg.endswith("re-run the same command to resume from step 2.")
    # The cause in words (reliability_cases.sh case 9 printed tensorstore's 400-character error instead).
    assert "a file reached the file size limit" in msg and "OUT_OF_RANGE" not in msg and len(msg) < 500, msg
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # no *.orbax-checkpoint-tmp left
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real_save)
    train_and_evaluate(config, workdir)
    assert metric_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert metric_steps(workdir, "eval/") == [6]


def test_case9_metrics_truncation_rules(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": 2, "train/loss": 1}, {"step": 4, "train/loss": 1}, {"step": 4, "eval/accuracy": 0.5},
            {"step": 6, "train/loss": 1}, {"step": 6, "eval/accuracy": 0.6}]
    for resume, total, kept in ((4, 10, rows[:3]), (6, 6, rows[:4]), (0, 6, [])):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.write('{"step": 7, "train/lo')  # a line cut short by a kill
        truncate_jsonl(path, resume, total)
        assert [json.loads(line) for line in open(path)] == kept


def tensorboard_scalars(logdir):
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir``, in the order the
    files and records are read (what any reader sees before deduplicating anything)."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out = {}
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(logdir) for n in names if "tfevents" in n)
    for path in files:
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(tf.make_ndarray(v.tensor))))
    return out


def test_case9_tensorboard_after_resume_has_each_step_once_and_keeps_the_dropped_events(idx_dir, data_dir, tmp_path):
    """A run stopped at step 6 (steps 1-5 logged) with its checkpoint at 4, resumed to 8, then re-run once finished (it
    is done: nothing is written): the event files hold each (tag, step) once, with metrics.jsonl's values,
    both read raw and through TensorBoard's own loader; the files as they were before each resume are kept
    whole in tensorboard.orphaned/, outside the log directory and not named as event files."""
    from tensorboard.backend.event_processing import event_accumulator

    from seqvis.train.metrics import ORPHANED_TB_DIR

    workdir = str(tmp_path / "tb")
    logdir = os.path.join(workdir, "tensorboard")
    config = tiny(idx_dir, data_dir, total_steps=8, log_every_steps=1, checkpoint_every_steps=4, tensorboard=True)
    assert train_and_evaluate(config, workdir, stop_at_step=6) is None  # stops before step 6 is logged
    assert [s for s, _ in tensorboard_scalars(logdir)["train/loss"]] == [1, 2, 3, 4, 5]
    first = {n: open(os.path.join(logdir, n), "rb").read() for n in os.listdir(logdir)}

    train_and_evaluate(config, workdir)  # resumes from step 4
    train_and_evaluate(config, workdir)  # finished: already done, nothing written

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    expected = {}
    for r in rows:
        for k, v in r.items():
            if k != "step":
                expected.setdefault(k, []).append((r["step"], v))
    scalars = tensorboard_scalars(logdir)
    assert sorted(scalars) == sorted(expected)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in scalars["eval/accuracy"]] == [8]
    for tag, points in scalars.items():
        np.testing.assert_allclose([v for _, v in points], [v for _, v in expected[tag]], rtol=1e-6, err_msg=tag)

    # As TensorBoard shows it (its Python loader; its Rust data server reads the same records).
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    assert sorted(acc.Tags()["tensors"]) == sorted(expected)
    for tag in expected:
        assert [e.step for e in acc.Tensors(tag)] == [s for s, _ in expected[tag]], tag

    # Nothing lost: the first run's file, whole, as it was before the first resume.
    orphaned = os.path.join(workdir, ORPHANED_TB_DIR)
    kept = sorted(n for n in os.listdir(orphaned) if n != "README.txt")
    assert kept and not any("tfevents" in n for n in kept)
    assert [n for n in kept if n.startswith("resumed-at-4.")] == \
        [f"resumed-at-4.{n.replace('tfevents', 'orphaned-events')}" for n in sorted(first)]
    for n in first:
        assert open(os.path.join(orphaned, f"resumed-at-4.{n.replace('tfevents', 'orphaned-events')}"), "rb").read() \
            == first[n]
    assert not [n for n in kept if n.startswith("resumed-at-8.")], kept  # the finished run was not re-opened
    assert "resumed at step 4" in open(os.path.join(orphaned, "README.txt")).read()


def test_case9_tensorboard_truncation_survives_a_record_cut_short(tmp_path):
    """An event file whose last record a kill cut short: the readable records up to the resumed step are
    kept, the rest (and the broken tail) only in the kept original."""
    import tensorflow as tf

    from seqvis.train.metrics import ORPHANED_TB_DIR, truncate_tensorboard

    logdir = str(tmp_path / "tensorboard")
    w = tf.summary.create_file_writer(logdir)
    with w.as_default():
        for step in range(1, 7):
            tf.summary.scalar("train/loss", float(step), step=step)
    w.close()
    (path,) = [os.path.join(logdir, n) for n in os.listdir(logdir)]
    whole = open(path, "rb").read()
    with open(path, "ab") as f:
        f.write(whole[-40:-5])  # half a record
    truncate_tensorboard(logdir, 3, 10)
    assert tensorboard_scalars(logdir) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0)]}
    (kept,) = [n for n in os.listdir(tmp_path / ORPHANED_TB_DIR) if n != "README.txt"]
    assert open(tmp_path / ORPHANED_TB_DIR / kept, "rb").read() == whole + whole[-40:-5]
    assert truncate_tensorboard(logdir, 3, 10) == []  # nothing more to drop: nothing moves
