"""Kill -9 suite: a training subprocess (the real command line, ``python -m seqvis.main``) is
interrupted several times at moments drawn from a fixed RNG -- Ctrl-C, SIGKILL while a
checkpoint is being written, SIGKILL after a random step, SIGKILL at a random time after
start -- and re-run each time with the same command. Its final train state must be
bit-identical to an uninterrupted run's, metrics.jsonl must hold each step once, and no
unfinished checkpoint directory may be left.

"While a checkpoint is being written" is made certain rather than hoped for: the worker
holds orbax's finalisation of one chosen step (its files are in ``N.orbax-checkpoint-tmp``,
not yet committed) and says so on stderr; the test kills it then.
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

from seqvis.train.trainer import train_and_evaluate



def write_idx(path, array):
    import gzip
    import struct

    magic = {1: 0x00000801, 3: 0x00000803}[array.ndim]
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 16

WORKER = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
hold = int(os.environ.get("SEQVIS_TEST_HOLD_STEP", "0"))
if hold:  # keep step `hold` in its tmp directory (written, not committed) until killed
    from orbax.checkpoint import checkpoint_manager as cm
    real = cm.CheckpointManager._finalize
    def _finalize(self, step, steps_to_remove):
        if step == hold:
            print(f"WRITING {step}", file=sys.stderr, flush=True)
            time.sleep(600)
        return real(self, step, steps_to_remove)
    cm.CheckpointManager._finalize = _finalize
from absl import app
from seqvis import main
app.run(main.main)
"""

OVERRIDES = {
    "model.width": 32, "model.depth": 1, "model.mlp_dim": 64, "model.num_heads": 2,
    "batch_size": 32, "eval_batch_size": 64, "total_steps": TOTAL, "schedule.warmup_steps": 2,
    "checkpoint_every_steps": 2, "keep_checkpoints": 2, "log_every_steps": 1, "async_checkpointing": True,
    "count_flops": False, "tensorboard": False, "data.shuffle_buffer": 256,
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
    def __init__(self, workdir, idx_dir, data_dir, hold=0):
        env = dict(os.environ, PYTHONPATH=ROOT, SEQVIS_TEST_HOLD_STEP=str(hold))
        cache = jax.config.jax_compilation_cache_dir
        if cache:
            env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.idx_dir": idx_dir,
                                                   "data.data_dir": data_dir}.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, f"--config={os.path.join(ROOT, 'configs', 'vit.py')}",
             f"--workdir={workdir}", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.stdout = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

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
        self.proc.send_signal(sig)
        return self.finish()

    def kill(self):
        return self.signal(signal.SIGKILL)

    def finish(self, timeout=180.0):
        rc = self.proc.wait(timeout)
        self.stdout = self.proc.stdout.read()
        self._reader.join(5)
        return rc

    @property
    def stderr(self):
        return "".join(self.lines)


def last_step(workdir):
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def read_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    rng = random.Random(1313)  # the kill moments: reproducible
    idx_dir, data_dir = tmp_path / "idx", str(tmp_path / "tfds")
    idx_dir.mkdir()
    for prefix, n, seed in (("train", 256, 0), ("t10k", 64, 1)):
        r = np.random.default_rng(seed)
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", r.integers(0, 255, (n, 28, 28)))
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", r.integers(0, 10, n))
    idx_dir = str(idx_dir)

    # The uninterrupted run (in this process; it also prepares the data set for the workers).
    ref = str(tmp_path / "ref")
    train_and_evaluate(make_config(idx_dir, data_dir), ref)

    run = str(tmp_path / "run")
    # 1. Ctrl-C after a random step: one line, no traceback.
    w = Worker(run, idx_dir, data_dir)
    k = rng.randint(3, 6)
    w.wait_for(f"step {k}/{TOTAL}")
    assert w.signal(signal.SIGINT) == 130
    resume = last_step(run)
    assert "Traceback" not in w.stderr, w.stderr
    assert f"re-run the same command to resume from step {resume} ({run})." in w.stderr.splitlines()[-1]
    assert w.stderr.splitlines()[-1].startswith("interrupted at step ")

    # 2. SIGKILL while a checkpoint is being written.
    hold = rng.choice([s for s in range(resume + 2, TOTAL - 3, 2)])
    w = Worker(run, idx_dir, data_dir, hold=hold)
    w.wait_for(f"WRITING {hold}")
    w.kill()
    assert any(n.startswith(f"{hold}.orbax-checkpoint-tmp") for n in os.listdir(os.path.join(run, "checkpoints")))
    assert last_step(run) == hold - 2

    # 3. SIGKILL at a random moment after a random step.
    w = Worker(run, idx_dir, data_dir)
    k = rng.randint(hold + 1, TOTAL - 1)
    w.wait_for(f"step {k}/{TOTAL}")
    time.sleep(rng.uniform(0.0, 0.3))
    w.kill()

    # 4. SIGKILL at a random time after start (importing, preparing, compiling or training).
    w = Worker(run, idx_dir, data_dir)
    time.sleep(rng.uniform(0.5, 3.0))
    w.kill()

    # 5. The same command once more, to the end.
    last_before_final = last_step(run)
    w = Worker(run, idx_dir, data_dir)
    assert w.finish() == 0, w.stderr
    assert "test accuracy:" in w.stdout
    # A quiet console: seqvis' own lines only (no absl/TF/orbax log lines, warnings or tracebacks).
    noise = [line for line in w.stderr.splitlines()
             if re.match(r"[IWEF]\d{4} \d\d:\d\d", line) or "Warning" in line or "Traceback" in line
             or line.startswith(("WARNING", "INFO"))]
    assert not noise, w.stderr
    assert f"Resuming from step {last_before_final}" in w.stderr

    a, b = read_state(ref, TOTAL), read_state(run, TOTAL)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb] and la
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, TOTAL + 1))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [TOTAL]
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in n]
