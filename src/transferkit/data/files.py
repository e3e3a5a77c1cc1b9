"""Datasets from user files, image folders and Hugging Face ``datasets`` objects.

Formats
-------
``.npz``
    Keys ``X`` and ``y`` (``np.load(..., allow_pickle=False)``, so no object arrays). ``X`` 2-D
    numeric -> tabular; 3-D ``(N,H,W)`` or 4-D ``(N,H,W,C)``/``(N,C,H,W)`` with C in {1, 3} -> images
    (float images in [0, 1] are scaled by 255); 1-D strings -> text. Optional keys: ``classes`` (names
    for integer labels 0..C-1), ``domains`` (+ optional ``domain_names``), ``is_test`` (bool).
``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet``
    A table with columns ``text`` and ``label`` (text modality). Optional columns: ``domain`` (domain
    names or ids) and ``split`` (``train``/``test``, kept in ``is_test``). In CSV/TSV only empty cells
    count as missing (so a review reading "NA" stays text). JSONL: one JSON object per line, blank
    lines skipped.

    Labels follow **one rule in every table format**, applied to each label as written (a CSV cell,
    a JSON number or string, a parquet value): a label that reads as a number (``3``, ``"3"``,
    ``3.0``, ``1e1``) is a number, anything else (``pos``, ``True``) is a name. A column of numbers
    must hold integers (``2.5`` is rejected) and gives integer classes in numeric order; a column of
    names gives the sorted names; a column mixing numbers and names (``1``, ``pos``, ``2.5``) is a
    one-line :class:`~transferkit.errors.DataError` in CSV, TSV, JSONL and parquet alike (write
    every label as a name, e.g. ``one``/``pos``, or every label as an integer). Empty cells, JSON
    ``null`` and NaN are missing labels (an error).
image folder
    ``root/<class name>/**/<image>`` with extensions ``.png .jpg .jpeg .bmp .gif .tif .tiff .webp
    .ppm .pgm .pbm``; class names are the sub-folder names, sorted; sub-folders without images are
    ignored, as are hidden files and files with other extensions. All images are resized with PIL
    bilinear resampling to the most common (width, height) among them (ties: the larger area). The
    set is RGB if any image has a colour mode (RGB, RGBA, CMYK, YCbCr, ... or a non-grey palette),
    otherwise grey; alpha is dropped.
Hugging Face ``datasets.Dataset``
    Columns ``text`` + ``label`` or ``image`` (or ``img``) + ``label``. A ``ClassLabel`` feature's
    names become the class names. Images (PIL images or arrays) are converted like an image folder.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError
from .dataset import Dataset, make_dataset

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
SUPPORTED = (".npz", *TABLE_SUFFIXES)
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def load_path(path: Path) -> Dataset:
    """Load a dataset file or image folder (dispatch on what ``path`` is)."""
    if path.is_dir():
        return load_image_folder(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix in TABLE_SUFFIXES:
        return load_table(path)
    raise DataError(f"unsupported file type {suffix or path.name!r} for {path}; "
                    f"expected {', '.join(SUPPORTED)} or an image folder")


# --------------------------------------------------------------------------- npz


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("X", "y") if k not in keys]
            if missing:
                raise DataError(f"{path.name} has no array {missing[0]!r} (it has: {', '.join(sorted(keys)) or 'nothing'})")
            arrays = {k: z[k] for k in keys}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path.name} holds object arrays; save X and y as numeric or string arrays") from None
        raise DataError(f"cannot read {path.name}: {_first_line(exc)}") from None
    except Exception as exc:
        raise DataError(f"cannot read {path.name} as .npz: {type(exc).__name__}") from None
    classes = arrays.get("classes")
    domain_names = arrays.get("domain_names")
    return make_dataset(
        path.stem, arrays["X"], arrays["y"],
        classes=None if classes is None else [str(c) for c in classes.tolist()],
        domains=arrays.get("domains"),
        domain_names=None if domain_names is None else [str(d) for d in domain_names.tolist()],
        is_test=arrays.get("is_test"),
        meta={"source": str(path)},
    )


# --------------------------------------------------------------------------- tables


def read_table(path: Path):
    """Read a CSV/TSV/JSONL/parquet file as a pandas DataFrame (DataError on failure)."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype={"text": str, "label": str},
                               keep_default_na=False, na_values=[""])
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path.name} line {lineno} is not valid JSON") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path.name} line {lineno} is not a JSON object")
                    rows.append(row)
            return pd.DataFrame(rows)
        if suffix == ".parquet":
            try:
                return pd.read_parquet(path)
            except ImportError:
                raise DataError("reading .parquet needs pyarrow: pip install 'transferkit[hf]'") from None
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"dataset file {path.name} is empty") from None
    except Exception as exc:
        raise DataError(f"cannot read {path.name}: {type(exc).__name__}: {_first_line(exc)}") from None
    raise DataError(f"unsupported file type {suffix!r}")


def load_table(path: Path) -> Dataset:
    df = read_table(path)
    return dataset_from_frame(df, path.stem, where=path.name, meta={"source": str(path)})


def dataset_from_frame(df, name: str, *, where: str, meta: dict | None = None) -> Dataset:
    """A text Dataset from a DataFrame with ``text``/``label`` (+ optional ``domain``/``split``)."""
    cols = [str(c) for c in df.columns]
    if len(df) == 0:
        raise DataError(f"dataset {where} is empty")
    for col in ("text", "label"):
        if col not in cols:
            raise DataError(f"{where} has no {col!r} column (columns: {', '.join(cols) or 'none'})")
    texts = _texts(df["text"].tolist(), where)
    domains = df["domain"] if "domain" in cols else None
    is_test = _split_column(df["split"], where) if "split" in cols else None
    labels = _label_column(df["label"].tolist(), where)
    return make_dataset(name, texts, labels, domains=domains, is_test=is_test, meta=meta, modality="text")


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def _label_column(values: list, where: str) -> np.ndarray:
    """The label rule of every table format (module docstring): int64 numbers or str names."""
    numbers: list[int | float] = []
    names: list[str] = []
    missing = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType", "NaTType"):
            missing.append(i)
        elif isinstance(v, (bool, np.bool_)):
            names.append(str(bool(v)))
        elif isinstance(v, (int, np.integer)):
            numbers.append(int(v))
        elif isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                raise DataError(f"{where}: labels contain NaN or infinite values (row {i})")
            numbers.append(int(v) if float(v).is_integer() else float(v))
        elif isinstance(v, str):
            t = v.strip()
            if _INTEGER.fullmatch(t):
                numbers.append(int(t))
            elif _NUMBER.fullmatch(t):
                f = float(t)
                numbers.append(int(f) if f.is_integer() else f)
            else:
                names.append(v)
        else:
            raise DataError(f"{where}: labels must be integers or strings, got {type(v).__name__} in row {i}")
    if missing:
        raise DataError(f"{where}: labels have {len(missing)} missing values (first at row {missing[0]})")
    if numbers and names:
        raise DataError(f"{where}: column 'label' is a mix of types: numbers (e.g. {numbers[0]!r}) and names (e.g. "
                        f"{names[0]!r}); write every label as a name or every label as an integer")
    if names:
        return np.asarray(names, dtype=str)
    frac = [x for x in numbers if isinstance(x, float)]
    if frac:
        raise DataError(f"{where}: labels must be integers or names, got a number with a fractional part "
                        f"(e.g. {frac[0]:g})")
    try:
        return np.asarray(numbers, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{where}: integer labels out of range") from None


def _texts(values: list, where: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            out.append(v)
        elif v is None or (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType", "NaTType"):
            raise DataError(f"{where}: text is missing in row {i}")
        else:
            out.append(str(v))
    return out


def _split_column(col, where: str) -> np.ndarray:
    values = [str(v).strip().lower() for v in col.tolist()]
    bad = sorted(set(values) - {"train", "test"})
    if bad:
        raise DataError(f"{where}: column 'split' must hold 'train' or 'test', got {bad[0]!r}")
    return np.asarray([v == "test" for v in values], dtype=bool)


# --------------------------------------------------------------------------- images


def _is_colour(im) -> bool:
    if im.mode in _GREY_MODES:
        return False
    if im.mode in ("P", "PA"):
        pal = im.getpalette() or []
        triples = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)
        return not bool((triples == triples[:, :1]).all())
    return True


def _common_size(sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    counts = Counter(sizes)
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s))


def images_to_array(images: list, where: str, names: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """Convert PIL images / arrays to one uint8 array (common size, grey or RGB; see module doc)."""
    from PIL import Image

    pil = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            pil.append(im)
            continue
        arr = np.asarray(im)
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise DataError(f"{where}: image {i} contains NaN or infinite values")
            arr = np.round(arr * 255 if arr.max() <= 1.0 else arr)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise DataError(f"{where}: image {i} has shape {arr.shape}; expected (H,W) or (H,W,3)")
        pil.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    if not pil:
        raise DataError(f"{where}: no images")
    colour = any(_is_colour(im) for im in pil)
    size = _common_size(im.size for im in pil)
    out = _empty_images(len(pil), size, colour)
    resized = 0
    for i, im in enumerate(pil):
        try:
            out[i], changed = _convert_one(im, size, colour)
        except Exception as exc:
            label = names[i] if names else f"image {i}"
            raise DataError(f"{where}: cannot read {label}: {type(exc).__name__}: {_first_line(exc)}") from None
        resized += changed
    return out, {"image_size": [size[1], size[0]], "resized": resized, "colour": colour,
                 "resample": "PIL bilinear"}


def _empty_images(n: int, size: tuple[int, int], colour: bool) -> np.ndarray:
    w, h = size
    return np.empty((n, h, w, 3) if colour else (n, h, w), dtype=np.uint8)


def _convert_one(im, size: tuple[int, int], colour: bool) -> tuple[np.ndarray, bool]:
    from PIL import Image

    im = im.convert("RGB" if colour else "L")
    changed = im.size != size
    if changed:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im), changed


def load_image_folder(root: Path) -> Dataset:
    """One sub-folder per class; see the module docstring for sizes and colour."""
    from PIL import Image

    files: list[Path] = []
    labels: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        imgs = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(sub).parts))
        files += imgs
        labels += [sub.name] * len(imgs)
    if not files:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        hint = " (images must sit in one sub-folder per class)" if loose else ""
        raise DataError(f"image folder {root} has no images{hint}")
    sizes, colour = [], False
    for f in files:  # pass 1: headers only (size, mode), so memory stays at one decoded image
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
                colour = colour or _is_colour(im)
        except Exception as exc:
            raise DataError(f"cannot read image {f}: {type(exc).__name__}: {_first_line(exc)}") from None
    size = _common_size(sizes)
    X = _empty_images(len(files), size, colour)
    resized = 0
    for i, f in enumerate(files):  # pass 2: decode, convert, resize
        try:
            with Image.open(f) as im:
                X[i], changed = _convert_one(im, size, colour)
        except Exception as exc:
            raise DataError(f"cannot read image {f}: {type(exc).__name__}: {_first_line(exc)}") from None
        resized += changed
    info = {"image_size": [size[1], size[0]], "resized": resized, "colour": colour, "resample": "PIL bilinear"}
    return make_dataset(root.name, X, labels, meta={"source": str(root), **info}, modality="image")


# --------------------------------------------------------------------------- Hugging Face


def is_hf_dataset(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    return mod.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def from_hf(obj: Any) -> Dataset:
    """A Dataset from a ``datasets.Dataset`` with ``text``/``label`` or ``image``/``label`` columns."""
    kind = type(obj).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        splits = ", ".join(obj.keys())
        raise DataError(f"got a {kind}; pass one split, e.g. ds['train'] (splits: {splits})")
    if kind != "Dataset":
        raise DataError(f"unsupported Hugging Face object {kind}; pass a datasets.Dataset")
    cols = list(obj.column_names)
    label_col = "label" if "label" in cols else "labels" if "labels" in cols else None
    if label_col is None:
        raise DataError(f"Hugging Face dataset has no 'label' column (columns: {', '.join(cols)})")
    name = getattr(getattr(obj, "info", None), "dataset_name", None) or "hf-dataset"
    feature = obj.features.get(label_col)
    raw = list(obj[label_col])
    classes = None
    names = getattr(feature, "names", None)
    if names is not None and type(feature).__name__ == "ClassLabel":
        labels = np.asarray(raw, dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise DataError("Hugging Face dataset has unlabelled rows (label -1)")
        present = np.unique(labels)
        remap = np.searchsorted(present, labels)
        classes = [names[int(i)] for i in present]
        labels = remap
    else:
        labels = raw
    meta = {"source": f"Hugging Face datasets.Dataset ({name})"}
    if "text" in cols:
        texts = _texts(list(obj["text"]), "Hugging Face dataset")
        return make_dataset(name, texts, labels, classes=classes, meta=meta, modality="text")
    img_col = "image" if "image" in cols else "img" if "img" in cols else None
    if img_col is None:
        raise DataError(f"Hugging Face dataset needs a 'text' or 'image' column (columns: {', '.join(cols)})")
    X, info = images_to_array(list(obj[img_col]), "Hugging Face dataset")
    return make_dataset(name, X, labels, classes=classes, meta={**meta, **info}, modality="image")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
