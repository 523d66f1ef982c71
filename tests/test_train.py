"""End to end through ``train_and_evaluate`` on small IDX files the tests write themselves.

A learnable toy: each class c is a bright horizontal bar at row 2c+3 plus noise, so a
small ViT reaches high accuracy in a few dozen steps.
"""

import gzip
import json
import os
import struct

import jax
import numpy as np
import pytest

from seqvis.data.presets import data_config
from seqvis.train import checkpoint as ckpt_lib
from seqvis.train.defaults import base_config
from seqvis.interop.pretrained import read_tree as read_checkpoint_params
from seqvis.errors import CheckpointError, ConfigError
from seqvis.trainer import train_and_evaluate

N_TRAIN, N_TEST = 512, 203  # 203: not a multiple of any eval batch used below


def write_idx(path, array):
    magic = {1: 0x00000801, 3: 0x00000803}[array.ndim]
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def toy_split(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 3: 2 * c + 5, 4:24] = 250
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = toy_split(n, seed)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return str(d)


def tiny_config(idx_dir, tmp_path, **kw):
    c = base_config()
    c.data = data_config("fashion_mnist", idx_dir=idx_dir, data_dir=str(tmp_path / "tfds"),
                         pp_train="decode|value_range(-1, 1)", shuffle_buffer=1000)
    c.model = dict(name="vit", variant="mu/7", width=32, depth=1, mlp_dim=64, num_heads=2)
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 12
    c.schedule.update(name="cosine", base_lr=3e-3, warmup_steps=2)
    c.optimizer.update(name="adamw", weight_decay=1e-4)
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
    c.async_checkpointing = False
    c.progress = False
    c.update(kw)
    return c


def test_end_to_end_outputs(idx_dir, tmp_path):
    workdir = str(tmp_path / "run")
    results = train_and_evaluate(tiny_config(idx_dir, tmp_path), workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    for key in ("accuracy", "loss", "steps", "examples_seen", "train_seconds", "gflops_per_example", "params"):
        assert key in on_disk, key
    assert on_disk["steps"] == 12 and on_disk["examples_seen"] == 12 * 32
    assert on_disk["num_examples"] == N_TEST  # every test example exactly once, none dropped
    assert results["accuracy"] == pytest.approx(on_disk["accuracy"])
    assert on_disk["gflops_per_example"] > 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    for key in ("train/learning_rate", "train/grad_norm", "train/img_per_sec", "train/img_per_sec_per_device",
                "train/accuracy", "train/gflops_per_example"):
        assert key in train_rows[0]
    assert any("eval/accuracy" in r for r in rows)
    assert sorted(ckpt_lib.Checkpointer(workdir).steps()) == [4, 8, 12]
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_loss_falls_on_learnable_toy(idx_dir, tmp_path):
    config = tiny_config(idx_dir, tmp_path, total_steps=150, checkpoint_every_steps=150, log_every_steps=10)
    results = train_and_evaluate(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert results["accuracy"] > 0.8  # chance is 0.1


def test_resume_is_bit_identical(idx_dir, tmp_path):
    full = tiny_config(idx_dir, tmp_path, total_steps=10, checkpoint_every_steps=3)
    # Augmentation on, so the data stream's position really matters.
    full.data.pp_train = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)"
    full.model.dropout_rate = 0.1
    train_and_evaluate(full, str(tmp_path / "a"))
    # "Killed" after step 7 (last checkpoint at 6), then restarted with the same command.
    assert train_and_evaluate(full, str(tmp_path / "b"), stop_at_step=7) is None
    assert max(ckpt_lib.Checkpointer(str(tmp_path / "b")).steps()) == 6
    train_and_evaluate(full, str(tmp_path / "b"))
    pa = read_checkpoint_params(str(tmp_path / "a"))
    pb = read_checkpoint_params(str(tmp_path / "b"))
    leaves_a, leaves_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def test_mesh_driver_trains(idx_dir, tmp_path):
    results = train_and_evaluate(tiny_config(idx_dir, tmp_path, parallel="mesh", total_steps=4),
                                 str(tmp_path / "m"))
    assert results["steps"] == 4 and results["num_examples"] == N_TEST


def test_nan_stops_with_message_and_keeps_checkpoint(idx_dir, tmp_path):
    config = tiny_config(idx_dir, tmp_path, total_steps=40, checkpoint_every_steps=2, log_every_steps=2)
    config.optimizer.update(name="sgd", momentum=0.0, grad_clip_norm=0.0)
    config.schedule.update(name="constant", base_lr=1e12, warmup_steps=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="Non-finite loss or gradient at step"):
        train_and_evaluate(config, workdir)
    steps = ckpt_lib.Checkpointer(workdir).steps()
    params = read_checkpoint_params(workdir)
    assert steps and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_corrupt_latest_checkpoint_falls_back(idx_dir, tmp_path):
    config = tiny_config(idx_dir, tmp_path, total_steps=8)
    workdir = tmp_path / "c"
    train_and_evaluate(config, str(workdir))
    # Damage every file of the newest checkpoint's state.
    for root, _, files in os.walk(workdir / "checkpoints" / "8" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config.total_steps = 10
    results = train_and_evaluate(config, str(workdir))  # resumes from step 4, finishes at 10
    assert results["steps"] == 10
    assert os.path.isdir(workdir / "checkpoints" / "10")


def test_checkpoint_from_another_model_is_refused(idx_dir, tmp_path):
    workdir = str(tmp_path / "x")
    train_and_evaluate(tiny_config(idx_dir, tmp_path, total_steps=4), workdir)
    other = tiny_config(idx_dir, tmp_path, total_steps=8)
    other.model.width = 64
    with pytest.raises(CheckpointError, match=r"(?s)different experiment.*model: saved"):
        train_and_evaluate(other, workdir)
    assert ckpt_lib.Checkpointer(workdir).steps() == [4]  # nothing lost


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 12, r"config.batch_size=12 must be a positive multiple of the device count \(8\)"),
    ("eval_batch_size", 20, r"config.eval_batch_size=20"),
    ("parallel", "pjit", r"config.parallel='pjit' is unknown"),
    ("total_steps", 0, r"Set config.total_steps or config.num_epochs"),
])
def test_bad_config_messages(idx_dir, tmp_path, field, value, message):
    config = tiny_config(idx_dir, tmp_path)
    config[field] = value
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_bad_model_config_message(idx_dir, tmp_path):
    config = tiny_config(idx_dir, tmp_path)
    config.model.variant = "Q/7"
    with pytest.raises(ValueError, match="Unknown ViT variant 'Q'"):
        train_and_evaluate(config, str(tmp_path / "bad"))
