"""Two processes on localhost (jax.distributed, 2 CPU devices each) == one process with 4 devices.

Each step uses the whole (tiny) training split as the global batch, so both setups see the
same examples every step whatever the per-process sharding; with SGD the parameters must
then agree up to float summation order.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from seqvis.interop.pretrained import read_tree as read_checkpoint_params

import childproc
from test_train import toy_split, write_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 64

WORKER = textwrap.dedent("""
    import faulthandler, json, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks on a hang
    from seqvis.data.presets import data_config
    from seqvis.train.defaults import base_config
    from seqvis.trainer import train_and_evaluate
    idx_dir, workdir, coordinator, nproc, pid = sys.argv[1:6]
    c = base_config()
    c.data = data_config("fashion_mnist", idx_dir=idx_dir, data_dir=workdir + "_tfds",
                         pp_train="decode|value_range(-1, 1)", train_split="train")
    c.model = dict(name="vit", variant="mu/7", width=32, depth=1, mlp_dim=64, num_heads=2)
    c.batch_size = %d
    c.eval_batch_size = 16
    c.total_steps = 5
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=0.0)
    c.schedule.update(name="constant", base_lr=0.05, warmup_steps=0)
    c.checkpoint_every_steps = 5
    c.log_every_steps = 5
    c.progress = False
    c.async_checkpointing = False
    if coordinator:
        c.distributed.coordinator_address = coordinator
        c.distributed.num_processes = int(nproc)
        c.distributed.process_id = int(pid)
    r = train_and_evaluate(c, workdir)
    print("RESULT " + json.dumps({"num_examples": r["num_examples"], "loss": r["loss"]}))
""" % N)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f] +
                                [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(out):
    line = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert line, out[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_two_processes_equal_one_process(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, n, seed in (("train", N, 0), ("t10k", 37, 1)):
        images, labels = toy_split(n, seed)
        write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", labels)

    single = childproc.run([sys.executable, "-c", WORKER, str(idx), str(tmp_path / "one"), "", "1", "0"],
                           env=_env(4))
    assert single.returncode == 0, single.stderr[-3000:]

    coordinator = f"localhost:{_free_port()}"
    logs = [(open(tmp_path / f"p{i}.out", "w+"), open(tmp_path / f"p{i}.err", "w+")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(idx), str(tmp_path / "two"), coordinator, "2",
                               str(i)], env=_env(2), stdout=out, stderr=err, text=True)
             for i, (out, err) in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.send_signal(signal.SIGUSR1)
        time.sleep(2 if hung else 0)
        for p in hung:
            p.kill()
    outs = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        outs.append((out.read(), err.read()))
        assert p.returncode == 0, f"process exit {p.returncode}\n" + outs[-1][1][-3000:]

    r1 = _result(single.stdout)
    r2 = [_result(out) for out, _ in outs]
    assert r1["num_examples"] == 37 and all(r["num_examples"] == 37 for r in r2)
    assert r2[0]["loss"] == pytest.approx(r1["loss"], rel=1e-4)
    p1 = read_checkpoint_params(str(tmp_path / "one"))
    p2 = read_checkpoint_params(str(tmp_path / "two"))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
