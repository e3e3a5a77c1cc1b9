"""The ``Dataset`` container and the checks every loader's output goes through.

A :class:`Dataset` holds one target set in a canonical form:

- ``modality="image"``: ``X`` is ``uint8`` of shape ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB);
- ``modality="text"``: ``X`` is a ``list[str]`` of length ``N``;
- ``modality="tabular"``: ``X`` is ``float32`` of shape ``(N, D)``, all finite;
- ``y`` is ``int64`` in ``0..C-1`` and ``classes[c]`` names label ``c``; ``y == -1``
  (:data:`UNLABELLED`) marks an item without a label (a target domain, a test-time stream).

Optional per-item arrays: ``domains`` (``int64`` ids into ``domain_names``) and ``is_test`` (``bool``,
set when the source defines its own train/test split). ``meta`` documents how labels were derived.

Unlabelled and multi-domain data follow skada's convention: unlabelled items carry the label -1
(:attr:`Dataset.labelled` is ``y != -1``) and every item may carry a domain id. Our ids are
non-negative indices into ``domain_names``; skada's ``sample_domain`` is ``domains + 1`` for source
items and ``-(domains + 1)`` for target items. :func:`make_dataset` with ``labels=None`` builds an
unlabelled dataset; :func:`combine_domains` joins a labelled source and an unlabelled target into one
Dataset with one domain id per part. A dataset may keep its task's ``classes`` while having no
labelled item (an unlabelled target of a known label set) or have ``classes=[]`` (a bare stream).
:func:`validate` is the training check: it needs two or more classes among the labelled items;
``validate(ds, need_labels=False)`` accepts a dataset with no labelled item.

Label encoding (:func:`encode_labels`) is the same for every input format: strings are mapped to
their sorted unique values; integers (also integral floats and booleans) are mapped to ``0..C-1`` in
the order of their sorted unique values, the original values kept (as strings) as class names.
Anything else (floats with fractions, NaN, mixed or other objects) is rejected with a one-line
:class:`~transferkit.errors.DataError`.

Sub-sampling (:func:`subsample`) and :func:`train_test_split` are stratified and reproducible from a
seed; indices are always returned in their original order. Unlabelled items form one more group,
sampled and split like a class (at random, proportionally over domains and the official split);
on fully labelled data the draws are exactly those of a dataset without the feature.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

MODALITIES = ("image", "text", "tabular")
UNLABELLED = -1
_FP_VERSION = b"transferkit-dataset-fingerprint-v1"


@dataclass
class Dataset:
    """A dataset in canonical form, labelled or not (see the module docstring for the layout)."""

    name: str
    modality: str
    X: Any
    y: np.ndarray
    classes: list[str]
    domains: np.ndarray | None = None
    domain_names: list[str] | None = None
    is_test: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise DataError(f"unknown modality {self.modality!r}; expected one of {', '.join(MODALITIES)}")
        self.y = np.asarray(self.y)
        n = len(self.y)
        if len(self.X) != n:
            raise DataError(f"X has {len(self.X)} items but y has {n} labels")
        for attr in ("domains", "is_test"):
            arr = getattr(self, attr)
            if arr is not None:
                arr = np.asarray(arr)
                if arr.shape != (n,):
                    raise DataError(f"{attr} has shape {arr.shape}; expected ({n},)")
                setattr(self, attr, arr)
        self.classes = [str(c) for c in self.classes]
        if self.domain_names is not None:
            self.domain_names = [str(d) for d in self.domain_names]

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        shape = f"{len(self.X)} texts" if self.modality == "text" else f"X{tuple(np.shape(self.X))}"
        extra = f", domains={self.domain_names}" if self.domain_names else ""
        split = f", test={int(self.is_test.sum())}" if self.is_test is not None else ""
        n_unl = int((self.y == UNLABELLED).sum())
        unl = f", unlabelled={n_unl}" if n_unl else ""
        return f"Dataset({self.name!r}, {self.modality}, {shape}, classes={len(self.classes)}{unl}{extra}{split})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the items that carry a label (``y != -1``)."""
        return self.y != UNLABELLED

    def class_counts(self) -> dict[str, int]:
        """Number of labelled items per class name (classes with no items included, as 0)."""
        counts = np.bincount(self.y[self.labelled], minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def subset(self, idx: Any) -> "Dataset":
        """The items ``idx`` (integer indices or a boolean mask), keeping classes and domain names."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"boolean mask has shape {idx.shape}; expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif idx.dtype.kind not in "iu":
            raise DataError(f"subset indices must be integers or a boolean mask, got {idx.dtype}")
        idx = idx.reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset index out of range for a dataset of {len(self)} items")
        X = [self.X[int(i)] for i in idx] if isinstance(self.X, list) else self.X[idx]
        return replace(
            self,
            X=X,
            y=self.y[idx],
            domains=None if self.domains is None else self.domains[idx],
            is_test=None if self.is_test is None else self.is_test[idx],
            meta=dict(self.meta),
            classes=list(self.classes),
            domain_names=None if self.domain_names is None else list(self.domain_names),
        )

    def fingerprint(self) -> str:
        """sha256 (hex) over modality, class names, labels (-1 for unlabelled), content, domains and split.

        Stable across runs and machines; independent of ``name`` and ``meta`` (two specs that give
        the same data share a fingerprint).
        """
        h = hashlib.sha256(_FP_VERSION)
        h.update(self.modality.encode())
        h.update(json.dumps(self.classes).encode())
        h.update(np.ascontiguousarray(self.y, dtype="<i8").tobytes())
        if self.modality == "text":
            for text in self.X:
                b = text.encode("utf-8", "surrogatepass")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        else:
            X = np.asarray(self.X)
            h.update(f"{X.dtype.str}{X.shape}".encode())
            h.update(np.ascontiguousarray(X).tobytes())
        if self.domains is not None:
            h.update(b"domains" + json.dumps(self.domain_names).encode())
            h.update(np.ascontiguousarray(self.domains, dtype="<i8").tobytes())
        if self.is_test is not None:
            h.update(b"is_test" + np.ascontiguousarray(self.is_test, dtype=bool).tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------- labels


def encode_labels(raw: Any, what: str = "labels") -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ``(y int64 in 0..C-1, class names)``; see the module docstring."""
    arr = _to_numpy_labels(raw, what)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{what} must be 1-D, got shape {arr.shape}")
    kind = arr.dtype.kind
    if kind in "US":
        return _encode_strings(arr.astype(str))
    if kind == "b":
        return _encode_ints(arr.astype(np.int64), names={0: "False", 1: "True"})
    if kind in "iu":
        return _encode_ints(arr.astype(np.int64))
    if kind == "f":
        return _encode_ints(_integral_floats(arr, what))
    if kind == "O":
        items = arr.tolist()
        if all(isinstance(v, str) for v in items):
            return _encode_strings(np.asarray(items, dtype=str))
        if all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in items):
            return _encode_ints(np.asarray(items, dtype=np.int64))
        if all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in items):
            return _encode_ints(_integral_floats(np.asarray(items, dtype=np.float64), what))
        kinds = sorted({type(v).__name__ for v in items})
        raise DataError(f"{what} must be all integers or all strings, got a mix of types: {', '.join(kinds)}")
    raise DataError(f"{what} must be integers or strings, got dtype {arr.dtype}")


def _to_numpy_labels(raw: Any, what: str) -> np.ndarray:
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(raw, pd.Series):
        if raw.isna().any():
            raise DataError(f"{what} have {int(raw.isna().sum())} missing values (first at row {int(np.flatnonzero(raw.isna().to_numpy())[0])})")
        if isinstance(raw.dtype, pd.CategoricalDtype):
            raw = raw.astype(object)
        if raw.dtype.kind in "biuf":
            return raw.to_numpy()
        return raw.to_numpy(dtype=object)
    if isinstance(raw, np.ndarray):
        return raw
    if isinstance(raw, (list, tuple)):
        if any(v is None for v in raw):
            raise DataError(f"{what} have missing values (None)")
        return np.asarray(list(raw), dtype=object)
    try:
        return np.asarray(raw)
    except Exception:
        raise DataError(f"cannot read {what} of type {type(raw).__name__}") from None


def _integral_floats(arr: np.ndarray, what: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{what} contain NaN or infinite values")
    frac = arr != np.round(arr)
    if frac.any():
        ex = arr[np.flatnonzero(frac)[0]]
        raise DataError(f"{what} must be integers or strings, got floats with fractional parts (e.g. {ex:g})")
    return arr.astype(np.int64)


def _encode_strings(arr: np.ndarray) -> tuple[np.ndarray, list[str]]:
    classes, y = np.unique(arr, return_inverse=True)
    return y.astype(np.int64).reshape(-1), [str(c) for c in classes]


def _encode_ints(arr: np.ndarray, names: dict[int, str] | None = None) -> tuple[np.ndarray, list[str]]:
    values, y = np.unique(arr, return_inverse=True)
    classes = [names.get(int(v), str(int(v))) if names else str(int(v)) for v in values]
    return y.astype(np.int64).reshape(-1), classes


# --------------------------------------------------------------------------- content


def canonical_X(X: Any, what: str = "X") -> tuple[Any, str]:
    """Return ``(X, modality)`` in canonical form, or raise a one-line DataError.

    Strings (a list, or a 1-D str array) give text; a 2-D numeric array gives tabular float32; a
    3-D array gives grey images, a 4-D one RGB (``(N,H,W,3)``; ``(N,H,W,1)`` is squeezed;
    channel-first ``(N,3,H,W)``/``(N,1,H,W)`` is transposed). Float images in [0, 1] are scaled by 255,
    otherwise image values must lie in [0, 255]; they are rounded to uint8.
    """
    if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype.kind in "USO"):
        return canonical_text(X, what), "text"
    try:
        arr = np.asarray(X)
    except Exception:
        raise DataError(f"cannot read {what} of type {type(X).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} must be numeric or strings, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            item = int(np.unravel_index(np.flatnonzero(bad)[0], arr.shape)[0])
            raise DataError(f"{what} contains NaN or infinite values (first at item {item})")
    if arr.ndim == 2:
        return arr.astype(np.float32, copy=False), "tabular"
    if arr.ndim == 3:
        return _to_uint8_image(arr, what), "image"
    if arr.ndim == 4:
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] != 3:
            if arr.shape[1] in (1, 3):
                arr = np.moveaxis(arr, 1, -1)
                if arr.shape[-1] == 1:
                    arr = arr[..., 0]
            else:
                raise DataError(f"{what} has shape {arr.shape}: images need 1 or 3 channels")
        return _to_uint8_image(arr, what), "image"
    raise DataError(f"{what} must be 2-D (tabular) or 3-D/4-D (images), got shape {arr.shape}")


def _to_uint8_image(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        arr = arr.astype(np.float32) * 255.0
    elif lo < 0 or hi > 255:
        raise DataError(f"{what} image values must lie in [0, 1] or [0, 255], got [{lo:g}, {hi:g}]")
    return np.ascontiguousarray(np.round(arr).astype(np.uint8))


def canonical_text(X: Any, what: str = "text") -> list[str]:
    items = X.tolist() if isinstance(X, np.ndarray) else list(X)
    out = []
    for i, v in enumerate(items):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, bytes):
            out.append(v.decode("utf-8", errors="replace"))
        elif v is None or (isinstance(v, float) and v != v):
            raise DataError(f"{what} is missing in item {i}")
        else:
            raise DataError(f"{what} must be strings; item {i} is {type(v).__name__}")
    return out


# --------------------------------------------------------------------------- validation


def make_dataset(
    name: str,
    X: Any,
    labels: Any = None,
    *,
    classes: Sequence[str] | None = None,
    domains: Any = None,
    domain_names: Sequence[str] | None = None,
    is_test: Any = None,
    meta: dict | None = None,
    modality: str | None = None,
) -> Dataset:
    """Build a validated Dataset from raw content and raw labels (see :func:`encode_labels`).

    With ``classes`` given, ``labels`` must already be integers in ``0..len(classes)-1``, or -1 for
    unlabelled items. ``labels=None`` gives an unlabelled dataset (every ``y`` is -1; ``classes``, if
    given, names the task's label set) checked with ``validate(..., need_labels=False)``.
    Raw ``domains`` are encoded like labels unless ``domain_names`` is given.
    """
    X, found = canonical_X(X)
    if modality is not None and modality != found:
        raise DataError(f"{name}: expected {modality} data, got {found}")
    if labels is None:
        y, classes = np.full(len(X), UNLABELLED, dtype=np.int64), list(classes or [])
    elif len(X) != _len(labels):
        raise DataError(f"X has {len(X)} items but y has {_len(labels)} labels")
    elif classes is not None:
        y = np.asarray(labels)
        if y.dtype.kind not in "iu":
            y = _integral_floats(y, "labels") if y.dtype.kind == "f" else y
        if y.dtype.kind not in "iu" or (y.size and (y.min() < UNLABELLED or y.max() >= len(classes))):
            raise DataError(f"labels must be integers in 0..{len(classes) - 1} (or -1 for unlabelled) "
                            f"to match the {len(classes)} class names")
        y = y.astype(np.int64)
        classes = list(classes)
    else:
        y, classes = encode_labels(labels)
    dom = None
    if domains is not None:
        if domain_names is not None:
            dom = np.asarray(domains).astype(np.int64)
        else:
            dom, domain_names = encode_labels(domains, "domains")
    split = None if is_test is None else np.asarray(is_test).astype(bool)
    ds = Dataset(name, found, X, y, list(classes), dom, None if dom is None else list(domain_names),
                 split, dict(meta or {}))
    return validate(ds, need_labels=labels is not None)


def _len(obj: Any) -> int:
    try:
        return len(obj)
    except TypeError:
        raise DataError(f"labels must be a sequence, got {type(obj).__name__}") from None


def validate(ds: Dataset, *, need_labels: bool = True) -> Dataset:
    """Check a Dataset is usable: non-empty, canonical content, labels in ``-1..C-1``.

    With ``need_labels`` (the default: the check for training) the labelled items must span two or
    more classes; ``need_labels=False`` accepts a dataset with no labelled item (a test-time stream).
    """
    if not isinstance(ds, Dataset):
        raise DataError(f"expected a Dataset, got {type(ds).__name__}")
    n = len(ds)
    if n == 0:
        raise DataError(f"dataset {ds.name!r} is empty")
    y = np.asarray(ds.y)
    if y.dtype.kind not in "iu":
        raise DataError(f"dataset {ds.name!r}: y must be integer labels, got {y.dtype}")
    if y.min() < UNLABELLED or y.max() >= len(ds.classes):
        raise DataError(f"dataset {ds.name!r}: labels must lie in 0..{len(ds.classes) - 1} (or -1 for unlabelled)")
    ds.y = y.astype(np.int64, copy=False)
    present = np.unique(ds.y[ds.labelled])
    if need_labels and len(present) == 0:
        raise DataError(f"dataset {ds.name!r} has no labelled items; training needs at least two classes")
    if need_labels and len(present) < 2:
        only = ds.classes[int(present[0])]
        raise DataError(f"dataset {ds.name!r} has a single class ({only!r}); need at least two")
    if ds.modality == "text":
        if not isinstance(ds.X, list) or not all(isinstance(t, str) for t in ds.X):
            ds.X = canonical_text(ds.X)
    else:
        X, found = canonical_X(ds.X)
        if found != ds.modality:
            raise DataError(f"dataset {ds.name!r} claims modality {ds.modality} but X looks like {found}")
        ds.X = X
    if ds.domains is not None:
        if ds.domain_names is None or ds.domains.min() < 0 or ds.domains.max() >= len(ds.domain_names):
            raise DataError(f"dataset {ds.name!r}: domain ids must index domain_names")
        ds.domains = ds.domains.astype(np.int64, copy=False)
    if ds.is_test is not None:
        ds.is_test = ds.is_test.astype(bool, copy=False)
    return ds


def combine_domains(source: Dataset, target: Dataset, *, name: str | None = None) -> Dataset:
    """One multi-domain Dataset: the labelled ``source`` items, then the ``target`` items unlabelled.

    Each part keeps its own domains when it has them, else becomes one domain named after it; the
    target's ids follow the source's. The target's labels are dropped (-1) — keep ``target`` itself
    to evaluate — and its ``classes``, when it has any, must equal the source's. ``is_test`` is
    dropped: split each part first and combine the training parts. Validated for training.
    """
    for part in (source, target):
        if not isinstance(part, Dataset):
            raise DataError(f"combine_domains takes Datasets, got {type(part).__name__}")
    if source.modality != target.modality:
        raise DataError(f"cannot combine {source.modality} {source.name!r} with {target.modality} {target.name!r}")
    if target.classes and target.classes != source.classes:
        raise DataError(f"target {target.name!r} has classes {target.classes}; the source {source.name!r} has {source.classes}")
    if source.modality == "text":
        X = list(source.X) + list(target.X)
    else:
        Xs, Xt = np.asarray(source.X), np.asarray(target.X)
        if Xs.shape[1:] != Xt.shape[1:]:
            raise DataError(f"cannot combine items of shape {Xs.shape[1:]} ({source.name!r}) "
                            f"with items of shape {Xt.shape[1:]} ({target.name!r})")
        X = np.concatenate([Xs, Xt])
    ids, names = [], []
    for part in (source, target):
        part_names = part.domain_names if part.domains is not None else [part.name]
        ids.append((part.domains if part.domains is not None else np.zeros(len(part), np.int64)) + len(names))
        names += part_names
    if len(set(names)) < len(names):
        raise DataError(f"source and target share a domain name ({', '.join(names)}); rename one")
    y = np.concatenate([source.y, np.full(len(target), UNLABELLED, dtype=np.int64)])
    combined = Dataset(name or f"{source.name}+{target.name}", source.modality, X, y, list(source.classes),
                       np.concatenate(ids), names, None, {"combined": {"source": source.name, "target": target.name}})
    return validate(combined)


# --------------------------------------------------------------------------- sampling


def _check_count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise DataError(f"{what} must be a positive integer, got {value}")
    return int(value)


def _substrata(ds: Dataset) -> np.ndarray:
    """Within-class strata: domain x official split, so sub-samples keep their proportions."""
    key = np.zeros(len(ds), dtype=np.int64)
    if ds.domains is not None:
        key = key + ds.domains * 2
    if ds.is_test is not None:
        key = key + ds.is_test.astype(np.int64)
    return key


def _allocate(counts: np.ndarray, total: int, rng: np.random.Generator, min_one: bool) -> np.ndarray:
    """Split ``total`` over groups of sizes ``counts`` proportionally (largest remainder).

    Ties are broken at random; with ``min_one`` every non-empty group gets at least one item when
    ``total`` allows it.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if total >= n:
        return counts.copy()
    quota = counts * (total / n)
    alloc = np.floor(quota).astype(np.int64)
    rest = total - int(alloc.sum())
    if rest:
        frac = quota - alloc
        order = np.lexsort((rng.random(len(counts)), -frac))
        for g in order:
            if rest == 0:
                break
            if alloc[g] < counts[g]:
                alloc[g] += 1
                rest -= 1
    if min_one and total >= int((counts > 0).sum()):
        for g in np.flatnonzero((alloc == 0) & (counts > 0)):
            donor = int(np.argmax(alloc))
            alloc[donor] -= 1
            alloc[g] += 1
    return alloc


def _groups(ds: Dataset) -> list[np.ndarray]:
    """Item indices per class, then the unlabelled items as one more group when there are any."""
    groups = [np.flatnonzero(ds.y == c) for c in range(len(ds.classes))]
    unlabelled = np.flatnonzero(~ds.labelled)
    return groups + [unlabelled] if len(unlabelled) else groups


def _pick(idx: np.ndarray, k: int, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k items of ``idx`` at random, proportionally over ``strata[idx]``."""
    if k >= len(idx):
        return idx
    keys, inv = np.unique(strata[idx], return_inverse=True)
    alloc = _allocate(np.bincount(inv, minlength=len(keys)), k, rng, min_one=False)
    chosen = [rng.choice(idx[inv == s], size=int(a), replace=False) for s, a in enumerate(alloc) if a]
    return np.concatenate(chosen) if chosen else idx[:0]


def subsample(ds: Dataset, *, limit: int | None = None, per_class: int | None = None, seed: int = 0) -> Dataset:
    """At most ``per_class`` items per class, then at most ``limit`` items, stratified by class.

    Within a class the draw is proportional over domains and the official train/test split; the
    unlabelled items count as one more class. Reproducible from ``seed``; the kept items stay in
    their original order.
    """
    limit = _check_count(limit, "limit")
    per_class = _check_count(per_class, "per_class")
    if limit is None and per_class is None:
        return ds
    rng = np.random.default_rng(seed)
    strata = _substrata(ds)
    groups = _groups(ds)
    counts = np.array([len(ix) for ix in groups], dtype=np.int64)
    if per_class is not None:
        counts = np.minimum(counts, per_class)
    if limit is not None:
        present = int((counts > 0).sum())
        if limit < present:
            unl = " (unlabelled items count as one)" if not ds.labelled.all() else ""
            raise DataError(f"limit={limit} is smaller than the number of classes{unl} ({present}) in {ds.name!r}")
        counts = _allocate(counts, limit, rng, min_one=True)
    keep = [_pick(ix, int(k), strata, rng) for ix, k in zip(groups, counts) if k]
    idx = np.sort(np.concatenate(keep))
    if len(idx) == len(ds):
        return ds
    out = ds.subset(idx)
    out.meta = {**out.meta, "subsample": {"limit": limit, "per_class": per_class, "seed": seed, "of": len(ds)}}
    return out


def train_test_split(ds: Dataset, test_size: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into (train, test) by :func:`split_mask`. The returned datasets have ``is_test=None``."""
    test = split_mask(ds, test_size, seed)
    train_ds, test_ds = ds.subset(~test), ds.subset(test)
    train_ds.is_test = None
    test_ds.is_test = None
    return train_ds, test_ds


def split_mask(ds: Dataset, test_size: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask of the test items of ``ds``.

    If ``ds.is_test`` marks an official split (both parts non-empty) that split is used and
    ``test_size``/``seed`` are ignored. Otherwise ``round(N * test_size)`` test items are shared
    over the classes in proportion to their sizes (largest remainder; a class with two or more
    items gets at least one and at most n - 1), and within a class over its domains, chosen at
    random from ``seed``. Unlabelled items count as one more class.
    """
    if not isinstance(ds, Dataset):
        raise DataError(f"train_test_split expects a Dataset, got {type(ds).__name__}")
    if ds.is_test is not None and ds.is_test.any() and not ds.is_test.all():
        return ds.is_test.copy()
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real) or not 0 < test_size < 1:
        raise DataError(f"test_size must be a fraction strictly between 0 and 1, got {test_size!r}")
    rng = np.random.default_rng(seed)
    groups = _groups(ds)
    counts = np.array([len(ix) for ix in groups], dtype=np.int64)
    alloc = _allocate(counts, int(round(len(ds) * float(test_size))), rng, min_one=True)
    sub = np.zeros(len(ds), dtype=np.int64) if ds.domains is None else ds.domains
    test = np.zeros(len(ds), dtype=bool)
    for ix, k in zip(groups, alloc):
        if len(ix) < 2:
            continue
        k = min(max(int(k), 1), len(ix) - 1)
        test[_pick(ix, k, sub, rng)] = True
    if not test.any() or test.all():
        raise DataError(f"dataset {ds.name!r} ({len(ds)} items) is too small to split into train and test")
    return test
