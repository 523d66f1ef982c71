"""tfds dataset -> tf.data pipeline -> numpy batches ``[local_devices, per_device_batch, ...]``.

Determinism: the batch at step s is a pure function of (seed, s) for a given dataset and
process count. Epoch e visits this process's examples in an order fixed by (seed, e,
process); example i of epoch e gets the augmentation seed (seed, e·N + i). A run resumed at
step s skips ``s · per_process_batch`` examples of that stream (cheap: they are skipped
before preprocessing) and continues with exactly the batches an uninterrupted run sees.

Evaluation visits every example of the split once: the last batch is padded with zeros
and ``mask = 0``, and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from seqvis.data import preprocess

from seqvis.data.builders import LOCAL_BUILDERS, local_builder_class


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says how to fix it."""


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
    return tf


def get_builder(cfg: Any):
    import tensorflow_datasets as tfds

    name = cfg.get("name")
    if not name:
        raise DataError("config.data.name is missing; e.g. fashion_mnist_idx (offline) or cifar10.")
    data_dir = cfg.get("data_dir") or None
    if name in LOCAL_BUILDERS:
        cls = local_builder_class(name)
        kwargs = dict(cfg.get("builder_kwargs", None) or {})
        return _prepare_once(lambda: cls(idx_dir=cfg.get("idx_dir") or None, data_dir=data_dir, **kwargs))
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - unknown names, bad versions
        raise DataError(f"config.data.name={name!r}: {e}") from e


def _prepare_once(make_builder):
    """Build and prepare a local builder; with several processes, process 0 writes while the others wait.

    The other processes construct their builder only after the files exist: a builder made
    earlier would keep the empty dataset info it read at construction.
    """
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            make_builder().download_and_prepare()
        multihost_utils.sync_global_devices("seqvis_prepare_local_dataset")
    builder = make_builder()
    builder.download_and_prepare()  # a no-op when the data is already there
    return builder


def _not_prepared(name: str, data_dir: str | None, err: Exception) -> DataError:
    return DataError(
        f"Dataset {name!r} is not prepared in {data_dir or 'the default tfds data_dir'} and this code never "
        f"downloads at run time ({type(err).__name__}). Prepare it on a machine with internet: "
        f"`tfds build {name} --data_dir=DIR` (or follow the dataset's manual-download instructions), copy DIR "
        "here and set --config.data.data_dir=DIR. Offline alternatives: fashion_mnist / mnist (local IDX files).")


def _as_dataset(builder, split: str, cfg: Any):
    tf = _tf()
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except (AssertionError, tf.errors.NotFoundError, FileNotFoundError) as e:
        raise _not_prepared(builder.name, cfg.get("data_dir") or None, e) from e
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts)


def process_split(split: str, process_index: int, process_count: int) -> str:
    if process_count == 1:
        return split
    import tensorflow_datasets as tfds

    return tfds.even_splits(split, n=process_count)[process_index]


def num_examples(cfg: Any, split: str) -> int:
    builder = get_builder(cfg)
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as e:
        raise DataError(f"config.data split {split!r} is not a split of {builder.name}: {e}") from e


def _split_size(builder, split: str, ds, counted: bool) -> int:
    """Examples in ``split``: counted through ``ds`` when it is cached (one pass fills the cache),
    else read from the dataset info, counting only when the info has no split sizes (mock data)."""
    if not counted:
        try:
            return int(builder.info.splits[split].num_examples)
        except KeyError:
            pass
    return sum(1 for _ in ds)


def _defaults(process_index, process_count, local_device_count):
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count,
            jax.local_device_count() if local_device_count is None else local_device_count)


def _to_devices(batch: dict, devices: int) -> dict:
    """Numeric features only (ids and strings stay on the host), split over the local devices."""
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()
            if not k.startswith("_") and v.dtype.kind in "biuf"}


def train_iterator(cfg: Any, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   local_device_count: int | None = None,
                   extra_ops: tuple = ()) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of training batches starting at ``start_step``.

    ``extra_ops`` (functions example -> example, from the task) run after the config's ops.
    """
    tf = _tf()
    pi, pc, nd = _defaults(process_index, process_count, local_device_count)
    if global_batch_size % pc or (global_batch_size // pc) % nd:
        raise DataError(f"config.batch_size={global_batch_size} must divide evenly over {pc} processes x {nd} "
                        "local devices.")
    per_proc = global_batch_size // pc
    split = process_split(cfg.get("train_split", "train"), pi, pc)
    builder = get_builder(cfg)
    ops = preprocess.parse(cfg.get("pp_train", "decode"), field="config.data.pp_train") + list(extra_ops)
    base = _as_dataset(builder, split, cfg)
    if cfg.get("cache", True):
        base = base.cache()
    n = _split_size(builder, split, base, counted=bool(cfg.get("cache", True)))
    if n < per_proc:
        raise DataError(f"split {split!r} has {n} examples, fewer than one per-process batch ({per_proc}).")
    start = start_step * per_proc
    epoch0, offset = divmod(start, n)
    buffer = int(cfg.get("shuffle_buffer", 10_000)) or n
    key = (int(seed) * 1_000_003 + pi) % (2**31 - 1)

    def epoch(e):
        d = base.shuffle(min(buffer, n), seed=tf.cast(key, tf.int64) * 7919 + e, reshuffle_each_iteration=False)
        d = d.enumerate()
        return d.map(lambda i, ex: {**ex, "_seed": tf.stack([tf.cast(key, tf.int64), e * n + i])})

    ds = tf.data.Dataset.range(epoch0, 2**62).flat_map(epoch).skip(offset)
    ds = ds.map(lambda ex: preprocess.apply(ops, ex), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_proc, drop_remainder=True).prefetch(int(cfg.get("prefetch", 2)) or tf.data.AUTOTUNE)
    mix = cfg.get("mixup", None)
    alpha = float(mix.get("alpha", 0.0)) if mix else 0.0
    p = float(mix.get("p", 0.0)) if mix else 0.0
    step = start_step
    for batch in ds.as_numpy_iterator():
        if alpha > 0 and p > 0:
            batch = preprocess.mixup(batch, seed=(int(seed), step), alpha=alpha, p=p,
                                     num_classes=int(cfg.num_classes))
        batch["mask"] = np.ones(per_proc, np.float32)
        yield _to_devices(batch, nd)
        step += 1


def eval_iterator(cfg: Any, *, global_batch_size: int, split: str | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  local_device_count: int | None = None,
                  extra_ops: tuple = ()) -> Iterator[dict[str, np.ndarray]]:
    """Every example of the split exactly once; the last batch padded with ``mask = 0``."""
    tf = _tf()
    pi, pc, nd = _defaults(process_index, process_count, local_device_count)
    if global_batch_size % pc or (global_batch_size // pc) % nd:
        raise DataError(f"config.eval_batch_size={global_batch_size} must divide evenly over {pc} processes x "
                        f"{nd} local devices.")
    per_proc = global_batch_size // pc
    split = split or cfg.get("eval_split", "test")
    builder = get_builder(cfg)
    ops = preprocess.parse(cfg.get("pp_eval", "decode"), field="config.data.pp_eval") + list(extra_ops)
    ds = _as_dataset(builder, process_split(split, pi, pc), cfg)
    ds = ds.map(lambda ex: preprocess.apply(ops, {**ex, "_seed": tf.constant([0, 0], tf.int64)}),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_proc).prefetch(2)
    if pc > 1:  # all processes must run the same number of (collective) eval steps
        counts = [builder.info.splits[process_split(split, i, pc)].num_examples for i in range(pc)]
        num_batches = math.ceil(max(counts) / per_proc)
    else:
        num_batches = None
    template = None
    yielded = 0
    for batch in ds.as_numpy_iterator():
        batch = {k: v for k, v in batch.items() if not k.startswith("_") and v.dtype.kind in "biuf"}
        real = len(next(iter(batch.values())))
        if template is None:
            template = {k: np.zeros((per_proc,) + v.shape[1:], v.dtype) for k, v in batch.items()}
        mask = np.zeros(per_proc, np.float32)
        mask[:real] = 1.0
        if real < per_proc:
            batch = {k: np.concatenate([v, template[k][: per_proc - real]]) for k, v in batch.items()}
        batch["mask"] = mask
        yield _to_devices(batch, nd)
        yielded += 1
    while num_batches is not None and yielded < num_batches:
        if template is None:
            raise DataError(f"eval split {split!r} is empty on process {pi}.")
        yield _to_devices({**template, "mask": np.zeros(per_proc, np.float32)}, nd)
        yielded += 1
