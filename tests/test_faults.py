"""The faults a user hits, each tried as a user meets it: the message, the exit code and what is left on disk.

Two runs on one workdir; a finished run re-run with fewer steps; plain mistakes on the command line;
a truncated weights file; a negative cache budget; a resume with changed hyper-parameters; SIGTERM (a
preempted VM). And the console: nothing from TensorFlow, absl or oneDNN, in a process whose environment
forces oneDNN on (TensorFlow's default on AVX-512 CPUs; ``TF_ENABLE_ONEDNN_OPTS=1`` turns it on anywhere).

The runs are tiny (a 1-block ViT of width 32 on 256 toy images), from tests/test_reliability.py.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import childproc
from seqvis.cli.config_cli import override_problem
from seqvis.errors import ConfigError, DataError
from seqvis.interop import timm_io
from seqvis.trainer import train_and_evaluate
from seqvis.train.workdir_lock import WorkdirLock
from test_reliability import data_dir, idx_dir, listing, tiny  # noqa: F401 - fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.width=32", "--config.model.depth=1", "--config.model.mlp_dim=64",
         "--config.model.num_heads=2", "--config.batch_size=32", "--config.eval_batch_size=64",
         "--config.schedule.warmup_steps=1", "--config.count_flops=False", "--config.tensorboard=False"]


def cli(args, env=None, **kw):
    """``python -m seqvis.cli.train ARGS`` as a user runs it."""
    env = dict(os.environ if env is None else env, PYTHONPATH=ROOT)
    return childproc.run([sys.executable, "-m", "seqvis.cli.train", f"--config={ROOT}/configs/vit.py", *args],
                         cwd=ROOT, env=env, **kw)


def noise(text):
    """Lines of a console that are not seqvis' own: TensorFlow/absl/oneDNN log lines, warnings, tracebacks."""
    return [line for line in text.splitlines()
            if re.match(r"[IWEF]\d{4} \d\d:\d\d", line) or "absl::InitializeLog" in line or "oneDNN" in line
            or "tensorflow" in line.lower() or "Warning" in line or "Traceback" in line
            or line.startswith(("WARNING", "INFO"))]


# ----------------------------------------------------------------------------- one owner per workdir


HOLDER = textwrap.dedent("""
    import sys, time
    from seqvis.train.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("HELD", flush=True)
    time.sleep(600)
""")


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_owner_blocks_nothing(tmp_path, idx_dir, data_dir):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny(idx_dir, data_dir, total_steps=2), workdir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        before = listing(workdir)
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on host "
                                              rf"{re.escape(socket.gethostname())}, started .*\).*another --workdir"):
            train_and_evaluate(tiny(idx_dir, data_dir, total_steps=4), workdir)
        assert listing(workdir) == before  # nothing of the first run's was touched
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the lock file stays behind
        holder.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))
    results = train_and_evaluate(tiny(idx_dir, data_dir, total_steps=4), workdir)  # the kernel let go of it
    assert results["steps"] == 4
    with open(os.path.join(workdir, ".lock")) as f:
        assert f.read() == ""  # the owner empties it when it lets go


def test_the_lock_is_one_per_process_of_a_multihost_run(tmp_path):
    with WorkdirLock(str(tmp_path), 0), WorkdirLock(str(tmp_path), 1):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path), 1).acquire()
    assert sorted(os.listdir(tmp_path)) == [".lock", ".lock.1"]


# ----------------------------------------------------------------------------- a finished run


def test_a_finished_run_is_not_overwritten_by_a_shorter_one(tmp_path, idx_dir, data_dir):
    workdir = str(tmp_path / "w")
    first = train_and_evaluate(tiny(idx_dir, data_dir, total_steps=6), workdir)
    before = listing(workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = f.read()
    with pytest.raises(ConfigError, match=r"trained to step 6, past config.total_steps=3: .*raise "
                                          r"config.total_steps.*new --workdir"):
        train_and_evaluate(tiny(idx_dir, data_dir, total_steps=3), workdir)
    # The same command again: already done, its results as they were, nothing written.
    again = train_and_evaluate(tiny(idx_dir, data_dir, total_steps=6), workdir)
    assert again == json.loads(saved) and again["accuracy"] == first["accuracy"]
    assert listing(workdir) == before
    with open(os.path.join(workdir, "results.json")) as f:
        assert f.read() == saved


# ----------------------------------------------------------------------------- the command line


def test_plain_mistakes_on_the_command_line_get_one_line(tmp_path):
    cases = {
        ("--config.modle.depth=1",): "error: --config.modle.depth=1: the config has no field 'modle' (did you mean "
                                     "'model'?)",
        ("--config.model.patch_sise=4",): "error: --config.model.patch_sise=4: config.model has no field "
                                          "'patch_sise' (did you mean 'model.patch_size'?)",
        ("--config.model.depth=two",): "error: --config.model.depth=two: config.model.depth is a whole number",
    }
    for args, first_line in cases.items():
        out = cli([f"--workdir={tmp_path / 'w'}", *args], timeout=120)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(first_line), out.stderr
    assert not os.path.exists(tmp_path / "w")
    # The workdir is an existing file.
    (tmp_path / "f").write_text("keep me")
    out = cli([f"--workdir={tmp_path / 'f'}", "--config.total_steps=2", *SMALL], timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"--workdir={tmp_path / 'f'} is an existing file, not a directory" in out.stderr
    assert (tmp_path / "f").read_text() == "keep me"


def test_a_catalogue_set_that_is_not_prepared_is_one_line_on_the_captioning_path(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = childproc.run([sys.executable, "-m", "seqvis.cli.train", f"--config={ROOT}/configs/captioning.py:show_attend_tell,coco",
                         f"--config.data.data_dir={tmp_path / 'missing'}", f"--workdir={tmp_path / 'w'}"],
                        cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("error: Dataset 'coco_captions' is not prepared in") and "tfds build coco_captions" in first


def test_the_planner_names_a_bad_override_in_one_line():
    out = childproc.run([sys.executable, "-m", "experiments.plan", "--config=configs/vit.py", "--devices=1",
                         "--accelerator=tpu_v3", "--config.modle.depth=1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--config.modle.depth=1: the config has no field 'modle' (did you mean 'model'?)" \
        in lines[0], out.stderr


def test_the_patch_size_is_a_field_of_the_vit_config():
    import importlib.util

    from seqvis.tasks.classification import build_classifier

    spec = importlib.util.spec_from_file_location("vit_config", os.path.join(ROOT, "configs", "vit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert build_classifier(c.model, 10).patch_size == (7, 7)  # unset: the variant's (s/7)
    c.model.patch_size = 4
    assert build_classifier(c.model, 10).patch_size == (4, 4)
    assert override_problem(c, "model.patch_size", "4") is None


# ----------------------------------------------------------------------------- inputs that cannot work


def test_a_truncated_safetensors_file_is_named_and_leaves_no_checkpoints(tmp_path, idx_dir, data_dir):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "vit.safetensors")
    timm_io.write_safetensors(path, {"patch_embed.proj.weight": rng.normal(size=(32, 1, 7, 7)).astype(np.float32),
                                     "cls_token": rng.normal(size=(1, 1, 32)).astype(np.float32)})
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:-100])  # a copy that stopped early
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=rf"{re.escape(path)} is truncated: its header describes \d+ bytes of "
                                         r"tensor data but the file holds \d+"):
        train_and_evaluate(tiny(idx_dir, data_dir, init_from=path), str(workdir))
    assert not os.path.exists(workdir / "checkpoints")


def test_a_negative_cache_budget_is_refused(tmp_path, idx_dir, data_dir):
    c = tiny(idx_dir, data_dir)
    c.data.cache_max_gb = -1.0
    with pytest.raises(DataError, match=r"config.data.cache_max_gb=-1.0 must be a size in GiB >= 0"):
        train_and_evaluate(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_resuming_with_changed_hyperparameters_says_what_changed(tmp_path, idx_dir, data_dir, caplog):
    workdir = str(tmp_path / "w")
    train_and_evaluate(tiny(idx_dir, data_dir, total_steps=4), workdir, stop_at_step=3)  # saved at step 2
    c = tiny(idx_dir, data_dir, total_steps=4, label_smoothing=0.1)
    c.schedule.base_lr = 1e-3
    with caplog.at_level(logging.WARNING, logger="seqvis"):
        train_and_evaluate(c, workdir)
    text = caplog.text
    assert "Resuming from step 2 with a changed config" in text
    assert "config.label_smoothing: 0.0 -> 0.1" in text and "config.schedule.base_lr: 0.003 -> 0.001" in text
    assert "config.model" not in text and "config.total_steps" not in text  # only what changed


# ----------------------------------------------------------------------------- SIGTERM and the console


def test_sigterm_saves_the_current_step_and_the_console_stays_quiet_with_onednn_on(tmp_path, idx_dir):
    """A preempted VM: SIGTERM mid-run saves that step and exits 143 with one line; the re-run resumes there.

    Both runs have TF_ENABLE_ONEDNN_OPTS=1, and the first prepares its data set (tfds prints to stdout there)."""
    workdir, data = str(tmp_path / "w"), str(tmp_path / "tfds")
    args = [f"--workdir={workdir}", f"--config.data.idx_dir={idx_dir}", f"--config.data.data_dir={data}",
            "--config.total_steps=40", "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1",
            "--config.data.pp_train=decode|value_range(-1, 1)", *SMALL]
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", PYTHONPATH=ROOT, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-m", "seqvis.cli.train", f"--config={ROOT}/configs/vit.py", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    timer = threading.Timer(400, proc.kill)  # never hang the suite
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate()
    finally:
        timer.cancel()
    err = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"SIGTERM at step (\d+): saved a checkpoint at step \1; re-run the same command to resume "
                     rf"\({re.escape(workdir)}\)\.", last)
    assert m, err
    step = int(m.group(1))
    assert 3 <= step < 40 and os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
    assert not noise(err), err
    assert out == ""  # tfds' "Downloading and preparing ..." lines do not reach stdout
    assert "Preparing data set fashion_mnist_idx" in err

    again = cli(args, env=env, timeout=400)  # the same command
    assert again.returncode == 0, again.stderr
    assert f"Resuming from step {step}" in again.stderr
    assert not noise(again.stderr), again.stderr
    assert [line.split(":")[0] for line in again.stdout.strip().splitlines()[-1:]] == ["test accuracy"]


FAKE_TF = textwrap.dedent("""
    import os
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1796298274.614423    8264 port.cc:153] oneDNN custom operations are on.\\n")
    os.write(2, b"E0000 00:00:1796298274.7 12 real_error.cc:1] kept: an error\\n")
    os.write(2, b"something else a library printed\\n")
""")


def test_tensorflow_start_up_notices_are_dropped_and_everything_else_is_kept(tmp_path):
    """The filter around TensorFlow's import, on a stand-in module: the same on any CPU."""
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TF)
    code = "from seqvis.cli import console; console.import_tensorflow(False); print('imported')"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    out = childproc.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr
    assert out.stderr.splitlines() == ["E0000 00:00:1796298274.7 12 real_error.cc:1] kept: an error",
                                       "something else a library printed"]
    verbose = childproc.run([sys.executable, "-c", code.replace("(False)", "(True)")], cwd=ROOT, env=env,
                            timeout=120)
    assert len(verbose.stderr.splitlines()) == 4  # --verbose hides nothing
