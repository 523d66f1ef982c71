"""The video task through the shared trainer: results.json with the time-reversed evaluation
(checked against a hand computation), the order-blind bound of the mean model, config errors
before compilation, and UCF101's padded clips on tfds mock data."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_train import write_idx

from seqvis.data import pipeline
from seqvis.data.builders import moving_fashion as mf
from seqvis.tasks.base import get_task
from seqvis.errors import ConfigError
from seqvis.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SIZE, N_TRAIN, N_TEST = 6, 16, 64, 37  # 37: the last eval batch is padded




@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 30)):
        items = rng.integers(0, 120, (n, 28, 28))
        items[:, 6:22, 8:20] += 120  # a body, and a bright head so that rotations show
        items[:, 2:6, 11:17] = 255
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", items)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return str(d)


def load_config(arg):
    path = os.path.join(REPO, "configs", "video.py")
    spec = importlib.util.spec_from_file_location("video_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def tiny(arg, idx_dir, tmp_path, steps=6):
    c = load_config(arg)
    c.data.idx_dir = idx_dir
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.builder_kwargs.update(num_frames=FRAMES, image_size=SIZE, num_train=N_TRAIN, num_test=N_TEST)
    c.data.num_frames = FRAMES
    c.data.image_shape = (SIZE, SIZE, 1)
    c.data.pp_train = f"sample_frames({FRAMES})|video_value_range(-1, 1)"
    c.data.pp_eval = f"sample_frames({FRAMES})|video_value_range(-1, 1)"
    c.model.update(embed_dim=16, width=16, mlp_dim=32, num_heads=2, max_frames=FRAMES)
    c.model.backbone_kwargs.channels = (4, 8)
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = steps
    c.num_epochs = 0.0
    c.schedule.warmup_steps = 1
    c.log_every_steps = 3
    c.checkpoint_every_steps = steps
    c.async_checkpointing = False
    c.progress = False
    return c


def test_mean_model_cannot_beat_its_reversal(idx_dir, tmp_path):
    workdir = str(tmp_path / "mean")
    results = train_and_evaluate(tiny("mean", idx_dir, tmp_path), workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    for key in ("accuracy", "reversed_accuracy", "reversed_loss", "reversal_consistency", "train_seconds"):
        assert key in on_disk, key
    assert on_disk["num_examples"] == on_disk["reversed_num_examples"] == N_TEST
    # The same prediction for a clip and its reversal, whose labels differ: right on at most one.
    assert results["accuracy"] + results["reversed_accuracy"] <= 1.0 + 1e-9
    assert results["reversal_consistency"] == 0.0


def test_reversed_evaluation_matches_a_hand_computation(idx_dir, tmp_path):
    config = tiny("lstm", idx_dir, tmp_path)
    task = get_task(config)
    task.setup(str(tmp_path))
    variables = jax.jit(task.init)(jax.random.PRNGKey(0), task.dummy_batch(2))
    rng = np.random.default_rng(5)  # random weights everywhere, so that predictions vary
    variables = jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.5, size=p.shape), p.dtype), variables)
    got = task.final_evaluation(variables, config, str(tmp_path))

    builder = pipeline.get_builder(config.data)
    videos, labels = [], []
    for ex in builder.as_dataset(split="test").as_numpy_iterator():
        videos.append(ex["video"].astype(np.float32) / 255.0 * 2.0 - 1.0)
        labels.append(int(ex["label"]))
    videos, labels = np.stack(videos), np.array(labels)
    apply = jax.jit(lambda x: task.model.apply(variables, x))
    pred = np.argmax(apply(videos), -1)
    rev_logits = np.asarray(apply(videos[:, ::-1]))
    rev_pred = np.argmax(rev_logits, -1)
    partner = np.array(mf.REVERSED_LABEL)
    assert len(set(rev_pred.tolist())) > 1
    assert got["reversed_num_examples"] == N_TEST
    assert got["reversed_accuracy"] == pytest.approx(np.mean(rev_pred == partner[labels]))
    assert got["reversal_consistency"] == pytest.approx(np.mean(rev_pred == partner[pred]))
    log_p = rev_logits - np.log(np.sum(np.exp(rev_logits - rev_logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - rev_logits.max(-1, keepdims=True)
    want_loss = -np.mean(log_p[np.arange(N_TEST), partner[labels]])
    assert got["reversed_loss"] == pytest.approx(want_loss, rel=1e-4)


@pytest.mark.parametrize("change,message", [
    (dict(pp_eval="sample_frames(4)|video_value_range(-1, 1)"), r"gives clips of shape \(4, 16, 16, 1\).*num_frames=6"),
    (dict(num_classes=10), r"config.data.num_classes=10 but moving_fashion has 8 classes"),
    (dict(reverse_labels=(0, 1, 2, 3, 4, 5, 6, 6)), r"reverse_labels=\(0, 1, 2, 3, 4, 5, 6, 6\) must be a permutation"),
])
def test_data_mismatch_is_reported_before_compiling(idx_dir, tmp_path, change, message):
    config = tiny("tconv", idx_dir, tmp_path, steps=2)
    config.data.update(change)
    workdir = tmp_path / "bad"
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.parametrize("field,value,message", [
    ("temporal", "conv3d", r"config.model.temporal='conv3d' is unknown"),
    ("max_frames", 3, r"config.model.max_frames=3 is smaller than config.data.num_frames=6"),
    ("depth", 3, r"config.model has unknown field\(s\) \['depth'\]"),
])
def test_bad_model_config_fails_fast(idx_dir, tmp_path, field, value, message):
    config = tiny("transformer", idx_dir, tmp_path, steps=2)
    config.model[field] = value
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_ucf101_clips_are_sampled_and_padded_on_mock_data(tmp_path):
    config = load_config("gru,ucf101")
    config.data.data_dir = str(tmp_path / "tfds")
    get_task(config)  # registers the video ops
    with tfds.testing.mock_data(num_examples=12):
        batches = list(pipeline.eval_iterator(config.data, global_batch_size=8, local_device_count=1))
    videos = np.concatenate([b["video"][0] for b in batches])
    lengths = np.concatenate([b["length"][0] for b in batches])
    mask = np.concatenate([b["mask"][0] for b in batches])
    assert videos.shape == (16, 16, 112, 112, 3) and mask.sum() == 12
    lengths = lengths[mask > 0]
    # Mock clips have random lengths; with stride 2, clips under 31 frames are padded.
    assert lengths.min() >= 1 and lengths.max() <= 16 and len(set(lengths.tolist())) > 1
    for v, n in zip(videos[mask > 0], lengths):
        assert np.all(v[n:] == 0.0) and np.all(np.abs(v[:n]) <= 1.0) and np.any(v[n - 1] != 0.0)
