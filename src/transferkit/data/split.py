"""The one train/test split every command uses, recorded so that later commands reuse it.

:func:`make_split` loads a dataset from its spec and splits it (stratified, from a seed); it returns the
two parts and a :class:`Split` record: the data spec and sub-sampling options, the seeds, the dataset's
fingerprint and the exact held-out item indices with their sha256. A run folder stores the record as
``split.json`` and every Delta carries it in ``meta["split"]``.

Every later evaluation of a run (``merge --evaluate``, the pipeline's merge, ranking ground truth)
calls :func:`held_out` with the record: it reloads the same items, checks the fingerprint, and returns
exactly the recorded held-out part — or refuses with a one-line :class:`~transferkit.errors.DataError`
when the data asked for is not the data the run was trained on, or the data changed. Nothing trains,
selects or tunes on the held-out part.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .dataset import Dataset, split_mask

__all__ = ["Split", "make_split", "held_out", "data_spec", "read_split", "write_split", "DEFAULT_TEST_SIZE"]

DEFAULT_TEST_SIZE = 0.2
_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    """A recorded train/test split (JSON-able with :meth:`to_dict`).

    data : the data spec (a built-in name or an absolute path; ``<in-memory NAME>`` for objects).
    limit, per_class, sample_seed : the sub-sampling of :func:`~transferkit.data.load_dataset`.
    seed, test_size : the split's seed and held-out fraction (ignored when the data has an official split).
    n : items of the loaded dataset; fingerprint : its :meth:`Dataset.fingerprint`.
    test_ids : indices (into the loaded dataset) of the held-out items; test_sha256 : their digest.
    """

    data: str
    limit: int | None
    per_class: int | None
    sample_seed: int
    seed: int
    test_size: float
    n: int
    fingerprint: str
    test_ids: tuple[int, ...]

    @property
    def test_sha256(self) -> str:
        return _ids_digest(self.fingerprint, self.test_ids)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "test_ids": list(self.test_ids), "test_sha256": self.test_sha256}

    @classmethod
    def from_dict(cls, d: Any, where: str = "split record") -> Split:
        if not isinstance(d, dict):
            raise DataError(f"{where} must be a mapping, got {type(d).__name__}")
        keys = {"data", "limit", "per_class", "sample_seed", "seed", "test_size", "n", "fingerprint", "test_ids"}
        missing = sorted(keys - set(d))
        if missing:
            raise DataError(f"{where} lacks {', '.join(missing)}")
        try:
            split = cls(**{k: d[k] for k in keys} | {"test_ids": tuple(int(i) for i in d["test_ids"])})
        except (TypeError, ValueError):
            raise DataError(f"{where} is malformed") from None
        if "test_sha256" in d and d["test_sha256"] != split.test_sha256:
            raise DataError(f"{where}: its held-out ids do not match their recorded sha256 (edited or corrupt)")
        return split

    def same_data(self, spec: Any, *, limit: int | None = None, per_class: int | None = None,
                  sample_seed: int = 0) -> bool:
        """Whether ``spec`` with these sub-sampling options names the data this split was made on."""
        return (data_spec(spec), limit, per_class, int(sample_seed)) == (
            self.data, self.limit, self.per_class, self.sample_seed)


def _ids_digest(fingerprint: str, ids) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(np.asarray(ids, dtype="<i8").tobytes())
    return h.hexdigest()


def data_spec(spec: Any) -> str:
    """The canonical string of a data spec: a path made absolute, a name as is, an object by its name."""
    if isinstance(spec, Dataset):
        return f"<in-memory {spec.name}>"
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(text)
        return str(path.resolve()) if path.exists() else text
    return f"<in-memory {type(spec).__name__}>"


def make_split(spec: Any, *, limit: int | None = None, per_class: int | None = None, sample_seed: int = 0,
               seed: int = 0, test_size: float = DEFAULT_TEST_SIZE,
               dataset: Dataset | None = None) -> tuple[Dataset, Dataset, Split]:
    """Load ``spec`` (unless ``dataset`` is the already loaded data) and split it once.

    Returns ``(train, test, record)``; the parts have ``is_test=None``.
    """
    from . import load_dataset

    ds = dataset if dataset is not None else load_dataset(spec, limit=limit, per_class=per_class, seed=sample_seed)
    mask = split_mask(ds, test_size, seed)
    record = Split(data_spec(spec), limit, per_class, int(sample_seed), int(seed), float(test_size), len(ds),
                   ds.fingerprint(), tuple(int(i) for i in np.flatnonzero(mask)))
    train, test = _parts(ds, mask)
    return train, test, record


def _parts(ds: Dataset, mask: np.ndarray) -> tuple[Dataset, Dataset]:
    train, test = ds.subset(~mask), ds.subset(mask)
    train.is_test = None
    test.is_test = None
    return train, test


def held_out(split: Split | dict, spec: Any = None, *, dataset: Dataset | None = None,
             what: str = "this run") -> tuple[Dataset, Dataset]:
    """``(train, test)`` of the recorded split, reloaded; refuses data that is not the recorded data.

    spec : the data the caller was asked to evaluate on (None: the recorded spec). It must name the
        recorded data (same spec and sub-sampling), otherwise the held-out part cannot be trusted.
    dataset : the data already loaded (in-memory objects cannot be reloaded from a spec).
    """
    from . import load_dataset

    if isinstance(split, dict):
        split = Split.from_dict(split, f"split record of {what}")
    if spec is not None and data_spec(spec) != split.data and dataset is None:
        raise DataError(f"{what} was trained on {split.data!r}, not {data_spec(spec)!r}: its held-out part "
                        f"cannot be taken from other data")
    if dataset is None:
        if split.data.startswith("<in-memory"):
            raise DataError(f"{what} was trained on in-memory data {split.data}; pass that dataset to evaluate it")
        dataset = load_dataset(split.data, limit=split.limit, per_class=split.per_class, seed=split.sample_seed)
    if len(dataset) != split.n or dataset.fingerprint() != split.fingerprint:
        raise DataError(f"the data of {what} ({split.data}) changed since it was split "
                        f"({len(dataset)} items now, {split.n} recorded): its held-out part is unknown")
    mask = np.zeros(len(dataset), dtype=bool)
    mask[list(split.test_ids)] = True
    return _parts(dataset, mask)


def write_split(run_dir: str | os.PathLike, split: Split) -> Path:
    """Write ``run_dir/split.json`` (atomically)."""
    from ..io import write_json

    path = Path(run_dir) / _FILE
    write_json(path, split.to_dict())
    return path


def read_split(run_dir: str | os.PathLike) -> Split | None:
    """The split recorded in ``run_dir/split.json`` (None when the folder records none)."""
    path = Path(run_dir) / _FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DataError(f"{path} is not readable JSON") from None
    return Split.from_dict(data, str(path))
