"""RandAugment ops against independent implementations: PIL's ImageOps / ImageEnhance /
Image.transform, and numpy for the integer translations.

PIL and TensorFlow round differently in places (PIL's luma conversion and blends round,
the TF ops truncate when casting to uint8), so the enhancement ops are compared within a
stated number of grey levels; the point ops (solarize, posterize, autocontrast) and the
geometric ops agree exactly.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from seqvis.data import randaugment as ra

M = 7.0  # magnitude on the paper's 0..10 scale


def _image(seed, h=20, w=24, c=3):
    """A test picture with smooth regions, edges and the full grey range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 255 / (h - 1))[..., None] * np.ones(c) * 0.6 + rng.integers(0, 100, (h, w, c))
    base[h // 3: h // 2, w // 4: w // 2] = 250  # a bright block: edges for the geometric ops
    return np.clip(base, 0, 255).astype(np.uint8)


def _ours(op, img, m=M, sign=1.0):
    return op(tf.constant(img), tf.constant(m), tf.constant(sign)).numpy()


def _pil(img):
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _arr(pil_img, like):
    a = np.asarray(pil_img)
    return a[..., None] if like.shape[-1] == 1 and a.ndim == 2 else a


# ============================================================================ point ops: exact


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("m", [0.0, 3.0, 7.0, 10.0])
def test_solarize_and_posterize_equal_pil(c, m):
    img = _image(1, c=c)
    threshold = math.ceil(256 - m / 10 * 256)  # PIL inverts v >= threshold; m=10 inverts everything
    np.testing.assert_array_equal(_ours(ra.solarize, img, m), _arr(ImageOps.solarize(_pil(img), threshold), img))
    bits = 8 - int(m / 10 * 4)
    np.testing.assert_array_equal(_ours(ra.posterize, img, m), _arr(ImageOps.posterize(_pil(img), bits), img))


@pytest.mark.parametrize("c", [1, 3])
def test_autocontrast_equals_pil(c):
    img = (_image(2, c=c) // 3 + 40).astype(np.uint8)  # a narrow range: the op must stretch it
    if c == 3:
        img[..., 2] = 77  # a constant channel stays as it is
    np.testing.assert_array_equal(_ours(ra.autocontrast, img), _arr(ImageOps.autocontrast(_pil(img)), img))


def test_equalize_is_histogram_equalisation():
    # No PIL twin (PIL drops the top bin from its step); the textbook map, per channel:
    # v -> floor(255 · (cdf(v) − cdf_min) / (N − cdf_min)), computed here with np.unique.
    img = _image(3)
    out = _ours(ra.equalize, img)
    for ch in range(3):
        x = img[..., ch].ravel()
        values, counts = np.unique(x, return_counts=True)
        cdf = np.cumsum(counts)
        lut = dict(zip(values, (cdf - cdf[0]) * 255 // (x.size - cdf[0])))
        np.testing.assert_array_equal(out[..., ch].ravel(), [lut[v] for v in x])
    assert out.max() == 255 and out.min() == 0


# ============================================================================ enhancements: within rounding


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name,enhancer,tol", [
    ("brightness", ImageEnhance.Brightness, 1),
    ("color", ImageEnhance.Color, 2),  # PIL's luma rounds, TF's grey is truncated
    ("contrast", ImageEnhance.Contrast, 3),  # the same, through the mean grey level
])
def test_enhancements_match_pil(name, enhancer, tol, sign):
    img = _image(4)
    factor = 1.0 + M / 10 * 0.9 * sign
    want = np.asarray(enhancer(_pil(img)).enhance(factor)).astype(int)
    got = _ours(getattr(ra, name), img, sign=sign).astype(int)
    assert np.abs(got - want).max() <= tol
    assert np.abs(got - img.astype(int)).max() > 10  # the op did something


def test_sharpness_matches_pil_inside_the_border():
    # PIL's SMOOTH filter (the same 3x3 kernel, centre 5 of 13) copies the border pixels; TF pads.
    img = _image(5)
    factor = 1.0 + M / 10 * 0.9
    want = np.asarray(ImageEnhance.Sharpness(_pil(img)).enhance(factor)).astype(int)
    got = _ours(ra.sharpness, img).astype(int)
    assert np.abs(got - want)[1:-1, 1:-1].max() <= 1
    smooth = np.asarray(_pil(img).filter(ImageFilter.SMOOTH)).astype(int)
    assert np.abs(smooth - img.astype(int))[1:-1, 1:-1].max() > 10  # the kernel has work to do


# ============================================================================ geometry: exact


def _pil_affine(img, coeffs):
    """PIL samples output pixel (x, y) at input ``(a·x' + b·y' + c, d·x' + e·y' + f)`` with x' = x + ½
    (pixel centres); nearest neighbour, fill 128."""
    return _arr(_pil(img).transform(_pil(img).size, Image.AFFINE, coeffs, resample=Image.NEAREST,
                                    fillcolor=(128,) * img.shape[-1] if img.shape[-1] > 1 else 128), img)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_shear_equals_pil_affine(sign):
    img = _image(6)
    k = M / 10 * 0.3 * sign
    # The op shears about the centre of pixel (0, 0); PIL's origin is that pixel's corner, so
    # the same map is x_in = x + k·(y' − ½) in PIL's coordinates.
    np.testing.assert_array_equal(_ours(ra.shear_x, img, sign=sign), _pil_affine(img, (1, k, -k / 2, 0, 1, 0)))
    np.testing.assert_array_equal(_ours(ra.shear_y, img, sign=sign), _pil_affine(img, (1, 0, 0, k, 1, -k / 2)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_equals_pil_rotate(sign):
    img = _image(7, h=21, w=21)  # odd sizes: the centre is a pixel centre for both
    deg = M / 10 * 30.0 * sign
    want = _arr(_pil(img).rotate(-deg, resample=Image.NEAREST, fillcolor=(128, 128, 128)), img)
    got = _ours(ra.rotate, img, sign=sign)
    # Nearest-neighbour ties (a sample exactly between two pixels) may round either way.
    assert np.mean(np.any(got != want, axis=-1)) < 0.01
    assert np.mean(np.any(got != img, axis=-1)) > 0.3  # it did rotate


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_translate_is_an_integer_shift_with_grey_fill(sign):
    img = _image(8, h=20, w=20)  # 0.45 · 20 · 7/10 = 6.3 px: the op samples at x + 6.3, nearest x + 6
    d = int(round(M / 10 * 0.45 * 20)) * int(sign)
    want_x = np.full_like(img, 128)
    want_y = np.full_like(img, 128)
    if d > 0:
        want_x[:, :-d], want_y[:-d] = img[:, d:], img[d:]
    else:
        want_x[:, -d:], want_y[-d:] = img[:, :d], img[:d]
    np.testing.assert_array_equal(_ours(ra.translate_x, img, sign=sign), want_x)
    np.testing.assert_array_equal(_ours(ra.translate_y, img, sign=sign), want_y)
