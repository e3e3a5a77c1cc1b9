"""Computations that several metrics need on the same features, done once per scoring pass.

Scoring one model with every metric repeats the same heavy linear algebra: the centred Gram matrix
XcᵀXc (SFDA's within-class scatter is it minus the between-class part) and its eigendecomposition
(H-score, shrinkage H-score, TransRate's coding rate, LogME — whose uncentred FᵀF = XcᵀXc + N μμᵀ is a
rank-one update of it, see :mod:`transferkit.rank.logme`) and PCA
(N-LEEP, GBC, PARC), which is the same eigendecomposition. Inside :func:`shared_pass` these are
memoised per feature array (by identity; the array is held so its id cannot be reused), so a pass over
all metrics pays for one D×D eigendecomposition instead of seven SVD/eigen solves. Outside a pass every
call computes afresh, so a metric called on its own gives the same value.

PCA here is exact (eigenvectors of the centred covariance, or the thin SVD of Xc when N < D), the
quantity that sklearn's ``PCA(svd_solver="full")`` computes; components are defined up to sign, which
none of the metrics depend on. ``n_components`` as a fraction keeps the fewest leading components whose
cumulative explained-variance ratio exceeds it (sklearn's rule, ``searchsorted(..., side="right") + 1``).

**Class translates.** PED moves every sample of a class by the same vector (X' = X + Δ[y]), which leaves
the within-class scatter unchanged. :func:`declare_class_translate` records that (inside a pass), and
:func:`within_scatter` of X' then returns the scatter of X instead of recomputing an O(N·D²) Gram matrix
— equal up to round-off, and bit-identical to what SFDA uses on X.

**Threads.** The memo may be shared by the worker threads of a concurrent pass (see
:func:`transferkit.rank.rank_features`): each entry is computed by exactly one thread; another thread
asking for the same entry meanwhile waits for it (the dependencies between entries form a DAG —
spectrum → gram → centred — so waiting cannot deadlock). A computation that raises is not kept; a
waiting thread then computes it itself (and gets the same error).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

import numpy as np

from ._base import class_means

__all__ = ["shared_pass", "in_shared_pass", "centred", "gram", "spectrum", "pca", "within_scatter",
           "declare_class_translate"]


class _Memo:
    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict = {}


class _Entry:
    __slots__ = ("done", "ok", "pinned", "value")

    def __init__(self, pinned):
        self.pinned = pinned  # the arrays whose ids make up the key (held so the ids stay unique)
        self.done = threading.Event()
        self.value = None
        self.ok = False


_MEMO: contextvars.ContextVar[_Memo | None] = contextvars.ContextVar("transferkit_rank_memo", default=None)


@contextlib.contextmanager
def shared_pass():
    """Memoise the shared computations of :mod:`transferkit.rank` metrics for the duration of the block.

    Worker threads see the memo when they run in a copy of this context (``contextvars.copy_context()``).
    """
    token = _MEMO.set(_Memo())
    try:
        yield
    finally:
        _MEMO.reset(token)


def in_shared_pass() -> bool:
    """Whether a :func:`shared_pass` is active in this context."""
    return _MEMO.get() is not None


def _memo(X, key, fn, *also):
    """``fn()`` memoised under (id(X), id(a) for a in also, key) in the active pass; computed afresh outside one."""
    memo = _MEMO.get()
    if memo is None:
        return fn()
    pinned = (X, *also)
    k = (tuple(id(a) for a in pinned), key)
    while True:
        with memo.lock:
            entry = memo.entries.get(k)
            if entry is None or any(p is not a for p, a in zip(entry.pinned, pinned)):
                entry = memo.entries[k] = _Entry(pinned)
                owner = True
            else:
                owner = False
        if owner:
            try:
                entry.value = fn()
                entry.ok = True
            finally:
                if not entry.ok:
                    with memo.lock:
                        if memo.entries.get(k) is entry:
                            del memo.entries[k]
                entry.done.set()
            return entry.value
        entry.done.wait()
        if entry.ok:
            return entry.value
        # the owner failed: compute it here (raising the same error, normally)


def _lookup(X, key, *also):
    """The memoised value under that key, or None (no pass, not computed, or computation failed)."""
    memo = _MEMO.get()
    if memo is None:
        return None
    with memo.lock:
        entry = memo.entries.get((tuple(id(a) for a in (X, *also)), key))
    if entry is None or any(p is not a for p, a in zip(entry.pinned, (X, *also))):
        return None
    entry.done.wait()
    return entry.value if entry.ok else None


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


def within_scatter(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ (D, D) = XcᵀXc − Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ, labels ``0..C-1``.

    For an array declared a class translate of another (:func:`declare_class_translate`, same ``y``),
    the scatter of that other array (the same object).
    """
    src = _lookup(X, "translate_of", y)
    if src is not None:
        return within_scatter(src, y)

    def compute():
        means, counts = class_means(X, y)
        M = np.sqrt(counts)[:, None] * (means - X.mean(0))
        return gram(X) - M.T @ M

    return _memo(X, "within_scatter", compute, y)


def declare_class_translate(Xm: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
    """Record (inside a pass) that ``Xm = X + Δ[y]`` for some per-class shift Δ, so both share one within-class scatter."""
    if _MEMO.get() is not None:
        _memo(Xm, "translate_of", lambda: X, y)
