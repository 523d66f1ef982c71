"""The few-shot probe (seqvis.evaluation.fewshot) against an independent least-squares computation.

The reference below whitens with explicitly written statistics, appends the bias feature, and
solves the ridge problem as an ordinary least-squares problem on the augmented system
``[X; sqrt(λ) I] W = [Y; 0]`` with ``np.linalg.lstsq`` (an SVD solve): neither of the normal
equations the module solves (primal or dual) appears in it.
"""

import numpy as np
import pytest

from seqvis.errors import DataError
from seqvis.evaluation import fewshot


def reference_predict(x_tr, y_tr, x_te, num_classes, l2_reg):
    x_tr, x_te = np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64)
    n, d = x_tr.shape
    mean = x_tr.sum(0) / n
    std = np.sqrt(((x_tr - mean) ** 2).sum(0) / n)
    constant = np.array([len(np.unique(x_tr[:, j])) == 1 for j in range(d)])
    z_tr = np.where(constant, 0.0, (x_tr - mean) / (std + 1e-5))
    z_te = np.where(constant, 0.0, (x_te - mean) / (std + 1e-5))
    a = np.hstack([z_tr, np.full((n, 1), 100.0)])
    b = np.hstack([z_te, np.full((len(z_te), 1), 100.0)])
    targets = -np.ones((n, num_classes))
    targets[np.arange(n), y_tr] = 1.0
    lhs = np.vstack([a, np.sqrt(l2_reg) * np.eye(d + 1)])
    rhs = np.vstack([targets, np.zeros((d + 1, num_classes))])
    w = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return np.argmax(b @ w, axis=1), w


def problem(n_per_class, num_classes, dim, m=300, seed=0, signal=1.0):
    """Class-dependent Gaussian features (so accuracies are far from both 0 and 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * signal
    y_tr = np.repeat(np.arange(num_classes), n_per_class)
    y_te = rng.integers(0, num_classes, m)
    x_tr = centres[y_tr] + rng.normal(size=(len(y_tr), dim))
    x_te = centres[y_te] + rng.normal(size=(m, dim))
    return x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te


def assert_same_predictions(x_tr, y_tr, x_te, y_te, k, l2):
    got = fewshot.lsr_predict(x_tr, y_tr, x_te, k, l2)
    want, _ = reference_predict(x_tr, y_tr, x_te, k, l2)
    # Predictions are argmaxes of continuous scores: two exact computations agree unless two scores tie
    # within round-off, which for random Gaussian features does not happen (allowing one would hide a bug
    # only if it changed a single prediction of hundreds).
    np.testing.assert_array_equal(got, want)
    acc = fewshot.fewshot_lsr(x_tr, y_tr, x_te, y_te, k, l2)
    assert acc == pytest.approx(np.mean(want == y_te))
    return acc


@pytest.mark.parametrize("n_per_class,num_classes,dim,l2", [
    (40, 5, 16, 1.0),          # n = 200 > d: primal system
    (1, 10, 64, 2.0 ** 10),    # one shot per class, d > n: dual system
    (1, 7, 3, 0.5),            # one shot per class, d + 1 < n
    (2, 4, 7, 3.0),            # n = d + 1: the primal system, at the boundary
    (5, 10, 200, 1e-3),        # d >> n, weak regularisation
])
def test_matches_independent_least_squares(n_per_class, num_classes, dim, l2):
    x_tr, y_tr, x_te, y_te = problem(n_per_class, num_classes, dim, seed=n_per_class * 100 + dim)
    acc = assert_same_predictions(x_tr, y_tr, x_te, y_te, num_classes, l2)
    assert 1.0 / num_classes < acc <= 1.0


@pytest.mark.parametrize("dim", [6, 80])
def test_unbalanced_training_set_matches(dim):
    """With as many examples of every class the bias weights are equal across classes and cannot change a
    prediction; with 1, 2, ..., 8 examples of the classes they do, so this case checks the bias feature."""
    rng = np.random.default_rng(dim)
    y_tr = np.repeat(np.arange(8), np.arange(1, 9))
    centres = rng.normal(size=(8, dim)) * 0.3
    x_tr = centres[y_tr] + rng.normal(size=(len(y_tr), dim))
    y_te = rng.integers(0, 8, 400)
    x_te = centres[y_te] + rng.normal(size=(400, dim))
    assert_same_predictions(x_tr, y_tr, x_te, y_te, 8, 30.0)


@pytest.mark.parametrize("n,d", [(30, 8), (6, 40)])
def test_primal_and_dual_weights_equal_lstsq(n, d):
    rng = np.random.default_rng(n + d)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
    lhs = np.vstack([x, np.sqrt(0.7) * np.eye(d)])
    want = np.linalg.lstsq(lhs, np.vstack([y, np.zeros((d, 3))]), rcond=None)[0]
    # float64 solves of well-conditioned systems (condition number < 1e3 here): agreement to 1e-9 relative.
    np.testing.assert_allclose(fewshot.ridge_weights(x, y, 0.7), want, rtol=1e-9, atol=1e-12)


def test_zero_variance_features_change_nothing():
    x_tr, y_tr, x_te, y_te = problem(3, 6, 12, seed=3)
    wide_tr = np.hstack([x_tr, np.full((len(x_tr), 3), 7.25, np.float32), x_tr[:, :1] * 0])
    wide_te = np.hstack([x_te, np.random.default_rng(0).normal(size=(len(x_te), 4)).astype(np.float32) * 50])
    assert_same_predictions(wide_tr, y_tr, wide_te, y_te, 6, 2.0)
    # The constant columns carry no information: the probe predicts as without them, whatever the test rows hold.
    np.testing.assert_array_equal(fewshot.lsr_predict(wide_tr, y_tr, wide_te, 6, 2.0),
                                  fewshot.lsr_predict(x_tr, y_tr, x_te, 6, 2.0))


def test_all_features_constant_predicts_by_the_bias():
    """Nothing varies: the only regressor is the bias, so the test rows' features (however large) change nothing."""
    x_tr = np.ones((4, 5))
    x_te = np.random.default_rng(1).normal(size=(9, 5)) * 1e3
    preds = fewshot.lsr_predict(x_tr, np.array([0, 1, 2, 3]), x_te, 4, 1.0)
    assert len(set(preds.tolist())) == 1
    want, _ = reference_predict(x_tr, np.array([0, 1, 2, 3]), x_te, 4, 1.0)
    assert len(set(want.tolist())) == 1


def test_one_hot_features_give_100_percent_at_one_shot():
    k, rng = 10, np.random.default_rng(5)
    y_tr = np.arange(k)
    y_te = rng.integers(0, k, 500)
    assert fewshot.fewshot_lsr(np.eye(k)[y_tr], y_tr, np.eye(k)[y_te], y_te, k, 2.0 ** 10) == 1.0
    # With a little noise on every feature (the test rows' one-hot entries then differ from the training rows').
    noisy = np.eye(k)[y_te] + 0.05 * rng.normal(size=(500, k))
    assert fewshot.fewshot_lsr(np.eye(k)[y_tr], y_tr, noisy, y_te, k, 2.0 ** 10) == 1.0


def test_random_features_are_at_chance():
    k, rng = 10, np.random.default_rng(6)
    y_tr = np.repeat(np.arange(k), 10)
    y_te = rng.integers(0, k, 5000)
    acc = fewshot.fewshot_lsr(rng.normal(size=(100, 32)), y_tr, rng.normal(size=(5000, 32)), y_te, k, 2.0 ** 10)
    # Features independent of the labels: the accuracy is Binomial(5000, 0.1) / 5000 (sd 0.0042); 0.025 is 6 sd.
    assert abs(acc - 0.1) < 0.025


def test_input_errors():
    x, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="l2_reg"):
        fewshot.fewshot_lsr(x, y, x, y, 2, 0.0)
    with pytest.raises(ValueError, match="outside"):
        fewshot.fewshot_lsr(x, np.array([0, 1, 2, 1]), x, y, 2, 1.0)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        fewshot.fewshot_lsr(x, y, np.zeros((4, 2)), y, 2, 1.0)


# ---------------------------------------------------------------------------- k-shot sets


def test_kshot_sets_are_balanced_nested_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    sets = fewshot.kshot_indices(labels, (1, 3, 10), seed=0, num_classes=5)
    for k, idx in sets.items():
        assert len(np.unique(idx)) == len(idx) == 5 * k
        assert np.bincount(labels[idx], minlength=5).tolist() == [k] * 5
    assert set(sets[1]) <= set(sets[3]) <= set(sets[10])
    again = fewshot.kshot_indices(labels, (1, 3, 10), seed=0, num_classes=5)
    other = fewshot.kshot_indices(labels, (1, 3, 10), seed=1, num_classes=5)
    for k in (1, 3, 10):
        np.testing.assert_array_equal(sets[k], again[k])
        assert not np.array_equal(sets[k], other[k])
    # The set of a seed does not depend on which other shot counts are asked for.
    np.testing.assert_array_equal(fewshot.kshot_indices(labels, (3,), seed=0, num_classes=5)[3], sets[3])


def test_kshot_needs_enough_examples_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(DataError, match=r"2 example\(s\) of class 1"):
        fewshot.kshot_indices(labels, (1, 3), seed=0, num_classes=3, what="the pool")
    with pytest.raises(DataError, match="class 3"):
        fewshot.kshot_indices(labels, (1,), seed=0, num_classes=4)
