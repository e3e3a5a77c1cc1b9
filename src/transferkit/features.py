"""Features: the representation of a dataset under one backbone tap, extracted once and cached.

A :class:`Features` holds a float32 matrix (N×D), integer labels, optional source-head
probabilities (N×C_s), optional domain ids and a fingerprint (model, tap, preprocessing, data
hash). It is stored as safetensors + JSON; :func:`extract` streams batches through the model so
memory stays flat in N, and returns the cached copy on a second call with the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError


@dataclass
class Features:
    """Frozen representations of one dataset under one model tap.

    Attributes
    ----------
    X : (N, D) float32 array of features.
    y : (N,) int64 array of labels in ``0..C-1``.
    probs : (N, C_s) float32 array of the source head's probabilities, or None.
    domains : (N,) int64 array of domain ids, or None.
    fingerprint : dict with ``model``, ``tap``, ``preprocessing`` and ``data`` keys.
    """

    X: np.ndarray
    y: np.ndarray
    probs: np.ndarray | None = None
    domains: np.ndarray | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y)
        if self.X.ndim != 2:
            raise DataError(f"features must be a 2-D (N, D) array, got shape {self.X.shape}")
        if self.y.shape != (len(self.X),):
            raise DataError(f"features have {len(self.X)} rows but labels have shape {self.y.shape}")
        if not np.issubdtype(self.y.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {self.y.dtype}")
        self.y = self.y.astype(np.int64)
        if not np.isfinite(self.X).all():
            raise DataError("features contain NaN or inf values")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.ndim != 2 or len(self.probs) != len(self.X):
                raise DataError(f"source probabilities must be (N, C_s) with N={len(self.X)}, got {self.probs.shape}")
        if self.domains is not None:
            self.domains = np.asarray(self.domains, dtype=np.int64)
            if self.domains.shape != self.y.shape:
                raise DataError("domain ids must have one entry per sample")

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, idx: np.ndarray) -> "Features":
        return Features(
            self.X[idx],
            self.y[idx],
            None if self.probs is None else self.probs[idx],
            None if self.domains is None else self.domains[idx],
            dict(self.fingerprint),
        )
