"""Few-shot linear transfer: closed-form regularised least squares on frozen features.

The probe of the ViT and Scaling-ViT papers (big_vision's ``fewshot_lsr``). Given features
``x_train [n, d]`` of a k-shot training set (k examples of each of the C classes) and of a
test set ``x_test [m, d]``:

1. whiten with the training set's statistics: ``x <- (x - μ) / (σ + 1e-5)``, μ and σ the
   per-feature mean and (population) standard deviation of ``x_train``;
2. append a constant feature ``100`` (the bias: its weight is penalised like the others,
   but a weight ``b`` on it costs ``λ (b / 100)²`` for an offset ``b``, i.e. next to nothing);
3. regress ±1 one-hot targets ``Y = 2·onehot(y) - 1 [n, C]`` with an L2 penalty λ::

       W = argmin ||X W - Y||² + λ ||W||²  =  (XᵀX + λI)⁻¹ XᵀY      (primal, n >= d + 1)
                                         =  Xᵀ (XXᵀ + λI)⁻¹ Y      (dual,   n <  d + 1)

   the two are the same matrix (push-through identity); the smaller system is solved;
4. predict ``argmax_c (x W)_c`` and report the accuracy on the test set.

Everything is float64 numpy on the host (a few hundred to a few thousand training rows,
features of width ≤ a few thousand: no device work is worth it). A feature that is constant
over the training set (σ = 0) is 0 after whitening, so its weight is exactly 0 in both forms;
it is set to exactly 0 on the training and the test rows (rather than ``(x - μ) / 1e-5``, whose
round-off a 1e5 factor would blow up), which is the prediction the formula defines.

k-shot sets (:func:`kshot_indices`): from every class ``c`` the first ``k`` entries of a
permutation of that class's examples seeded with ``(seed, c)``, so a set is class-balanced,
a function of ``(labels, k, seed)`` only, and nested in ``k`` (the 5-shot set of a seed holds
its 1-shot set).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seqvis.data.subset import class_prefixes
from seqvis.errors import ConfigError, DataError

BIAS_CONSTANT = 100.0  # the appended bias feature (big_vision's value)
STD_EPS = 1e-5  # added to the per-feature standard deviation before dividing
_TEST_CHUNK = 8192  # test rows projected at a time (bounds the float64 copy)


def _whiten(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature mean, ``std + 1e-5``, and which features vary (any two training values differ; a
    float mean of equal values can miss them by an ulp, so ``std > 0`` would not say it exactly)."""
    return x_train.mean(axis=0), x_train.std(axis=0) + STD_EPS, np.any(x_train != x_train[:1], axis=0)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.full((x.shape[0], 1), BIAS_CONSTANT, x.dtype)], axis=1)


def ridge_weights(x: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
    """``W [d, C]`` minimising ``||x W - targets||² + l2_reg ||W||²`` (``x [n, d]``), by the smaller of
    the primal ``(d x d)`` and dual ``(n x n)`` systems (both symmetric positive definite for l2_reg > 0)."""
    n, d = x.shape
    if n >= d:
        return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)


def fewshot_lsr(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float) -> float:
    """Test accuracy of the regularised least-squares probe (module docstring) fitted on ``(x_train, y_train)``.

    ``x_train [n, d]``, ``y_train [n]`` ints in ``[0, num_classes)``; ``x_test [m, d]``, ``y_test [m]``;
    ``l2_reg`` > 0. Any ``n >= 1`` works, including one example per class, ``d > n`` and
    features of zero variance.
    """
    y_test = np.asarray(y_test).reshape(-1)
    if len(y_test) != len(x_test):
        raise ValueError(f"fewshot_lsr: {len(x_test)} test feature rows for {len(y_test)} labels.")
    _check_labels(y_test, num_classes, "y_test")
    return float(np.mean(lsr_predict(x_train, y_train, x_test, num_classes, l2_reg) == y_test))


def _check_labels(y: np.ndarray, k: int, name: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"fewshot_lsr: {name} has labels from {y.min()} to {y.max()}, outside [0, {k}).")


def lsr_predict(x_train, y_train, x_test, num_classes: int, l2_reg: float) -> np.ndarray:
    """The probe's predicted class of every test row, ``[m]`` ints (what :func:`fewshot_lsr` scores)."""
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test)
    y_train = np.asarray(y_train).reshape(-1)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"fewshot_lsr: features must be [n, d] and [m, d]; got {x_train.shape} and {x_test.shape}.")
    if len(y_train) != len(x_train):
        raise ValueError(f"fewshot_lsr: {len(x_train)} training feature rows for {len(y_train)} labels.")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("fewshot_lsr: the training and the test set need at least one example each.")
    if not (np.isfinite(float(l2_reg)) and float(l2_reg) > 0):
        raise ValueError(f"fewshot_lsr: l2_reg={l2_reg} must be a finite number > 0.")
    k = int(num_classes)
    _check_labels(y_train, k, "y_train")
    mean, scale, varies = _whiten(x_train)
    x = (x_train - mean) / scale
    x[:, ~varies] = 0.0
    w = ridge_weights(_with_bias(x), 2.0 * np.eye(k)[y_train] - 1.0, float(l2_reg))
    preds = []
    for lo in range(0, len(x_test), _TEST_CHUNK):
        xt = (np.asarray(x_test[lo:lo + _TEST_CHUNK], np.float64) - mean) / scale
        xt[:, ~varies] = 0.0  # zero weight there (module docstring)
        preds.append(np.argmax(_with_bias(xt) @ w, axis=1))
    return np.concatenate(preds)


def kshot_indices(labels: np.ndarray, shots: Sequence[int], seed: int, num_classes: int,
                  what: str = "the few-shot training split") -> dict[int, np.ndarray]:
    """``{k: sorted indices of the k-shot set}`` of ``labels`` (module docstring) for every ``k`` in ``shots``.

    Raises :class:`DataError` (naming ``what``) when a class has fewer than ``max(shots)`` examples.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{what}: labels must be integers in [0, {num_classes}); got {labels.dtype} from "
                        f"{labels.min()} to {labels.max()}.")
    most = max(int(k) for k in shots)
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    if counts.min() < most:
        c = int(np.argmin(counts))
        raise DataError(f"{what} has {counts[c]} example(s) of class {c}, fewer than the {most} shots asked for; "
                        f"use shots of at most {int(counts.min())} or a larger training split.")
    prefixes = class_prefixes(labels, num_classes, most, seed)
    return {int(k): np.sort(np.concatenate([p[:int(k)] for p in prefixes])).astype(np.int64) for k in shots}


def check_shots(shots, field: str) -> tuple[int, ...]:
    """``shots`` as a tuple of distinct positive ints (``field`` names the config entry in the message)."""
    try:
        out = tuple(int(k) for k in shots)
        ok = len(out) > 0 and all(k >= 1 and float(k) == float(s) for k, s in zip(out, shots))
    except (TypeError, ValueError):
        ok = False
    if not ok or len(set(out)) != len(out):
        raise ConfigError(f"{field}={shots!r} must be distinct whole numbers >= 1 (examples per class), "
                          "e.g. (1, 5, 10, 25).")
    return out
