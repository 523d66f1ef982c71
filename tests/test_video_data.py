"""Moving-item clips and video pp ops: geometry against hand-worked cases, motion semantics
measured on the rendered pixels, exact time-reversal pairs, the tfds builder, the tf.data ops."""


import numpy as np
import pytest
import tensorflow as tf
from test_train import write_idx

from seqvis.data import preprocess, video_ops
from seqvis.data.builders import LOCAL_BUILDERS
from seqvis.data.builders import moving_fashion as mf
from seqvis.data.presets import PRESETS

# --------------------------------------------------------------------------- geometry


def test_warp_identity_shift_and_quarter_turns():
    item = np.random.default_rng(0).uniform(0, 255, (28, 28))
    one = lambda c, s, th, size=28: mf.warp_affine(item, np.array([c], float), np.array([s], float),  # noqa: E731
                                                   np.array([th], float), size)[0]
    np.testing.assert_allclose(one((13.5, 13.5), 1.0, 0.0), item, atol=1e-9)
    # Centre moved by (+2 rows, -3 cols): out[r, c] = item[r - 2, c + 3], zeros where that is outside.
    shifted = one((15.5, 10.5), 1.0, 0.0)
    np.testing.assert_allclose(shifted[2:, :25], item[:26, 3:], atol=1e-9)
    assert np.all(shifted[:2] == 0) and np.all(shifted[:, 25:] == 0)
    # Clockwise on screen is numpy's rot90 with k=-1; anticlockwise k=+1.
    np.testing.assert_allclose(one((13.5, 13.5), 1.0, np.pi / 2), np.rot90(item, -1), atol=1e-9)
    np.testing.assert_allclose(one((13.5, 13.5), 1.0, -np.pi / 2), np.rot90(item, 1), atol=1e-9)


def test_warp_bilinear_half_pixel_and_scale():
    item = np.zeros((28, 28))
    item[10, 10] = 100.0
    out = mf.warp_affine(item, np.array([[13.5, 14.0]]), np.array([1.0]), np.array([0.0]), 28)[0]
    # Half a pixel to the right: the spot is shared by columns 10 and 11.
    np.testing.assert_allclose(out[10, 10:12], [50.0, 50.0], atol=1e-9)
    assert out.sum() == pytest.approx(100.0)
    # Scale 2 about the centre: item pixel q maps to 2q, so output (row 13.5 + 2(10-13.5)) = 6.5 gets it.
    big = mf.warp_affine(item, np.array([[13.5, 13.5]]), np.array([2.0]), np.array([0.0]), 28)[0]
    assert big[6, 6] == pytest.approx(100.0 * 0.75 * 0.75)  # q = (6 - 13.5)/2 + 13.5 = 9.75


# --------------------------------------------------------------------------- clips


def marked_items(n=4):
    """Body 160 (rows 8..21, cols 9..18) and a brighter 'head' 250 (rows 2..6, cols 11..16)."""
    items = np.zeros((n, 28, 28), np.uint8)
    items[:, 8:22, 9:19] = 160
    items[:, 2:7, 11:17] = 250
    return items


def centroid(frame, mask=None):
    w = frame.astype(np.float64) if mask is None else mask.astype(np.float64)
    rows, cols = np.mgrid[: frame.shape[0], : frame.shape[1]]
    return np.array([np.sum(w * rows), np.sum(w * cols)]) / max(np.sum(w), 1e-9)


def bearing(frame):
    """Clockwise angle (degrees, 0 = up) from the item's centroid to its bright head."""
    f = frame[..., 0].astype(np.float64)
    body = centroid(f)
    head = centroid(f, f > 0.85 * f.max())
    d = head - body
    return np.degrees(np.arctan2(d[1], -d[0]))


SPEC = mf.ClipSpec(num_frames=12, image_size=40, distractor_prob=0.0)


@pytest.mark.parametrize("label", range(8))
def test_motion_semantics_measured_on_pixels(label):
    items = marked_items()
    for index in range(4):
        video, got, _ = mf.make_clip(SPEC, items, index, "train", label=label)
        assert got == label and video.shape == (12, 40, 40, 1) and video.dtype == np.uint8
        first, last = video[0, ..., 0], video[-1, ..., 0]
        move = centroid(last) - centroid(first)
        mass = last.astype(float).sum() / first.astype(float).sum()
        name = mf.MOTIONS[label]
        if name in ("left", "right", "up", "down"):
            axis, sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}[name]
            assert sign * move[axis] > 0.2 * 40 * 0.8, (name, move)  # >= 30% of the canvas, minus clipping
            assert abs(move[1 - axis]) < 1.5
        elif name in ("growing", "shrinking"):
            assert (mass > 2.0) if name == "growing" else (mass < 0.5), (name, mass)
            assert np.all(np.abs(move) < 1.5)
        else:
            turn = np.unwrap(np.radians([bearing(f) for f in video]))
            total = np.degrees(turn[-1] - turn[0])
            assert (80 < total < 190) if name == "clockwise" else (-190 < total < -80), (name, total)


def test_rotations_start_near_upright():
    items = marked_items()
    for max_angle, tolerance in ((0.0, 8.0), (45.0, 53.0)):  # bearings on pixels: +-8 degrees
        spec = mf.ClipSpec(num_frames=12, image_size=40, distractor_prob=0.0, max_start_angle=max_angle)
        starts = []
        for index in range(8):
            cw = mf.make_clip(spec, items, index, "train", label=6)[0]
            acw = mf.make_clip(spec, items, index, "train", label=7)[0]
            starts.append(bearing(cw[0]))
            assert abs(bearing(acw[-1]) - starts[-1]) < 1e-6  # the reversed clip ends there
        assert max(abs(a) for a in starts) < tolerance
    assert max(abs(a) for a in starts) > 15.0  # 45 degrees: the start varies


def test_reversed_label_plays_the_same_clip_backwards():
    spec = mf.ClipSpec(num_frames=10, image_size=32, distractor_prob=1.0, noise_std=6.0, seed=3)
    items = np.random.default_rng(1).integers(0, 256, (20, 28, 28)).astype(np.uint8)
    for index in range(6):
        for label in range(8):
            clip, _, item = mf.make_clip(spec, items, index, "test", label=label)
            partner, _, item2 = mf.make_clip(spec, items, index, "test", label=mf.REVERSED_LABEL[label])
            np.testing.assert_array_equal(clip[::-1], partner)
            assert item == item2
    assert sorted(mf.REVERSED_LABEL) == list(range(8))
    assert all(mf.REVERSED_LABEL[mf.REVERSED_LABEL[c]] == c != mf.REVERSED_LABEL[c] for c in range(8))
    assert tuple(PRESETS["moving_fashion"]["reverse_labels"]) == mf.REVERSED_LABEL
    # Mirroring left-right swaps left/right and the two rotations, nothing else.
    assert [mf.MOTIONS[c] for c in mf.FLIP_LR_LABEL] == ["right", "left", "up", "down", "growing", "shrinking",
                                                          "anticlockwise", "clockwise"]


def test_clips_are_a_pure_function_of_seed_split_index():
    items = np.random.default_rng(1).integers(0, 256, (50, 28, 28)).astype(np.uint8)
    spec = mf.ClipSpec(num_frames=6, image_size=24)
    a = [mf.make_clip(spec, items, i, "train") for i in range(40)]
    b = [mf.make_clip(spec, items, i, "train") for i in reversed(range(40))][::-1]
    for (va, la, ia), (vb, lb, ib) in zip(a, b):
        np.testing.assert_array_equal(va, vb)
        assert (la, ia) == (lb, ib)
    other = mf.make_clip(mf.ClipSpec(num_frames=6, image_size=24, seed=1), items, 0, "train")[0]
    test0 = mf.make_clip(spec, items, 0, "test")[0]
    assert not np.array_equal(other, a[0][0]) and not np.array_equal(test0, a[0][0])
    assert sorted({la for _, la, _ in a}) == list(range(8))  # all motions drawn


def test_config_name_tracks_every_parameter():
    base = mf.ClipSpec()
    names = {base.name()}
    for field, value in dict(source="mnist", num_frames=8, image_size=48, num_train=10, num_test=10,
                             distractor_prob=0.25, noise_std=3.0, max_start_angle=180.0, seed=7).items():
        names.add(mf.ClipSpec(**{**base.__dict__, field: value}).name())
    assert len(names) == 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(distractor_prob=1.5), r"builder_kwargs.distractor_prob=1.5 must be in \[0, 1\]"),
    (dict(source="cifar"), r"builder_kwargs.source='cifar' is unknown"),
    (dict(num_frames=1), r"builder_kwargs.num_frames=1"),
    (dict(frames=16), r"builder_kwargs has unknown field\(s\) \['frames'\]"),
])
def test_bad_builder_kwargs(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        mf.MovingFashion(data_dir=str(tmp_path), **kwargs)


# --------------------------------------------------------------------------- tfds builder




@pytest.fixture(scope="module")
def fake_idx(tmp_path_factory):
    """Train items all of class 3, test items all of class 7 (so we can tell the splits apart)."""
    d = tmp_path_factory.mktemp("idx")
    for prefix, n, cls in (("train", 30, 3), ("t10k", 20, 7)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", marked_items(n))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.full(n, cls))
    return str(d)


def test_builder_prepares_splits_from_their_own_items(fake_idx, tmp_path):
    assert LOCAL_BUILDERS["moving_fashion"] == ("seqvis.data.builders.moving_fashion", "MovingFashion")
    kw = dict(num_frames=5, image_size=20, num_train=24, num_test=10, seed=2)
    builder = mf.MovingFashion(idx_dir=fake_idx, data_dir=str(tmp_path), **kw)
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 24 and builder.info.splits["test"].num_examples == 10
    items, _ = mf.load_split("fashion_mnist", "test", fake_idx)
    seen = []
    for ex in builder.as_dataset(split="test").as_numpy_iterator():
        assert ex["video"].shape == (5, 20, 20, 1) and ex["item_label"] == 7
        seen.append(int(ex["index"]))
        video, label, _ = mf.make_clip(builder.spec, items, seen[-1], "test")
        np.testing.assert_array_equal(ex["video"], video)
        assert ex["label"] == label
    assert sorted(seen) == list(range(10))
    assert {int(ex["item_label"]) for ex in builder.as_dataset(split="train").as_numpy_iterator()} == {3}
    # Another setting lands in another directory instead of reusing these files.
    other = mf.MovingFashion(idx_dir=fake_idx, data_dir=str(tmp_path), **{**kw, "seed": 3})
    assert other.data_dir != builder.data_dir


# --------------------------------------------------------------------------- pp ops


def _run(spec, ex, seed=(0, 0)):
    ops = preprocess.parse(spec)
    ex = {k: tf.constant(v) for k, v in ex.items()}
    ex["_seed"] = tf.constant(seed, tf.int64)
    return {k: v.numpy() for k, v in preprocess.apply(ops, ex).items() if not k.startswith("_")}


def counting_video(n, h=6, w=6):
    """Frame i is filled with the value i + 1 (so padding, 0, is distinguishable)."""
    return np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, h, w, 1)).copy()


def test_video_ops_are_registered():
    for name in ("sample_frames", "reverse_time", "video_resize", "video_random_crop", "video_central_crop",
                 "video_flip_lr", "video_value_range"):
        assert name in preprocess.OPS
    with pytest.raises(ValueError, match="sample_frames"):
        preprocess.parse("sample_frames(0)")


def test_sample_frames_with_stride_centred_random_and_padded():
    out = _run("sample_frames(4, stride=2)", {"video": counting_video(10), "label": 1})
    # span 7 in 10 frames: 3 spare positions, centred start 1 -> frames 1, 3, 5, 7 (values +1)
    assert list(out["video"][:, 0, 0, 0]) == [2, 4, 6, 8] and out["length"] == 4
    starts = set()
    for s in range(40):
        got = _run("sample_frames(4, stride=2, random=True)", {"video": counting_video(10)}, seed=(s, 1))
        v = got["video"][:, 0, 0, 0].astype(int)
        assert list(np.diff(v)) == [2, 2, 2]
        starts.add(v[0] - 1)
    assert starts == {0, 1, 2, 3}
    short = _run("sample_frames(4, stride=2)", {"video": counting_video(5)})
    assert list(short["video"][:, 0, 0, 0]) == [1, 3, 5, 0] and short["length"] == 3
    assert np.all(short["video"][3] == 0)


def test_reverse_time_keeps_padding_and_maps_labels():
    video = counting_video(4)
    video[3] = 0
    out = _run("reverse_time(label_map=[1, 0, 3, 2])", {"video": video, "length": 3, "label": 2})
    assert list(out["video"][:, 0, 0, 0]) == [3, 2, 1, 0] and out["label"] == 3
    same = _run("reverse_time(p=0.0, label_map=[1, 0, 3, 2])", {"video": video, "length": 3, "label": 2})
    np.testing.assert_array_equal(same["video"], video)
    assert same["label"] == 2
    flips = [_run("reverse_time(p=0.5, label_map=[1, 0])", {"video": counting_video(3), "label": 0}, (s, 0))
             for s in range(30)]
    for o in flips:  # reversed exactly when relabelled
        assert (o["label"] == 1) == (o["video"][0, 0, 0, 0] == 3)
    assert 5 < sum(o["label"] for o in flips) < 25


def test_spatial_ops_use_one_window_for_all_frames():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, (12, 12, 1)).astype(np.uint8)
    video = np.stack([base + t for t in range(5)])
    for s in range(5):
        out = _run("video_random_crop(8, pad=1)", {"video": video}, seed=(s, 3))["video"]
        assert out.shape == (5, 8, 8, 1)
        padded = np.pad(base, ((1, 1), (1, 1), (0, 0))).astype(int)
        hits = [(i, j) for i in range(7) for j in range(7) if np.array_equal(padded[i:i + 8, j:j + 8], out[0])]
        assert hits, "the first frame is not a window of the padded frame"
        i, j = hits[0]
        for t in range(5):  # the same window in every frame (padding stays 0)
            want = np.pad(base + t, ((1, 1), (1, 1), (0, 0)))[i:i + 8, j:j + 8]
            np.testing.assert_array_equal(out[t], want)
    cc = _run("video_central_crop(8)", {"video": video})["video"]
    np.testing.assert_array_equal(cc, video[:, 2:10, 2:10])
    assert _run("video_resize(4)", {"video": video})["video"].shape == (5, 4, 4, 1)
    flips = [_run("video_flip_lr(label_map=[1, 0, 2])", {"video": video, "label": 0}, (s, 5)) for s in range(20)]
    for o in flips:
        mirrored = o["label"] == 1
        np.testing.assert_array_equal(o["video"], video[:, :, ::-1] if mirrored else video)
    assert 0 < sum(o["label"] for o in flips) < 20


def test_value_range_zeroes_padding_and_finalize():
    video = counting_video(4)
    video[2:] = 0
    out = _run("video_value_range(-1, 1)", {"video": video, "length": 2, "label": 5})
    np.testing.assert_allclose(out["video"][:2, 0, 0, 0], [-1 + 2 / 255 * 1, -1 + 2 / 255 * 2], rtol=1e-6)
    assert np.all(out["video"][2:] == 0.0)
    fin = video_ops.finalize(4, (6, 6, 1))({"video": tf.constant(video), "label": tf.constant(5, tf.int64),
                                            "item_label": tf.constant(1)})
    assert set(fin) == {"video", "length", "label"} and int(fin["length"]) == 4
    assert fin["video"].dtype == tf.float32 and fin["label"].dtype == tf.int32
