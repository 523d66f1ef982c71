"""A/B of ViT model switches on the default-ViT workloads of ``experiments.compare``, in one process.

    python -m experiments.compare_vit_variants --variants plain,fused [--rounds 3]

``plain`` is the default model, ``fused`` sets ``use_fused_attention=True``
(``jax.nn.dot_product_attention``), ``scan`` sets ``scan_layers=True``. Per round every variant
takes one timed run (the seqvis step of ``experiments.compare``), the order rotating; prints the
median img/s per variant for training and inference.
"""

from __future__ import annotations

import argparse
import json
import statistics

VARIANTS = {"plain": {}, "fused": {"use_fused_attention": True}, "scan": {"scan_layers": True}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="plain,fused")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="vit_default_train,vit_default_inference")
    args = ap.parse_args(argv)
    from experiments import compare

    names = args.variants.split(",")
    for wname in args.workloads.split(","):
        w = compare.workload(wname)
        runners = {n: compare._vit_runner(dict(w, model_overrides=VARIANTS[n])) for n in names}
        runs = {n: [] for n in names}
        for r in range(args.rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                runs[n].append(w["steps"] * w["batch"] / runners[n].run(w["steps"]))
        print(json.dumps({"workload": wname, "median_img_per_sec": {n: statistics.median(v) for n, v in runs.items()},
                          "runs": runs}), flush=True)
        del runners


if __name__ == "__main__":
    main()
