"""The data layer: IDX reading and its errors, pp ops, deterministic order, sharding, eval coverage."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from seqvis.data import pipeline, preprocess
from seqvis.data import video_ops  # noqa: F401 - registers the video ops (test_sizes_are_an_int_or_a_pair)
from seqvis.data.builders import idx
from seqvis.data.presets import data_config
from seqvis.errors import DataError, IdxError

from test_train import toy_split, write_idx

N_TRAIN, N_TEST = 96, 45


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx_data")
    for prefix, n, seed in (("train", N_TRAIN, 3), ("t10k", N_TEST, 4)):
        images, labels = toy_split(n, seed)
        images[:, 0, 0] = np.arange(n) % 256  # a per-example id in a corner pixel
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(d)


@pytest.fixture(scope="module")
def cfg(idx_dir, tmp_path_factory):
    return data_config("fashion_mnist", idx_dir=idx_dir, data_dir=str(tmp_path_factory.mktemp("tfds")),
                       pp_train="decode", pp_eval="decode", shuffle_buffer=1000)


def ids(batch):
    """Example ids (corner pixel) of a [devices, B, 28, 28, 1] batch, flattened in order."""
    return batch["image"][..., 0, 0, 0].reshape(-1).tolist()


# ---------------------------------------------------------------------------- IDX files


def test_idx_round_trip_and_header_checks(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "a.gz")), a)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(IdxError, match="not an IDX file"):
        idx.read_idx(str(tmp_path / "bad"))
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        raw = f.read()
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(IdxError, match="truncated or corrupt"):
        idx.read_idx(str(tmp_path / "short"))


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("SEQVIS_IDX_DIR", raising=False)
    monkeypatch.setitem(idx.DEBIAN_DIRS, "fashion_mnist", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"(?s)apt-get install dataset-fashion-mnist.*config.data.idx_dir"):
        idx.find_idx_dir("fashion_mnist", str(tmp_path))


def test_builder_features_match_the_catalogue(cfg):
    ours = pipeline.get_builder(cfg).info
    catalogue = tfds.builder("fashion_mnist").info  # metadata from code: no download
    assert ours.features["image"].shape == catalogue.features["image"].shape == (28, 28, 1)
    assert ours.features["image"].dtype == catalogue.features["image"].dtype
    assert ours.features["label"].names == catalogue.features["label"].names
    assert ours.splits["train"].num_examples == N_TRAIN and ours.splits["test"].num_examples == N_TEST


def test_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="config.data.name='no_such_dataset'"):
        bad = data_config("cifar10")
        bad.name = "no_such_dataset"
        pipeline.get_builder(bad)
    empty = data_config("cifar10", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"(?s)not prepared.*tfds build cifar10"):
        next(pipeline.eval_iterator(empty, global_batch_size=8, local_device_count=1))


# ---------------------------------------------------------------------------- order and sharding


def test_train_order_is_a_function_of_seed_and_step(cfg):
    def first(seed, start, k):
        it = pipeline.train_iterator(cfg, global_batch_size=16, seed=seed, start_step=start, local_device_count=2)
        return [ids(next(it)) for _ in range(k)]

    run = first(0, 0, 9)  # 9 steps of 16 = 1.5 epochs of 96
    assert run == first(0, 0, 9)
    assert first(0, 7, 2) == run[7:9]  # resuming mid-epoch 2 continues the same stream
    assert first(1, 0, 1) != run[:1]
    epoch0 = sum(run[:6], [])
    assert sorted(epoch0) == list(range(N_TRAIN))  # one epoch visits every example once
    assert sum(run[6:9], []) != epoch0[:48]  # and the next epoch is reshuffled


def test_train_batches_are_split_over_devices(cfg):
    batch = next(pipeline.train_iterator(cfg, global_batch_size=16, seed=0, local_device_count=4))
    assert batch["image"].shape == (4, 4, 28, 28, 1) and batch["label"].shape == (4, 4)
    assert batch["mask"].shape == (4, 4) and batch["mask"].all()
    assert not any(k.startswith("_") for k in batch)


def test_processes_read_disjoint_shards(cfg):
    seen = []
    for pi in range(2):
        it = pipeline.train_iterator(cfg, global_batch_size=16, seed=0, process_index=pi, process_count=2,
                                     local_device_count=1)
        seen.append(set(sum((ids(next(it)) for _ in range(6)), [])))  # 6 x 8 = one epoch of 48
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N_TRAIN))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_once(cfg, process_count):
    got, nbatches = [], []
    for pi in range(process_count):
        batches = list(pipeline.eval_iterator(cfg, global_batch_size=8 * process_count, process_index=pi,
                                              process_count=process_count, local_device_count=2))
        nbatches.append(len(batches))
        for b in batches:
            m = b["mask"].reshape(-1).astype(bool)
            got += [i for i, keep in zip(ids(b), m) if keep]
            assert not b["image"].reshape(len(m), -1)[~m].any()  # padding is zeros
    assert sorted(got) == list(range(N_TEST))
    assert len(set(nbatches)) == 1  # every process runs the same number of eval steps


def test_catalogue_dataset_through_mock_data(tmp_path):
    c = data_config("cifar10", data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=20):
        batch = next(pipeline.train_iterator(c, global_batch_size=8, seed=0, local_device_count=2))
        evals = list(pipeline.eval_iterator(c, global_batch_size=8, local_device_count=2))
    assert batch["image"].shape == (2, 4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert sum(b["mask"].sum() for b in evals) == 20


# ---------------------------------------------------------------------------- preprocessing ops


def run_ops(spec, image, seed=(0, 0), label=3):
    ex = {"image": tf.constant(image), "label": tf.constant(label, tf.int64),
          "_seed": tf.constant(seed, tf.int64)}
    out = preprocess.apply(preprocess.parse(spec), ex)
    return {k: v.numpy() for k, v in out.items()}


def test_value_range_and_normalize():
    img = np.array([[[0], [255]], [[51], [102]]], np.uint8)
    np.testing.assert_allclose(run_ops("value_range(-1, 1)", img)["image"], img / 127.5 - 1.0, atol=1e-6)
    out = run_ops("normalize(mean=[10.0], std=[2.0])", img)["image"]
    np.testing.assert_allclose(out, (img.astype(np.float32) - 10.0) / 2.0)


def test_flip_and_crop_take_values_from_the_input():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    flips = [run_ops("flip_lr", img, seed=(0, s))["image"] for s in range(16)]
    assert all(np.array_equal(f, img) or np.array_equal(f, img[:, ::-1]) for f in flips)
    assert any(np.array_equal(f, img[:, ::-1]) for f in flips) and any(np.array_equal(f, img) for f in flips)
    padded = np.pad(img, [(2, 2), (2, 2), (0, 0)])
    for s in range(8):
        crop = run_ops("random_crop(8, pad=2)", img, seed=(1, s))["image"]
        windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(np.array_equal(crop, w) for w in windows)
    assert np.array_equal(run_ops("central_crop(4)", img)["image"], img[2:6, 2:6])


def test_inception_crop_and_resize_shapes():
    img = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    out = run_ops("inception_crop(16)", img)["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert run_ops("resize(12)", img)["image"].shape == (12, 12, 3)
    const = np.full((40, 30, 3), 77, np.uint8)
    assert (run_ops("inception_crop(16)", const)["image"] == 77).all()  # a crop of a constant is constant


def test_randaugment_is_deterministic_per_seed():
    img = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = run_ops("randaugment(2, 10)", img, seed=(5, 1))["image"]
    b = run_ops("randaugment(2, 10)", img, seed=(5, 1))["image"]
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    outs = [run_ops("randaugment(2, 10)", img, seed=(5, s))["image"] for s in range(8)]
    assert len({o.tobytes() for o in outs}) > 1
    with pytest.raises(ValueError, match="uint8"):
        run_ops("value_range(-1, 1)|randaugment(2, 10)", img)


def test_mixup_matches_formula():
    rng = np.random.default_rng(3)
    batch = {"image": rng.normal(size=(4, 2, 2, 1)).astype(np.float32), "label": np.array([0, 1, 2, 1])}
    out = preprocess.mixup(batch, seed=(0, 7), alpha=0.2, p=1.0, num_classes=3)
    lam = out["mixup_lambda"][0]
    assert 0.0 <= lam <= 1.0
    onehot = np.eye(3)[batch["label"]]
    np.testing.assert_allclose(out["image"], lam * batch["image"] + (1 - lam) * batch["image"][[3, 0, 1, 2]],
                               rtol=1e-6)
    np.testing.assert_allclose(out["labels"], lam * onehot + (1 - lam) * onehot[[3, 0, 1, 2]], rtol=1e-6)
    np.testing.assert_allclose(out["labels"].sum(-1), 1.0, rtol=1e-6)
    again = preprocess.mixup(batch, seed=(0, 7), alpha=0.2, p=1.0, num_classes=3)
    assert again["mixup_lambda"][0] == lam


def test_sizes_are_an_int_or_a_pair():
    """One rule for every size argument of the image and video ops (seqvis.utils.pair)."""
    img = tf.zeros([40, 50, 3], tf.uint8)
    video = tf.zeros([4, 40, 50, 3], tf.uint8)
    ex = {"_seed": tf.constant([0, 1], tf.int64)}
    for size, hw in ((20, [20, 20]), ((20, 30), [20, 30]), ([12, 16], [12, 16])):
        for op in ("resize", "random_crop", "central_crop", "inception_crop"):
            (fn,) = preprocess.parse(f"{op}({size!r})")
            assert fn({**ex, "image": img})["image"].shape.as_list()[:2] == hw, (op, size)
        for op in ("video_resize", "video_random_crop", "video_central_crop"):
            (fn,) = preprocess.parse(f"{op}({size!r})")
            assert fn({**ex, "video": video})["video"].shape.as_list()[1:3] == hw, (op, size)
    for op in ("resize", "random_crop", "central_crop", "inception_crop", "decode_jpeg_and_inception_crop",
               "video_resize", "video_random_crop", "video_central_crop"):
        with pytest.raises(ValueError, match=r"an int or a pair \(height, width\), got \(1, 2, 3\)"):
            preprocess.parse(f"{op}((1, 2, 3))")


def test_pp_string_errors():
    with pytest.raises(ValueError, match=r"config.data.pp_train: unknown op 'rotate90'"):
        preprocess.parse("decode|rotate90", field="config.data.pp_train")
    with pytest.raises(ValueError, match="only have literal arguments"):
        preprocess.parse("resize(size)")
    with pytest.raises(ValueError, match="bad arguments for op 'resize'"):
        preprocess.parse("resize(1, 2, 3, 4)")


def test_explicit_idx_dir_is_honoured_or_refused(idx_dir, tmp_path, monkeypatch):
    """An explicit idx_dir is never silently replaced: not by the system files when it is empty, and not by
    data prepared earlier from another directory."""
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(idx.DEBIAN_DIRS, "fashion_mnist", idx_dir)  # good files elsewhere must not be used
    with pytest.raises(FileNotFoundError, match=r"config.data.idx_dir=.*empty.*does not hold"):
        idx.find_idx_dir("fashion_mnist", str(empty))
    data_dir = str(tmp_path / "tfds")
    c = data_config("fashion_mnist", idx_dir=idx_dir, data_dir=data_dir)
    pipeline.get_builder(c)  # prepared from idx_dir
    pipeline.get_builder(c)  # the same source again: fine
    other = tmp_path / "other"
    shutil.copytree(idx_dir, other)
    c.idx_dir = str(other)
    with pytest.raises(IdxError, match=r"(?s)config.data.idx_dir=.*other.*is not used.*prepared from .*"
                                           r"Set another --config.data.data_dir"):
        pipeline.get_builder(c)
    c.data_dir = str(tmp_path / "tfds2")
    assert pipeline.get_builder(c).info.splits["train"].num_examples == N_TRAIN  # a new data_dir takes them
