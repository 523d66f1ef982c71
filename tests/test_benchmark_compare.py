"""The --compare harness of experiments.benchmark without torch: a fake peer process speaking the
JSON-lines protocol, fake seqvis runners, medians, ratios, alternation, JSON shape, and the
seqvis-only fallback when the peer is missing or fails. The captioning decoder workloads are
also built for real at tiny shapes: the seqvis step (jax), and the torch peer when a peer
interpreter is named by ``SEQVIS_PEER_PYTHON`` (else skipped),
both checked against the parameter count the shapes imply."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import compare

# Seconds per step of the fake peer, by workload name; "vit_*" workloads fail in setup when
# the name says so (timm missing).
FAKE_PEER = textwrap.dedent('''
    import json, sys
    SECONDS = {"lstm_train": [0.5, 0.4, 0.6], "gru_train": [0.2, 0.2, 0.2], "caption_lstm_train": [0.4] * 3}
    calls = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        if cmd == "info":
            resp = {"torch": "fake", "timm": None, "torch_threads": 2, "matmul_gflops_float32": 10.0}
        elif cmd == "setup":
            name = req["workload"]["name"]
            resp = {"error": "ModuleNotFoundError: No module named 'timm'"} if name.startswith("vit") else {}
            if name.startswith("caption"):
                resp = {"setup_seconds": 0.1, "params": 1234}
        elif cmd == "run":
            i = calls.get(req["name"], 0)
            calls[req["name"]] = i + 1
            resp = {"seconds": SECONDS[req["name"]][i] * req["steps"]}
        else:
            resp = {}
        print(json.dumps(resp), flush=True)
''')


class FakeRunner:
    def __init__(self, seconds_per_step, log, flops=None, params=None):
        self.seconds, self.log, self.i = list(seconds_per_step), log, 0
        self.flops_per_step = flops
        self.compile_seconds = 0.0
        self.params = params

    def run(self, steps):
        self.log.append("seqvis")
        s = self.seconds[self.i] * steps
        self.i += 1
        return s


@pytest.fixture
def fake_peer(tmp_path):
    path = tmp_path / "fake_peer.py"
    path.write_text(FAKE_PEER)
    return str(path)


def _run(names, peer_python, peer_script, runners, peak=1e12):
    out, err = io.StringIO(), io.StringIO()
    summary = compare.run(names, lambda w: runners[w["name"]], peer_python, repeats=3, peak_flops=peak,
                          machine={"cpu": "test"}, out=out, err=err, peer_script=peer_script)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    return summary, lines, err.getvalue()


def test_ratio_median_and_json_shape(fake_peer):
    log = []
    # LSTM: batch 64, 30 steps per run. seqvis 0.1, 0.3, 0.2 s/step -> median 0.2 s/step = 320 seq/s;
    # peer 0.5, 0.4, 0.6 -> median 0.5 s/step = 128 seq/s; ratio 2.5.
    runners = {"lstm_train": FakeRunner([0.1, 0.3, 0.2], log, flops=64e9),
               "gru_train": FakeRunner([0.1, 0.1, 0.1], log)}
    summary, lines, err = _run(["lstm_train", "gru_train"], sys.executable, fake_peer, runners)
    assert len(lines) == 3 and lines[-1] == summary  # one line per workload, then the summary
    lstm, gru = summary["rows"]
    assert lstm["workload"] == "lstm_train" and lstm["unit"] == "seq/s" and lstm["batch"] == 64
    assert lstm["seqvis"] == pytest.approx(320.0) and lstm["peer"] == pytest.approx(128.0)
    assert lstm["ratio"] == pytest.approx(2.5)
    assert len(lstm["seqvis_runs"]) == len(lstm["peer_runs"]) == 3
    # FLOPs per step 64 GFLOP at 320/64 = 5 steps/s -> 320 GFLOP/s, 32% of a 1 TFLOP/s peak.
    assert lstm["gflops_per_step"] == pytest.approx(64.0)
    assert lstm["seqvis_fraction_of_peak"] == pytest.approx(0.32)
    assert lstm["peer_fraction_of_peak"] == pytest.approx(0.128)
    assert gru["ratio"] == pytest.approx(2.0) and gru["seqvis_fraction_of_peak"] is None
    assert summary["machine"]["peer"]["torch"] == "fake"
    assert summary["machine"]["matmul_gflops_float32"] == pytest.approx(1000.0)
    assert "| lstm_train (seq/s) | 320 | 128 | 2.50 |" in err


def test_runs_alternate_and_flip_order(fake_peer, monkeypatch):
    order = []
    runners = {"gru_train": FakeRunner([0.1] * 3, order)}
    real_run = compare.PeerClient.run

    def logged(self, w, steps):
        order.append("peer")
        return real_run(self, w, steps)

    monkeypatch.setattr(compare.PeerClient, "run", logged)
    _run(["gru_train"], sys.executable, fake_peer, runners)
    assert order == ["seqvis", "peer", "peer", "seqvis", "seqvis", "peer"]


def test_missing_peer_reports_seqvis_alone(tmp_path):
    runners = {"gru_train": FakeRunner([0.1] * 3, [])}
    summary, lines, err = _run(["gru_train"], str(tmp_path / "no" / "python"), compare.PEER_SCRIPT, runners)
    row = summary["rows"][0]
    assert row["seqvis"] == pytest.approx(640.0) and row["peer"] is None and row["ratio"] is None
    assert "cannot start the peer interpreter" in summary["machine"]["peer_error"]
    assert "reporting seqvis alone" in err and "--peer_python" in err


def test_peer_without_torch_reports_seqvis_alone(tmp_path):
    script = tmp_path / "broken_peer.py"
    script.write_text("import sys\nsys.stderr.write('No module named torch\\n')\nsys.exit(1)\n")
    runners = {"gru_train": FakeRunner([0.1] * 3, [])}
    summary, _, err = _run(["gru_train"], sys.executable, str(script), runners)
    assert summary["rows"][0]["peer"] is None and "exited" in summary["machine"]["peer_error"]
    assert "reporting seqvis alone" in err


def test_peer_failing_one_workload_keeps_the_others(fake_peer):
    runners = {"vit_default_train": FakeRunner([0.1] * 3, []), "gru_train": FakeRunner([0.1] * 3, [])}
    summary, _, _ = _run(["vit_default_train", "gru_train"], sys.executable, fake_peer, runners)
    vit, gru = summary["rows"]
    assert vit["peer"] is None and "timm" in vit["peer_error"] and vit["seqvis"] == pytest.approx(1280.0)
    assert gru["ratio"] == pytest.approx(2.0)


def test_workload_shapes_match_the_issue():
    w = compare.WORKLOADS
    assert w["vit_default_train"]["batch"] == 128 and w["vit_default_train"]["image_shape"] == [28, 28, 1]
    assert w["vit_ti4_32_inference"]["batch"] == 64 and w["vit_ti4_32_inference"]["patch"] == 4
    assert w["vit_s16_224_train"]["batch"] == 8 and w["vit_s16_224_train"]["image_shape"] == [224, 224, 3]
    assert (w["lstm_train"]["batch"], w["lstm_train"]["T"], w["lstm_train"]["in"], w["lstm_train"]["hidden"]) \
        == (64, 50, 128, 256)
    c = w["caption_lstm_train"]
    assert (c["kind"], c["batch"], c["T"], c["vocab"], c["embed"], c["hidden"], c["features"]) \
        == ("caption", 32, 20, 5000, 256, 512, [1, 1, 512])
    t = w["caption_transformer_train"]
    assert (t["batch"], t["T"], t["vocab"], t["width"], t["layers"], t["heads"], t["mlp_dim"]) \
        == (32, 20, 5000, 256, 2, 4, 512)
    with pytest.raises(SystemExit, match="valid"):
        compare.workload("nope")


def test_caption_row_carries_both_parameter_counts(fake_peer):
    # batch 32, 10 steps per run: seqvis 0.2 s/step -> 160 seq/s, peer 0.4 s/step -> 80 seq/s.
    runners = {"caption_lstm_train": FakeRunner([0.2] * 3, [], flops=16e9, params=1234)}
    summary, _, err = _run(["caption_lstm_train"], sys.executable, fake_peer, runners)
    row = summary["rows"][0]
    assert row["unit"] == "seq/s" and row["batch"] == 32 and row["steps_per_run"] == 10
    assert row["seqvis"] == pytest.approx(160.0) and row["peer"] == pytest.approx(80.0)
    assert row["ratio"] == pytest.approx(2.0)
    assert row["seqvis_fraction_of_peak"] == pytest.approx(16e9 * 5 / 1e12)
    assert row["seqvis_params"] == row["peer_params"] == 1234
    assert "| caption_lstm_train (seq/s) | 160 | 80.0 | 2.00 |" in err


# ----------------------------------------------------------------------------- real captioning decoders, tiny


def _tiny_caption(decoder):
    name = f"caption_{decoder}_train"
    return dict(compare.WORKLOADS[name], name=name, batch=2, T=3, vocab=11, embed=4, hidden=5, width=8, layers=1,
                heads=2, mlp_dim=12, features=[1, 1, 6] if decoder == "lstm" else [2, 2, 6], steps=1)


def _caption_params(w):
    """Trained parameters implied by the shapes (the same formula for both sides)."""
    v, d, regions = w["vocab"], w["features"][-1], w["features"][0] * w["features"][1]
    if w["decoder"] == "lstm":
        e, h = w["embed"], w["hidden"]
        #      image_proj      embed   LSTM: W, U, one bias       out
        return d * e + e + v * e + (e + h) * 4 * h + 4 * h + h * v + v
    wd, m = w["width"], w["mlp_dim"]
    attention = 4 * wd * wd + 4 * wd                                 # q, k, v, out with biases
    block = 2 * attention + wd * m + m + m * wd + wd + 3 * 2 * wd    # self, cross, MLP, 3 LayerNorms
    #      memory_proj      memory pos    LN        embed   token_pos     blocks         final LN  out
    return d * wd + wd + regions * wd + 2 * wd + v * wd + w["T"] * wd + w["layers"] * block + 2 * wd + wd * v + v


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_caption_seqvis_step_runs_with_the_expected_parameters(decoder):
    w = _tiny_caption(decoder)
    runner = compare.seqvis_runner(w)
    assert runner.params == _caption_params(w)
    assert runner.flops_per_step and runner.flops_per_step > 0
    assert runner.run(1) > 0


@pytest.fixture(scope="module")
def real_peer():
    python = os.environ.get("SEQVIS_PEER_PYTHON", "")
    if not python:
        pytest.skip("no peer interpreter: set SEQVIS_PEER_PYTHON to a Python with torch")
    if not os.path.exists(python) or subprocess.run([python, "-c", "import torch"], capture_output=True).returncode:
        pytest.skip(f"SEQVIS_PEER_PYTHON={python} is not a Python with torch")
    peer = compare.PeerClient(python)
    yield peer
    peer.close()


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_caption_peer_trains_the_same_parameters(decoder, real_peer):
    w = _tiny_caption(decoder)
    assert real_peer.setup(w)["params"] == _caption_params(w)
    assert real_peer.run(w, 1) > 0
    real_peer.drop(w)
