"""Where a training step's time goes on this machine: a jax.profiler trace, summed per XLA op.

    python -m experiments.profile_step                       # the default job's ViT step
    python -m experiments.profile_step --model=ti4_32 --steps=3
    python -m experiments.profile_step --top=40 --trace_dir=DIR   # keep the trace (open it in Perfetto)

Runs the real seqvis training step (``experiments.benchmark.synthetic_setup``: the config's
optimiser, ``PmapDriver``, synthetic batches) under ``jax.profiler.trace`` and reads the
Perfetto JSON the profiler writes. XLA:CPU records one event per executed thunk (an HLO
instruction: a fusion, a dot, a convolution, a YNNPACK/oneDNN call, a copy ...) on the
thread that ran it; this script sums each op's time over the traced steps and looks the op
up in the HLO of the executable that ran (the step is compiled once, ``lower(...).compile()``) for its opcode,
its fusion kind and the model operation it came from (the ``op_name`` metadata, e.g.
``.../Encoder/block_0/attn/...``).

Prints one JSON line: ``step_ms`` (wall time per step), ``op_ms`` (the ops' summed time per
step; it can exceed the wall time when ops run on several threads at once), ``by_kind``
(ms per step by opcode / fusion kind), ``by_scope`` (by model scope: embedding, attention,
MLP, norm, head, optimiser, loss) and ``top`` (the heaviest ops). A markdown summary goes to
stderr. Only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Profiler bookkeeping events that are not ops.
_SKIP = re.compile(r"^(ThreadpoolListener|ThunkExecutor|end: |\$|PjitFunction|PmapFunction|CommonPjRt|"
                   r"ParseArguments|Handle |AllocateOutput|Wait for|PythonRefManager|TfrtCpu|PjRt)")

_SCOPES = [("optimizer", re.compile(r"adam|optax|opt_state|clip|global_norm|scale_by|update", re.I)),
           ("attention", re.compile(r"attn|attention|MultiHead|query|key|value|softmax", re.I)),
           ("mlp", re.compile(r"mlp|Mlp|MLP|Dense_[0-9]|gelu", re.I)),
           ("norm", re.compile(r"LayerNorm|norm", re.I)),
           ("embedding", re.compile(r"embedding|patch|posemb|pos_embed|cls", re.I)),
           ("head", re.compile(r"head|pre_logits", re.I)),
           ("loss", re.compile(r"cross_entropy|log_softmax|loss|one_hot", re.I))]


def hlo_index(hlo_text: str) -> dict[str, dict]:
    """HLO instruction name -> {opcode, kind, op_name} for every instruction of the compiled module."""
    out = {}
    pat = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\((.*)$")
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        name, opcode, rest = m.group(1).lstrip("%"), m.group(2), m.group(3)
        kind = re.search(r"kind=(\w+)", rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out[name] = {"opcode": opcode, "kind": kind.group(1) if kind else "",
                     "calls": calls.group(1) if calls else "", "op_name": op_name.group(1) if op_name else ""}
    return out


def _fusion_body_ops(hlo_text: str) -> dict[str, collections.Counter]:
    """Fused computation name -> Counter of the opcodes inside it (to name what a fusion does)."""
    bodies: dict[str, collections.Counter] = {}
    cur = None
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$", line) or re.match(r"^([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            cur = head.group(1)
            bodies[cur] = collections.Counter()
            continue
        if cur and line.strip() == "}":
            cur = None
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S.*?\s([\w\-]+)\(", line)
        if cur and m:
            bodies[cur][m.group(1)] += 1
    return bodies


def classify(name: str, info: dict | None, bodies: dict[str, collections.Counter]) -> str:
    """A short label for an op: its opcode, and for a fusion what it contains (dot, conv, reduce, ...)."""
    if info is None:
        base = re.sub(r"[.\-_]?\d+$", "", name)
        return base or name
    if info["opcode"] != "fusion":
        return info["opcode"]
    body = bodies.get(info["calls"], collections.Counter())
    for key in ("convolution", "dot", "reduce-window", "reduce", "scatter", "gather", "transpose", "sort"):
        if body.get(key):
            return f"fusion({key})"
    return "fusion(elementwise)"


def scope(info: dict | None) -> str:
    op = (info or {}).get("op_name", "")
    if not op:
        return "other"
    for label, pat in _SCOPES:
        if pat.search(op):
            return label
    return "other"


def read_trace(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarise(events: list[dict], index: dict, bodies: dict, steps: int, step_seconds: float, top: int) -> dict:
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or _SKIP.match(e.get("name", "")):
            continue
        per_op[e["name"]] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
    by_kind: collections.Counter = collections.Counter()
    by_scope: collections.Counter = collections.Counter()
    rows = []
    matched = 0.0
    for name, ms in per_op.items():
        info = index.get(name)
        matched += ms if info else 0.0
        k, s = classify(name, info, bodies), scope(info)
        by_kind[k] += ms / steps
        by_scope[s] += ms / steps
        rows.append({"op": name, "ms_per_step": ms / steps, "kind": k, "scope": s,
                     "op_name": (info or {}).get("op_name", "")[-120:]})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(per_op.values()) / steps
    rnd = lambda c: {k: round(v, 3) for k, v in sorted(c.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"steps": steps, "step_ms": 1e3 * step_seconds / steps, "op_ms": total,
            "matched_fraction": matched / max(sum(per_op.values()), 1e-12),
            "by_kind": rnd(by_kind), "by_scope": rnd(by_scope),
            "top": [dict(r, ms_per_step=round(r["ms_per_step"], 3)) for r in rows[:top]]}


def markdown(s: dict) -> str:
    lines = [f"step {s['step_ms']:.1f} ms wall; ops {s['op_ms']:.1f} ms summed over threads", "",
             "| kind | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / s['op_ms']:.0%} |" for k, v in s["by_kind"].items()]
    lines += ["", "| scope | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / s['op_ms']:.0%} |" for k, v in s["by_scope"].items()]
    lines += ["", "| op | kind | scope | ms/step |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['kind']} | {r['scope']} | {r['ms_per_step']:.2f} |" for r in s["top"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="a model of experiments.benchmark (default, ti4_32)")
    ap.add_argument("--steps", type=int, default=10, help="traced steps (after 3 untraced warm-up steps)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace_dir", default="", help="keep the trace here (default: a temporary directory)")
    args = ap.parse_args(argv)

    import jax

    from experiments import benchmark

    configs = benchmark.configs()
    if args.model not in configs:
        raise SystemExit(f"--model: unknown {args.model!r}; valid: {', '.join(configs)}")
    setup = benchmark.synthetic_setup(configs[args.model])
    driver, state = setup["driver"], setup["state"]
    data = driver.put_batch(setup["data"])
    # Compiled once; the traced steps run this very executable, so its HLO names are the trace's op names.
    step = driver._train.lower(state, data).compile()
    hlo = step.as_text()
    for _ in range(3):
        state, _ = step(state, data)
    jax.block_until_ready(state)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="seqvis_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, _ = step(state, data)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t
    s = summarise(read_trace(trace_dir), hlo_index(hlo), _fusion_body_ops(hlo), args.steps, seconds, args.top)
    s.update(model=args.model, batch=setup["batch"], trace_dir=trace_dir if args.trace_dir else None)
    print(json.dumps(s), flush=True)
    print(markdown(s), file=sys.stderr)
    return s


if __name__ == "__main__":
    main()
