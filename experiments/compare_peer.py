"""The peer side of ``python -m experiments.benchmark --compare``: timm / torch.nn workloads.

Run by the peer interpreter (``--peer_python``, e.g. ``PEER_VENV/bin/python``) as a child of
the seqvis benchmark; it never imports jax or seqvis, and seqvis never imports torch. It reads
one JSON request per line on stdin and answers one JSON line on stdout:

    {"cmd": "info"}                       -> versions, torch threads, float32 matmul GFLOP/s
    {"cmd": "setup", "workload": {...}}   -> builds the model, runs warm-up steps; {"params": trained parameters}
    {"cmd": "run", "name": N, "steps": k} -> {"seconds": wall time of k steps}
    {"cmd": "quit"}

A workload is a plain dict of shapes (see ``experiments.compare.WORKLOADS``), so both sides
build the same network from the same numbers:

* ``kind="vit"``: ``timm.models.vision_transformer.VisionTransformer`` (class token, learned
  position embedding, pre-LN blocks, qkv bias), trained with AdamW + global-norm clipping and
  cross-entropy, or run under ``torch.inference_mode()``.
* ``kind="rnn"``: ``torch.nn.LSTM`` / ``torch.nn.GRU`` (one layer, batch first), trained with
  Adam on ``mean(outputs ** 2)``.
* ``kind="caption"``: the decoder of a captioner over precomputed image features ``[B, h, w, D]``
  (no CNN), trained with teacher forcing, mean cross-entropy over the ``B x T`` target words and
  Adam. ``decoder="lstm"``: Show and Tell as ``seqvis.models.captioning.ShowAndTell`` computes
  it: ``nn.Linear`` of the mean feature vector, fed to a one-layer ``nn.LSTM`` as its first input
  ahead of the ``nn.Embedding`` of the words (one call over ``1 + T`` steps: the same recurrence
  as seqvis' image step followed by the word steps), ``nn.Linear`` to the vocabulary on the ``T``
  word outputs. torch's LSTM has two bias vectors (``b_ih``, ``b_hh``) where seqvis' cell has
  one; ``b_hh`` is held at zero and not trained, so both sides train the same parameters.
  ``decoder="transformer"``: ``TransformerCaptioner``'s layout: image tokens ``LN(W_m a + E_pos)``,
  words ``W_e y + P_t``, ``nn.TransformerDecoder`` of pre-LN layers (causal self-attention,
  cross-attention, tanh-GELU MLP; LayerNorm eps 1e-6 as flax) with a final LayerNorm,
  ``nn.Linear`` to the vocabulary.
"""

from __future__ import annotations

import json
import sys
import time


def _matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2] / 1e9


def info() -> dict:
    import torch

    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError as e:  # the recurrent workloads still run
        out["timm"] = None
        out["timm_error"] = str(e)
    out["matmul_gflops_float32"] = _matmul_gflops()
    return out


class _Vit:
    def __init__(self, w: dict):
        import torch
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        h, wd, c = w["image_shape"]
        self.train = w["mode"] == "train"
        self.model = VisionTransformer(
            img_size=(h, wd), patch_size=w["patch"], in_chans=c, num_classes=w["num_classes"],
            embed_dim=w["width"], depth=w["depth"], num_heads=w["heads"], mlp_ratio=w["mlp_dim"] / w["width"],
            class_token=True, global_pool="token", qkv_bias=True)
        b = w["batch"]
        self.x = torch.randn(b, c, h, wd)
        self.y = torch.randint(0, w["num_classes"], (b,))
        self.clip = w.get("grad_clip_norm")
        if self.train:
            self.model.train()
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=w.get("weight_decay", 0.0))
            self.loss = torch.nn.CrossEntropyLoss()
        else:
            self.model.eval()

    def step(self):
        import torch

        if self.train:
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.model(self.x), self.y)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
        else:
            with torch.inference_mode():
                self.model(self.x)


class _Rnn:
    def __init__(self, w: dict):
        import torch

        torch.manual_seed(0)
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[w["cell"]]
        self.model = cls(w["in"], w["hidden"], num_layers=1, batch_first=True)
        self.x = torch.randn(w["batch"], w["T"], w["in"])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        out, _ = self.model(self.x)
        (out ** 2).mean().backward()
        self.opt.step()


class _Caption:
    def __init__(self, w: dict):
        import torch
        from torch import nn

        torch.manual_seed(0)
        b, t, v = w["batch"], w["T"], w["vocab"]
        h, wd, d = w["features"]
        self.features = torch.randn(b, h * wd, d)  # the encoder's output as regions [B, L, D]
        tokens = torch.randint(0, v, (b, t + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.lstm = w["decoder"] == "lstm"
        if self.lstm:
            e, hid = w["embed"], w["hidden"]
            self.model = nn.ModuleDict(dict(image_proj=nn.Linear(d, e), embed=nn.Embedding(v, e),
                                            lstm=nn.LSTM(e, hid, num_layers=1, batch_first=True),
                                            out=nn.Linear(hid, v)))
            with torch.no_grad():
                self.model["lstm"].bias_hh_l0.zero_()
            self.model["lstm"].bias_hh_l0.requires_grad_(False)
        else:
            width, ln = w["width"], (lambda: nn.LayerNorm(w["width"], eps=1e-6))
            layer = nn.TransformerDecoderLayer(
                width, w["heads"], dim_feedforward=w["mlp_dim"], dropout=0.0,
                activation=lambda x: nn.functional.gelu(x, approximate="tanh"), layer_norm_eps=1e-6,
                batch_first=True, norm_first=True)
            self.model = nn.ModuleDict(dict(
                memory_proj=nn.Linear(d, width), memory_norm=ln(), embed=nn.Embedding(v, width),
                decoder=nn.TransformerDecoder(layer, w["layers"], norm=ln()), out=nn.Linear(width, v)))
            self.memory_pos = nn.Parameter(0.02 * torch.randn(1, h * wd, width))
            self.token_pos = nn.Parameter(0.02 * torch.randn(1, t, width))  # max_positions = T
            self.causal = nn.Transformer.generate_square_subsequent_mask(t)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.lstm:
            self.params += [self.memory_pos, self.token_pos]
        self.model.train()
        self.opt = torch.optim.Adam(self.params, lr=1e-3)

    def logits(self):
        import torch

        m = self.model
        if self.lstm:
            image = m["image_proj"](self.features.mean(dim=1))                    # [B, E]
            x = torch.cat([image[:, None], m["embed"](self.inputs)], dim=1)      # [B, 1 + T, E]
            out, _ = m["lstm"](x)
            return m["out"](out[:, 1:])                                         # [B, T, V]
        memory = m["memory_norm"](m["memory_proj"](self.features) + self.memory_pos)
        y = m["embed"](self.inputs) + self.token_pos
        y = m["decoder"](y, memory, tgt_mask=self.causal, tgt_is_causal=True)
        return m["out"](y)

    def step(self):
        import torch

        self.opt.zero_grad(set_to_none=True)
        logits = self.logits()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        self.opt.step()


def trained_params(runner) -> int:
    """Number of trained parameters of a built workload (what its optimiser updates; for an
    inference workload, the model's parameters)."""
    opt = getattr(runner, "opt", None)
    if opt is None:
        return sum(p.numel() for p in runner.model.parameters())
    return sum(p.numel() for group in opt.param_groups for p in group["params"] if p.requires_grad)


KINDS = {"vit": _Vit, "rnn": _Rnn, "caption": _Caption}


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    built: dict = {}
    for line in stdin:
        req = json.loads(line)
        try:
            cmd = req["cmd"]
            if cmd == "quit":
                return
            if cmd == "info":
                resp = info()
            elif cmd == "setup":
                w = req["workload"]
                t = time.perf_counter()
                runner = KINDS[w["kind"]](w)
                for _ in range(int(req.get("warmup", 2))):
                    runner.step()
                built[w["name"]] = runner
                resp = {"setup_seconds": time.perf_counter() - t, "params": trained_params(runner)}
            elif cmd == "run":
                runner = built[req["name"]]
                t = time.perf_counter()
                for _ in range(int(req["steps"])):
                    runner.step()
                resp = {"seconds": time.perf_counter() - t}
            elif cmd == "drop":
                built.pop(req["name"], None)
                resp = {}
            else:
                resp = {"error": f"unknown command {cmd!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which carries on without this row
            resp = {"error": f"{type(e).__name__}: {e}"}
        stdout.write(json.dumps(resp) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve()
