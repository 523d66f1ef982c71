"""Preprocessing ops chosen from the config: ``"decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)"``.

Ops are separated by ``|``; each is ``name`` or ``name(args)`` with literal arguments
(parsed with ``ast``, never evaluated). Each op maps a feature dict of tf tensors to a
feature dict, inside tf.data. Random ops draw from ``tf.random.stateless_*`` with the
per-example seed the pipeline stores in ``ex['_seed']``, so an example's augmentation
depends only on (run seed, position in the stream), never on threads or on resuming.

The ops and their big_vision equivalents (``big_vision/pp/ops_image.py``, ``ops_general.py``).
Every random op here is stateless (seeded per example); big_vision's draw from TF's stateful
generators, so the same pp string gives other random crops and flips there.

=================================== ====================================== =============================================
seqvis                              big_vision                             difference
=================================== ====================================== =============================================
decode(channels)                    decode(channels=3)                     channels default to the dataset's (1 for
                                                                           Fashion-MNIST); an already decoded image
                                                                           passes through
decode_jpeg_and_inception_crop(s)   decode_jpeg_and_inception_crop(s)      same window parameters (area 5-100 %, ratio
                                                                           0.75-1.33); non-JPEG bytes and decoded images
                                                                           are handled (decoded whole / cropped)
resize(s, method, antialias)        resize(s, method, antialias)           uint8 results are rounded (big_vision
                                                                           truncates in the cast)
resize_small(s, method="area")      resize_small(s, method="area")         same rounding note; same side rounding
inception_crop(s, area_min, ...)    inception_crop(s, area_min, ...)       —
random_crop(s, pad=0)               random_crop(s)                         optional zero padding first (CIFAR style)
central_crop(s)                     central_crop(s)                        size required (no "largest square")
flip_lr()                           flip_lr()                              —
value_range(vmin, vmax, in_min,     value_range(vmin, vmax, in_min,        no ``clip_values``
in_max)                             in_max)
normalize(mean, std)                vgg_value_range(mean, std)             the caller gives mean/std in pixel units
grayscale_to_rgb()                  (none)                                 —
onehot(n, key, key_result, on, off) onehot(depth, key, key_result, on,     a list of labels (multi-hot) drops ``key``
                                    off)
keep(*keys)                         keep(*keys)                            keys starting with ``_`` (seeds) are kept
randaugment(num_layers, magnitude)  randaug(num_layers, magnitude)         own TF implementation (see randaugment.py)
=================================== ====================================== =============================================
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable

import numpy as np

from seqvis.utils import pair

OPS: dict[str, Callable[..., Callable[[dict], dict]]] = {}


def register(name: str):
    def deco(fn):
        OPS[name] = fn
        return fn

    return deco


def tf_module():
    """TensorFlow, imported when the first op runs (deferred on purpose: the ops run inside tf.data)."""
    import tensorflow as tf

    return tf


def parse(spec: str, field: str = "pp", defaults: dict | None = None) -> list[Callable[[dict], dict]]:
    """``"a|b(1, k=2)"`` -> list of per-example functions.

    ``defaults`` fills keyword arguments an op accepts but the spec leaves out (the pipeline
    passes ``channels``: the dataset's channel count, so ``decode`` of a grayscale set stays
    one channel and of an RGB set three, whatever the stored file holds).
    """
    ops = []
    for i, part in enumerate(p.strip() for p in (spec or "").split("|")):
        if not part:
            continue
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError as e:
            raise ValueError(f"{field}: cannot parse op {part!r}: {e.msg}") from e
        if isinstance(node, ast.Name):
            name, args, kwargs = node.id, [], {}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = node.func.id
            try:
                args = [ast.literal_eval(a) for a in node.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError as e:
                raise ValueError(f"{field}: op {part!r} may only have literal arguments.") from e
        else:
            raise ValueError(f"{field}: op {part!r} is not of the form name or name(args).")
        if name not in OPS:
            raise ValueError(f"{field}: unknown op {name!r}; valid ops: {', '.join(sorted(OPS))}.")
        for k, v in (defaults or {}).items():
            if k not in kwargs and k in inspect.signature(OPS[name]).parameters:
                kwargs[k] = v
        try:
            ops.append(OPS[name](*args, **kwargs))
        except TypeError as e:
            raise ValueError(f"{field}: bad arguments for op {name!r}: {e}") from e
    return ops


def apply(ops: list[Callable[[dict], dict]], ex: dict) -> dict:
    for i, op in enumerate(ops):
        ex = dict(ex)
        if "_seed" in ex:  # a distinct stream per op position
            tf = tf_module()
            ex["_op_seed"] = tf.random.experimental.stateless_fold_in(tf.cast(ex["_seed"], tf.int64), i)
        ex = op(ex)
    ex.pop("_op_seed", None)
    return ex


def example_seed(ex, salt: int = 0):
    """The stateless seed of a random op for this example: the pipeline's ``ex['_seed']`` (or the
    per-op ``_op_seed`` RandAugment sets), folded with ``salt``."""
    tf = tf_module()
    s = ex.get("_op_seed", ex.get("_seed"))
    if s is None:
        raise ValueError("random preprocessing op used without a per-example seed")
    return tf.random.experimental.stateless_fold_in(tf.cast(s, tf.int64), salt)


def _image_op(fn):
    def op(ex):
        ex["image"] = fn(ex["image"], ex)
        return ex

    return op


def _resize(img, hw, method: str = "bilinear", antialias: bool = False):
    """``tf.image.resize`` that keeps uint8 images uint8 (rounded and clipped, not truncated)."""
    tf = tf_module()
    out = tf.image.resize(img, hw, method=method, antialias=antialias)
    if img.dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    return tf.cast(out, img.dtype)


# Ops that take the encoded bytes of an image: the pipeline lets tfds skip image decoding
# (``tfds.decode.SkipDecoding``) when the pp spec contains one of them, so decoding happens
# here, after the random crop is known, instead of for every example read.
DECODE_OPS = ("decode", "decode_jpeg_and_inception_crop")


@register("decode")
def decode(channels: int | None = None):
    """Encoded bytes (JPEG, PNG, GIF, BMP) -> uint8 ``[H, W, channels]``; a decoded image passes through.

    ``channels`` defaults to the dataset's channel count (set by the pipeline): a grayscale
    JPEG in an RGB set comes out with three channels, so every example batches.
    """

    def fn(img, ex):
        tf = tf_module()
        if img.dtype == tf.string:
            img = tf.io.decode_image(img, channels=channels or 0, expand_animations=False)
        return img

    return _image_op(fn)


@register("resize")
def resize(size, method: str = "bilinear", antialias: bool = False):
    """To exactly ``size x size`` (or ``(h, w)``); the aspect ratio is not kept (see resize_small)."""
    h, w = pair(size)

    def fn(img, ex):
        return _resize(img, (h, w), method, antialias)

    return _image_op(fn)


@register("resize_small")
def resize_small(size: int, method: str = "area", antialias: bool = False):
    """Shorter side to ``size``, the aspect ratio kept (sides rounded to the nearest pixel)."""

    def fn(img, ex):
        tf = tf_module()
        hw = tf.cast(tf.shape(img)[:2], tf.float32)
        new = tf.cast(tf.round(hw * (float(size) / tf.reduce_min(hw))), tf.int32)
        out = _resize(img, new, method, antialias)
        out.set_shape([None, None, img.shape[-1]])
        return out

    return _image_op(fn)


@register("random_crop")
def random_crop(size, pad: int = 0):
    h, w = pair(size)

    def fn(img, ex):
        tf = tf_module()
        if pad:
            img = tf.pad(img, [[pad, pad], [pad, pad], [0, 0]])
        c = img.shape[-1] if img.shape[-1] is not None else tf.shape(img)[-1]
        out = tf.image.stateless_random_crop(img, tf.stack([h, w, c]), seed=example_seed(ex))
        return tf.ensure_shape(out, [h, w, img.shape[-1]])

    return _image_op(fn)


@register("central_crop")
def central_crop(size):
    h, w = pair(size)

    def fn(img, ex):
        tf = tf_module()
        s = tf.shape(img)
        top, left = (s[0] - h) // 2, (s[1] - w) // 2
        return img[top:top + h, left:left + w]

    return _image_op(fn)


def _inception_window(shape, ex, area_min, area_max, ratio_min, ratio_max):
    """A random crop window ``(begin, size)`` of an image of ``shape`` ``[H, W, C]`` (Inception/GoogLeNet:
    area in [area_min, area_max] % of the image, aspect ratio in [ratio_min, ratio_max])."""
    tf = tf_module()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=example_seed(ex), area_range=(area_min / 100, area_max / 100),
        aspect_ratio_range=(ratio_min, ratio_max), min_object_covered=0, use_image_if_no_bounding_boxes=True)
    return begin, size


@register("inception_crop")
def inception_crop(size, area_min: float = 5, area_max: float = 100, ratio_min: float = 0.75,
                   ratio_max: float = 1.33, method: str = "bilinear", antialias: bool = False):
    h, w = pair(size)

    def fn(img, ex):
        tf = tf_module()
        begin, crop_size = _inception_window(tf.shape(img), ex, area_min, area_max, ratio_min, ratio_max)
        crop = tf.slice(img, begin, crop_size)
        crop.set_shape([None, None, img.shape[-1]])  # keep the static channel count
        return _resize(crop, (h, w), method, antialias)

    return _image_op(fn)


@register("decode_jpeg_and_inception_crop")
def decode_jpeg_and_inception_crop(size, area_min: float = 5, area_max: float = 100, ratio_min: float = 0.75,
                                   ratio_max: float = 1.33, channels: int | None = None, method: str = "bilinear",
                                   antialias: bool = False):
    """``decode|inception_crop(size)`` in one op that decodes only the crop window of a JPEG.

    The window is drawn from the JPEG header's size (``tf.image.extract_jpeg_shape``) and
    ``tf.image.decode_and_crop_jpeg`` decodes only the rows and blocks it covers; the same
    seed gives the same window as ``inception_crop`` on the decoded image. Other formats are
    decoded whole, then cropped; an image decoded upstream (in-memory cache, mock data) is
    cropped directly.
    """
    h, w = pair(size)
    c = channels or 3
    window = (area_min, area_max, ratio_min, ratio_max)

    def fn(img, ex):
        tf = tf_module()
        if img.dtype != tf.string:
            begin, crop_size = _inception_window(tf.shape(img), ex, *window)
            crop = tf.slice(img, begin, crop_size)
        else:
            def jpeg():
                begin, crop_size = _inception_window(tf.image.extract_jpeg_shape(img), ex, *window)
                box = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
                return tf.image.decode_and_crop_jpeg(img, box, channels=c)

            def other():
                full = tf.io.decode_image(img, channels=c, expand_animations=False)
                begin, crop_size = _inception_window(tf.shape(full), ex, *window)
                return tf.slice(full, begin, crop_size)

            crop = tf.cond(tf.io.is_jpeg(img), jpeg, other)
        crop.set_shape([None, None, img.shape[-1] if img.dtype != tf.string else c])
        return _resize(crop, (h, w), method, antialias)

    return _image_op(fn)


@register("flip_lr")
def flip_lr():
    def fn(img, ex):
        return tf_module().image.stateless_random_flip_left_right(img, seed=example_seed(ex))

    return _image_op(fn)


@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0, in_max: float = 255.0):
    def fn(img, ex):
        tf = tf_module()
        x = tf.cast(img, tf.float32)
        return vmin + (x - in_min) * (vmax - vmin) / (in_max - in_min)

    return _image_op(fn)


@register("normalize")
def normalize(mean, std):
    def fn(img, ex):
        tf = tf_module()
        return (tf.cast(img, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)

    return _image_op(fn)


@register("grayscale_to_rgb")
def grayscale_to_rgb():
    def fn(img, ex):
        tf = tf_module()
        return tf.cond(tf.shape(img)[-1] == 1, lambda: tf.image.grayscale_to_rgb(img), lambda: img)

    return _image_op(fn)


@register("onehot")
def onehot(num_classes: int, key: str = "label", key_result: str = "labels", on: float = 1.0, off: float = 0.0):
    """``ex[key_result] [num_classes]``: ``on`` at the class ``ex[key]``, ``off`` elsewhere. A list of classes
    (e.g. ImageNet ReaL's ``real_label``, possibly empty) gives the multi-hot vector of all of them, and
    ``key`` is dropped (its length varies, so it would not batch)."""

    def op(ex):
        tf = tf_module()
        labels = ex[key]
        if labels.shape.rank == 0:
            ex[key_result] = tf.one_hot(labels, num_classes, on_value=on, off_value=off)
            return ex
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        hits = tf.scatter_nd(labels[:, None], tf.ones_like(labels, tf.float32), [num_classes])
        ex[key_result] = tf.clip_by_value(hits, 0.0, 1.0) * (on - off) + off
        if key != key_result:
            ex.pop(key)
        return ex

    return op


@register("keep")
def keep(*keys):
    def op(ex):
        return {k: v for k, v in ex.items() if k in keys or k.startswith("_")}

    return op


@register("randaugment")
def randaugment(num_layers: int = 2, magnitude: int = 10):
    from seqvis.data import randaugment as ra  # deferred on purpose: it imports TensorFlow at its top

    def fn(img, ex):
        return ra.randaugment(img, num_layers, magnitude, example_seed(ex))

    return _image_op(fn)


def mixup(batch: dict, *, seed: tuple[int, int], alpha: float, p: float = 1.0, num_classes: int) -> dict:
    """Mix each example with its neighbour (batch rolled by one) with λ ~ Beta(α, α).

    ``image = λ·x + (1-λ)·roll(x)``, ``labels = λ·y + (1-λ)·roll(y)`` (one-hot); applied with
    probability p per batch, deterministic from ``seed`` (run seed, step). ``mixup_lambda``
    records λ.
    """
    rng = np.random.default_rng(list(seed))
    lam = float(rng.beta(alpha, alpha)) if rng.random() < p else 1.0
    out = dict(batch)
    labels = batch.get("labels")
    if labels is None:
        labels = np.eye(num_classes, dtype=np.float32)[batch["label"]]
    x = batch["image"].astype(np.float32)
    out["image"] = lam * x + (1.0 - lam) * np.roll(x, 1, axis=0)
    out["labels"] = (lam * labels + (1.0 - lam) * np.roll(labels, 1, axis=0)).astype(np.float32)
    out["mixup_lambda"] = np.full(len(x), lam, np.float32)
    return out
