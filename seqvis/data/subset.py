"""Class-balanced, seeded, nested subsets of a training split (``config.data.train_examples``).

A data-size study trains on ``n`` examples of the training split for several ``n``. The
subset of ``n`` examples takes, from every class ``c``, the first ``n / K`` entries of a
seeded permutation of that class's examples (``K`` = ``config.data.num_classes``; the
permutation of class ``c`` is seeded with ``(config.data.subset_seed, c)``). Hence:

- balanced: exactly ``n / K`` examples of every class (``n`` must be a multiple of ``K``);
- seeded: the subset is a function of ``(labels, n, subset_seed)`` only, not of the
  training seed, the batch size or the process count;
- nested: for ``n1 < n2`` the smaller subset is inside the larger one (prefixes of the
  same permutations), so adding data only adds examples.

The pipeline reads the subset by index through the same order as a whole split (a stateless
permutation of the ``n`` positions per epoch, see :mod:`seqvis.data.pipeline`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from seqvis.errors import ConfigError

FIELD = "config.data.train_examples"


# ============================================================================ the rules (each checked here only)


def check_multiple(size: int, k: int, from_config: bool = True) -> None:
    """``size`` must be a multiple of the ``k`` classes (each class gets ``size / k``).

    ``from_config``: ``k`` is ``config.data.num_classes`` (named in the message) rather than
    counted from the labels."""
    if size % k:
        lo, hi = (size // k) * k, (size // k + 1) * k
        classes = f"config.data.num_classes={k}" if from_config else f"the {k} classes"
        raise ConfigError(f"{FIELD}={size} is not a multiple of {classes}, so the classes cannot get equal counts; "
                          f"use {lo or hi} or {hi}.")


def check_fits(size: int, split_size: int, k: int | None = None, split: str = "") -> None:
    """``size`` must not exceed the ``split_size`` examples of the training split (``split``: how to
    name it, e.g. ``'train' of fashion_mnist_idx``); the advice is the largest multiple of ``k``."""
    if size > split_size:
        at_most = (split_size // k) * k if k else split_size
        raise ConfigError(f"{FIELD}={size} exceeds the training split {split + ' ' if split else ''}"
                          f"({split_size:,} examples); use at most {at_most} (0 = the whole split).")


def subset_seed(cfg: Any) -> int:
    """``config.data.subset_seed`` as an int (default 0), refused when negative."""
    seed = (cfg.get("subset_seed", 0) if cfg is not None else 0) or 0
    if int(seed) < 0:
        raise ConfigError(f"config.data.subset_seed={seed} must be >= 0.")
    return int(seed)


# ============================================================================ config -> subset


def requested(cfg: Any) -> int:
    """``config.data.train_examples`` as an int (0 = the whole split), checked without reading data.

    Refused: a negative or non-integer value, a value that is not a multiple of
    ``config.data.num_classes`` (the classes could not all get the same count), a negative
    ``subset_seed``.
    """
    raw = cfg.get("train_examples", 0) if cfg is not None else 0
    if raw is None or raw == 0:
        return 0
    if isinstance(raw, bool) or not float(raw).is_integer() or int(raw) < 0:
        raise ConfigError(f"{FIELD}={raw!r} must be a whole number >= 0 (0 = the whole training split); "
                          "e.g. --config.data.train_examples=1000.")
    n = int(raw)
    k = cfg.get("num_classes", None)
    if k:
        check_multiple(n, int(k))
    subset_seed(cfg)
    return n


def class_prefixes(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> list[np.ndarray]:
    """For every class ``c`` of ``labels [n]``, the first ``per_class`` indices of a permutation of that class's
    examples seeded with ``(seed, c)`` (the draw behind the balanced, nested subsets above and the few-shot
    sets of :mod:`seqvis.evaluation.fewshot`). The caller has checked that every class has enough examples."""
    out = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        out.append(members[np.random.default_rng([int(seed), c]).permutation(len(members))[:per_class]])
    return out


def subset_indices(labels: np.ndarray, size: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of the class-balanced subset of ``size`` examples (module docstring).

    ``labels`` holds the class of every example of the split; classes are ``0 .. K-1`` with
    ``K = num_classes`` (default: ``labels.max() + 1``). Raises :class:`ConfigError` naming
    ``config.data.train_examples`` when ``size`` is not a multiple of ``K`` or exceeds the split
    or a class has fewer than ``size / K`` examples.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ConfigError(f"{FIELD}={size}: the training split has no labelled examples.")
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"{FIELD}={size}: a balanced subset needs integer class labels; this split's labels are "
                          f"{labels.dtype}. Set {FIELD}=0 to train on the whole split.")
    k = int(num_classes) if num_classes else int(labels.max()) + 1
    check_fits(size, labels.size, k)
    check_multiple(size, k, from_config=bool(num_classes))
    per_class = size // k
    counts = np.bincount(labels, minlength=k)
    if len(counts) > k:
        raise ConfigError(f"{FIELD}={size}: the split has labels up to {len(counts) - 1} but "
                          f"config.data.num_classes={k}.")
    if counts.min() < per_class:
        c = int(np.argmin(counts))
        raise ConfigError(f"{FIELD}={size} needs {per_class} examples of each of the {k} classes, but class {c} has "
                          f"only {counts[c]}; use at most {int(counts.min()) * k}.")
    return np.sort(np.concatenate(class_prefixes(labels, k, per_class, seed))).astype(np.int64)
