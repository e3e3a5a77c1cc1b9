"""MNIST-C / Fashion-MNIST-C: the 15 common corruptions of Hendrycks & Dietterich, built from the test sets.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019 (reference code: ``hendrycks/robustness``, ``ImageNet-C/create_c/make_cifar_c.py``).

>>> from transferkit.data.corrupt import CORRUPTIONS, corrupt, corrupted_dataset
>>> noisy = corrupt(images, "gaussian_noise", 5, seed=0)                       # doctest: +SKIP
>>> ds = load_dataset("fashion-mnist-c:fog:3")                                # doctest: +SKIP

:func:`corrupt` takes uint8 images ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB) and returns the same
shape and dtype. It uses only numpy, scipy and PIL (the reference also needs ImageMagick, OpenCV and
scikit-image). Randomness: item ``i`` draws from its own generator, child ``i`` of
``SeedSequence([seed, index of the corruption])``, so an item's result depends only on its image, its
position ``i``, the corruption, the severity and the seed: ``corrupt(X)[:k] == corrupt(X[:k])``, and the
five severities of one item share their random draws (only the constants change). Outputs are rounded
to the nearest integer (the reference truncates with ``np.uint8``: a deliberate deviation that removes
its -0.5 bias).

Constants: the CIFAR (32×32) ones of ``make_cifar_c.py`` for every corruption; constants in pixels
(blur radii and sigmas, shuffle distance) are kept as they are, the reference's hard-coded 32 becomes the
image side (28 for MNIST), and grey images are treated as one channel:

=================  =====================================================================================
gaussian_noise     σ = .04 .06 .08 .09 .10 (pixel scale [0, 1]), one draw per pixel and channel
shot_noise         Poisson(x·λ)/λ, λ = 500 250 100 75 50
impulse_noise      salt & pepper on a fraction .01 .02 .03 .05 .07 of the values (skimage ``random_noise``
                   semantics: each value flipped with that probability, half to 1 and half to 0)
defocus_blur       disk radius .3 .4 .5 1 1.5 on a 17×17 grid, anti-aliased by a 3×3 Gaussian of σ =
                   .4 .5 .6 .2 .1 (``cv2.GaussianBlur``), applied with mirrored borders (``cv2.filter2D``)
glass_blur         (σ, δ, iterations) = (.05,1,1) (.25,1,1) (.4,1,1) (.25,1,2) (.4,1,2): blur, truncate to
                   uint8, swap every pixel from the bottom-right (side-1) to (2, 2) with one at offset
                   in ``[-δ, δ)`` (the reference's ``randint`` excludes +δ; kept), blur again
motion_blur        (radius, σ) = (6,1) (6,1.5) (6,2) (8,2) (9,2.5), angle ~ U(-45°, 45°): ImageMagick's
                   ``MotionBlurImage`` re-implemented (one-sided Gaussian kernel of width 2·radius+1,
                   offsets ``ceil(i·cos a - .5)``, ``ceil(i·sin a - .5)``, edge pixels repeated)
zoom_blur          mean of the image and its centre zooms by 1, 1.01, ... < 1.06 1.11 1.16 1.21 1.26
                   (scipy ``zoom``, order 1, cropped to the side)
snow               CIFAR constants (loc, scale, zoom, threshold, blur radius, blur σ, mix) unchanged;
                   the grey value stands in for ``cv2 RGB2GRAY`` on grey images; the flake layer is
                   motion-blurred as above (angle ~ U(-135°, -45°))
frost              mix (image, frost) = (1, .2) (1, .3) (.9, .4) (.85, .4) (.75, .45). **Substitute:** the
                   reference crops one of six frost photographs, which are not available offline; here
                   each item gets a procedural frost layer (see :func:`frost_layer`): ice-crystal
                   streaks (random short line segments, blurred) over a plasma-fractal haze, values in
                   [0, 1] (mean ≈ 0.42), bluish-white on RGB images. Severity is the same mix.
fog                (strength, decay) = (.2,3) (.5,3) (.75,2.5) (1,2) (1.5,1.75): plasma fractal of side
                   32 (next power of two ≥ the side) cropped to the image, rescaled by max/(max+strength)
brightness         V + .05 .1 .15 .2 .3 in HSV (clipped at 1); on grey images that is ``min(x + c, 1)``,
                   on RGB a pixel is scaled by V'/V (the same as skimage's rgb2hsv → hsv2rgb)
contrast           (x - mean)·c + mean per image and channel, c = .75 .5 .4 .3 .15
elastic_transform  side·(α, σ, affine jitter) = (0,0,.08) (.05,.2,.07) (.08,.06,.06) (.1,.04,.05)
                   (.1,.03,.03), side = 28 instead of the reference's IMSIZE = 32: random affine of
                   three points (mirrored borders, linear), then a Gaussian-smoothed random field
                   (``mode='reflect'``, truncate 3) scaled by α
pixelate           PIL BOX resize to int(side·c) and back, c = .95 .9 .85 .75 .65 (28 → 26 25 23 21 18)
jpeg_compression   PIL JPEG quality 80 65 58 50 40
=================  =====================================================================================

Random corruptions: the noises, glass_blur, motion_blur, snow, frost, fog and elastic_transform; the other
five are deterministic. The mean absolute distance from the clean image grows strictly with severity for
11 corruptions; at the reference's constants it does not for four (mean |Δ| on 500 Fashion-MNIST test
images, severities 1..5): glass_blur 23.0 22.9 21.7 30.2 28.4 (two shuffle passes at 4-5, one at 1-3;
more blur at 3 smooths the shuffle), motion_blur 11.0 16.5 21.0 21.0 24.9 (severities 3 and 4 give the
same images: the extra taps of radius 8 over 6 weigh < 1e-9 at σ = 2), frost 20.4 30.1 34.0 31.8 34.3
(the image is dimmed by .9 .85 .75 as frost is added; on bright pixels the two cancel) and
elastic_transform 28.7 26.1 23.6 22.0 18.8 (the affine jitter shrinks from .08 to .03 of the side while
the elastic field grows).

:func:`corrupted_dataset` corrupts a built-in image dataset's official test items (Fashion-MNIST: the
10,000 test images; ``mnist`` has no official split, so all 10,000 items are used); it backs the
built-in specs ``mnist-c:<corruption>:<severity>`` and ``fashion-mnist-c:<corruption>:<severity>``
(seed 0; built in 0.1-5 s per spec on one core, then cached by :mod:`.builtin` like the other
built-ins). :func:`corruption_stream` is the continual test-time-adaptation stream (CoTTA's protocol):
the 15 corruptions in order, repeated, with ``domains`` naming each item's corruption.
"""

from __future__ import annotations

import io
import math
import numbers
from typing import Callable

import numpy as np
from scipy import ndimage

from ..errors import DataError
from .dataset import Dataset

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow",
                    "frost", "fog", "elastic_transform"})
BASES = ("mnist", "fashion-mnist")  # the built-in specs <base>-c:<corruption>:<severity>
VERSION = 1  # of the corruption code: part of the cache path of the built-in specs; bump on any change

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corrupted_dataset", "corruption_stream", "parse_spec",
           "check_corruption", "frost_layer"]


# --------------------------------------------------------------------------- checks


def check_corruption(name: object, severity: object) -> tuple[str, int]:
    """``(name, severity)`` validated: a known corruption and an integer in 1..5 (else a one-line DataError)."""
    from ..registry import did_you_mean

    if not isinstance(name, str) or name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {str(name)[:80]!r}{did_you_mean(name, CORRUPTIONS)}; "
                        f"known: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise DataError(f"corruption severity must be an integer in 1..5, got {str(severity)[:40]!r}")
    return name, int(severity)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DataError(f"corruption seed must be a non-negative integer, got {str(seed)[:40]!r}")
    return int(seed)


def _check_images(images: object) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(f"corrupt needs a uint8 numpy array, got {getattr(images, 'dtype', type(images).__name__)}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or min(images.shape[1:3]) < 4:
        raise DataError(f"corrupt needs images of shape (N, H, W) or (N, H, W, 3) with H, W >= 4, "
                        f"got {images.shape}")
    return images


# --------------------------------------------------------------------------- helpers


def _each(rngs: list[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """One draw per item from that item's generator, stacked."""
    return np.stack([np.asarray(draw(r)) for r in rngs])


def _plasma(rngs: list[np.random.Generator], size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps ``(N, size, size)`` in [0, 1], one per item (the reference's plasma_fractal)."""
    n, m = len(rngs), size
    a = np.zeros((n, m, m))
    step, wibble = m, 100.0

    def wibbled(arr: np.ndarray) -> np.ndarray:
        return arr / 4 + wibble * _each(rngs, lambda r: r.uniform(-wibble, wibble, arr.shape[1:]))

    while step >= 2:
        h = step // 2
        corner = a[:, 0:m:step, 0:m:step]
        sq = corner + np.roll(corner, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        a[:, h:m:step, h:m:step] = wibbled(sq)
        dr, ul = a[:, h:m:step, h:m:step], a[:, 0:m:step, 0:m:step]
        a[:, 0:m:step, h:m:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        a[:, h:m:step, 0:m:step] = wibbled(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= decay
    a -= a.min(axis=(1, 2), keepdims=True)
    return a / np.maximum(a.max(axis=(1, 2), keepdims=True), 1e-12)


def _pow2(side: int) -> int:
    return 1 << max(1, math.ceil(math.log2(side)))


def _clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Zoom ``(N, H, W, C)`` by ``z`` about the centre (scipy ``zoom``, order 1), cropped back to ``(H, W)``.

    Linear zoom is separable, so it is applied as two 1-D interpolation matrices (those of ``zoom`` on an
    identity matrix): the same numbers as zooming each image, ~50x faster on a batch.
    """
    h, w = x.shape[1:3]
    mats = []
    for side in (h, w):
        crop = math.ceil(side / z)
        start = (side - crop) // 2
        m = ndimage.zoom(np.eye(crop), (z, 1), order=1)
        trim = (m.shape[0] - side) // 2
        full = np.zeros((side, side))
        full[:, start:start + crop] = m[trim:trim + side]
        mats.append(full)
    out = mats[0] @ np.moveaxis(x, -1, 1) @ mats[1].T  # (N, C, H, W): the same matrix products for every item
    return np.moveaxis(out, 1, -1)


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on ``(N, H, W, C)``, one angle (degrees) per item."""
    n, h, w = x.shape[:3]
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    a = np.deg2rad(angles)[:, None]
    i = np.arange(width)[None, :]
    ox, oy = np.ceil(i * np.cos(a) - 0.5).astype(int), np.ceil(i * np.sin(a) - 0.5).astype(int)
    items = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for j in range(width):
        rows = np.clip(np.arange(h)[None, :] + oy[:, j:j + 1], 0, h - 1)[:, :, None]
        cols = np.clip(np.arange(w)[None, :] + ox[:, j:j + 1], 0, w - 1)[:, None, :]
        out += k[j] * x[items, rows, cols]
    return out


def _grey(x: np.ndarray) -> np.ndarray:
    """Luma ``(N, H, W, 1)`` (cv2 RGB2GRAY weights on RGB; the value itself on grey)."""
    return x if x.shape[-1] == 1 else (x @ np.array([0.299, 0.587, 0.114]))[..., None]


def frost_layer(rngs: list[np.random.Generator], h: int, w: int) -> np.ndarray:
    """Procedural frost ``(N, H, W)`` in [0, 1] standing in for the reference's frost photographs.

    A plasma-fractal haze (decay 2) weighted .6 plus ice-crystal streaks weighted .8, clipped to [0, 1]
    (mean ≈ 0.42 at 28×28): the streaks are 2·side random line segments (length 2..side/3 px, any angle,
    brightness U(.5, 1)) accumulated, blurred with σ = .6 and scaled so the brightest point is 1.
    """
    n, m = len(rngs), 2 * max(h, w)
    haze = _plasma(rngs, _pow2(max(h, w)), 2.0)[:, :h, :w]
    seg = _each(rngs, lambda r: np.column_stack([r.uniform(0, h, m), r.uniform(0, w, m), r.uniform(0, np.pi, m),
                                                 r.uniform(2, max(h, w) / 3, m), r.uniform(0.5, 1, m)]))
    t = np.linspace(0, 1, 12)
    ys = np.rint(seg[..., 0:1] + t * seg[..., 3:4] * np.sin(seg[..., 2:3])).astype(int)
    xs = np.rint(seg[..., 1:2] + t * seg[..., 3:4] * np.cos(seg[..., 2:3])).astype(int)
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    item = np.broadcast_to(np.arange(n)[:, None, None], ys.shape)
    crystals = np.zeros((n, h, w))
    np.add.at(crystals, (item[ok], ys[ok], xs[ok]), np.broadcast_to(seg[..., 4:5], ys.shape)[ok])
    crystals = ndimage.gaussian_filter(crystals, (0, 0.6, 0.6))
    crystals /= np.maximum(crystals.max(axis=(1, 2), keepdims=True), 1e-12)
    return np.clip(0.6 * haze + 0.8 * crystals, 0, 1)


# --------------------------------------------------------------------------- corruptions
# Each takes float images (N, H, W, C) in [0, 1], the item generators and the severity (1..5), and
# returns floats (clipped and rounded by the caller); pixelate and jpeg work on uint8 through PIL.


def _gaussian_noise(x, rngs, s):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + c * _each(rngs, lambda r: r.standard_normal(x.shape[1:]))


def _shot_noise(x, rngs, s):
    c = [500, 250, 100, 75, 50][s - 1]
    return np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / c


def _impulse_noise(x, rngs, s):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = _each(rngs, lambda r: r.random((2, *x.shape[1:])))
    flipped, salt = u[:, 0] < c, u[:, 1] < 0.5
    return np.where(flipped, np.where(salt, 1.0, 0.0), x)


def _defocus_blur(x, rngs, s):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    grid = np.arange(-8, 9)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).astype(float)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias ** 2))
    g /= g.sum()
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    kernel = kernel[6:11, 6:11]  # the anti-aliased disk is zero outside the central 5×5 for every severity
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


def _glass_blur(x, rngs, s):
    sigma, d, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    n, h, w = x.shape[:3]
    blur = (0, sigma, sigma, 0)
    img = (ndimage.gaussian_filter(x, blur, mode="nearest") * 255).astype(np.uint8)
    hs, ws = range(h - d, d, -1), range(w - d, d, -1)
    shifts = _each(rngs, lambda r: r.integers(-d, d, size=(iters, len(hs), len(ws), 2)))
    items = np.arange(n)
    for it in range(iters):
        for a, hh in enumerate(hs):
            for b, ww in enumerate(ws):
                dx, dy = shifts[:, it, a, b, 0], shifts[:, it, a, b, 1]
                here, there = img[:, hh, ww].copy(), img[items, hh + dy, ww + dx]
                img[:, hh, ww] = there
                img[items, hh + dy, ww + dx] = here
    return ndimage.gaussian_filter(img / 255.0, blur, mode="nearest")


def _motion(x, rngs, s):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return _motion_blur(x, radius, sigma, _each(rngs, lambda r: r.uniform(-45, 45)))


def _zoom_blur(x, rngs, s):
    zooms = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)
    out = np.zeros_like(x)
    for z in zooms:
        out += _clipped_zoom(x, z)
    return (x + out) / (len(zooms) + 1)


def _snow(x, rngs, s):
    loc, scale, zoom, thresh, radius, sigma, mix = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    flakes = _each(rngs, lambda r: r.normal(loc, scale, x.shape[1:3]))[..., None]
    flakes = _clipped_zoom(flakes, zoom)
    flakes[flakes < thresh] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8) / 255.0  # the reference's PNG round trip
    flakes = _motion_blur(flakes, radius, sigma, _each(rngs, lambda r: r.uniform(-135, -45)))
    x = mix * x + (1 - mix) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, 2, axes=(1, 2))


def _frost(x, rngs, s):
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    layer = frost_layer(rngs, *x.shape[1:3])[..., None]
    if x.shape[-1] == 3:
        layer = layer * np.array([0.85, 0.92, 1.0])
    return a * x + b * layer


def _fog(x, rngs, s):
    strength, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    h, w = x.shape[1:3]
    top = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma(rngs, _pow2(max(h, w)), decay)[:, :h, :w, None]
    return x * top / (top + strength)


def _brightness(x, rngs, s):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    v = x.max(axis=-1, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    return np.where(v > 0, x * v_new / np.where(v > 0, v, 1.0), v_new)


def _contrast(x, rngs, s):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def _elastic(x, rngs, s):
    n, h, w, ch = x.shape
    side = min(h, w)
    alpha, sigma, jitter = (side * f for f in [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                                                (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)][s - 1])
    cx, cy, sq = w // 2, h // 2, side // 3
    src = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=float)  # (x, y)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty_like(x)
    for i, r in enumerate(rngs):
        dst = src + r.uniform(-jitter, jitter, (3, 2))
        fwd = np.linalg.solve(np.column_stack([src, np.ones(3)]), dst).T  # 2×3: (x, y, 1) → (x', y')
        inv = np.linalg.inv(fwd[:, :2])
        matrix, offset = inv[::-1, ::-1], (-inv @ fwd[:, 2])[::-1]  # output (row, col) → input (row, col)
        fields = [ndimage.gaussian_filter(r.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
                  for _ in range(2)]
        dx, dy = fields
        for c in range(ch):
            warped = ndimage.affine_transform(x[i, :, :, c], matrix, offset, order=1, mode="mirror")
            out[i, :, :, c] = ndimage.map_coordinates(warped, [rows + dy, cols + dx], order=1, mode="reflect")
    return out


def _pil_each(images: np.ndarray, fn: Callable) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(im))) for im in images]).reshape(images.shape)


def _pixelate(images, s):
    from PIL import Image

    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = images.shape[1:3]
    return _pil_each(images, lambda im: im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))


def _jpeg(images, s):
    from PIL import Image

    quality = [80, 65, 58, 50, 40][s - 1]

    def roundtrip(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        with Image.open(io.BytesIO(buf.getvalue())) as out:
            return out.convert(im.mode)

    return _pil_each(images, roundtrip)


_FLOAT = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
          "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion, "zoom_blur": _zoom_blur,
          "snow": _snow, "frost": _frost, "fog": _fog, "brightness": _brightness, "contrast": _contrast,
          "elastic_transform": _elastic}
_UINT8 = {"pixelate": _pixelate, "jpeg_compression": _jpeg}


# --------------------------------------------------------------------------- public API


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` with corruption ``name`` at ``severity`` (1..5).

    Deterministic for a seed; item ``i`` uses only its own random draws (see the module docstring), so
    ``corrupt(X, ...)[:k]`` equals ``corrupt(X[:k], ...)``. Returns a new uint8 array of the same shape.
    """
    name, severity = check_corruption(name, severity)
    seed = _check_seed(seed)
    images = _check_images(images)
    if len(images) == 0:
        return images.copy()
    if name in _UINT8:
        return _UINT8[name](images, severity)
    rngs = []
    if name in RANDOM:
        root = np.random.SeedSequence([seed, CORRUPTIONS.index(name)])
        rngs = [np.random.default_rng(child) for child in root.spawn(len(images))]
    x = images.astype(np.float64) / 255.0
    x = x if images.ndim == 4 else x[..., None]
    out = _FLOAT[name](x, rngs, severity)
    out = np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)
    return out.reshape(images.shape)


def _check_base(base: object) -> str:
    if base not in BASES:
        from ..registry import did_you_mean

        raise DataError(f"no corrupted version of dataset {str(base)[:80]!r}{did_you_mean(base, BASES)}; "
                        f"known: {', '.join(BASES)}")
    return str(base)


def _test_items(base: str) -> Dataset:
    from .builtin import load_builtin

    ds = load_builtin(_check_base(base))
    return ds.subset(ds.is_test) if ds.is_test is not None else ds


def corrupted_dataset(base: str, name: str, severity: int, seed: int = 0) -> Dataset:
    """The official test items of built-in ``base`` (``mnist`` or ``fashion-mnist``) corrupted by ``name``."""
    name, severity = check_corruption(name, severity)
    seed = _check_seed(seed)
    test = _test_items(base)
    return Dataset(f"{base}-c:{name}:{severity}", "image", corrupt(test.X, name, severity, seed), test.y,
                   test.classes, meta={"base": base, "corruption": name, "severity": severity, "seed": seed,
                                       "items": "official test split" if base == "fashion-mnist" else "all items",
                                       "paper": "Hendrycks & Dietterich, ICLR 2019 (CIFAR-10-C constants)"})


def parse_spec(spec: str) -> tuple[str, str, int]:
    """``(base, corruption, severity)`` of a spec ``<base>-c:<corruption>:<severity>``, all validated."""
    parts = spec.split(":")
    head = parts[0]
    if len(parts) != 3 or not head.endswith("-c"):
        raise DataError(f"dataset {spec[:80]!r} must be {head}:<corruption>:<severity>, "
                        f"e.g. {head}:gaussian_noise:5")
    severity = parts[2].strip()
    if not severity.isdigit():
        raise DataError(f"corruption severity must be an integer in 1..5, got {severity[:40]!r} in {spec[:80]!r}")
    name, level = check_corruption(parts[1], int(severity))
    return _check_base(head[:-2]), name, level


def corruption_stream(base: str, severity: int, repeats: int = 1, per_corruption: int | None = None,
                      seed: int = 0) -> Dataset:
    """The 15 corruptions in :data:`CORRUPTIONS` order, ``repeats`` times, as one stream.

    Every corruption block holds the same ``per_corruption`` test items (a seeded random sample, in
    their original order; all test items when None), corrupted with ``seed``; the passes are identical
    copies, so an error on the first and on the last pass compares the model's state on the same items.
    ``domains[i]`` is the index of item ``i``'s corruption in ``domain_names`` (= CORRUPTIONS).
    """
    _, severity = check_corruption(CORRUPTIONS[0], severity)
    seed = _check_seed(seed)
    for value, what in ((repeats, "repeats"), (per_corruption, "per_corruption")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise DataError(f"{what} must be a positive integer, got {str(value)[:40]!r}")
    test = _test_items(base)
    if per_corruption is not None and per_corruption < len(test):
        pick = np.sort(np.random.default_rng(seed).choice(len(test), per_corruption, replace=False))
        test = test.subset(pick)
    blocks = [corrupt(test.X, name, severity, seed) for name in CORRUPTIONS]
    X = np.concatenate(blocks * repeats)
    n = len(test)
    domains = np.tile(np.repeat(np.arange(len(CORRUPTIONS)), n), repeats)
    return Dataset(f"{base}-c-stream:{severity}", "image", X, np.tile(test.y, len(CORRUPTIONS) * repeats),
                   test.classes, domains=domains, domain_names=list(CORRUPTIONS),
                   meta={"base": base, "severity": severity, "repeats": int(repeats), "per_corruption": n,
                         "seed": seed, "order": "CORRUPTIONS order, repeated; pass = index // (15 * per_corruption)"})
