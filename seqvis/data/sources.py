"""Where examples come from: a prepared split in file order, decoded in memory, by record, or a subset.

Every source has the same small interface, used by :mod:`seqvis.data.pipeline` to read the
training stream by index (``len``, ``read(indices) -> dict of arrays``, ``signature()`` for
tf.data, ``parse(example)`` inside tf.data, ``kind``, ``reads``):

- :class:`MemorySource`: the split decoded once into host arrays (the ``memory`` cache);
- :class:`RecordSource`: random access to the serialized records of ``array_record`` files;
- :class:`SubsetSource`: positions ``0 .. n-1`` of a fixed subset of another source (the
  class-balanced subset of ``config.data.train_examples``, :func:`training_subset`).

Which one a run uses is :func:`train_source`'s choice: the cache policy (``config.data.cache``,
:func:`cache_plan`; see :mod:`seqvis.data.pipeline` for the three ways of reading), then random
access to the records if the files allow it, else none (the pipeline streams the files).
:func:`as_dataset` reads a whole split in file order (evaluation, the in-memory cache,
counting: :func:`split_size`); :func:`split_labels` its labels, for the subset.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from seqvis.data import subset as subset_lib
from seqvis.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def host_tf():
    """TensorFlow, kept off the accelerators JAX uses (deferred on purpose: imported when data is read)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def split_key(builder, split: str) -> tuple:
    """What names a prepared split within this process (memoised counts, the in-memory cache)."""
    return builder.name, str(builder.data_dir), split


def image_keys(builder) -> list[str]:
    """The features of ``builder`` that are images."""
    import tensorflow_datasets as tfds  # deferred on purpose: heavy, only when data is read

    return [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]


def _not_prepared(name: str, data_dir: str | None, err: Exception) -> DataError:
    return DataError(
        f"Dataset {name!r} is not prepared in {data_dir or 'the default tfds data_dir'} and this code never "
        f"downloads at run time ({type(err).__name__}). Prepare it on a machine with internet: "
        f"`tfds build {name} --data_dir=DIR --file_format=array_record` (or follow the dataset's manual-download "
        "instructions), copy DIR here and set --config.data.data_dir=DIR. Offline alternatives: fashion_mnist / "
        "mnist (local IDX files).")


def as_dataset(builder, split: str, cfg: Any, decoders: dict | None = None):
    """The split in file order as a tf.data dataset (tfrecord files through tfds, array_record files through
    their data source: tfds cannot stream those with ``as_dataset``)."""
    tf = host_tf()
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


COUNTED: dict[tuple, int] = {}  # split sizes counted in this process (tfds info without sizes)


def split_size(builder, split: str, cfg: Any) -> int:
    """Examples in ``split``, from the dataset info; counted (once per process) only when the info has no
    sizes, as with tfds mock data."""
    try:
        return int(builder.info.splits[split].num_examples)
    except KeyError:
        pass
    except ValueError as e:
        raise DataError(f"config.data split {split!r} is not a split of {builder.name}: {e}") from e
    key = split_key(builder, split)
    if key not in COUNTED:
        ds = as_dataset(builder, split, cfg)  # first: a set that is not prepared fails here, with its message
        log.info("The dataset info of %s has no size for split %r: counting it once.", builder.name, split)
        COUNTED[key] = sum(1 for _ in ds)
    return COUNTED[key]


# ============================================================================ random-access sources


_MEMORY: dict[tuple, Any] = {}  # the last split decoded in memory, reused by the next run in this process


def _mocked() -> bool:
    """Inside ``tfds.testing.mock_data``: generated examples that differ between calls, never reused."""
    import tensorflow_datasets as tfds  # deferred on purpose: heavy, only when data is read

    return getattr(tfds.core.DatasetBuilder.as_dataset, "__module__", "").startswith("tensorflow_datasets.testing")


class MemorySource:
    """The split decoded once into numpy arrays (a nested dict like the tfds features).

    The arrays of the last split are kept for the next run in the same process (sweep points,
    tests): decoding 60k Fashion-MNIST images takes seconds, reading prepared files is immutable.
    """

    kind = "memory"

    def __init__(self, builder, split: str, cfg: Any):
        tf = host_tf()
        key = split_key(builder, split)
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
        return host_tf().nest.map_structure(lambda a: a[indices], self.arrays)

    def signature(self):
        tf = host_tf()
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
        import tensorflow_datasets as tfds  # deferred on purpose: heavy, only when data is read

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
        # tfds' data sources read a batch of keys through the sequence protocol's batched read, __getitems__
        # (the one grain and torch's DataLoader call); the tests' reads of array_record sets go through it.
        records = self.source.__getitems__([int(i) for i in indices])
        return {"_record": np.array(records, dtype=object)}

    def signature(self):
        tf = host_tf()
        return {"_record": tf.TensorSpec((None,), tf.string)}

    def parse(self, ex: dict) -> dict:
        out = self.builder.info.features.deserialize_example(ex["_record"], decoders=self.decoders)
        return {**out, **{k: v for k, v in ex.items() if k != "_record"}}

    def in_order(self, chunk: int = 256):
        """Every example once, in file order (evaluation, the in-memory cache, counting)."""
        tf = host_tf()

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
    key = split_key(builder, split)
    if key not in _LABELS or _mocked():
        import tensorflow_datasets as tfds  # deferred on purpose: heavy, only when data is read

        if "label" not in builder.info.features:
            raise ConfigError(f"{subset_lib.FIELD} selects a class-balanced subset by the 'label' feature, which "
                              f"{builder.name} does not have; set {subset_lib.FIELD}=0.")
        skip = {k: tfds.decode.SkipDecoding() for k in image_keys(builder)} or None
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
    seed = subset_lib.subset_seed(cfg)
    indices = subset_lib.subset_indices(labels, want, seed, cfg.get("num_classes", None))
    log.info("Input: training on %d of the %d examples of %s %r (class-balanced subset, subset_seed=%d).",
             want, len(source), builder.name, split, seed)
    return SubsetSource(source, indices)


# ============================================================================ which source: the cache policy


def host_memory_bytes() -> int:
    """Physical memory of this host (8 GiB when the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def decoded_bytes(builder, split: str, cfg: Any) -> int | None:
    """Bytes of ``split`` decoded in memory, or None when a feature has no fixed shape (images of any size).

    Fixed-shape tensors count ``prod(shape) · itemsize`` per example; strings (captions, ids)
    count at most the split's size on disk, which holds them verbatim.
    """
    import tensorflow as tf  # deferred on purpose: heavy, only when data is read

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


def check_cache_budget(cfg: Any) -> float | None:
    """``config.data.cache_max_gb``: None (a quarter of the host's memory) or a size in GiB >= 0."""
    budget_gb = cfg.get("cache_max_gb", None)
    if budget_gb is not None and not (float(budget_gb) >= 0 and math.isfinite(float(budget_gb))):
        raise DataError(f"config.data.cache_max_gb={budget_gb} must be a size in GiB >= 0 (unset: a quarter of "
                        "the host's memory); to never cache, set --config.data.cache=none.")
    return budget_gb


def cache_plan(builder, split: str, cfg: Any) -> tuple[bool, str]:
    """(cache decoded in memory?, why) for ``config.data.cache`` = auto | memory | none."""
    mode = cfg.get("cache", "auto")
    mode = {True: "memory", False: "none"}.get(mode, mode)
    if mode not in ("auto", "memory", "none"):
        raise DataError(f"config.data.cache={mode!r}: use 'auto' (decoded in memory when it fits), 'memory' or "
                        "'none'.")
    budget_gb = check_cache_budget(cfg)
    if mode == "none":
        return False, "config.data.cache='none'"
    size = decoded_bytes(builder, split, cfg)
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
