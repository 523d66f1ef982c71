"""seqvis against timm / torch.nn on the same CPU, measured side by side in one run.

    python -m experiments.benchmark --compare --peer_python=PEER_VENV/bin/python
    python -m experiments.benchmark --compare --workloads=lstm_train,gru_train --repeats=5

Each workload is built twice from one dict of shapes (``WORKLOADS``): in this process with
seqvis (the real training step for the ViTs: ``PmapDriver`` + the config's AdamW and clipping;
``Recurrent(LSTMCell | GRUCell)`` + Adam for the recurrent rows; the captioning decoders
``ShowAndTell`` / ``TransformerCaptioner`` of ``seqvis.models.captioning`` + Adam for the
``caption_*`` rows), and in a child process of the peer interpreter with timm
``VisionTransformer`` / ``torch.nn.LSTM | GRU`` / ``nn.Embedding`` + ``nn.LSTM`` or
``nn.TransformerDecoder`` + ``nn.Linear`` (``experiments/compare_peer.py``; torch is never
imported here and never a seqvis dependency). After compile / warm-up, the two sides take
turns: one timed run of ``steps`` steps each per round, the order flipping every round, so
load drift hits both alike; only one side computes at any moment. The reported figure is the
median over ``repeats`` rounds.

Output: one JSON line per workload (``seqvis`` and ``peer`` in items/s, ``ratio`` =
seqvis / peer, the runs, XLA's FLOPs per step and each side's fraction of the machine's
float32 matmul peak), then one summary line ``{"machine": ..., "rows": [...]}``; a markdown
table goes to stderr. The peak is a jitted ``jnp.dot`` of two 2048x2048 float32 matrices
(median of 5), measured in the same run. FLOPs per step are XLA's cost analysis of the
compiled seqvis step, with the iterations XLA leaves out of a scan added back
(``seqvis.evaluation.flops``); the peer is credited with the same count (same shapes).

The ``caption_*`` rows time the teacher-forced training step of a captioning decoder alone:
the image encoder is replaced by its output (precomputed image features ``[B, h, w, D]``,
passed through unchanged), so no CNN is measured; the step is image projection, word
embedding, decoder, vocabulary projection, mean cross-entropy over the ``B x T`` target
words, Adam. Every row also carries both sides' numbers of trained parameters
(``seqvis_params``, ``peer_params``).

Without a usable peer interpreter (missing, or torch not importable) the run says so on
stderr and reports the seqvis numbers alone (``peer``/``ratio`` null, ``peer_error`` set).
Timings are only meaningful on an otherwise idle machine.

Over 400 lines on purpose: each workload's seqvis side sits next to its shapes, which the peer script
mirrors; splitting them would separate a workload from its definition.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_peer.py")

_VIT_DEFAULT = dict(kind="vit", config="", image_shape=[28, 28, 1], patch=7, width=128, depth=2, heads=4,
                    mlp_dim=256, num_classes=10, batch=128, weight_decay=0.05, grad_clip_norm=1.0)
_VIT_TI4 = dict(kind="vit", config="Ti/4,cifar10", image_shape=[32, 32, 3], patch=4, width=192, depth=12,
                heads=3, mlp_dim=768, num_classes=10, batch=64, weight_decay=0.05, grad_clip_norm=1.0)
_VIT_S16 = dict(kind="vit", config="S/16,imagenet2012", image_shape=[224, 224, 3], patch=16, width=384,
                depth=12, heads=6, mlp_dim=1536, num_classes=1000, batch=8, weight_decay=0.05, grad_clip_norm=1.0)
_RNN = dict(kind="rnn", batch=64, T=50, **{"in": 128}, hidden=256)
# Captioning decoders at the model classes' default sizes; ``features`` = the encoder output
# [h, w, D] per image (a pooled 512-d vector for Show and Tell, 7x7 regions for the transformer).
_CAPTION = dict(kind="caption", batch=32, T=20, vocab=5000)

#: name -> shapes; ``steps`` per timed run is sized for ~2-4 s on a 2-core CPU.
WORKLOADS: dict[str, dict] = {
    "vit_default_train": dict(_VIT_DEFAULT, mode="train", steps=20),
    "vit_default_inference": dict(_VIT_DEFAULT, mode="inference", steps=100),
    "vit_ti4_32_train": dict(_VIT_TI4, mode="train", steps=3),
    "vit_ti4_32_inference": dict(_VIT_TI4, mode="inference", steps=10),
    "vit_s16_224_train": dict(_VIT_S16, mode="train", steps=2),
    "vit_s16_224_inference": dict(_VIT_S16, mode="inference", steps=5),
    "lstm_train": dict(_RNN, cell="lstm", mode="train", steps=30),
    "gru_train": dict(_RNN, cell="gru", mode="train", steps=30),
    "caption_lstm_train": dict(_CAPTION, decoder="lstm", features=[1, 1, 512], embed=256, hidden=512,
                               mode="train", steps=10),
    "caption_transformer_train": dict(_CAPTION, decoder="transformer", features=[7, 7, 512], width=256,
                                      layers=2, heads=4, mlp_dim=512, mode="train", steps=15),
}


def workload(name: str) -> dict:
    if name not in WORKLOADS:
        raise SystemExit(f"--workloads: unknown {name!r}; valid: {', '.join(WORKLOADS)}")
    return dict(WORKLOADS[name], name=name)


def unit(w: dict) -> str:
    return "img/s" if w["kind"] == "vit" else "seq/s"


# ----------------------------------------------------------------------------- the peer process


class PeerError(RuntimeError):
    pass


class PeerClient:
    """The peer interpreter as a child process speaking JSON lines (see ``compare_peer.py``)."""

    def __init__(self, python: str, script: str = PEER_SCRIPT):
        if not python:
            raise PeerError("no peer interpreter given (--peer_python)")
        try:
            self.proc = subprocess.Popen([python, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)
        except OSError as e:
            raise PeerError(f"cannot start the peer interpreter {python!r}: {e}") from e
        self.python = python
        try:
            self.info = self.request({"cmd": "info"})
        except PeerError:
            self.close()
            raise

    def request(self, req: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as e:
            raise PeerError(f"peer process {self.python!r} is gone: {e}") from e
        if not line:
            raise PeerError(f"peer process {self.python!r} exited (code {self.proc.poll()}); see its stderr above. "
                            "Is torch importable there? Install the peers in their own venv and pass --peer_python.")
        resp = json.loads(line)
        if "error" in resp:
            raise PeerError(resp["error"])
        return resp

    def setup(self, w: dict) -> dict:
        return self.request({"cmd": "setup", "workload": w})

    def run(self, w: dict, steps: int) -> float:
        return float(self.request({"cmd": "run", "name": w["name"], "steps": steps})["seconds"])

    def drop(self, w: dict) -> None:
        self.request({"cmd": "drop", "name": w["name"]})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- the comparison


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def compare_workload(w: dict, seqvis_runner: Any, peer: PeerClient | None, repeats: int,
                     peak_flops: float | None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Alternate timed runs of one workload; ``seqvis_runner.run(steps) -> seconds``."""
    steps, batch = int(w["steps"]), int(w["batch"])
    row = {"workload": w["name"], "mode": w["mode"], "unit": unit(w), "batch": batch, "steps_per_run": steps}
    peer_error, peer_params = None, None
    if peer is not None:
        try:
            peer_params = peer.setup(w).get("params")
        except PeerError as e:
            peer_error = str(e)
            log(f"{w['name']}: peer skipped: {e}")
            peer = None
    seqvis_runs: list[float] = []
    peer_runs: list[float] = []
    for r in range(repeats):
        order = ("seqvis", "peer") if r % 2 == 0 else ("peer", "seqvis")
        for side in order:
            if side == "seqvis":
                seqvis_runs.append(steps * batch / seqvis_runner.run(steps))
            elif peer is not None:
                try:
                    peer_runs.append(steps * batch / peer.run(w, steps))
                except PeerError as e:
                    peer_error, peer, peer_runs = str(e), None, []
    if peer is not None:
        try:
            peer.drop(w)
        except PeerError:
            pass
    s, p = _median(seqvis_runs), _median(peer_runs)
    flops = getattr(seqvis_runner, "flops_per_step", None)
    row.update(seqvis=s, peer=p, ratio=(s / p) if s and p else None,
               seqvis_runs=seqvis_runs, peer_runs=peer_runs,
               compile_seconds=getattr(seqvis_runner, "compile_seconds", None),
               seqvis_params=getattr(seqvis_runner, "params", None), peer_params=peer_params,
               gflops_per_step=None if flops is None else flops / 1e9)
    for side, v in (("seqvis", s), ("peer", p)):
        row[f"{side}_gflops_per_sec"] = None if (flops is None or not v) else flops * v / batch / 1e9
        row[f"{side}_fraction_of_peak"] = (None if (flops is None or not v or not peak_flops)
                                           else flops * v / batch / peak_flops)
    if peer_error:
        row["peer_error"] = peer_error
    return row


def markdown_table(rows: list[dict], machine: dict) -> str:
    peer_name = "peer"
    info = machine.get("peer") or {}
    lines = ["| workload | seqvis | " + peer_name + " | ratio | seqvis % of peak | peer % of peak |",
             "|---|---|---|---|---|---|"]

    def num(x, fmt="{:,.0f}"):
        return "-" if x is None else (fmt.format(x) if x >= 100 else f"{x:.1f}")

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    for r in rows:
        lines.append(f"| {r['workload']} ({r['unit']}) | {num(r['seqvis'])} | {num(r['peer'])} | "
                     f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f')} | "
                     f"{pct(r['seqvis_fraction_of_peak'])} | {pct(r['peer_fraction_of_peak'])} |")
    peak = machine.get("matmul_gflops_float32")
    lines.append(f"\nfloat32 matmul peak (jnp.dot 2048^2): {peak:.0f} GFLOP/s" if peak else "")
    if info:
        lines.append(f"peer: torch {info.get('torch')}, timm {info.get('timm')}, "
                     f"{info.get('torch_threads')} threads, torch.mm peak {info.get('matmul_gflops_float32', 0):.0f} GFLOP/s")
    return "\n".join(lines)


def run(names: list[str], make_seqvis: Callable[[dict], Any], peer_python: str | None, repeats: int,
        peak_flops: float | None, machine: dict, out=sys.stdout, err=sys.stderr, peer_script: str = PEER_SCRIPT,
        steps_scale: float = 1.0) -> dict:
    """The whole comparison: one JSON line per workload on ``out``, then the summary line."""

    def log(msg):
        print(msg, file=err, flush=True)

    peer = None
    machine = dict(machine, matmul_gflops_float32=None if peak_flops is None else peak_flops / 1e9)
    try:
        peer = PeerClient(peer_python, peer_script)
        machine["peer"] = peer.info
        machine["peer_python"] = peer_python
    except PeerError as e:
        machine["peer_error"] = str(e)
        log(f"--compare: no peer ({e}); reporting seqvis alone. Install torch/timm in a separate venv "
            "(python3 -m venv PEER_VENV && PEER_VENV/bin/pip install torch torchvision timm) "
            "and pass --peer_python=PEER_VENV/bin/python (or set SEQVIS_PEER_PYTHON).")
    rows = []
    try:
        for name in names:
            w = workload(name)
            w["steps"] = max(1, round(w["steps"] * steps_scale))
            log(f"{name}: building seqvis step ...")
            runner = make_seqvis(w)
            row = compare_workload(w, runner, peer, repeats, peak_flops, log)
            del runner
            rows.append(row)
            print(json.dumps(row), file=out, flush=True)
    finally:
        if peer is not None:
            peer.close()
    summary = {"machine": machine, "repeats": repeats, "rows": rows}
    print(json.dumps(summary), file=out, flush=True)
    log(markdown_table(rows, machine))
    return summary


# ----------------------------------------------------------------------------- the seqvis side


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine: a jitted ``jnp.dot``, median of ``reps``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


class _Timed:
    """``run(steps) -> seconds`` around a compiled step; threads the state for training."""

    def __init__(self, compiled, state, args, train: bool):
        self.compiled, self.state, self.args, self.train = compiled, state, args, train

    def run(self, steps: int) -> float:
        import jax

        t = time.perf_counter()
        if self.train:
            s = self.state
            for _ in range(steps):
                s, _ = self.compiled(s, *self.args)
            jax.block_until_ready(s)
            self.state = s
        else:
            for _ in range(steps):
                out = self.compiled(*self.args)
            jax.block_until_ready(out)
        return time.perf_counter() - t


def _vit_runner(w: dict):
    import jax
    import numpy as np

    from seqvis.cli.config_cli import load_config
    from seqvis.evaluation.flops import compiled_flops
    from seqvis.models.common import num_params
    from seqvis.train import optim, step as step_lib
    from seqvis.tasks.base import get_task

    config = load_config(os.path.join(REPO, "configs", "vit.py") + (f":{w['config']}" if w["config"] else ""))
    config.batch_size = w["batch"]
    config.model.update(w.get("model_overrides", {}))  # e.g. {"use_fused_attention": True} for an A/B
    assert list(config.data.image_shape) == list(w["image_shape"]), (config.data.image_shape, w)
    if not w["config"]:  # the default job's model: the peer builds these dimensions, so they must agree
        got = {k: config.model[f] for k, f in (("width", "width"), ("depth", "depth"), ("heads", "num_heads"),
                                               ("mlp_dim", "mlp_dim"))}
        want = {k: w[k] for k in got}
        assert got == want, f"configs/vit.py's default model {got} differs from the workload's {want}"
    task = get_task(config)
    sched = optim.make_schedule(config.schedule, 10 * max(config.schedule.warmup_steps, 1) + 10)
    tx = optim.make_optimizer(config.optimizer, sched)
    n_dev = jax.local_device_count()
    per_dev = w["batch"] // n_dev
    state = jax.device_get(step_lib.create_state(task, tx, 0, task.dummy_batch(per_dev)))
    rng = np.random.default_rng(0)
    h, wd, c = w["image_shape"]
    images = rng.normal(size=(n_dev, per_dev, h, wd, c)).astype(np.float32)
    t = time.perf_counter()
    driver = step_lib.PmapDriver(step_lib.make_train_step(task, tx, sched), step_lib.make_eval_step(task))
    if w["mode"] == "train":
        data = driver.put_batch({"image": images,
                                 "label": rng.integers(0, w["num_classes"], (n_dev, per_dev)).astype(np.int32),
                                 "mask": np.ones((n_dev, per_dev), np.float32)})
        s = driver.put_state(state)
        fn, args = driver._train, (data,)
        compiled = fn.lower(s, *args).compile()
        flops = compiled_flops(compiled, fn, s, *args)
        runner = _Timed(compiled, s, args, train=True)
    else:
        fn = jax.pmap(lambda v, x: task.model.apply(v, x, train=False))
        variables = step_lib.replicate({"params": state.params, **state.model_state}, jax.local_devices())
        args = (variables, driver.put_batch({"image": images})["image"])
        compiled = fn.lower(*args).compile()
        flops = compiled_flops(compiled, fn, *args)
        runner = _Timed(compiled, None, args, train=False)
    runner.run(2)  # warm-up
    runner.compile_seconds = time.perf_counter() - t
    runner.flops_per_step = flops
    runner.params = num_params(state.params)
    return runner


def rnn_train_step(cell: str, hidden: int, lr: float = 1e-3, unroll: int = 1):
    """``(model, tx, step)``: ``Recurrent(cell)`` trained with Adam on ``mean(outputs ** 2)``."""
    import jax
    import optax

    from seqvis.models import recurrent as rec

    model = rec.Recurrent(rec.make_cell(cell, hidden), unroll=unroll)
    tx = optax.adam(lr)

    def loss_fn(params, x):
        y, _ = model.apply({"params": params}, x)
        return (y ** 2).mean()

    def step(state, x):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return model, tx, step


def _rnn_runner(w: dict):
    import jax
    import numpy as np

    from seqvis.evaluation.flops import compiled_flops
    from seqvis.models.common import num_params

    model, tx, step = rnn_train_step(w["cell"], w["hidden"], unroll=w.get("unroll", 1))
    x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(w["batch"], w["T"], w["in"])).astype(np.float32))
    params = model.init(jax.random.key(0), x)["params"]
    state = (params, tx.init(params))
    n_params = num_params(params)  # before the step donates them
    t = time.perf_counter()
    fn = jax.jit(step, donate_argnums=0)
    compiled = fn.lower(state, x).compile()
    flops = compiled_flops(compiled, fn, state, x)
    runner = _Timed(compiled, state, (x,), train=True)
    runner.run(2)
    runner.compile_seconds = time.perf_counter() - t
    runner.flops_per_step = flops
    runner.params = n_params
    return runner


def caption_model(w: dict):
    """The seqvis captioning model of a ``caption_*`` workload, its image encoder replaced by
    precomputed features: ``ShowAndTell`` (``decoder='lstm'``, mean pooling of the features) or
    ``TransformerCaptioner`` (``decoder='transformer'``, ``max_positions = T``); no dropout."""
    import flax.linen as nn

    from seqvis.models import captioning

    class PrecomputedFeatures(nn.Module):
        """Stands in for the CNN: its input already is the feature map ``[B, h, w, D]``."""

        @nn.compact
        def __call__(self, features, train: bool = False):
            return features

    if w["decoder"] == "lstm":
        return captioning.ShowAndTell(PrecomputedFeatures(), vocab_size=w["vocab"], embed_dim=w["embed"],
                                      hidden_dim=w["hidden"], pooling="mean")
    return captioning.TransformerCaptioner(PrecomputedFeatures(), vocab_size=w["vocab"], max_positions=w["T"],
                                           width=w["width"], num_layers=w["layers"], num_heads=w["heads"],
                                           mlp_dim=w["mlp_dim"])


def caption_train_step(model, lr: float = 1e-3):
    """``(tx, step)``: teacher forcing, mean cross-entropy over every target word, Adam.
    ``step((params, opt_state), features, inputs, targets) -> (state, loss)``."""
    import jax
    import optax

    tx = optax.adam(lr)

    def loss_fn(params, features, inputs, targets):
        # dropout_rate is 0, so train=False is the same computation (and needs no dropout rng)
        logits, _ = model.apply({"params": params}, features, inputs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(state, features, inputs, targets):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, features, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return tx, step


def _caption_runner(w: dict):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqvis.evaluation.flops import compiled_flops
    from seqvis.models.common import num_params

    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(w["batch"], *w["features"])).astype(np.float32))
    tokens = rng.integers(0, w["vocab"], (w["batch"], w["T"] + 1)).astype(np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])  # <bos> y_1 .. -> y_1 .. <eos>
    model = caption_model(w)
    tx, step = caption_train_step(model)
    params = model.init(jax.random.key(0), features, inputs)["params"]
    state = (params, tx.init(params))
    n_params = num_params(params)  # before the step donates them
    t = time.perf_counter()
    fn = jax.jit(step, donate_argnums=0)
    args = (features, inputs, targets)
    compiled = fn.lower(state, *args).compile()
    flops = compiled_flops(compiled, fn, state, *args)
    runner = _Timed(compiled, state, args, train=True)
    runner.run(2)
    runner.compile_seconds = time.perf_counter() - t
    runner.flops_per_step = flops
    runner.params = n_params
    return runner


def seqvis_runner(w: dict):
    return {"vit": _vit_runner, "rnn": _rnn_runner, "caption": _caption_runner}[w["kind"]](w)


def machine_info() -> dict:
    import platform

    import jax

    return {"backend": jax.default_backend(), "devices": jax.local_device_count(), "jax": jax.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(names: list[str], peer_python: str | None, repeats: int = 3, steps_scale: float = 1.0) -> dict:
    peak = matmul_peak_flops()
    return run(names, seqvis_runner, peer_python, repeats, peak, machine_info(), steps_scale=steps_scale)
