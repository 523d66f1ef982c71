"""RandAugment (Cubuk et al. 2020) in TensorFlow, stateless and deterministic per example.

Each of ``num_layers`` rounds picks one op uniformly from the list below and applies it at
``magnitude`` (0..10 scale, as in the paper; geometric ops and signed enhancements flip
sign with probability 1/2). Works on uint8 images with 1 or 3 channels.
"""

from __future__ import annotations

import tensorflow as tf

_MAX = 10.0


def _blend(a, b, factor):
    """a + factor·(b - a), clipped to uint8 (factor 0 -> a, 1 -> b)."""
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _gray(img):
    f = tf.cast(img, tf.float32)
    g = tf.image.rgb_to_grayscale(f) if img.shape[-1] == 3 else f
    return tf.cast(tf.broadcast_to(g, tf.shape(img)), tf.uint8)


def _affine(img, transform):
    """Apply a 3x3 (flattened first 8) projective transform with nearest sampling, fill 128."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(img[None], tf.uint8), transforms=tf.cast(transform[None], tf.float32),
        output_shape=tf.shape(img)[:2], fill_value=128.0, interpolation="NEAREST", fill_mode="CONSTANT")
    return out[0]


def identity(img, m, s):
    return img


def autocontrast(img, m, s):
    f = tf.cast(img, tf.float32)
    lo = tf.reduce_min(f, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(f, axis=[0, 1], keepdims=True)
    scaled = (f - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.cast(tf.where(hi > lo, scaled, f), tf.uint8)


def equalize(img, m, s):
    def channel(c):
        hist = tf.histogram_fixed_width(tf.cast(c, tf.int32), [0, 255], nbins=256)
        cdf = tf.cumsum(hist)
        cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, tf.reduce_max(cdf)))
        denom = tf.maximum(tf.reduce_max(cdf) - cdf_min, 1)
        lut = tf.cast(tf.clip_by_value((cdf - cdf_min) * 255 // denom, 0, 255), tf.uint8)
        return tf.gather(lut, tf.cast(c, tf.int32))

    chans = [channel(img[..., i]) for i in range(img.shape[-1])]
    return tf.stack(chans, axis=-1)


def rotate(img, m, s):
    deg = m / _MAX * 30.0 * s
    rad = deg * 3.141592653589793 / 180.0
    h, w = tf.cast(tf.shape(img)[0], tf.float32), tf.cast(tf.shape(img)[1], tf.float32)
    cos, sin = tf.cos(rad), tf.sin(rad)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Output pixel (x, y) samples input at R^-1 (x - c) + c.
    t = tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy, 0.0, 0.0])
    return _affine(img, t)


def solarize(img, m, s):
    threshold = 256.0 - m / _MAX * 256.0
    return tf.where(tf.cast(img, tf.float32) >= threshold, 255 - img, img)


def posterize(img, m, s):
    bits = 8 - tf.cast(m / _MAX * 4.0, tf.int32)
    shift = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(img, shift), shift)


def _enhance(target_fn):
    def op(img, m, s):
        return _blend(target_fn(img), img, 1.0 + m / _MAX * 0.9 * s)

    return op


color = _enhance(_gray)
contrast = _enhance(lambda img: tf.cast(tf.fill(tf.shape(img), tf.reduce_mean(tf.cast(_gray(img), tf.float32))),
                                        tf.uint8))
brightness = _enhance(lambda img: tf.zeros_like(img))


def _blur(img):
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    c = img.shape[-1]
    kernel = tf.tile(k[:, :, None, None], [1, 1, c, 1])
    f = tf.cast(img, tf.float32)[None]
    blurred = tf.nn.depthwise_conv2d(f, kernel, [1, 1, 1, 1], "SAME")[0]
    return tf.cast(tf.clip_by_value(tf.round(blurred), 0, 255), tf.uint8)


sharpness = _enhance(_blur)


def shear_x(img, m, s):
    k = m / _MAX * 0.3 * s
    return _affine(img, tf.stack([1.0, k, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(img, m, s):
    k = m / _MAX * 0.3 * s
    return _affine(img, tf.stack([1.0, 0.0, 0.0, k, 1.0, 0.0, 0.0, 0.0]))


def translate_x(img, m, s):
    d = m / _MAX * 0.45 * tf.cast(tf.shape(img)[1], tf.float32) * s
    return _affine(img, tf.stack([1.0, 0.0, d, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(img, m, s):
    d = m / _MAX * 0.45 * tf.cast(tf.shape(img)[0], tf.float32) * s
    return _affine(img, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, d, 0.0, 0.0]))


OPS = [identity, autocontrast, equalize, rotate, solarize, color, posterize, contrast, brightness, sharpness,
       shear_x, shear_y, translate_x, translate_y]


def randaugment(img, num_layers: int, magnitude: float, seed):
    """``img`` uint8 ``[H, W, C]`` -> uint8, ``num_layers`` random ops at ``magnitude``."""
    if img.dtype != tf.uint8:
        raise ValueError("randaugment works on uint8 images: put it before value_range/normalize in the pp string.")
    if img.shape.rank != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"randaugment needs an image [H, W, 1 or 3] with a known channel count, got {img.shape}; "
                         "decode with channels=3 (decode(3)) before it in the pp string.")
    m = tf.constant(float(magnitude))
    for layer in range(num_layers):
        lseed = tf.random.experimental.stateless_fold_in(seed, layer)
        which = tf.random.stateless_uniform([], lseed, 0, len(OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], lseed + 1) < 0.5, -1.0, 1.0)
        branches = [lambda op=op: tf.ensure_shape(op(img, m, sign), img.shape) for op in OPS]
        img = tf.switch_case(which, branches)
    return img
