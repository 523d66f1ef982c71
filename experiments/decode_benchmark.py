"""Decode speed of the transformer captioner with and without the key/value cache.

    python -m experiments.decode_benchmark [--repeats 5] [--batch 64] [--max-len 20] [--beam 3]
    python -m experiments.decode_benchmark --quick      # tiny sizes: checks that it runs

Prints one JSON line per decoding method (greedy, beam): the median wall time of one
jit-compiled decode call (encoder included, as the final evaluation runs it) with the cache
(``kv_cache=True``, the default) and without it (``kv_cache=False``: every step re-runs the
whole causal prefix), and their ratio. The model is the scenes transformer of
``configs/captioning.py:transformer`` (ResNet trunk, 6x6 regions of 84x84x3 images, width 128,
2 layers) at random initialisation; the end token is set to the never-generated ``<pad>``, so
every caption runs all ``max_len`` steps and both paths do the same, fixed amount of work.
Calls alternate between the two paths (the order flips every round) so that load drift hits
both alike; compile time is reported separately. The tokens of both paths are checked equal.
``xla_gflops`` is XLA's cost analysis of each compiled decoder, which counts the body of the
decoding while-loop once: encoder + per-image preparation + one step (``encode_gflops`` is the
encoder alone), a machine-independent view of the per-step saving.
Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from seqvis.models import decoding
from seqvis.tasks.captioning import build_captioner

PAD, BOS = 0, 1


def scenes_transformer_config():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "captioning.py")
    spec = importlib.util.spec_from_file_location("captioning_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("transformer")


def _timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, out


def _gflops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return None if flops is None else flops / 1e9


def run(args) -> list[dict]:
    config = scenes_transformer_config()
    image_shape = tuple(config.data.image_shape)
    if args.quick:
        config.model.encoder.update(stage_sizes=(1,), width=8)
        config.model.update(width=16, mlp_dim=32, num_heads=2)
        image_shape = (24, 24, 3)
    model = build_captioner(config.model, args.vocab, args.max_len)
    ref_model = model.clone(kv_cache=False)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch,) + image_shape), jnp.float32)
    variables = model.init(jax.random.key(0), images[:1], jnp.zeros((1, args.max_len), jnp.int32))
    regions = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), variables, images)["memory"].shape[1]

    encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode)).lower(variables, images).compile()
    _timed(encode, variables, images)  # warm-up
    encode_s = statistics.median(_timed(encode, variables, images)[0] for _ in range(args.repeats))

    common = dict(max_steps=args.max_len, bos_id=BOS, eos_id=PAD, pad_id=PAD)  # <pad> is banned: no early end
    lines = []
    for method in ("greedy", "beam"):
        fns, compile_s, gflops, outs = {}, {}, {}, {}
        for name, m in (("cached", model), ("uncached", ref_model)):
            t = time.perf_counter()
            fns[name] = decoding.make_decoder(m, method=method, beam_size=args.beam, **common).lower(
                variables, images).compile()
            compile_s[name] = time.perf_counter() - t
            gflops[name] = _gflops(fns[name])
            _, outs[name] = _timed(fns[name], variables, images)  # first call: warm-up, not timed
        times = {name: [] for name in fns}
        for r in range(args.repeats):
            for name in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
                times[name].append(_timed(fns[name], variables, images)[0])
        med = {name: statistics.median(ts) for name, ts in times.items()}
        lines.append({
            "benchmark": "decode", "method": method, "beam_size": args.beam if method == "beam" else 1,
            "batch": args.batch, "max_len": args.max_len, "image_shape": list(image_shape), "regions": int(regions),
            "width": int(model.width), "num_layers": int(model.num_layers), "vocab": args.vocab,
            "repeats": args.repeats, "cached_s": med["cached"], "uncached_s": med["uncached"],
            "speedup": med["uncached"] / med["cached"],
            "cached_runs_s": times["cached"], "uncached_runs_s": times["uncached"],
            "compile_s": compile_s, "encode_s": encode_s, "xla_gflops": gflops, "encode_gflops": _gflops(encode),
            "tokens_equal": bool(np.array_equal(np.asarray(outs["cached"]["tokens"]),
                                                np.asarray(outs["uncached"]["tokens"]))),
            "quick": bool(args.quick), "backend": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(), "devices": jax.local_device_count(),
        })
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path (median reported; >= 3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-len", type=int, default=20, help="tokens decoded per caption (= max_positions)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny model, batch 2, 4 tokens, 1 repeat: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.max_len, args.repeats = 2, 4, 1
    elif args.repeats < 3:
        p.error("--repeats must be >= 3 (the median of alternating runs is reported)")
    for line in run(args):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
