"""A/B of the recurrent layer's input-product split, paired with torch.nn in one run.

    python -m experiments.compare_rnn_split --peer_python=PEER_VENV/bin/python [--cells lstm,gru]
        [--variants loop,split,split_unroll2] [--repeats 3]

Variants of seqvis ``Recurrent`` on the ``lstm_train`` / ``gru_train`` shapes of
``experiments.compare``: ``loop`` is the default layer (``x_t @ W`` inside the scan, the cell
called step by step), ``split`` sets ``Recurrent(split_input_product=True)``: ``x @ W + b`` for
all T steps as one product outside the scan; ``_unrollK`` sets ``Recurrent.unroll``. Per round every variant
and the peer take one timed run, the order rotating; medians over rounds, one JSON line per
(cell, variant) with seq/s and the ratio to torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _runner(w: dict, variant: str):
    from experiments import compare

    unroll = int(variant.split("_unroll")[1]) if "_unroll" in variant else 1
    return compare._rnn_runner(dict(w, unroll=unroll, split_input_product=variant.startswith("split")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer_python", default=os.environ.get("SEQVIS_PEER_PYTHON", sys.executable))
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--variants", default="loop,split")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from experiments import compare

    try:
        peer = compare.PeerClient(args.peer_python)
    except compare.PeerError as e:
        print(f"no peer ({e}); seqvis variants only", file=sys.stderr)
        peer = None
    variants = args.variants.split(",")
    try:
        for cell in args.cells.split(","):
            w = compare.workload(f"{cell}_train")
            runners = {v: _runner(w, v) for v in variants}
            sides = variants + (["torch"] if peer else [])
            if peer:
                peer.setup(w)
            runs = {s: [] for s in sides}
            for r in range(args.repeats):
                k = r % len(sides)
                for side in sides[k:] + sides[:k]:
                    sec = peer.run(w, w["steps"]) if side == "torch" else runners[side].run(w["steps"])
                    runs[side].append(w["steps"] * w["batch"] / sec)
            med = {s: statistics.median(v) for s, v in runs.items()}
            for v in variants:
                print(json.dumps({"workload": w["name"], "variant": v, "seq_per_sec": med[v], "runs": runs[v],
                                  "torch": med.get("torch"), "ratio": med[v] / med["torch"] if peer else None,
                                  "compile_seconds": runners[v].compile_seconds}), flush=True)
            if peer:
                peer.drop(w)
    finally:
        if peer:
            peer.close()


if __name__ == "__main__":
    main()
