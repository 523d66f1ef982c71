"""Dataset presets: tfds name, classes, image shape after preprocessing, standard pp strings.

Configs call :func:`data_config` with a short name (``fashion_mnist``, ``cifar10``,
``imagenet2012``...) and override what they ablate. ``fashion_mnist`` and ``mnist`` read
local IDX files (offline); the others are tfds catalogue datasets that must be prepared in
``data_dir``.
"""

from __future__ import annotations

import ml_collections

_SMALL_GRAY = dict(image_shape=(28, 28, 1), num_classes=10, train_split="train", eval_split="test")
# ImageNet-size sets: the training crop decodes only its window of the JPEG; evaluation keeps
# the aspect ratio (shorter side to 256, central 224 crop), as the published ViT/ResNet recipes.
_INCEPTION_224 = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"
_CENTER_224 = "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"

PRESETS: dict[str, dict] = {
    "fashion_mnist": dict(
        name="fashion_mnist_idx", **_SMALL_GRAY,
        pp_train="decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|value_range(-1, 1)"),
    "mnist": dict(
        name="mnist_idx", **_SMALL_GRAY,
        pp_train="decode|random_crop(28, pad=2)|value_range(-1, 1)",
        pp_eval="decode|value_range(-1, 1)"),
    "cifar10": dict(
        name="cifar10", image_shape=(32, 32, 3), num_classes=10, train_split="train", eval_split="test",
        pp_train="decode|random_crop(32, pad=4)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|value_range(-1, 1)"),
    "cifar100": dict(
        name="cifar100", image_shape=(32, 32, 3), num_classes=100, train_split="train", eval_split="test",
        pp_train="decode|random_crop(32, pad=4)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|value_range(-1, 1)"),
    "imagenet2012": dict(
        name="imagenet2012", image_shape=(224, 224, 3), num_classes=1000,
        train_split="train[:99%]", eval_split="validation", cache="none",
        pp_train=_INCEPTION_224, pp_eval=_CENTER_224),
    # ImageNet-like JPEGs made offline (seqvis.data.builders.synthetic_jpeg) with the ImageNet pp ops:
    # the input pipeline's tests and `experiments.benchmark --input` run on it.
    "synthetic_jpeg": dict(
        name="synthetic_jpeg", image_shape=(224, 224, 3), num_classes=10, train_split="train",
        eval_split="validation", builder_kwargs=dict(num_train=2_000, num_eval=200, seed=0),
        pp_train=_INCEPTION_224, pp_eval=_CENTER_224),
    "oxford_iiit_pet": dict(
        name="oxford_iiit_pet", image_shape=(224, 224, 3), num_classes=37, train_split="train",
        eval_split="test", pp_train="decode|inception_crop(224)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|resize(224)|value_range(-1, 1)"),
    # Captioning (task 'captioning'). Offline: scenes of 2-3 tinted Fashion-MNIST items with 5
    # captions each (seqvis.data.builders.fashion_scenes). No flips: captions say left and right.
    "fashion_scenes": dict(
        name="fashion_scenes", image_shape=(84, 84, 3), train_split="train", eval_split="test",
        builder_kwargs=dict(num_train=20_000, num_test=2_000, canvas=84, min_items=2, max_items=3, seed=0),
        pp_train="decode|value_range(-1, 1)", pp_eval="decode|value_range(-1, 1)"),
    # COCO captions 2014, Karpathy splits (tfds catalogue; prepare with `tfds build coco_captions`).
    "coco_captions": dict(
        name="coco_captions", image_shape=(224, 224, 3), train_split="train+restval", eval_split="test",
        cache="none",  # decoded COCO does not fit in host memory; images stay encoded until pp decodes them
        pp_train="decode|resize_small(256)|random_crop(224)|value_range(-1, 1)",
        pp_eval="decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"),
    # Video (task 'video'). Offline: clips of a moving Fashion-MNIST item, label = the motion
    # (seqvis.data.builders.moving_fashion); reverse_labels[c] is the label of class c played backwards.
    "moving_fashion": dict(
        name="moving_fashion", num_frames=16, image_shape=(32, 32, 1), num_classes=8,
        train_split="train", eval_split="test",
        builder_kwargs=dict(source="fashion_mnist", num_frames=16, image_size=32, num_train=12_000,
                            num_test=4_000, distractor_prob=0.5, noise_std=0.0, max_start_angle=45.0,
                            seed=0),
        reverse_labels=(1, 0, 3, 2, 5, 4, 7, 6),
        pp_train="sample_frames(16)|video_value_range(-1, 1)",
        pp_eval="sample_frames(16)|video_value_range(-1, 1)"),
    # UCF101 (tfds catalogue, split 1 at 256x256; prepare it with `tfds build ucf101`): 16 frames
    # with stride 2, random 112 crops of 128x128 frames. Decoded clips do not fit in memory: no cache.
    "ucf101": dict(
        name="ucf101", num_frames=16, image_shape=(112, 112, 3), num_classes=101,
        train_split="train", eval_split="test", cache="none", shuffle_buffer=256, reverse_labels=None,
        pp_train="sample_frames(16, stride=2, random=True)|video_resize(128)|video_random_crop(112)|"
                 "video_flip_lr|video_value_range(-1, 1)",
        pp_eval="sample_frames(16, stride=2)|video_resize(128)|video_central_crop(112)|video_value_range(-1, 1)"),
}


def data_config(name: str, **overrides) -> ml_collections.ConfigDict:
    if name not in PRESETS:
        raise ValueError(f"Unknown dataset preset {name!r}; valid: {', '.join(PRESETS)}.")
    c = ml_collections.ConfigDict(dict(
        data_dir="", idx_dir="",  # "" = tfds default / built-in search path
        # cache: "auto" = decoded in host memory when every feature has a fixed shape and the split
        # fits cache_max_gb (None: a quarter of host RAM); "memory"; "none". See seqvis.data.pipeline.
        cache="auto", cache_max_gb=ml_collections.config_dict.placeholder(float),
        random_access=True,  # read array_record files by index (O(1) resume); False: sequential
        shuffle_buffer=50_000,  # only for sequential reading (tfrecord files)
        prefetch=2,
        # Train on a class-balanced subset of the training split: train_examples (0 = all) examples, a
        # multiple of num_classes, chosen by subset_seed; nested in the size (see seqvis.data.subset).
        train_examples=0, subset_seed=0,
        mixup=ml_collections.ConfigDict(dict(p=0.0, alpha=0.0))))
    c.update(PRESETS[name])
    c.preset = name
    c.update(overrides)
    return c
