"""The planner against published runs: every run a paper reports must fit, and its lower bound must
be below the reported time. The runs, their sources and what each one checks are the table
:data:`PUBLISHED`; ``docs/planner.md`` shows the results.

    python -m experiments.plan_published              # one JSON line per published run, then a summary line
    python -m experiments.plan_published --markdown   # the same as the docs/planner.md table
    python -m experiments.plan_published --pieces     # g/14 and G/14 with the Scaling-ViT recipe pieces

Each run is planned with :func:`experiments.plan.plan` from shapes and the lowered step
(``--no_compile``: nothing here needs XLA:CPU's compile, so this takes seconds). Per run:

- ``fits``: the modelled accelerator memory of the run as published (its per-device batch,
  precision, optimiser state, remat) is within the usable memory. Runs whose per-device batch is
  not published (the ViT paper's) are not checked for memory.
- ``lower_bound_below_published``: the planner's lower-bound time (MFU ``MFU_MAX``) is below the
  published time (wall-clock hours, or device-days where the paper gives those).
- ``implied_mfu``: the MFU the published time implies, FLOPs of the run / (time x devices x peak);
  the planner's likely range (``MFU_RANGE``) is the range of these, rounded outwards.

Where a paper leaves a figure open (the epochs behind the ViT paper's Table 2 core-days), the run
is checked at the reading that is stricter for the lower bound (more epochs), and the implied MFU
of the other reading is given too.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from experiments import plan as plan_lib

VIT_PAPER = "Dosovitskiy et al. 2021, An Image is Worth 16x16 Words (ICLR), Table 2 (TPUv3-core-days)"
BEYER = "Beyer, Zhai, Kolesnikov 2022, Better plain ViT baselines for ImageNet-1k (arXiv:2205.01580), abstract"
BV_S16 = "big_vision configs/vit_s16_i1k.py docstring: '6-7h to finish 90ep on a TPU-v3-8'"
DEIT = ("Touvron et al. 2021, DeiT (ICML), 'Training time': DeiT-B 300 epochs 37 h on 2 nodes of 8 GPUs; "
        "facebookresearch/deit README + run_with_submitit.py: 2 x 8 V100, batch 64 per GPU, 32 GB GPUs only "
        "requested with --use_volta32 (not for DeiT-B)")
BV_G14 = ("Zhai et al. 2022, Scaling Vision Transformers (CVPR), recipe released as big_vision "
          "configs/proj/scaling_laws/train_vit_g.py: 'Fits 32 images per TPUv3 core with ViT-g/14' (batch 16384, "
          "MAP head, big_vision.scale_by_adafactor: factored second moment, bfloat16 momentum)")

_S16 = {"optimizer.mu_dtype": "bfloat16",  # big_vision: config.optax = dict(mu_dtype='bfloat16')
        "model.representation_size": 384}  # big_vision: rep_size=True
_VIT_PAPER = {"model.scan_layers": True}  # same numbers, faster to trace; the paper's FLOPs are the analytic count
_DEIT = {"model.representation_size": None, "model.dropout_rate": 0.0, "model.stochastic_depth": 0.1,
         "batch_size": 1024}

# name: the run as published. hours: wall-clock hours (upper bound the paper gives); device_days: the
# paper's device-days; memory: True where the per-device batch is published (then it must fit).
PUBLISHED: list[dict[str, Any]] = [
    dict(name="S/16 i1k 90 ep, TPUv3-8", source=f"{BEYER}; {BV_S16}", config="configs/vit_s16_i1k_baseline.py",
         devices=8, accelerator="tpu_v3", precision="float32", epochs=90, overrides=_S16, hours=7.0, memory=True,
         note="big_vision's ViT computes in float32 (dtype_mm default), 128 images per core, no remat"),
    dict(name="S/16 i1k 300 ep, TPUv3-8", source=BEYER, config="configs/vit_s16_i1k_baseline.py",
         devices=8, accelerator="tpu_v3", precision="float32", epochs=300, overrides=_S16, hours=24.0, memory=True,
         note="'300 epochs ... in less than one day'"),
    dict(name="L/16 JFT-300M, 0.68k core-days", source=VIT_PAPER, config="configs/vit_i1k.py:L/16", devices=512,
         accelerator="tpu_v3", precision="float32", epochs=14, other_epochs=7, num_examples=303_000_000,
         overrides={**_VIT_PAPER, "data.num_classes": 18291}, device_days=680.0, memory=False,
         note="batch 4096; L/16 is trained for 7 or 14 epochs on JFT (the paper's appendix), Table 2 does not say "
              "which: checked at 14; core count not published"),
    dict(name="H/14 JFT-300M, 2.5k core-days", source=VIT_PAPER, config="configs/vit_i1k.py:H/14", devices=512,
         accelerator="tpu_v3", precision="float32", epochs=14, num_examples=303_000_000,
         overrides={**_VIT_PAPER, "data.num_classes": 18291}, device_days=2500.0, memory=False,
         note="batch 4096, 14 epochs; core count not published"),
    dict(name="L/16 ImageNet-21k, 0.23k core-days", source=VIT_PAPER + "; §4.2: 'a standard cloud TPUv3 with 8 "
         "cores in approximately 30 days'", config="configs/vit_i1k.py:L/16", devices=512, accelerator="tpu_v3",
         precision="float32", epochs=90, other_epochs=30, num_examples=14_197_122,
         overrides={**_VIT_PAPER, "data.num_classes": 21843}, device_days=230.0, memory=False,
         note="30 or 90 epochs on ImageNet-21k (the paper's appendix): checked at 90"),
    dict(name="DeiT-B 300 ep, 16 x V100", source=DEIT, config="configs/vit_i1k.py:B/16", devices=16,
         accelerator="v100", precision="bfloat16", epochs=300, overrides=_DEIT, hours=37.0, memory=True,
         note="PyTorch AMP (float16; 'bfloat16' here: same bytes), 64 images per GPU, 16 GB V100"),
    dict(name="g/14 MAP + Adafactor, TPUv3, 32/core", source=BV_G14, config="configs/vit_i1k.py:g/14",
         devices=512, accelerator="tpu_v3", precision="float32", total_steps=1_000_000, memory=True,
         remat=True,
         overrides={"model.pool": "map", "model.representation_size": None, "model.dropout_rate": 0.0,
                    "model.scan_layers": True, "model.remat": True, "data.num_classes": 29593,
                    "batch_size": 16384, "optimizer.name": "adafactor_momentum", "optimizer.mu_dtype": "bfloat16",
                    "optimizer.min_dim_size_to_factor": 32, "schedule.name": "rsqrt"},
         note="the released config sets neither scan nor remat; at 32 images per core the step fits only "
              "with the blocks rematerialised (XLA's automatic rematerialisation does that when a program "
              "exceeds HBM): planned with config.model.remat=True"),
]


def _args(run: dict, **extra) -> tuple[Any, list]:
    argv = [f"--config={run['config']}", f"--devices={run['devices']}", f"--accelerator={run['accelerator']}",
            f"--precision={run['precision']}", "--no_compile", "--json_only"]
    if run.get("epochs") is not None:
        argv.append(f"--epochs={run['epochs']}")
    if run.get("num_examples"):
        argv.append(f"--num_examples={run['num_examples']}")
    args, _ = plan_lib.parse_args(argv + [f"--{k}={v}" for k, v in extra.items()])
    overrides = list(run.get("overrides", {}).items())
    if run.get("total_steps"):
        overrides.append(("total_steps", run["total_steps"]))
    return args, overrides


def check(run: dict) -> dict[str, Any]:
    """Plan one published run and compare (see the module docstring)."""
    args, overrides = _args(run)
    r = plan_lib.plan(args, overrides)
    acc = plan_lib.ACCELERATORS[run["accelerator"]]
    peak = acc["bf16"] if run["precision"] == "bfloat16" else acc["f32"]
    total_flops = r["flops_per_step"] * r["total_steps"]
    published = unit = lower = mfu = None
    if run.get("hours"):
        published_device_s = run["hours"] * 3600.0 * run["devices"]
        lower = r["train_hours_lower_bound"]
        published, unit = run["hours"], "hours"
    elif run.get("device_days"):
        published_device_s = run["device_days"] * 86400.0
        lower = r["device_hours_lower_bound"] / 24.0
        published, unit = run["device_days"], "device-days"
    if published is not None:
        mfu = total_flops / (published_device_s * peak)
    out = {
        "name": run["name"], "source": run["source"], "note": run.get("note", ""),
        "accelerator": run["accelerator"], "devices": run["devices"], "per_device_batch": r["per_device_batch"],
        "precision": run["precision"], "params": r["params"], "total_steps": r["total_steps"],
        "flops_per_step": r["flops_per_step"], "flops_source": r["sources"]["flops"],
        "memory_bytes": r["accelerator_memory_bytes"], "usable_bytes": r["usable_hbm_bytes"],
        "memory_checked": bool(run["memory"]), "fits": bool(r["fits"]),
        "published": published, "unit": unit, "lower_bound": lower,
        "time_checked": published is not None,
        "lower_bound_below_published": None if published is None else bool(lower < published),
        "implied_mfu": mfu,
        "optimizer_state_source": r["sources"]["optimizer_state"],
    }
    if run.get("other_epochs"):
        out["implied_mfu_other_reading"] = out["implied_mfu"] * run["other_epochs"] / run["epochs"]
    return out


def summary(results: list[dict]) -> dict[str, Any]:
    """All checks at once; the implied MFUs of the checked readings give the planner's likely range."""
    mfus = [r["implied_mfu"] for r in results if r["time_checked"]]
    return {"summary": True, "runs": len(results),
            "all_checked_fit": all(r["fits"] for r in results if r["memory_checked"]),
            "all_lower_bounds_below_published": all(r["lower_bound_below_published"] for r in results
                                                    if r["time_checked"]),
            "implied_mfu_min": min(mfus), "implied_mfu_max": max(mfus),
            "implied_mfu_other_readings": [r["implied_mfu_other_reading"] for r in results
                                           if "implied_mfu_other_reading" in r],
            "mfu_range": list(plan_lib.MFU_RANGE), "mfu_max": plan_lib.MFU_MAX}


def markdown(results: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    lines = ["| # | run | accelerator x devices, batch/device, precision | modelled memory / usable (GiB) | fits | "
             "published | lower bound | implied MFU |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for i, r in enumerate(results, 1):
        m = r["memory_bytes"]
        mem = f"{gib(m['total'])} / {gib(r['usable_bytes'])}"
        fits = ("yes" if r["fits"] else "**no**") if r["memory_checked"] else "not checked"
        if r["time_checked"]:
            mfu = f"{r['implied_mfu']:.2f}" + (f" ({r['implied_mfu_other_reading']:.2f})"
                                               if "implied_mfu_other_reading" in r else "")
            pub, low = f"{r['published']:g} {r['unit']}", f"{r['lower_bound']:.1f} {r['unit']}"
        else:
            mfu, pub, low = "-", "(memory only)", "-"
        lines.append(f"| {i} | {r['name']} | {r['accelerator']} x {r['devices']}, {r['per_device_batch']}, "
                     f"{r['precision']} | {mem} | {fits} | {pub} | {low} | {mfu} |")
        notes.append(f"{i}. {r['source']}. {r['note']}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


# ---------------------------------------------------------------------------- g/14 and G/14, recipe pieces

_BIG = {"model.scan_layers": True, "model.representation_size": None, "model.dropout_rate": 0.0}
_FACTORED = {"optimizer.name": "adafactor_momentum", "optimizer.min_dim_size_to_factor": 32}
PIECES: list[tuple[str, dict]] = [
    ("class token, Adam float32", {}),
    ("+ MAP head", {"model.pool": "map"}),
    ("+ bf16 first moment", {"model.pool": "map", "optimizer.mu_dtype": "bfloat16"}),
    ("+ factored second moment", {"model.pool": "map", "optimizer.mu_dtype": "bfloat16", **_FACTORED}),
    ("+ remat", {"model.pool": "map", "optimizer.mu_dtype": "bfloat16", **_FACTORED, "model.remat": True}),
]
# Where the pieces are planned: the README's table setting (i21k, batch 4096 over 256 devices, bf16, FSDP
# over all), and the published g/14 setting (32 images per TPUv3 core, float32, state replicated as in
# big_vision's default sharding).
SETTINGS = {
    "fsdp256": dict(devices=256, precision="bfloat16", parallel="fsdp", accelerator="all", epochs=90,
                    num_examples=14_197_122, overrides={"data.num_classes": 21843, "batch_size": 4096}),
    "published_g14": dict(devices=512, precision="float32", parallel="pmap", accelerator="tpu_v3",
                          total_steps=1_000_000, overrides={"data.num_classes": 29593, "batch_size": 16384,
                                                            "schedule.name": "rsqrt"}),
}


def pieces(variant: str, setting: str = "fsdp256") -> list[dict[str, Any]]:
    """The planner for ``variant`` (g/14, G/14) in a :data:`SETTINGS` entry as the recipe pieces are added."""
    st = SETTINGS[setting]
    rows = []
    for label, extra in PIECES:
        run = dict(config=f"configs/vit_i1k.py:{variant}", **{k: v for k, v in st.items() if k != "parallel"})
        run["overrides"] = {**_BIG, **st["overrides"], **extra}
        args, overrides = _args(run)
        args.parallel = st["parallel"]
        r = plan_lib.plan(args, overrides)
        per = {a["accelerator"]: a for a in (r.get("per_accelerator") or [r])}
        v3 = per["tpu_v3"]
        rows.append({"variant": variant, "setting": setting, "pieces": label, "params": r["params"],
                     "devices": r["devices"], "per_device_batch": r["per_device_batch"],
                     "precision": r["precision"], "optimizer_state_source": r["sources"]["optimizer_state"],
                     "memory_bytes": r["accelerator_memory_bytes"], "fsdp_size": r["fsdp_size"],
                     "min_fsdp": {k: v["smallest_fsdp_size_that_fits"] for k, v in per.items()},
                     "fits_tpu_v3": v3["fits"], "usable_tpu_v3": v3["usable_hbm_bytes"],
                     "device_days_lower_bound_tpu_v3": v3["device_hours_lower_bound"] / 24.0,
                     "device_days_likely_tpu_v3": v3["device_days_likely"]})
    return rows


def pieces_markdown(rows: list[dict]) -> str:
    """The smallest FSDP degree that fits, per accelerator ("no": none up to the device count)."""
    accs = list(plan_lib.ACCELERATORS)
    lines = ["| model | recipe | params | " + " | ".join(accs) + " | v3 core-days (>= / likely) |",
             "|---|---|---|" + "---|" * len(accs) + "---|"]
    for r in rows:
        cells = [str(r["min_fsdp"][a]) if r["min_fsdp"][a] else "no" for a in accs]
        lo, (a, b) = r["device_days_lower_bound_tpu_v3"], r["device_days_likely_tpu_v3"]
        lines.append(f"| {r['variant']} | {r['pieces']} | {r['params'] / 1e6:.0f}M | " + " | ".join(cells)
                     + f" | {lo:,.0f} / {a:,.0f}-{b:,.0f} |")
    return "\n".join(lines)


def breakdown_markdown(rows: list[dict]) -> str:
    """Per-device memory by part on a TPUv3 core (GiB) and whether it fits."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| model | recipe | params | optimiser | gradients | activations | total / usable | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory_bytes"]
        lines.append(f"| {r['variant']} | {r['pieces']} | {gib(m['params'])} | {gib(m['optimizer_state'])} | "
                     f"{gib(m['gradients'])} | {gib(m['activations'])} | {gib(m['total'])} / "
                     f"{gib(r['usable_tpu_v3'])} | {'yes' if r['fits_tpu_v3'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.plan_published", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the docs/planner.md table")
    p.add_argument("--pieces", action="store_true", help="g/14 and G/14 with the recipe pieces")
    args = p.parse_args(argv)
    plan_lib.set_device_flags(8, 8)
    if args.pieces:
        rows = pieces("g/14") + pieces("G/14")
        published = pieces("g/14", "published_g14")
        for r in rows + published:
            print(json.dumps(r))
        if args.markdown:
            print(pieces_markdown(rows))
            print()
            print(breakdown_markdown(published))
        return 0
    results = [check(run) for run in PUBLISHED]
    for r in results:
        print(json.dumps(r))
    print(json.dumps(summary(results)))
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
