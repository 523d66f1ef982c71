"""The input pipeline alone: img/s, peak RSS, time to the first batch, and the cost of resuming.

    python -m experiments.benchmark --input=default,jpeg [--input_batches 40] [--data_dir DIR]
    python -m experiments.input_benchmark --workloads default,jpeg,jpeg_1core,resume

Workloads (one child process each, so every peak RSS is its own):

- ``default``: the default job's training input (Fashion-MNIST, decoded in memory, its pp ops).
- ``jpeg``: an ImageNet-like JPEG set (``synthetic_jpeg``: 2,000 JPEGs of 150-500 px in 4
  array_record shards) with the ImageNet training ops (fused decode-and-crop to 224, flip,
  value range), read by random access; ``jpeg_1core`` the same pinned to one core (taskset).
- ``resume``: time and records read to the first batch when resuming 1.5 epochs in, by random
  access (array_record) and by the sequential fallback (the same set as tfrecord: a shuffle
  buffer and a skip of the records before the position, the pipeline's previous behaviour).

Prints one JSON line per workload. Sets are written once under ``--data_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

JPEG_KW = dict(num_train=2_000, num_eval=200, seed=0)
BATCH = 128


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _default_cfg(data_dir: str):
    from seqvis.cli.config_cli import load_config

    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "vit.py")).data
    cfg.data_dir = os.path.join(data_dir, "fashion_mnist")
    return cfg


def _jpeg_cfg(data_dir: str, file_format: str = "array_record"):
    from seqvis.data.presets import data_config

    return data_config("synthetic_jpeg", data_dir=os.path.join(data_dir, f"jpeg_{file_format}"),
                       builder_kwargs=dict(JPEG_KW, file_format=file_format))


def throughput(cfg, batches: int) -> dict:
    from seqvis.data import pipeline

    t0 = time.time()
    builder = pipeline.get_builder(cfg)  # prepared once, before timing
    prepare_s = time.time() - t0
    t0 = time.time()
    it = pipeline.train_iterator(cfg, global_batch_size=BATCH, seed=0, local_device_count=1)
    next(it)
    first_s = time.time() - t0
    for _ in range(3):  # warm-up: tf.data autotuning
        next(it)
    t0 = time.time()
    for _ in range(batches):
        next(it)
    dt = time.time() - t0
    return {"dataset": builder.name, "pp_train": cfg.pp_train, "batch": BATCH, "batches": batches,
            "img_per_sec": batches * BATCH / dt, "first_batch_seconds": first_s, "prepare_seconds": prepare_s,
            "peak_rss_mb": _peak_rss_mb(), "cpus": len(os.sched_getaffinity(0))}


def resume_cost(data_dir: str) -> list[dict]:
    from seqvis.data import pipeline

    rows = []
    for fmt in ("array_record", "tfrecord"):
        cfg = _jpeg_cfg(data_dir, fmt)
        cfg.pp_train = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"
        builder = pipeline.get_builder(cfg)
        n = builder.info.splits["train"].num_examples
        for start in (0, (3 * n // 2) // BATCH):
            counted = {"reads": 0}
            if fmt == "tfrecord":  # count the records the sequential reader pulls before the first batch
                import tensorflow as tf

                skip = tf.data.Dataset.skip

                def counting_skip(ds, count, name=None):
                    counted["reads"] += int(count)
                    return skip(ds, count, name=name)

                tf.data.Dataset.skip = counting_skip
            t0 = time.time()
            src = pipeline.train_source(cfg, builder, "train", pipeline.decoders_for(builder, cfg.pp_train))
            it = pipeline.train_iterator(cfg, global_batch_size=BATCH, seed=0, start_step=start,
                                         local_device_count=1, source=src)
            next(it)
            dt = time.time() - t0
            if fmt == "tfrecord":
                tf.data.Dataset.skip = skip
                reads = counted["reads"] + BATCH
            else:
                reads = src.reads
            rows.append({"workload": "resume", "file_format": fmt, "source": "records" if src else "sequential",
                         "start_step": start, "position_in_epoch": (start * BATCH) % n, "split_size": n,
                         "first_batch_seconds": dt, "records_read_to_first_batch": reads})
    return rows


def child(workload: str, data_dir: str, batches: int) -> None:
    logging_quiet()
    if workload == "default":
        rows = [dict(throughput(_default_cfg(data_dir), batches), workload=workload)]
    elif workload in ("jpeg", "jpeg_1core"):
        rows = [dict(throughput(_jpeg_cfg(data_dir), batches), workload=workload)]
    elif workload == "resume":
        rows = resume_cost(data_dir)
    else:
        raise SystemExit(f"unknown workload {workload!r}; valid: default, jpeg, jpeg_1core, resume")
    for r in rows:
        print("RESULT " + json.dumps(r), flush=True)


def logging_quiet() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass


def run(workloads: list[str], data_dir: str, batches: int) -> None:
    for w in workloads:
        cmd = [sys.executable, "-m", "experiments.input_benchmark", "--child", w, "--data_dir", data_dir,
               "--input_batches", str(batches)]
        if w.endswith("_1core"):
            if not shutil.which("taskset"):
                print(json.dumps({"workload": w, "error": "taskset not found (util-linux)"}), flush=True)
                continue
            cmd = ["taskset", "-c", "0"] + cmd
        out = subprocess.run(cmd, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [l[len("RESULT "):] for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            print(json.dumps({"workload": w, "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
        for l in lines:
            print(l, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="default,jpeg,jpeg_1core,resume")
    ap.add_argument("--input_batches", type=int, default=40)
    ap.add_argument("--data_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "seqvis-input-bench"))
    ap.add_argument("--child", default="")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.data_dir, args.input_batches)
    else:
        run(args.workloads.split(","), args.data_dir, args.input_batches)


if __name__ == "__main__":
    main()
