"""Kill -9 suite: a training subprocess (the real command line: seqvis.cli.train's ``main`` under
``absl.app.run``) is interrupted at moments drawn from a fixed RNG -- Ctrl-C after a random step;
SIGKILL while a checkpoint is being written, after a random step; SIGKILL at a random time after it
starts (restoring, cleaning up, preparing, compiling or training) -- and re-run each time with the
same command; the last re-run, to the end, is in-process. The final train state must be bit-identical
to an uninterrupted run's, metrics.jsonl and the TensorBoard files must hold each step once, and no
unfinished checkpoint directory may be left.

"While a checkpoint is being written" is made certain rather than hoped for: the worker
holds orbax's commit of one chosen step (its files are in ``N.orbax-checkpoint-tmp``, not yet
renamed to ``N``) and says so on stderr; training goes on meanwhile (the write is
asynchronous) and the test kills it a random step later.

Speed (the test is start-up bound: importing TensorFlow, jax, flax and orbax is ~13 s of a ~20 s
run): the workers are started together at the beginning, import what the command imports (console
set up first, as ``main`` does) and wait on stdin; the test lets each one go in turn. Their imports
overlap each other and the in-process reference run; nothing touches the workdir before the go.
"""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from seqvis.trainer import train_and_evaluate

from test_train import write_idx


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 16

WORKER = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
from seqvis.cli import console, train as main  # noqa: F401 - main: what the command imports first
console.setup(False)  # what main() does first, then the imports it defers
import seqvis.trainer, seqvis.data.pipeline, tensorflow, tensorflow_datasets  # noqa: E401
print("READY", file=sys.stderr, flush=True)
go = sys.stdin.readline()  # the test's go: "HOLD PAUSE" (steps, 0 = none)
if not go:  # the test ended without letting this one go
    sys.exit(0)
hold, pause = map(int, go.split())
if pause:  # wait after step `pause` is reported, so the Ctrl-C lands mid-run however loaded the machine is
    from seqvis.train import metrics
    real_update = metrics.Progress.update
    def update(self, step, info):
        real_update(self, step, info)
        if step == pause:
            print(f"PAUSED {step}", file=sys.stderr, flush=True)
            for _ in range(6000):  # short sleeps: a SIGINT that lands on another thread does not cut a long
                time.sleep(0.1)    # sleep of this one short, and Python runs its handler only between them
    metrics.Progress.update = update
if hold:  # keep step `hold` in its tmp directory (written, not committed) until killed
    # Held at the commit itself (the rename of N.orbax-checkpoint-tmp* to N, in orbax's async thread).
    # Holding CheckpointManager._finalize instead did not hold the rename, which runs beside it: one
    # fresh-clone run found step `hold` already committed when it looked.
    from orbax.checkpoint._src.checkpointers import async_checkpointer as ac
    real = ac._on_commit_callback
    def _on_commit_callback(tmpdir, *args, **kwargs):
        if os.path.basename(str(tmpdir.get_final())) == str(hold):
            print(f"WRITING {hold}", file=sys.stderr, flush=True)
            time.sleep(600)
        return real(tmpdir, *args, **kwargs)
    ac._on_commit_callback = _on_commit_callback
from absl import app
app.run(main.main)
"""

OVERRIDES = {
    "model.width": 32, "model.depth": 1, "model.mlp_dim": 64, "model.num_heads": 2,
    "batch_size": 32, "eval_batch_size": 64, "total_steps": TOTAL, "schedule.warmup_steps": 2,
    "checkpoint_every_steps": 2, "keep_checkpoints": 2, "log_every_steps": 1, "async_checkpointing": True,
    "count_flops": False, "tensorboard": True, "data.shuffle_buffer": 256,
    "data.pp_train": "decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)",  # the stream position matters
}


def make_config(idx_dir, data_dir):
    spec = importlib.util.spec_from_file_location("vit_config", os.path.join(ROOT, "configs", "vit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for k, v in {**OVERRIDES, "data.idx_dir": idx_dir, "data.data_dir": data_dir}.items():
        parent, _, leaf = k.rpartition(".")
        (c[parent] if parent else c)[leaf] = v
    return c


class Worker:
    """A standby command line: started at once, it imports and waits for :meth:`go`."""

    def __init__(self, workdir, idx_dir, data_dir):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONFAULTHANDLER="1")  # SIGABRT prints its stacks
        cache = jax.config.jax_compilation_cache_dir
        if cache:
            env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.idx_dir": idx_dir,
                                                   "data.data_dir": data_dir}.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, f"--config={os.path.join(ROOT, 'configs', 'vit.py')}",
             f"--workdir={workdir}", *args],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def go(self, hold=0, pause=0):
        """Run the command (once imported); ``hold``: the step whose checkpoint write never completes;
        ``pause``: the step after which the training loop waits (for the test's signal)."""
        self.wait_for("READY")
        self.proc.stdin.write(f"{hold} {pause}\n")
        self.proc.stdin.close()

    def wait_for(self, text, timeout=120.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(text in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"worker never printed {text!r}; stderr:\n{''.join(self.lines)}")

    def signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.finish()

    def kill(self):
        return self.signal(signal.SIGKILL)

    def finish(self, timeout=180.0):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack on stderr
            self.proc.wait(30)
            self._reader.join(5)
            raise AssertionError(f"the command did not end {timeout:.0f} s after the signal; its stderr:\n"
                                 + "".join(self.lines)[-8000:]) from None
        self.stdout = self.proc.stdout.read()
        self._reader.join(5)
        return rc

    @property
    def stderr(self):
        return "".join(line for line in self.lines if line != "READY\n")

    def assert_quiet(self):
        """seqvis' own lines only (no absl/TF/orbax log lines, warnings or tracebacks)."""
        noise = [line for line in self.stderr.splitlines()
                 if re.match(r"[IWEF]\d{4} \d\d:\d\d", line) or "Warning" in line or "Traceback" in line
                 or line.startswith(("WARNING", "INFO"))]
        assert not noise, self.stderr


def last_step(workdir):
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def read_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def tensorboard_steps(logdir):
    """``{tag: [step, ...]}`` over every event file under ``logdir``, in reading order."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out = {}
    for path in sorted(os.path.join(d, n) for d, _, names in os.walk(logdir) for n in names if "tfevents" in n):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            for v in event.summary.value:
                out.setdefault(v.tag, []).append(int(event.step))
    return out


def test_killed_and_resumed_run_is_bit_identical(tmp_path, caplog):
    rng = random.Random(1313)  # the kill moments: reproducible
    idx_dir, data_dir = tmp_path / "idx", str(tmp_path / "tfds")
    idx_dir.mkdir()
    for prefix, n, seed in (("train", 256, 0), ("t10k", 64, 1)):
        r = np.random.default_rng(seed)
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", r.integers(0, 255, (n, 28, 28)))
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", r.integers(0, 10, n))
    idx_dir = str(idx_dir)
    run = str(tmp_path / "run")
    workers = [Worker(run, idx_dir, data_dir) for _ in range(3)]  # importing while the reference trains
    try:
        # The uninterrupted run (in this process; it also prepares the data set for the workers).
        ref = str(tmp_path / "ref")
        train_and_evaluate(make_config(idx_dir, data_dir), ref)

        # 1. Ctrl-C after a random step: one line, no traceback. The command waits after step k: a fresh-clone
        # run on a loaded machine once saw the whole run finish (exit 0) before the signal arrived.
        w = workers[0]
        k = rng.randint(3, 6)
        w.go(pause=k)
        w.wait_for(f"PAUSED {k}")
        rc = w.signal(signal.SIGINT)
        assert rc == 130, f"exit code {rc}; the command's stderr:\n{w.stderr}"
        resume = last_step(run)
        assert "Traceback" not in w.stderr, w.stderr
        assert f"re-run the same command to resume from step {resume} ({run})." in w.stderr.splitlines()[-1]
        assert w.stderr.splitlines()[-1].startswith("interrupted at step ")
        w.assert_quiet()

        # 2. SIGKILL while a checkpoint is being written, a random step after the write started (training
        # goes on while it is written, until the next save waits for it).
        hold = rng.choice([s for s in range(resume + 2, TOTAL - 3, 2)])
        w = workers[1]
        w.go(hold)
        w.wait_for(f"WRITING {hold}")
        w.wait_for(f"step {rng.choice([hold + 1, hold + 2])}/{TOTAL}")
        w.kill()
        assert any(n.startswith(f"{hold}.orbax-checkpoint-tmp") for n in os.listdir(os.path.join(run, "checkpoints")))
        assert last_step(run) == hold - 2
        assert f"Resuming from step {resume}" in w.stderr
        w.assert_quiet()

        # 3. SIGKILL at a random time after the command starts (restoring and cleaning up, preparing the
        # input, compiling or training).
        w = workers[2]
        w.go()
        time.sleep(rng.uniform(0.0, 4.0))
        w.kill()
        w.assert_quiet()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill()

    # 4. The same run once more, to the end (in this process).
    last_before_final = last_step(run)
    with caplog.at_level("INFO", logger="seqvis"):
        results = train_and_evaluate(make_config(idx_dir, data_dir), run)
    assert f"Resuming from step {last_before_final}" in caplog.text
    assert results["steps"] == TOTAL

    a, b = read_state(ref, TOTAL), read_state(run, TOTAL)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb] and la
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [TOTAL]
    tb = tensorboard_steps(os.path.join(run, "tensorboard"))
    assert tb["train/loss"] == list(range(1, TOTAL + 1)) and tb["eval/accuracy"] == [TOTAL], tb
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in n]
