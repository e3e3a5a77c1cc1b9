"""Computations that several metrics need on the same features, done once per scoring pass.

Scoring one model with every metric repeats the same heavy linear algebra: the centred Gram matrix
XcᵀXc (SFDA's within-class scatter is it minus the between-class part) and its eigendecomposition
(H-score, shrinkage H-score, TransRate's coding rate) and PCA
(N-LEEP, GBC, PARC), which is the same eigendecomposition. Inside :func:`shared_pass` these are
memoised per feature array (by identity; the array is held so its id cannot be reused), so a pass over
all metrics pays for one D×D eigendecomposition instead of six SVD/eigen solves. Outside a pass every
call computes afresh, so a metric called on its own gives the same value.

PCA here is exact (eigenvectors of the centred covariance, or the thin SVD of Xc when N < D), the
quantity that sklearn's ``PCA(svd_solver="full")`` computes; components are defined up to sign, which
none of the metrics depend on. ``n_components`` as a fraction keeps the fewest leading components whose
cumulative explained-variance ratio exceeds it (sklearn's rule, ``searchsorted(..., side="right") + 1``).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

__all__ = ["shared_pass", "centred", "gram", "spectrum", "pca"]

_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("transferkit_rank_memo", default=None)


@contextlib.contextmanager
def shared_pass():
    """Memoise the shared computations of :mod:`transferkit.rank` metrics for the duration of the block."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _memo(X: np.ndarray, key, fn):
    memo = _MEMO.get()
    if memo is None:
        return fn()
    hit = memo.get((id(X), key))
    if hit is not None and hit[0] is X:
        return hit[1]
    val = fn()
    memo[(id(X), key)] = (X, val)
    return val


def centred(X: np.ndarray) -> np.ndarray:
    """X minus its column means (a new array)."""
    return _memo(X, "centred", lambda: X - X.mean(0))


def gram(X: np.ndarray) -> np.ndarray:
    """XcᵀXc (D, D), the centred scatter matrix."""

    def compute():
        Xc = centred(X)
        return Xc.T @ Xc

    return _memo(X, "gram", compute)


def spectrum(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues w (descending, ≥ 0) and eigenvectors V (D, k) of XcᵀXc.

    N ≥ D: all D eigenpairs from ``eigh`` of the D×D Gram matrix. N < D: the thin SVD of Xc
    (k = N pairs; the other D − N eigenvalues are 0 and their eigenvectors are orthogonal to every
    centred row, so no metric here needs them).
    """

    def compute():
        Xc = centred(X)
        n, d = Xc.shape
        if n >= d:
            w, V = np.linalg.eigh(gram(X))
            return np.clip(w[::-1], 0.0, None), V[:, ::-1]
        _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
        return s**2, Vt.T

    return _memo(X, "spectrum", compute)


def pca(X: np.ndarray, n_components) -> np.ndarray:
    """Exact PCA projection of X: a float in (0, 1] keeps that fraction of the variance, an int that many components."""

    def compute():
        w, V = spectrum(X)
        if isinstance(n_components, float):
            if n_components >= 1.0:
                return centred(X)
            ratio = np.cumsum(w) / max(float(w.sum()), np.finfo(np.float64).tiny)
            k = int(np.searchsorted(ratio, n_components, side="right")) + 1
        else:
            k = int(n_components)
        k = max(1, min(k, len(w), X.shape[0]))
        return centred(X) @ V[:, :k]

    return _memo(X, ("pca", n_components), compute)
