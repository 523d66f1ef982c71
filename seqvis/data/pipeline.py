"""tfds dataset -> tf.data pipeline -> numpy batches ``[local_devices, per_device_batch, ...]``.

Where training examples come from (chosen per run and logged):

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

import functools
import logging
import math
import os
import threading
from typing import Any, Iterator

import numpy as np

from seqvis.data import preprocess
from seqvis.data.builders import LOCAL_BUILDERS, local_builder_class
from seqvis.data import subset as subset_lib
from seqvis.errors import ConfigError
from seqvis.errors import DataError  # also importable from here, its old home

log = logging.getLogger(__name__)


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
    return tf


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
            make_builder().download_and_prepare()
        multihost_utils.sync_global_devices("seqvis_prepare_local_dataset")
    builder = make_builder()
    builder.download_and_prepare()  # a no-op when the data is already there
    return builder


def _not_prepared(name: str, data_dir: str | None, err: Exception) -> DataError:
    return DataError(
        f"Dataset {name!r} is not prepared in {data_dir or 'the default tfds data_dir'} and this code never "
        f"downloads at run time ({type(err).__name__}). Prepare it on a machine with internet: "
        f"`tfds build {name} --data_dir=DIR --file_format=array_record` (or follow the dataset's manual-download "
        "instructions), copy DIR here and set --config.data.data_dir=DIR. Offline alternatives: fashion_mnist / "
        "mnist (local IDX files).")


def _image_keys(builder) -> list[str]:
    import tensorflow_datasets as tfds

    return [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]


def decoders_for(builder, pp_spec: str) -> dict | None:
    """Skip tfds' decoding of images of any size when the pp ops decode them (decode late: after the crop
    is known, only the crop window of a JPEG). Images of a fixed shape are decoded by tfds as before (the
    ``decode`` op passes them through): nothing to gain, and they may be cached decoded."""
    import tensorflow_datasets as tfds

    names = {p.strip().split("(")[0].strip() for p in (pp_spec or "").split("|")}
    if not names & set(preprocess.DECODE_OPS):
        return None
    keys = [k for k in _image_keys(builder) if None in builder.info.features[k].shape]
    return {k: tfds.decode.SkipDecoding() for k in keys} or None


def _pp_defaults(builder) -> dict:
    """Defaults for pp op arguments taken from the dataset: the image channel count for ``decode``."""
    keys = _image_keys(builder)
    if not keys:
        return {}
    c = builder.info.features[keys[0]].shape[-1]
    return {"channels": int(c) if c else 3}


def as_dataset(builder, split: str, cfg: Any, decoders: dict | None = None):
    """The split in file order as a tf.data dataset (tfrecord files through tfds, array_record files through
    their data source: tfds cannot stream those with ``as_dataset``)."""
    tf = _tf()
    records = RecordSource.open(builder, split)
    if records is not None:
        ds = RecordSource(builder, split, records, decoders).in_order()
    else:
        try:
            ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
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


_COUNTED: dict[tuple, int] = {}


def _split_key(builder, split: str) -> tuple:
    """What names a prepared split within this process (memoised counts, the in-memory cache)."""
    return builder.name, str(builder.data_dir), split


def split_size(builder, split: str, cfg: Any) -> int:
    """Examples in ``split``, from the dataset info; counted (once per process) only when the info has no
    sizes, as with tfds mock data."""
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:
        pass
    except ValueError as e:
        raise DataError(f"config.data split {split!r} is not a split of {builder.name}: {e}") from e
    key = _split_key(builder, split)
    if key not in _COUNTED:
        log.info("The dataset info of %s has no size for split %r: counting it once.", builder.name, split)
        _COUNTED[key] = sum(1 for _ in as_dataset(builder, split, cfg))
    return _COUNTED[key]


def num_examples(cfg: Any, split: str) -> int:
    """Examples in ``split``; for the training split with ``config.data.train_examples`` set, that many
    (the subset the run trains on, so ``num_epochs`` counts epochs of the subset)."""
    builder = get_builder(cfg)
    n = split_size(builder, split, cfg)
    want = subset_lib.requested(cfg)
    if want and split == cfg.get("train_split", "train"):
        if want > n:
            raise ConfigError(f"{subset_lib.FIELD}={want} exceeds the training split {split!r} of {builder.name} "
                              f"({n:,} examples); use at most {n} (0 = the whole split).")
        return want
    return n


def _defaults(process_index, process_count, local_device_count):
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count,
            jax.local_device_count() if local_device_count is None else local_device_count)


def _to_devices(batch: dict, devices: int) -> dict:
    """Numeric features only (ids and strings stay on the host), split over the local devices."""
    return {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()
            if not k.startswith("_") and v.dtype.kind in "biuf"}


# ============================================================================ cache policy


def host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def decoded_bytes(builder, split: str, cfg: Any) -> int | None:
    """Bytes of ``split`` decoded in memory, or None when a feature has no fixed shape (images of any size).

    Fixed-shape tensors count ``prod(shape) · itemsize`` per example; strings (captions, ids)
    count at most the split's size on disk, which holds them verbatim.
    """
    import tensorflow as tf

    per_example, strings = 0, False
    for info in tf.nest.flatten(builder.info.features.get_tensor_info()):
        if any(d is None for d in info.shape):
            return None
        if info.tf_dtype == tf.string:
            strings = True
        else:
            per_example += int(np.prod(info.shape, dtype=np.int64)) * info.tf_dtype.size
    n = split_size(builder, split, cfg)
    extra = 0
    if strings:
        try:
            extra = int(builder.info.splits[split].num_bytes)
        except (KeyError, ValueError, AttributeError):
            extra = 0
        extra = extra or 1024 * n  # no size recorded (mock data): a generous 1 KiB per example
    return n * per_example + extra


def cache_plan(builder, split: str, cfg: Any) -> tuple[bool, str]:
    """(cache decoded in memory?, why) for ``config.data.cache`` = auto | memory | none."""
    mode = cfg.get("cache", "auto")
    mode = {True: "memory", False: "none"}.get(mode, mode)
    if mode not in ("auto", "memory", "none"):
        raise DataError(f"config.data.cache={mode!r}: use 'auto' (decoded in memory when it fits), 'memory' or "
                        "'none'.")
    if mode == "none":
        return False, "config.data.cache='none'"
    size = decoded_bytes(builder, split, cfg)
    budget_gb = cfg.get("cache_max_gb", None)
    budget = float(budget_gb) * 2**30 if budget_gb is not None else host_memory_bytes() / 4
    if size is None:
        why = "its decoded size is unknown (features without a fixed shape)"
        if mode == "memory":
            raise DataError(f"config.data.cache='memory' but {builder.name} {split!r}: {why}; use cache='auto'.")
        return False, why
    if mode == "memory":
        return True, f"config.data.cache='memory' ({size / 2**30:.2f} GiB decoded)"
    if size > budget:
        return False, (f"decoded it needs {size / 2**30:.2f} GiB > config.data.cache_max_gb="
                       f"{budget / 2**30:.2f}")
    return True, f"decoded it needs {size / 2**30:.2f} GiB <= config.data.cache_max_gb={budget / 2**30:.2f}"


# ============================================================================ random-access sources


_MEMORY: dict[tuple, Any] = {}  # the last split decoded in memory, reused by the next run in this process


def _mocked() -> bool:
    """Inside ``tfds.testing.mock_data``: generated examples that differ between calls, never reused."""
    import tensorflow_datasets as tfds

    return getattr(tfds.core.DatasetBuilder.as_dataset, "__module__", "").startswith("tensorflow_datasets.testing")


class MemorySource:
    """The split decoded once into numpy arrays (a nested dict like the tfds features).

    The arrays of the last split are kept for the next run in the same process (sweep points,
    tests): decoding 60k Fashion-MNIST images takes seconds, reading prepared files is immutable.
    """

    kind = "memory"

    def __init__(self, builder, split: str, cfg: Any):
        tf = _tf()
        key = _split_key(builder, split)
        if key not in _MEMORY or _mocked():
            _MEMORY.clear()  # at most one decoded split held
            parts = list(as_dataset(builder, split, cfg).batch(4096).as_numpy_iterator())
            if not parts:
                raise DataError(f"split {split!r} of {builder.name} is empty.")
            # Strings as fixed-width bytes: tf.data's generator input takes no multi-dimensional object arrays.
            _MEMORY[key] = tf.nest.map_structure(
                lambda *xs: np.concatenate(xs).astype(np.bytes_) if xs[0].dtype == object else np.concatenate(xs),
                *parts)
        self.arrays = _MEMORY[key]
        self.size = len(tf.nest.flatten(self.arrays)[0])
        self.reads = 0

    def __len__(self) -> int:
        return self.size

    def read(self, indices: np.ndarray) -> dict:
        self.reads += len(indices)
        return _tf().nest.map_structure(lambda a: a[indices], self.arrays)

    def signature(self):
        tf = _tf()
        return tf.nest.map_structure(
            lambda a: tf.TensorSpec((None,) + a.shape[1:], tf.string if a.dtype.kind in "OSU" else tf.as_dtype(a.dtype)),
            self.arrays)

    def parse(self, ex: dict) -> dict:
        return ex


class RecordSource:
    """Random access to the serialized records of a prepared split (array_record files).

    Records are returned as bytes and parsed inside tf.data (``features.deserialize_example``),
    with tfds' image decoding skipped when the pp ops decode.
    """

    kind = "records"

    def __init__(self, builder, split: str, data_source, decoders: dict | None):
        self.builder, self.source, self.decoders = builder, data_source, decoders
        self.size = len(data_source)
        self.reads = 0

    @staticmethod
    def open(builder, split: str) -> Any | None:
        """The raw-bytes data source of ``split``, or None when the files allow no random access."""
        import tensorflow_datasets as tfds

        fmt = builder.info.file_format
        if fmt is None or fmt not in tfds.core.file_adapters.FileFormat.with_random_access() or _mocked():
            return None  # tfds mock data generates examples, not records
        try:
            src = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        except (NotImplementedError, ValueError, FileNotFoundError, AssertionError) as e:
            log.info("No random access to %s %s (%s): reading it sequentially.", builder.name, split, e)
            return None
        return src

    def __len__(self) -> int:
        return self.size

    def read(self, indices: np.ndarray) -> dict:
        self.reads += len(indices)
        records = self.source.__getitems__([int(i) for i in indices])
        return {"_record": np.array(records, dtype=object)}

    def signature(self):
        tf = _tf()
        return {"_record": tf.TensorSpec((None,), tf.string)}

    def parse(self, ex: dict) -> dict:
        out = self.builder.info.features.deserialize_example(ex["_record"], decoders=self.decoders)
        return {**out, **{k: v for k, v in ex.items() if k != "_record"}}

    def in_order(self, chunk: int = 256):
        """Every example once, in file order (evaluation, the in-memory cache, counting)."""
        tf = _tf()

        def gen():
            for lo in range(0, self.size, chunk):
                yield self.read(np.arange(lo, min(self.size, lo + chunk)))

        ds = tf.data.Dataset.from_generator(gen, output_signature=self.signature()).unbatch()
        return ds.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE)


class SubsetSource:
    """A fixed subset of another random-access source: position ``i`` is example ``indices[i]`` of the split.

    The training subset of ``config.data.train_examples`` (:mod:`seqvis.data.subset`); the stream
    order, resume and process sharding work on the ``len(indices)`` positions as on a whole split.
    """

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.kind = source.kind

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def reads(self) -> int:
        return self.source.reads

    def read(self, indices: np.ndarray) -> dict:
        return self.source.read(self.indices[np.asarray(indices, np.int64)])

    def signature(self):
        return self.source.signature()

    def parse(self, ex: dict) -> dict:
        return self.source.parse(ex)


_LABELS: dict[tuple, np.ndarray] = {}


def split_labels(builder, split: str, cfg: Any, source: Any = None) -> np.ndarray:
    """The ``label`` of every example of ``split`` in file order (index order of the sources).

    Taken from the in-memory arrays when the split is cached; otherwise read once per process
    (images left encoded) and kept.
    """
    arrays = getattr(source, "arrays", None)
    if isinstance(arrays, dict) and "label" in arrays:
        return np.asarray(arrays["label"])
    key = _split_key(builder, split)
    if key not in _LABELS or _mocked():
        import tensorflow_datasets as tfds

        if "label" not in builder.info.features:
            raise ConfigError(f"{subset_lib.FIELD} selects a class-balanced subset by the 'label' feature, which "
                              f"{builder.name} does not have; set {subset_lib.FIELD}=0.")
        skip = {k: tfds.decode.SkipDecoding() for k in _image_keys(builder)} or None
        ds = as_dataset(builder, split, cfg, skip).map(lambda ex: ex["label"]).batch(4096)
        _LABELS[key] = np.concatenate(list(ds.as_numpy_iterator()))
    return _LABELS[key]


def training_subset(cfg: Any, builder, split: str, source: Any) -> Any:
    """``source`` restricted to the ``config.data.train_examples`` subset, or ``source`` itself when unset."""
    want = subset_lib.requested(cfg)
    if not want:
        return source
    if source is None:
        raise ConfigError(f"{subset_lib.FIELD}={want} needs random access to the training split, and {builder.name} "
                          f"{split!r} is read sequentially; cache it (config.data.cache='memory') or prepare it with "
                          "--file_format=array_record.")
    labels = split_labels(builder, split, cfg, source)
    if len(labels) != len(source):
        raise DataError(f"{builder.name} {split!r}: {len(labels)} labels for {len(source)} examples.")
    indices = subset_lib.subset_indices(labels, want, int(cfg.get("subset_seed", 0) or 0),
                                        cfg.get("num_classes", None))
    log.info("Input: training on %d of the %d examples of %s %r (class-balanced subset, subset_seed=%d).",
             want, len(source), builder.name, split, int(cfg.get("subset_seed", 0) or 0))
    return SubsetSource(source, indices)


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


def _indexed_stream(source, *, seed: int, start_step: int, global_batch: int, per_proc: int, pi: int,
                    stop: threading.Event):
    """tf.data dataset of single examples, in stream order from ``start_step`` (this process's share).

    The reads run in a Python generator inside tf.data; setting ``stop`` ends the stream, which
    :func:`train_iterator` does before it lets go of the iterator (see there).
    """
    tf = _tf()
    n = len(source)

    def gen():
        step = start_step
        while not stop.is_set():
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


def train_source(cfg: Any, builder, split: str, decoders) -> MemorySource | RecordSource | SubsetSource | None:
    """The random-access source of the training split per the cache policy, or None (sequential);
    restricted to the ``config.data.train_examples`` subset when that is set."""
    cache, why = cache_plan(builder, split, cfg)
    if cache:
        log.info("Input: %s %r decoded in host memory (%s).", builder.name, split, why)
        return training_subset(cfg, builder, split, MemorySource(builder, split, cfg))
    src = RecordSource.open(builder, split) if cfg.get("random_access", True) else None
    if src is not None:
        log.info("Input: %s %r read by random access, not cached (%s).", builder.name, split, why)
        return training_subset(cfg, builder, split, RecordSource(builder, split, src, decoders))
    log.info("Input: %s %r read sequentially, not cached (%s); resume re-reads up to one epoch.",
             builder.name, split, why)
    return training_subset(cfg, builder, split, None)


# ============================================================================ iterators


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
    if source is not None:
        if len(source) < global_batch_size:
            raise DataError(f"split {split!r} has {len(source)} examples, fewer than one batch "
                            f"(config.batch_size={global_batch_size}).")
        ds = _indexed_stream(source, seed=seed, start_step=start_step, global_batch=global_batch_size,
                             per_proc=per_proc, pi=pi, stop=stop)
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
    try:
        for batch in batches:
            if alpha > 0 and p > 0:
                batch = preprocess.mixup(batch, seed=(int(seed), step), alpha=alpha, p=p,
                                         num_classes=int(cfg.num_classes))
            batch["mask"] = np.ones(per_proc, np.float32)
            yield _to_devices(batch, nd)
            step += 1
    finally:
        # Destroying a tf.data iterator waits for its in-flight work while holding the GIL; a read in
        # the Python generator waiting for the GIL then deadlocks the process (an error after the first
        # batch hung instead of exiting). So the generator is told to stop and the stream drained first.
        stop.set()
        if source is not None:  # (the sequential stream has no Python generator, and no end)
            try:
                for _ in batches:
                    pass
            except Exception:  # noqa: BLE001  at interpreter exit the reads fail fast instead: nothing waits
                pass


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
    spec = cfg.get("pp_eval", "decode")
    ops = preprocess.parse(spec, field="config.data.pp_eval", defaults=_pp_defaults(builder)) + list(extra_ops)
    ds = as_dataset(builder, process_split(split, pi, pc), cfg, decoders_for(builder, spec))
    ds = ds.map(lambda ex: preprocess.apply(ops, {**ex, "_seed": tf.constant([0, 0], tf.int64)}),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_proc).prefetch(2)
    if pc > 1:  # all processes must run the same number of (collective) eval steps
        counts = [split_size(builder, process_split(split, i, pc), cfg) for i in range(pc)]
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
