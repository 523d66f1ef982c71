"""Input at ImageNet scale, on an ImageNet-like JPEG set written here (no download).

The set (seqvis.data.builders.synthetic_jpeg): JPEGs of 150-500 px per side with mixed aspect
ratios, one in 50 grayscale, in 4 array_record shards per split, each example with its index
``id``. Checked: images stay encoded until the pp ops decode them and nothing decoded is
cached (flat RSS over 3 epochs), the first batch needs no counting pass, resuming mid-epoch
gives the uninterrupted stream and reads O(1) records, two processes together see each
example once per epoch, evaluation visits every example once, ``resize_small`` keeps the
aspect ratio, the fused decode-and-crop equals decode then crop, the cache policy decides
from the dataset info, and the in-memory and random-access sources give the same batches.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from seqvis.data import pipeline, preprocess, sources
from seqvis.data.presets import data_config
from seqvis.errors import DataError

import childproc
from test_train import toy_split, write_idx

N_TRAIN, N_EVAL, BATCH = 640, 60, 32  # 20 steps per epoch


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = data_config("synthetic_jpeg", data_dir=str(tmp_path_factory.mktemp("jpeg_tfds")),
                    builder_kwargs=dict(num_train=N_TRAIN, num_eval=N_EVAL, seed=0))
    pipeline.get_builder(c)  # prepare once
    return c


def small(cfg, **kw):
    """The same data with cheap pp ops (64 px crops), for tests about order rather than pixels."""
    c = cfg.copy_and_resolve_references()
    c.pp_train = "decode_jpeg_and_inception_crop(64)|flip_lr|value_range(-1, 1)"
    c.update(kw)
    return c


def ids(batch):
    return batch["id"].reshape(-1).tolist()


def stream(cfg, start, k, **kw):
    it = pipeline.train_iterator(cfg, global_batch_size=BATCH, seed=0, start_step=start, local_device_count=1, **kw)
    return [next(it) for _ in range(k)]


def test_split_files_are_imagenet_like(cfg):
    b = pipeline.get_builder(cfg)
    assert b.info.splits["train"].num_shards == 4 and b.info.splits["train"].num_examples == N_TRAIN
    src = b.as_data_source("train")
    shapes = [src[i]["image"].shape for i in range(0, N_TRAIN, 16)]
    sides = np.array([s[:2] for s in shapes])
    assert sides.min() >= 150 and sides.max() <= 500
    ratios = sides[:, 0] / sides[:, 1]
    assert ratios.min() < 0.75 and ratios.max() > 1.33  # mixed aspect ratios
    raw = b.as_data_source("train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    channels = {}
    for r in raw:
        ex = b.info.features.deserialize_example(r, decoders={"image": tfds.decode.SkipDecoding()})
        assert tf.io.is_jpeg(ex["image"])
        channels[int(ex["id"])] = int(tf.image.extract_jpeg_shape(ex["image"])[2])
    assert sorted(channels) == list(range(N_TRAIN))
    assert {i for i, c in channels.items() if c == 1} == set(range(49, N_TRAIN, 50))  # a few grayscale JPEGs


def test_cache_policy_from_the_dataset_info(cfg, tmp_path):
    b = pipeline.get_builder(cfg)
    cached, why = sources.cache_plan(b, "train", cfg)
    assert not cached and "unknown" in why  # images of any size: never cached decoded
    with pytest.raises(DataError, match="config.data.cache='memory'"):
        sources.cache_plan(b, "train", small(cfg, cache="memory"))
    # A Fashion-MNIST-shaped set: 28x28x1 uint8 image + int64 label per example, sizes from the info.
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, n in (("train", 96), ("t10k", 45)):
        images, labels = toy_split(n, 0)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    fm = data_config("fashion_mnist", idx_dir=str(d), data_dir=str(tmp_path / "tfds"))
    fb = pipeline.get_builder(fm)
    assert sources.decoded_bytes(fb, "train", fm) == 96 * (28 * 28 + 8)
    assert sources.cache_plan(fb, "train", fm)[0]  # 72 KB fits a quarter of any host's RAM
    fm.cache_max_gb = 50e3 / 2**30  # 50 kB budget
    cached, why = sources.cache_plan(fb, "train", fm)
    assert not cached and "cache_max_gb" in why
    fm.cache = "none"
    assert sources.cache_plan(fb, "train", fm) == (False, "config.data.cache='none'")


def test_first_batch_without_counting_pass_and_images_decoded_late(cfg, monkeypatch):
    b = pipeline.get_builder(cfg)
    decoders = pipeline.decoders_for(b, cfg.pp_train)
    assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
    src = pipeline.train_source(cfg, b, "train", decoders)
    assert isinstance(src, sources.RecordSource)

    def no_full_pass(*a, **k):
        raise AssertionError("a pass over the whole split before the first batch")

    monkeypatch.setattr(sources.RecordSource, "in_order", no_full_pass)
    batch = stream(cfg, 0, 1, source=src)[0]
    assert batch["image"].shape == (1, BATCH, 224, 224, 3) and batch["image"].dtype == np.float32
    # the first batch and what the stream may read ahead, not the split
    assert src.reads <= (1 + pipeline.read_ahead_batches(cfg)) * BATCH < N_TRAIN
    assert not any(k[0] == "synthetic_jpeg" for k in sources.COUNTED)


def test_resume_mid_epoch_is_exact_and_reads_one_batch(cfg):
    c = small(cfg)
    src = pipeline.train_source(c, pipeline.get_builder(c), "train", pipeline.decoders_for(pipeline.get_builder(c), c.pp_train))
    run = stream(c, 0, 30, source=src)  # 1.5 epochs
    epoch0 = sum((ids(b) for b in run[:20]), [])
    assert sorted(epoch0) == list(range(N_TRAIN))  # every example once per epoch
    assert sum((ids(b) for b in run[20:30]), []) != epoch0[:320]  # the next epoch is reshuffled
    reads = {}
    for start in (1, 27):  # early, and mid-way through the second epoch
        src.reads = 0
        resumed = stream(c, start, 2, source=src)
        reads[start] = src.reads
        for got, want in zip(resumed, run[start:start + 2]):
            assert ids(got) == ids(want)
            np.testing.assert_array_equal(got["image"], want["image"])  # same crops and flips
    # O(1): the two batches and the stream's read-ahead, whatever the position (a re-read of the epoch up to
    # step 27 would be 27 x 32 records) and however fast this machine's tf.data threads run.
    bound = (2 + pipeline.read_ahead_batches(c)) * BATCH
    assert 2 * BATCH <= reads[1] <= bound and 2 * BATCH <= reads[27] <= bound, (reads, bound)


def test_two_processes_see_each_example_once_per_epoch(cfg):
    c = small(cfg)
    seen = []
    for pi in range(2):
        it = pipeline.train_iterator(c, global_batch_size=BATCH, seed=0, process_index=pi, process_count=2,
                                     local_device_count=1)
        seen.append(sum((ids(next(it)) for _ in range(N_TRAIN // BATCH)), []))
    assert len(seen[0]) == len(seen[1]) == N_TRAIN // 2
    assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))
    # The global batch does not depend on the process count: process 0 of 2 gets the first half of it.
    one = stream(c, 0, 2)
    assert [ids(b)[:BATCH // 2] for b in one] == [seen[0][:BATCH // 2], seen[0][BATCH // 2:BATCH]]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_once(cfg, process_count):
    got = []
    for pi in range(process_count):
        for b in pipeline.eval_iterator(cfg, global_batch_size=16 * process_count, process_index=pi,
                                        process_count=process_count, local_device_count=1):
            assert b["image"].shape == (1, 16, 224, 224, 3)
            m = b["mask"].reshape(-1).astype(bool)
            got += [i for i, keep in zip(ids(b), m) if keep]
    assert sorted(got) == list(range(N_EVAL))


def test_resize_small_keeps_the_aspect_ratio(cfg):
    # Shapes over the real set: shorter side 256, the other scaled by the same factor (rounded).
    b = pipeline.get_builder(cfg)
    ops = preprocess.parse("decode|resize_small(256)", defaults={"channels": 3})
    ds = pipeline.as_dataset(b, "validation", cfg, pipeline.decoders_for(b, "decode")).take(12)
    for ex in ds:
        h, w = tf.io.decode_image(ex["image"], channels=3).shape[:2]
        out = preprocess.apply(ops, ex)["image"].numpy()
        s = 256 / min(h, w)
        assert out.shape == (round(h * s), round(w * s), 3) and min(out.shape[:2]) == 256
    # Pixels against numpy: halving by area = the mean of each 2x2 block.
    img = np.random.default_rng(0).integers(0, 256, size=(512, 768, 3)).astype(np.uint8)
    out = preprocess.apply(preprocess.parse("resize_small(256)"), {"image": tf.constant(img)})["image"].numpy()
    want = img.reshape(256, 2, 384, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert out.dtype == np.uint8 and np.abs(out - np.round(want)).max() <= 1


def test_fused_decode_and_crop_equals_decode_then_crop(cfg):
    b = pipeline.get_builder(cfg)
    ds = pipeline.as_dataset(b, "validation", cfg, pipeline.decoders_for(b, "decode")).take(8)
    fused = preprocess.parse("decode_jpeg_and_inception_crop(96)", defaults={"channels": 3})
    crop = preprocess.parse("inception_crop(96)")
    for i, ex in enumerate(ds):
        seed = tf.constant([3, i], tf.int64)
        a = preprocess.apply(fused, {"image": ex["image"], "_seed": seed})["image"].numpy()
        decoded = tf.io.decode_jpeg(ex["image"], channels=3)
        want = preprocess.apply(crop, {"image": decoded, "_seed": seed})["image"].numpy()
        assert a.shape == want.shape == (96, 96, 3)
        assert np.abs(a.astype(int) - want.astype(int)).max() <= 2  # same window, same decoder


def test_memory_and_random_access_sources_give_the_same_batches(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, n, seed in (("train", 96, 1), ("t10k", 45, 2)):
        images, labels = toy_split(n, seed)
        images[:, 0, 0] = np.arange(n)  # an id in a corner pixel
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    c = data_config("fashion_mnist", idx_dir=str(d), data_dir=str(tmp_path / "tfds"),
                    builder_kwargs=dict(file_format="array_record"))
    b = pipeline.get_builder(c)
    memory = pipeline.train_source(c, b, "train", None)
    c.cache = "none"
    records = pipeline.train_source(c, b, "train", pipeline.decoders_for(b, c.pp_train))
    assert isinstance(memory, sources.MemorySource) and isinstance(records, sources.RecordSource)
    for src_a, src_b in ((memory, records),):
        for x, y in zip(stream(c, 3, 4, source=src_a), stream(c, 3, 4, source=src_b)):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from seqvis.data import pipeline
    from seqvis.data.presets import data_config

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    cfg = data_config("synthetic_jpeg", data_dir=sys.argv[1], builder_kwargs=json.loads(sys.argv[2]))
    steps = int(sys.argv[3])
    it = pipeline.train_iterator(cfg, global_batch_size=32, seed=0, local_device_count=1)
    next(it)
    rss = [rss_mb()]
    for epoch in range(3):
        for _ in range(steps):
            next(it)
        rss.append(rss_mb())
    print(json.dumps(rss))
""")


def test_rss_stays_flat_over_three_epochs(cfg):
    """Nothing decoded is kept: RSS does not grow by what a decoded cache of the split would hold.

    Decoded, the split is ~200 MB. A cache of it would add all of that during the first epoch, and a
    leak of decoded images would keep adding after it. So: the first epoch adds less than half the
    decoded split (the rest is tf.data's and the allocator's warm-up: 12-55 MB measured on AVX2 and AVX-512
    CPUs), and epochs 2-3 together add less than a quarter of it (0.5-25 MB measured, the most with the
    other core busy). Keeping even the decoded crops of one epoch would add ~380 MB.
    """
    b = pipeline.get_builder(cfg)
    decoded_mb = sum(int(np.prod(ex["image"].shape)) for ex in b.as_data_source("train")) / 2**20
    out = childproc.run([sys.executable, "-c", RSS_SCRIPT, cfg.data_dir, json.dumps(dict(cfg.builder_kwargs)),
                         str(N_TRAIN // BATCH)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert decoded_mb > 150
    assert rss[1] - rss[0] < 0.5 * decoded_mb, (rss, decoded_mb)  # epoch 1: warm-up, not a cache
    assert max(rss[2:]) - rss[1] < 0.25 * decoded_mb, (rss, decoded_mb)  # after warm-up: flat


def test_a_stream_left_open_is_ended_by_the_exit_handler(cfg, monkeypatch):
    """A program that exits with its training iterator open: an atexit handler ends the stream first.

    Left to the interpreter's final cleanup, tf.data's threads can no longer run the generator's reads:
    the RSS script above hung at exit in 2 of 8 runs on a loaded machine (0 of 32 with the handler).
    """
    import atexit

    registered = []
    monkeypatch.setattr(pipeline, "_ATEXIT", [])
    monkeypatch.setattr(atexit, "register", registered.append)
    before = set(pipeline._OPEN_STREAMS)
    it = pipeline.train_iterator(small(cfg), global_batch_size=BATCH, seed=0, local_device_count=1)
    next(it)
    assert registered == [pipeline._end_open_streams]
    assert len(set(pipeline._OPEN_STREAMS) - before) == 1
    pipeline._end_open_streams()
    assert not pipeline._OPEN_STREAMS
    with pytest.raises(StopIteration):  # the stream has ended
        next(it)


def test_imagenet_recipes_never_cache_decoded_images(tmp_path):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("vit_i1k.py", "vit_s16_i1k_baseline.py"):
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, "configs", name))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        config = mod.get_config(None)
        c = config.data
        c.data_dir = str(tmp_path)
        assert c.name == "imagenet2012" and c.cache == "none"
        assert c.pp_train.startswith("decode_jpeg_and_inception_crop(224")
        assert "resize_small(256)|central_crop(224)" in c.pp_eval
        with tfds.testing.mock_data(num_examples=8):
            b = pipeline.get_builder(c)
            assert sources.cache_plan(b, c.train_split, c) == (False, "config.data.cache='none'")
            assert isinstance(pipeline.decoders_for(b, c.pp_train)["image"], tfds.decode.SkipDecoding)
            batch = next(pipeline.train_iterator(c, global_batch_size=8, seed=0, local_device_count=1))
        assert batch["image"].shape == (1, 8, 224, 224, 3) and batch["image"].dtype == np.float32
