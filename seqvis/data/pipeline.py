"""tfds dataset -> tf.data pipeline -> numpy batches ``[local_devices, per_device_batch, ...]``.

Where training examples come from (chosen per run and logged; the sources and the cache
policy are in :mod:`seqvis.data.sources`):

- ``memory``: the split decoded once into host arrays. Chosen by the cache policy
  (``config.data.cache``): ``"auto"`` (default) caches only when every feature has a
  known shape and the decoded split fits ``config.data.cache_max_gb`` (default: a quarter
  of host RAM); ``"memory"`` insists; ``"none"`` never caches. Big sets (ImageNet, COCO,
  UCF101) have images of unknown size and are never cached.
- ``records``: random access to the prepared tfds files (``array_record`` format, e.g.
  ``tfds build NAME --file_format=array_record``). Image bytes stay encoded until a pp op
  decodes them (``decode``, or the fused ``decode_jpeg_and_inception_crop``).
- ``stream``: sequential reading of ``tfrecord`` files (no random access), a shuffle
  buffer, and a skip on resume (the previous behaviour; resuming re-reads up to one epoch
  of records). Used only when the files allow nothing better; the log says so.

Order (``memory`` and ``records``). Global position ``t = s·B + j`` for step ``s`` and
example ``j`` of the global batch ``B``; epoch ``e = t // n``; example index
``π_e(t mod n)`` with ``π_e`` a stateless pseudo-random permutation of the ``n`` examples
(``tf.random.experimental.index_shuffle`` with seed ``(seed, e)``: O(1) per index, no
table). Process ``p`` of ``P`` takes positions ``p·B/P .. (p+1)·B/P - 1`` of every global
batch, so the processes together see every example once per epoch. Example ``t`` gets the
augmentation seed ``(seed, t)``. The global batch at step ``s`` therefore depends on
``(seed, s)`` only, and resuming at step ``s`` reads exactly the records of that batch:
O(1), not a re-read of the epoch.

Training subsets (``config.data.train_examples = n``, 0 = all): the stream above runs over the
``n`` positions of a class-balanced, seeded, nested subset of the split (``subset_seed``; see
:mod:`seqvis.data.subset`), read by index from the same sources; ``num_epochs`` counts epochs
of the subset.

Evaluation visits every example of the split once (contiguous per-process shards): the
last batch is padded with zeros and ``mask = 0``, and every process yields the same
number of batches.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import logging
import math
import threading
from typing import Any, Iterator

import numpy as np

from seqvis.data import preprocess
from seqvis.data import subset as subset_lib
from seqvis.data.builders import LOCAL_BUILDERS, local_builder_class
from seqvis.data.sources import as_dataset, host_tf as _tf, image_keys, split_size, train_source
from seqvis.errors import DataError

log = logging.getLogger(__name__)


# ============================================================================ builders and splits


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
            _prepare(make_builder())
        multihost_utils.sync_global_devices("seqvis_prepare_local_dataset")
    return _prepare(make_builder())


def _prepare(builder):
    """``download_and_prepare`` (a no-op, after the builder's own checks, when the files are there)."""
    fresh = not builder.is_prepared()
    if fresh:
        log.info("Preparing data set %s in %s (once; later runs reuse it)...", builder.name, builder.data_dir)
    # tfds prints its own "Downloading and preparing ..." lines to stdout, where a command's results go.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        builder.download_and_prepare()
    if fresh:
        log.debug("%s", said.getvalue().strip())
        log.info("Data set %s ready.", builder.name)
    return builder


def decoders_for(builder, pp_spec: str) -> dict | None:
    """Skip tfds' decoding of images of any size when the pp ops decode them (decode late: after the crop
    is known, only the crop window of a JPEG). Images of a fixed shape are decoded by tfds as before (the
    ``decode`` op passes them through): nothing to gain, and they may be cached decoded."""
    import tensorflow_datasets as tfds

    names = {p.strip().split("(")[0].strip() for p in (pp_spec or "").split("|")}
    if not names & set(preprocess.DECODE_OPS):
        return None
    keys = [k for k in image_keys(builder) if None in builder.info.features[k].shape]
    return {k: tfds.decode.SkipDecoding() for k in keys} or None


def _pp_defaults(builder) -> dict:
    """Defaults for pp op arguments taken from the dataset: the image channel count for ``decode``."""
    keys = image_keys(builder)
    if not keys:
        return {}
    c = builder.info.features[keys[0]].shape[-1]
    return {"channels": int(c) if c else 3}


def process_split(split: str, process_index: int, process_count: int) -> str:
    if process_count == 1:
        return split
    import tensorflow_datasets as tfds

    return tfds.even_splits(split, n=process_count)[process_index]


def num_examples(cfg: Any, split: str) -> int:
    """Examples in ``split``; for the training split with ``config.data.train_examples`` set, that many
    (the subset the run trains on, so ``num_epochs`` counts epochs of the subset)."""
    builder = get_builder(cfg)
    n = split_size(builder, split, cfg)
    want = subset_lib.requested(cfg)
    if want and split == cfg.get("train_split", "train"):
        subset_lib.check_fits(want, n, cfg.get("num_classes", None), f"{split!r} of {builder.name}")
        return want
    return n


def num_steps(run: Any, data: Any = None) -> int:
    """The training steps of a run config (a ConfigDict or its JSON dict): ``total_steps`` if set, else
    ``num_epochs`` epochs of the training split of ``data`` (default ``run["data"]``) at ``batch_size``."""
    if run.get("total_steps"):
        return int(run["total_steps"])
    data = run["data"] if data is None else data
    n = num_examples(data, data.get("train_split", "train"))
    return int(math.ceil(float(run.get("num_epochs") or 0) * n / int(run["batch_size"])))


def _defaults(process_index, process_count, local_device_count):
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count,
            jax.local_device_count() if local_device_count is None else local_device_count)


def _to_devices(batch: dict, devices: int) -> dict:
    """Numeric features only (ids and strings stay on the host), split over the local devices."""
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()
            if not k.startswith("_") and v.dtype.kind in "biuf"}


# ============================================================================ the training stream


def shuffled_indices(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Example index of each global stream position: ``π_e(t mod n)``, ``e = t // n`` (module docstring)."""
    tf = _tf()
    epochs, within = np.divmod(positions.astype(np.int64), n)
    out = np.empty_like(within)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = tf.random.experimental.index_shuffle(
            tf.constant(within[sel]), seed=tf.constant([int(seed), int(e)], tf.int64), max_index=n - 1).numpy()
    return out


def read_ahead_batches(cfg: Any) -> int:
    """How many batches the training stream reads beyond those it has yielded, at most.

    The prefetch buffer (``config.data.prefetch`` batches; 2 when it is 0, i.e. tf.data's autotuned
    buffer, which this caps), the batch being assembled, and the examples in the parallel pp ops. A
    resume at any step therefore reads at most ``(k + read_ahead_batches) x per-process batch`` records
    to yield its first ``k`` batches, however fast the machine is.
    """
    return (int(cfg.get("prefetch", 2)) or 2) + 2


def _indexed_stream(source, *, seed: int, start_step: int, global_batch: int, per_proc: int, pi: int,
                    stop: threading.Event, credit: threading.Semaphore):
    """tf.data dataset of single examples, in stream order from ``start_step`` (this process's share).

    The reads run in a Python generator inside tf.data, one per-process batch at a time, each after
    taking one of ``credit``'s permits: :func:`train_iterator` starts it with
    :func:`read_ahead_batches` permits and returns one per batch it yields, so the reads never run
    further ahead than that. Setting ``stop`` ends the stream, which :func:`train_iterator` does
    before it lets go of the iterator (see there).
    """
    tf = _tf()
    n = len(source)

    def gen():
        step = start_step
        while not stop.is_set():
            if not credit.acquire(timeout=0.1):
                continue  # the consumer is behind: wait (and notice a stop)
            pos = step * global_batch + pi * per_proc + np.arange(per_proc, dtype=np.int64)
            ex = source.read(shuffled_indices(pos, n, seed))
            ex["_seed"] = np.stack([np.full(per_proc, int(seed), np.int64), pos], axis=1)
            yield ex
            step += 1

    sig = {**source.signature(), "_seed": tf.TensorSpec((None, 2), tf.int64)}
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig).unbatch()
    return ds.map(source.parse, num_parallel_calls=tf.data.AUTOTUNE) if source.kind == "records" else ds


def _sequential_stream(builder, split: str, cfg: Any, decoders, *, seed: int, start_step: int, per_proc: int,
                       pi: int, pc: int):
    """Fallback without random access: this process's shard in a shuffle-buffer order; resume skips records."""
    tf = _tf()
    split = process_split(split, pi, pc)
    base = as_dataset(builder, split, cfg, decoders)
    n = split_size(builder, split, cfg)
    if n < per_proc:
        raise DataError(f"split {split!r} has {n} examples, fewer than one per-process batch ({per_proc}).")
    epoch0, offset = divmod(start_step * per_proc, n)
    buffer = int(cfg.get("shuffle_buffer", 10_000)) or n
    key = (int(seed) * 1_000_003 + pi) % (2**31 - 1)

    def epoch(e):
        d = base.shuffle(min(buffer, n), seed=tf.cast(key, tf.int64) * 7919 + e, reshuffle_each_iteration=False)
        d = d.enumerate()
        return d.map(lambda i, ex: {**ex, "_seed": tf.stack([tf.cast(key, tf.int64), e * n + i])})

    if offset:
        log.warning("Resuming %s at step %d: %d records of the epoch are read and skipped (its files allow no "
                    "random access; prepare it with --file_format=array_record for O(1) resume).",
                    builder.name, start_step, offset)
    return tf.data.Dataset.range(epoch0, 2**62).flat_map(epoch).skip(offset)


# ============================================================================ iterators

# The training streams not yet ended, by id: each entry ends one (see train_iterator's finally).
_OPEN_STREAMS: dict[int, Any] = {}
_ATEXIT = []


def _end_stream(stop: threading.Event, batches) -> None:
    stop.set()
    try:
        for _ in batches:
            pass
    except Exception:  # noqa: BLE001  an ended or failed stream has nothing left to wait for
        pass


def _end_open_streams() -> None:
    """At exit, before the interpreter finalizes: end every training stream a program left open.

    A stream still open at finalization ends from the module cleanup, when tf.data's threads may no
    longer take the GIL to run the generator's reads: the process then hangs at exit (seen in 2 of 8
    runs of a script that returned with its iterator open). atexit handlers run before that point.
    """
    while _OPEN_STREAMS:
        _OPEN_STREAMS.popitem()[1]()


def train_iterator(cfg: Any, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   local_device_count: int | None = None,
                   extra_ops: tuple = (), source: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of training batches starting at ``start_step``.

    ``extra_ops`` (functions example -> example, from the task) run after the config's ops.
    ``source`` reuses a :func:`train_source` (benchmarks, tests that count reads).
    """
    tf = _tf()
    pi, pc, nd = _defaults(process_index, process_count, local_device_count)
    if global_batch_size % pc or (global_batch_size // pc) % nd:
        raise DataError(f"config.batch_size={global_batch_size} must divide evenly over {pc} processes x {nd} "
                        "local devices.")
    per_proc = global_batch_size // pc
    split = cfg.get("train_split", "train")
    builder = get_builder(cfg)
    spec = cfg.get("pp_train", "decode")
    ops = preprocess.parse(spec, field="config.data.pp_train", defaults=_pp_defaults(builder)) + list(extra_ops)
    decoders = decoders_for(builder, spec)
    source = source if source is not None else train_source(cfg, builder, split, decoders)
    stop = threading.Event()
    credit = threading.Semaphore(read_ahead_batches(cfg))
    if source is not None:
        if len(source) < global_batch_size:
            raise DataError(f"split {split!r} has {len(source)} examples, fewer than one batch "
                            f"(config.batch_size={global_batch_size}).")
        ds = _indexed_stream(source, seed=seed, start_step=start_step, global_batch=global_batch_size,
                             per_proc=per_proc, pi=pi, stop=stop, credit=credit)
    else:
        ds = _sequential_stream(builder, split, cfg, decoders, seed=seed, start_step=start_step, per_proc=per_proc,
                                pi=pi, pc=pc)
    ds = ds.map(functools.partial(preprocess.apply, ops), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_proc, drop_remainder=True).prefetch(int(cfg.get("prefetch", 2)) or tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.deterministic = True
    ds = ds.with_options(opts)
    mix = cfg.get("mixup", None)
    alpha = float(mix.get("alpha", 0.0)) if mix else 0.0
    p = float(mix.get("p", 0.0)) if mix else 0.0
    step = start_step
    batches = ds.as_numpy_iterator()
    if source is not None:
        if not _ATEXIT:  # registered after TensorFlow's own handlers, so it runs before them
            atexit.register(_end_open_streams)
            _ATEXIT.append(True)
        end = _OPEN_STREAMS[id(stop)] = functools.partial(_end_stream, stop, batches)
    try:
        for batch in batches:
            if alpha > 0 and p > 0:
                batch = preprocess.mixup(batch, seed=(int(seed), step), alpha=alpha, p=p,
                                         num_classes=int(cfg.num_classes))
            batch["mask"] = np.ones(per_proc, np.float32)
            credit.release()  # one batch out: the reads may go one batch further
            yield _to_devices(batch, nd)
            step += 1
    finally:
        # Destroying a tf.data iterator waits for its in-flight work while holding the GIL; a read in
        # the Python generator waiting for the GIL then deadlocks the process (an error after the first
        # batch hung instead of exiting). So the generator is told to stop and the stream drained first.
        # A stream still open when the program exits is ended by _end_open_streams instead (and this block,
        # run once more when the interpreter collects the generator, then has nothing left to do).
        if source is not None and not stop.is_set():  # (the sequential stream has no Python generator)
            _OPEN_STREAMS.pop(id(stop), None)
            end()


def eval_iterator(cfg: Any, *, global_batch_size: int, split: str | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  local_device_count: int | None = None,
                  extra_ops: tuple = (), examples: np.ndarray | None = None,
                  pp_field: str = "config.data.pp_eval") -> Iterator[dict[str, np.ndarray]]:
    """Every example of the split exactly once; the last batch padded with ``mask = 0``.

    ``examples``: only these indices of the split (file order), in increasing order, each process
    taking a contiguous share; images are decoded by the pp ops for those examples only. ``pp_field``
    names the pp string in error messages.
    """
    tf = _tf()
    pi, pc, nd = _defaults(process_index, process_count, local_device_count)
    if global_batch_size % pc or (global_batch_size // pc) % nd:
        raise DataError(f"config.eval_batch_size={global_batch_size} must divide evenly over {pc} processes x "
                        f"{nd} local devices.")
    per_proc = global_batch_size // pc
    split = split or cfg.get("eval_split", "test")
    builder = get_builder(cfg)
    spec = cfg.get("pp_eval", "decode")
    ops = preprocess.parse(spec, field=pp_field, defaults=_pp_defaults(builder)) + list(extra_ops)
    if examples is None:
        ds = as_dataset(builder, process_split(split, pi, pc), cfg, decoders_for(builder, spec))
    else:
        import tensorflow_datasets as tfds

        shares = np.array_split(np.unique(np.asarray(examples, np.int64)), pc)
        keep = np.zeros(split_size(builder, split, cfg), bool)
        keep[shares[pi]] = True
        decoders = decoders_for(builder, spec)
        if {p.strip().split("(")[0].strip() for p in (spec or "").split("|")} & set(preprocess.DECODE_OPS):
            decoders = {k: tfds.decode.SkipDecoding() for k in image_keys(builder)} or None  # only kept ones
        keep_t = tf.constant(keep)

        def kept(i, ex):
            return tf.gather(keep_t, i)

        def example(i, ex):
            return ex

        ds = as_dataset(builder, split, cfg, decoders).enumerate().filter(kept).map(example)
    ds = ds.map(lambda ex: preprocess.apply(ops, {**ex, "_seed": tf.constant([0, 0], tf.int64)}),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_proc).prefetch(2)
    if pc > 1:  # all processes must run the same number of (collective) eval steps
        counts = ([split_size(builder, process_split(split, i, pc), cfg) for i in range(pc)] if examples is None
                  else [len(share) for share in shares])
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
