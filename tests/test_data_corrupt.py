"""MNIST-C / Fashion-MNIST-C corruptions (Hendrycks & Dietterich, ICLR'19): every corruption × severity runs,
is seeded, grows with severity where the reference's constants make it grow, matches identities computed a
second way; the built-in specs, the continual stream and the one-line errors."""

import numpy as np
import pytest
from _cli import bad
from scipy import ndimage

from transferkit import assets
from transferkit.data import load_dataset
from transferkit.data.builtin import builtin_names, is_builtin, load_builtin
from transferkit.data.corrupt import (CORRUPTIONS, RANDOM, VERSION, corrupt, corrupted_dataset, corruption_stream,
                                      frost_layer)
from transferkit.errors import DataError

pytestmark = pytest.mark.assets  # real Fashion-MNIST test images (cached by the catalogue)

# distance from the clean image strictly grows with severity for these (measured on 500 Fashion-MNIST and
# 500 MNIST test images); the others are asserted separately below
MONOTONE = [c for c in CORRUPTIONS if c not in ("glass_blur", "motion_blur", "frost", "elastic_transform")]
# the same draws and operations on every channel: an RGB copy of a grey image gives the grey result per channel
CHANNELWISE = ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate"]


@pytest.fixture(scope="module")
def fashion_test():
    ds = load_builtin("fashion-mnist")
    return ds.subset(ds.is_test)


@pytest.fixture(scope="module")
def images(fashion_test):
    return fashion_test.X[:64]


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_api_order_is_the_papers():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                           "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                           "elastic_transform", "pixelate", "jpeg_compression")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_runs_keeps_shape_changes_images_and_is_seeded(name, images):
    x = images[:12]
    for s in range(1, 6):
        out = corrupt(x, name, s, seed=3)
        assert out.shape == x.shape and out.dtype == np.uint8
        assert all((o != i).any() for o, i in zip(out, x)), f"{name} {s} left an image unchanged"
        assert np.array_equal(out, corrupt(x, name, s, seed=3))
        other = corrupt(x, name, s, seed=4)
        assert (not np.array_equal(out, other)) if name in RANDOM else np.array_equal(out, other)
    assert np.array_equal(x, images[:12])  # the input is not modified


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_an_item_does_not_depend_on_the_batch_it_is_in(name, images):
    x = images[:10]
    full = corrupt(x, name, 3, seed=7)
    assert np.array_equal(full[:4], corrupt(x[:4], name, 3, seed=7))
    assert corrupt(x[:0], name, 3).shape == (0, 28, 28)


def _distances(name, x):
    return [np.abs(corrupt(x, name, s).astype(float) - x).mean() for s in range(1, 6)]


@pytest.mark.parametrize("name", MONOTONE)
def test_distance_from_clean_grows_with_severity(name, images):
    d = _distances(name, images)
    assert all(a < b for a, b in zip(d, d[1:])), np.round(d, 2)


def test_corruptions_that_are_not_monotone_at_the_reference_constants(images):
    """What holds for the four exceptions (the CIFAR constants, not our adaptation, make them so)."""
    g = _distances("glass_blur", images)  # two shuffle passes (4, 5) are further than one (1-3)
    assert min(g[3], g[4]) > max(g[:3])
    m = _distances("motion_blur", images)  # (radius 6, σ 2) and (8, 2): the extra taps weigh < 1e-9
    assert m[0] < m[1] < m[2] < m[4] and np.array_equal(corrupt(images, "motion_blur", 3),
                                                         corrupt(images, "motion_blur", 4))
    f = _distances("frost", images)  # from severity 3 on, the image is dimmed (×.9 .85 .75) as frost is added
    assert f[0] < f[1] < min(f[2:])  # (+.4 .4 .45): on bright pixels the two cancel
    e = _distances("elastic_transform", images)  # the affine jitter (.08 → .03 of the side) dominates
    assert all(a > b for a, b in zip(e, e[1:])), np.round(e, 2)


def test_severities_share_their_random_draws(images):
    x = images[:16].astype(float)
    lo, hi = corrupt(images[:16], "gaussian_noise", 1) - x, corrupt(images[:16], "gaussian_noise", 5) - x
    inside = (x > 40) & (x < 215)  # no clipping at either severity
    assert np.corrcoef(lo[inside], hi[inside])[0, 1] > 0.98
    assert np.std(hi[inside]) / np.std(lo[inside]) == pytest.approx(0.10 / 0.04, rel=0.05)


def test_noise_statistics_on_a_flat_grey_image():
    flat = np.full((64, 28, 28), 128, dtype=np.uint8)
    for s, sigma in enumerate([0.04, 0.06, 0.08, 0.09, 0.10], 1):
        diff = corrupt(flat, "gaussian_noise", s, seed=1).astype(float) - 128
        assert diff.std() == pytest.approx(sigma * 255, rel=0.03) and abs(diff.mean()) < 0.3
    for s, lam in enumerate([500, 250, 100, 75, 50], 1):  # Poisson(λ/2)/λ has sd sqrt(1/(2λ))
        diff = corrupt(flat, "shot_noise", s, seed=1).astype(float) - 128
        assert diff.std() == pytest.approx(255 * np.sqrt(128 / 255 / lam), rel=0.05)
    n = flat.size
    for s, amount in enumerate([0.01, 0.02, 0.03, 0.05, 0.07], 1):  # each value flipped with p = amount
        out = corrupt(flat, "impulse_noise", s, seed=1)
        salt, pepper = int((out == 255).sum()), int((out == 0).sum())
        assert salt + pepper + int((out == 128).sum()) == n
        assert abs(salt + pepper - n * amount) < 5 * np.sqrt(n * amount)
        assert abs(salt - pepper) < 5 * np.sqrt(n * amount)


def test_brightness_is_min_x_plus_c_on_grey_and_skimage_hsv_on_rgb(images):
    for s, c in enumerate([0.05, 0.1, 0.15, 0.2, 0.3], 1):
        out = corrupt(images, "brightness", s).astype(float)
        assert np.abs(out - np.minimum(images + c * 255, 255)).max() <= 0.5 + 1e-9
    color = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 3)).astype(np.uint8)
    rgb[0, :4, :4] = 0  # black pixels: V = 0
    for s, c in enumerate([0.05, 0.1, 0.15, 0.2, 0.3], 1):
        hsv = color.rgb2hsv(rgb / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        want = np.rint(np.clip(color.hsv2rgb(hsv), 0, 1) * 255)
        assert np.abs(corrupt(rgb, "brightness", s).astype(float) - want).max() <= 1


def test_contrast_keeps_each_mean_and_scales_each_sd(images):
    x = images.astype(float)
    for s, c in enumerate([0.75, 0.5, 0.4, 0.3, 0.15], 1):
        out = corrupt(images, "contrast", s).astype(float)
        assert np.abs(out.mean(axis=(1, 2)) - x.mean(axis=(1, 2))).max() < 0.5  # (x - m)·c + m never clips
        assert out.std(axis=(1, 2)) == pytest.approx(c * x.std(axis=(1, 2)), abs=0.3)


def _reference_clipped_zoom(img, z):  # make_cifar_c.py's clipped_zoom, one image at a time
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim:trim + h, trim:trim + h]


def test_zoom_blur_matches_the_references_per_image_zoom(images):
    x = images[:6] / 255.0
    zooms = np.arange(1, 1.16, 0.01)  # severity 3
    want = [(xi + sum(_reference_clipped_zoom(xi, z) for z in zooms)) / (len(zooms) + 1) for xi in x]
    want = np.rint(np.clip(np.stack(want), 0, 1) * 255)
    got = corrupt(images[:6], "zoom_blur", 3).astype(float)
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.999


def test_defocus_blur_matches_the_full_17x17_disk_kernel(images):
    radius, alias = 1.5, 0.1  # severity 5: the 3×3 box, barely anti-aliased
    grid = np.arange(-8, 9)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).astype(float)
    disk /= disk.sum()
    disk = ndimage.gaussian_filter(disk, alias, mode="mirror", truncate=1 / alias)  # 3 taps: ±1 pixel
    want = np.stack([ndimage.correlate(xi / 255.0, disk, mode="mirror") for xi in images[:6]])
    got = corrupt(images[:6], "defocus_blur", 5).astype(float)
    assert np.abs(got - np.rint(np.clip(want, 0, 1) * 255)).max() <= 1
    box = ndimage.uniform_filter(images[:6] / 255.0, size=(1, 3, 3), mode="mirror")
    assert np.abs(got - np.rint(box * 255)).max() <= 1  # σ = .1 leaves the 3×3 box


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_rgb_images(name, images):
    rgb = np.repeat(images[:4, :, :, None], 3, axis=-1)
    out = corrupt(rgb, name, 5, seed=2)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and (out != rgb).any()
    if name in CHANNELWISE:  # a grey image in RGB: each channel is the grey result
        grey = corrupt(images[:4], name, 5, seed=2)
        assert all(np.array_equal(out[..., k], grey) for k in range(3))


def test_frost_layer_is_in_range_and_seeded():
    rngs = lambda: [np.random.default_rng(i) for i in range(32)]  # noqa: E731
    layer = frost_layer(rngs(), 28, 28)
    assert layer.shape == (32, 28, 28) and layer.min() >= 0 and layer.max() <= 1
    assert 0.3 < layer.mean() < 0.55 and np.array_equal(layer, frost_layer(rngs(), 28, 28))


def test_spec_loads_the_corrupted_official_test_items_and_caches_them(fashion_test):
    want = corrupt(fashion_test.X, "gaussian_noise", 5, seed=0)
    for _ in range(2):  # built, then read from the sealed cache
        ds = load_dataset("fashion-mnist-c:gaussian_noise:5")
        assert ds.name == "fashion-mnist-c:gaussian_noise:5" and len(ds) == 10000 == len(fashion_test)
        assert ds.classes == fashion_test.classes and np.array_equal(ds.y, fashion_test.y)
        assert np.array_equal(ds.X, want)
        assert ds.meta["corruption"] == "gaussian_noise" and ds.meta["severity"] == 5
    cached = assets.derived_dir(f"fashion-mnist-c/v{VERSION}/gaussian_noise-5") / "parsed-v1.npz"
    assert assets.derived_intact(cached)
    small = load_dataset("mnist-c:contrast:2", limit=30, seed=1)
    assert len(small) == 30 and small.X.shape[1:] == (28, 28)
    assert is_builtin("mnist-c:fog:3") and "fashion-mnist-c:<corruption>:<severity>" in builtin_names()
    assert np.array_equal(corrupted_dataset("fashion-mnist", "brightness", 1, seed=5).X,
                          corrupt(fashion_test.X, "brightness", 1))  # deterministic: the seed does nothing


@pytest.mark.parametrize("spec, match", [
    ("fashion-mnist-c:nope:5", "unknown corruption 'nope'"),
    ("fashion-mnist-c:gausian_noise:5", "did you mean 'gaussian_noise'"),
    ("fashion-mnist-c:fog:6", "severity must be an integer in 1..5"),
    ("fashion-mnist-c:fog:0", "severity must be an integer in 1..5"),
    ("fashion-mnist-c:fog:x", "severity must be an integer in 1..5"),
    ("fashion-mnist-c:fog", "must be fashion-mnist-c:<corruption>:<severity>"),
    ("fashion-mnist-c:fog:3:1", "must be fashion-mnist-c:<corruption>:<severity>"),
    ("mnist-c", "must be mnist-c:<corruption>:<severity>"),
])
def test_bad_specs_are_one_line_data_errors(spec, match):
    with pytest.raises(DataError) as exc:
        load_dataset(spec)
    assert match in one_line(exc)


def test_bad_arguments_are_one_line_data_errors(images):
    cases = [(lambda: corrupt(images, "fogg", 1), "did you mean 'fog'"),
             (lambda: corrupt(images, "fog", 6), "1..5"),
             (lambda: corrupt(images, "fog", True), "1..5"),
             (lambda: corrupt(images, "fog", 2.0), "1..5"),
             (lambda: corrupt(images, "fog", 1, seed=-1), "non-negative"),
             (lambda: corrupt(images.astype(np.float32), "fog", 1), "uint8"),
             (lambda: corrupt(images[..., None], "fog", 1), "(N, H, W, 3)"),
             (lambda: corrupted_dataset("cifar10", "fog", 1), "no corrupted version"),
             (lambda: corruption_stream("fashion-mnist", 5, repeats=0), "repeats"),
             (lambda: corruption_stream("fashion-mnist", 5, per_corruption=0), "per_corruption"),
             (lambda: corruption_stream("fashion-mnist", 7), "1..5")]
    for call, match in cases:
        with pytest.raises(DataError) as exc:
            call()
        assert match in one_line(exc)


def test_corruption_stream_layout(fashion_test):
    n, reps = 4, 2
    st = corruption_stream("fashion-mnist", 5, repeats=reps, per_corruption=n, seed=3)
    assert len(st) == 15 * n * reps and st.domain_names == list(CORRUPTIONS)
    assert np.array_equal(st.domains, np.tile(np.repeat(np.arange(15), n), reps))
    half = 15 * n
    assert np.array_equal(st.X[:half], st.X[half:]) and np.array_equal(st.y[:half], st.y[half:])
    blocks_y = st.y[:half].reshape(15, n)
    assert (blocks_y == blocks_y[0]).all()  # the same items under every corruption
    k = CORRUPTIONS.index("contrast")  # deterministic: its rows are contrast-corrupted test items
    rows = {r.tobytes() for r in corrupt(fashion_test.X, "contrast", 5)}
    assert all(r.tobytes() in rows for r in st.X[k * n:(k + 1) * n])


def test_adapt_cli_with_a_bad_corruption_is_one_line_exit_2(tmp_path):
    out = tmp_path / "o"
    bad(["adapt", "--source", "fashion-mnist", "--target", "fashion-mnist-c:nope:5", "--model", "digits-usps",
         "--method", "tent", "--out", out], "unknown corruption 'nope'")
    assert not out.exists()
