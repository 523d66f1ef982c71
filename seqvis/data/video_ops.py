"""Video preprocessing ops for tf.data, registered in the :mod:`seqvis.data.preprocess` registry.

A clip is ``ex['video'] [N, H, W, C]`` (uint8 or float); ops that change the number of real
frames keep ``ex['length']`` (int32), the count of real frames at the front of the clip,
with zero frames after them. Importing this module registers::

    sample_frames(num_frames, stride=1, random=False)  T frames t0, t0+s, .., t0+(T-1)s; pads
                                                       short clips with zeros and sets length
    reverse_time(p=1.0, label_map=None)                play the real frames backwards (padding
                                                       stays at the end); label -> label_map[label]
    video_resize(size, method='bilinear')              every frame to size x size (or (h, w))
    video_random_crop(size, pad=0)                     one random window, the same in every frame
    video_central_crop(size)
    video_flip_lr(label_map=None)                      mirror every frame (w.p. 1/2); relabel
    video_value_range(vmin=-1, vmax=1, in_min=0, in_max=255)

Random ops draw from ``tf.random.stateless_*`` with the per-example seed of the pipeline
(see :func:`seqvis.data.preprocess.example_seed`), so they are deterministic and resumable.
``label_map`` turns label-changing transforms into valid augmentations: on the moving-item
clips, playing backwards maps *left* to *right* (``REVERSED_LABEL``) and mirroring maps
*left* to *right* and *clockwise* to *anticlockwise* (``FLIP_LR_LABEL``).
"""

from __future__ import annotations

from typing import Sequence

from seqvis.data.preprocess import example_seed, register, tf_module
from seqvis.utils import pair


def _length(ex, video):
    tf = tf_module()
    if "length" in ex:
        return tf.cast(ex["length"], tf.int32)
    return tf.shape(video)[0]


def _map_label(ex, label_map: Sequence[int] | None, apply):
    """``label_map[label]`` where ``apply`` (a bool tensor), else the label unchanged."""
    if label_map is None or "label" not in ex:
        return ex
    tf = tf_module()
    label = ex["label"]
    mapped = tf.gather(tf.constant(list(label_map), label.dtype), label)
    ex["label"] = tf.where(apply, mapped, label)
    return ex


@register("sample_frames")
def sample_frames(num_frames: int, stride: int = 1, random: bool = False):
    """``T = num_frames`` frames with ``stride``: ``video[t0 + i·stride]``, i = 0 .. T-1.

    The window spans ``(T-1)·stride + 1`` frames; ``t0`` is uniform over the positions where
    it fits (``random=True``, training) or centred (evaluation). A clip shorter than the
    window keeps the frames it has, then zeros: ``length`` = number of real frames.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"sample_frames(num_frames={num_frames}, stride={stride}): both must be >= 1.")
    span = (num_frames - 1) * stride + 1

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        n = _length(ex, video)
        room = tf.maximum(n - span, 0)
        if random:
            start = tf.random.stateless_uniform([], example_seed(ex), 0, room + 1, dtype=tf.int32)
        else:
            start = room // 2
        idx = start + tf.range(num_frames, dtype=tf.int32) * stride
        valid = idx < n
        frames = tf.gather(video, tf.minimum(idx, tf.maximum(n - 1, 0)))
        keep = tf.reshape(tf.cast(valid, frames.dtype), [num_frames, 1, 1, 1])
        ex["video"] = frames * keep
        ex["length"] = tf.reduce_sum(tf.cast(valid, tf.int32))
        return ex

    return op


@register("reverse_time")
def reverse_time(p: float = 1.0, label_map: Sequence[int] | None = None):
    """Play the ``length`` real frames backwards (w.p. ``p``); padding stays at the end.

    ``video'[t] = video[length - 1 - t]`` for ``t < length``. With ``label_map`` the label
    becomes ``label_map[label]`` for reversed clips (the label of the reversed motion).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"reverse_time(p={p}) must have 0 <= p <= 1.")

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        n = _length(ex, video)
        apply = tf.constant(True) if p >= 1.0 else tf.random.stateless_uniform([], example_seed(ex)) < p
        rev = tf.reverse_sequence(video[None], tf.reshape(tf.cast(n, tf.int64), [1]), seq_axis=1, batch_axis=0)[0]
        ex["video"] = tf.where(apply, rev, video)
        return _map_label(ex, label_map, apply)

    return op


@register("video_resize")
def video_resize(size, method: str = "bilinear"):
    h, w = pair(size)

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        out = tf.image.resize(video, (h, w), method=method)  # [T, H, W, C] is a batch of frames
        if video.dtype == tf.uint8:
            out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
        ex["video"] = tf.cast(out, video.dtype)
        return ex

    return op


@register("video_random_crop")
def video_random_crop(size, pad: int = 0):
    """The same random ``h x w`` window in every frame (after zero-padding by ``pad``)."""
    h, w = pair(size)

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        if pad:
            video = tf.pad(video, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        s = tf.shape(video)
        out = tf.image.stateless_random_crop(video, tf.stack([s[0], h, w, s[3]]), seed=example_seed(ex))
        ex["video"] = tf.ensure_shape(out, [video.shape[0], h, w, video.shape[-1]])
        return ex

    return op


@register("video_central_crop")
def video_central_crop(size):
    h, w = pair(size)

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        s = tf.shape(video)
        top, left = (s[1] - h) // 2, (s[2] - w) // 2
        ex["video"] = tf.ensure_shape(video[:, top:top + h, left:left + w],
                                      [video.shape[0], h, w, video.shape[-1]])
        return ex

    return op


@register("video_flip_lr")
def video_flip_lr(label_map: Sequence[int] | None = None):
    """Mirror every frame of the clip left-right with probability 1/2 (relabel with ``label_map``)."""

    def op(ex):
        tf = tf_module()
        apply = tf.random.stateless_uniform([], example_seed(ex)) < 0.5
        ex["video"] = tf.where(apply, tf.reverse(ex["video"], axis=[2]), ex["video"])
        return _map_label(ex, label_map, apply)

    return op


@register("video_value_range")
def video_value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0, in_max: float = 255.0):
    """Pixels from ``[in_min, in_max]`` to ``[vmin, vmax]`` (float32). Padded frames stay at 0,
    whatever they map to, so that nothing distinguishes them from "no frame"."""

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        x = vmin + (tf.cast(video, tf.float32) - in_min) * (vmax - vmin) / (in_max - in_min)
        if "length" in ex:
            t = tf.shape(x)[0]
            real = tf.range(t) < tf.cast(ex["length"], tf.int32)
            x = x * tf.reshape(tf.cast(real, tf.float32), [t, 1, 1, 1])
        ex["video"] = x
        return ex

    return op


def finalize(num_frames: int, shape: Sequence[int]):
    """The op the video task appends: keep ``video``, ``length`` (int32) and ``label``.

    Not registered (it is not a config choice). ``length`` defaults to the clip length.
    """

    def op(ex):
        tf = tf_module()
        video = ex["video"]
        out = {k: v for k, v in ex.items() if k.startswith("_")}
        out["length"] = _length(ex, video)
        out["video"] = tf.ensure_shape(tf.cast(video, tf.float32), [num_frames, *shape])
        out["label"] = tf.cast(ex["label"], tf.int32)
        return out

    return op

