"""config.data.train_examples: class-balanced, seeded, nested subsets of the training split.

Checked against numpy counts of the labels written to the IDX files (never through the code
under test): every class gets size/K examples, the same seed gives the same subset, a smaller
subset is inside a larger one, the selection within a class is uniform, and the training
stream visits exactly the subset once per epoch.
"""

import gzip
import os

import numpy as np
import pytest

from seqvis.data import pipeline, sources
from seqvis.data.presets import data_config
from seqvis.data.subset import subset_indices
from seqvis.errors import ConfigError
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train.defaults import base_config
from seqvis.trainer import check_config

from test_train import write_idx

# Uneven classes: class c has 6 + 2c examples (6 .. 24), 150 in all, in a shuffled order.
COUNTS = [6 + 2 * c for c in range(10)]
N_TRAIN = sum(COUNTS)


def skewed_labels(seed=0):
    labels = np.repeat(np.arange(10), COUNTS)
    return np.random.default_rng(seed).permutation(labels).astype(np.uint8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx_subset")
    rng = np.random.default_rng(5)
    for prefix, labels in (("train", skewed_labels()), ("t10k", rng.integers(0, 10, 30).astype(np.uint8))):
        n = len(labels)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = np.arange(n) % 256  # the example's index in a corner pixel
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(d)


def file_labels(idx_dir):
    """The training labels read straight from the IDX file (8-byte header, one byte per label)."""
    with gzip.open(os.path.join(idx_dir, "train-labels-idx1-ubyte.gz"), "rb") as f:
        return np.frombuffer(f.read()[8:], np.uint8)


def rows_in_split_order(cfg):
    """IDX row of each position of the prepared split (tfds shuffles the rows when it writes them),
    read with tfds directly from the corner pixels."""
    builder = pipeline.get_builder(cfg)
    ds = builder.as_dataset(split="train", shuffle_files=False)
    return np.array([int(ex["image"][0, 0, 0]) for ex in ds.as_numpy_iterator()])


def cfg_for(idx_dir, tmp_path_factory, **kw):
    return data_config("fashion_mnist", idx_dir=idx_dir, data_dir=str(tmp_path_factory.mktemp("tfds")),
                       pp_train="decode", pp_eval="decode", **kw)


# ---------------------------------------------------------------------------- the selection (numpy only)


def test_balanced_exactly_on_uneven_classes():
    labels = skewed_labels(1)
    for size in (10, 30, 60):  # 60 = 6 per class: all of the smallest class
        idx = subset_indices(labels, size, seed=3)
        assert len(idx) == len(set(idx.tolist())) == size
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(labels)
        assert np.bincount(labels[idx], minlength=10).tolist() == [size // 10] * 10


def test_seeded_and_nested():
    labels = skewed_labels(2)
    sizes = (10, 20, 40, 60)
    for seed in range(5):
        subsets = [set(subset_indices(labels, n, seed).tolist()) for n in sizes]
        for small, large in zip(subsets, subsets[1:]):
            assert small < large  # strictly inside: a larger subset only adds examples
        assert subset_indices(labels, 40, seed).tolist() == subset_indices(labels, 40, seed).tolist()
    assert subset_indices(labels, 40, 0).tolist() != subset_indices(labels, 40, 1).tolist()


def test_selection_within_a_class_is_uniform():
    """Over many seeds each example of class c is chosen with probability (size/K) / count_c."""
    labels = skewed_labels(3)
    seeds, size = 400, 40
    hits = np.zeros(len(labels))
    for seed in range(seeds):
        hits[subset_indices(labels, size, seed)] += 1
    freq = hits / seeds
    expected = (size // 10) / np.array(COUNTS)[labels]
    # binomial standard error <= sqrt(0.25 / 400) = 0.025; 5 sigma
    assert np.max(np.abs(freq - expected)) < 0.125
    assert abs(freq.sum() - size) < 1e-9


@pytest.mark.parametrize("size, words", [
    (N_TRAIN + 10, "exceeds the training split"),
    (25, "not a multiple"),
    (70, "class 0 has only 6"),  # 7 per class, the smallest class has 6
])
def test_bad_sizes_name_the_field(size, words):
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=\d+") as e:
        subset_indices(skewed_labels(), size, seed=0)
    assert words in str(e.value)


def test_check_config_refuses_before_any_data():
    c = base_config()
    c.data = data_config("fashion_mnist", train_examples=505)
    c.model = dict(name="vit")
    c.num_epochs = 1.0
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=505 is not a multiple of "
                                          r"config\.data\.num_classes=10.*use 500 or 510"):
        check_config(c)
    c.data.train_examples = -10
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=-10 must be a whole number"):
        check_config(c)
    c.data.train_examples = 500
    check_config(c)


def test_changing_the_subset_refuses_an_exact_resume():
    saved = {"data": {"name": "fashion_mnist_idx", "train_examples": 500, "subset_seed": 0}}
    now = {"data": {"name": "fashion_mnist_idx", "train_examples": 1000, "subset_seed": 1}}
    _, stream = ckpt_lib.resume_problems(saved, now, None, 1)
    assert any(s.startswith("config.data.train_examples: saved 500, now 1000") for s in stream)
    assert any(s.startswith("config.data.subset_seed: saved 0, now 1") for s in stream)


# ---------------------------------------------------------------------------- through the pipeline


def stream_ids(cfg, batch, steps, seed=0, start=0):
    it = pipeline.train_iterator(cfg, global_batch_size=batch, seed=seed, start_step=start, local_device_count=1)
    out = []
    for _ in range(steps):
        b = next(it)
        out.append((b["image"][..., 0, 0, 0].reshape(-1).astype(int).tolist(), b["label"].reshape(-1).tolist()))
    return out


def test_the_stream_visits_exactly_the_subset(idx_dir, tmp_path_factory):
    cfg = cfg_for(idx_dir, tmp_path_factory, train_examples=40, subset_seed=7)
    rows = rows_in_split_order(cfg)
    labels = file_labels(idx_dir)  # by IDX row, the id the stream's images carry
    expected = sorted(rows[subset_indices(labels[rows], 40, 7)].tolist())
    assert pipeline.num_examples(cfg, "train") == 40 and pipeline.num_examples(cfg, "test") == 30
    run = stream_ids(cfg, batch=8, steps=10)  # two epochs of 40
    epoch0 = sum((ids for ids, _ in run[:5]), [])
    epoch1 = sum((ids for ids, _ in run[5:]), [])
    assert sorted(epoch0) == sorted(epoch1) == expected
    assert epoch0 != epoch1  # reshuffled per epoch, as on a whole split
    got_labels = sum((lab for _, lab in run[:5]), [])
    assert got_labels == labels[epoch0].tolist()  # the label travels with its image
    assert np.bincount(got_labels, minlength=10).tolist() == [4] * 10
    assert stream_ids(cfg, batch=8, steps=2, start=6) == run[6:8]  # resume mid-epoch: same stream

    larger = cfg_for(idx_dir, tmp_path_factory, train_examples=60, subset_seed=7)
    seen = set(sum((ids for ids, _ in stream_ids(larger, batch=10, steps=6)), []))
    assert set(epoch0) < seen and len(seen) == 60
    other = cfg_for(idx_dir, tmp_path_factory, train_examples=40, subset_seed=8)
    assert set(sum((ids for ids, _ in stream_ids(other, batch=8, steps=5)), [])) != set(epoch0)


def test_pipeline_errors_name_the_field(idx_dir, tmp_path_factory):
    too_many = cfg_for(idx_dir, tmp_path_factory, train_examples=N_TRAIN + 10)
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=160 exceeds the training split"):
        pipeline.num_examples(too_many, "train")
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=160 exceeds the training split"):
        next(pipeline.train_iterator(too_many, global_batch_size=8, seed=0, local_device_count=1))
    sequential = cfg_for(idx_dir, tmp_path_factory, train_examples=40, cache="none", random_access=False)
    with pytest.raises(ConfigError, match=r"config\.data\.train_examples=40 needs random access"):
        next(pipeline.train_iterator(sequential, global_batch_size=8, seed=0, local_device_count=1))


def test_labels_read_without_the_cache_equal_the_file(idx_dir, tmp_path_factory):
    cfg = cfg_for(idx_dir, tmp_path_factory)
    builder = pipeline.get_builder(cfg)
    rows = rows_in_split_order(cfg)
    assert sorted(rows.tolist()) == list(range(N_TRAIN))
    assert sources.split_labels(builder, "train", cfg).tolist() == file_labels(idx_dir)[rows].tolist()
