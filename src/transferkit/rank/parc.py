"""PARC: Pairwise Annotation Representation Comparison.

Paper: D. Bolya, R. Mittapalli, J. Hoffman, "Scalable Diverse Model Selection for Accessible
Transfer Learning", NeurIPS 2021 (reference: dbolya/parc ``methods.py::PARC``).

1. If N > ``max_samples`` (default 3000), draw ``max_samples`` rows uniformly without replacement
   (seeded) and score **only those** (see the defect note).
2. PCA to ``n_dims = 32`` dimensions, then standardise each dimension. The PCA is exact (shared
   with the other metrics of a scoring pass, :mod:`transferkit.rank._shared`); the reference uses
   sklearn's randomised solver with ``random_state=1919``, an approximation of the same projection.
3. RDM_f = 1 − corrcoef(rows of the features) and RDM_y = 1 − corrcoef(one-hot labels) (N×N).
4. PARC = 100 × Spearman(upper triangle of RDM_f, upper triangle of RDM_y).

RDM_y takes two values (0 within a class, C/(C−1) across), so its ranks are an affine function of
the cross-class indicator b and the Spearman correlation equals the Pearson correlation between the
average ranks r of RDM_f and b. That correlation needs only the rank sum of the within-class pairs
(a Mann–Whitney statistic) and the tie counts, so it is computed from one sort of RDM_f's M entries
plus a binary search of the within-class entries, in closed form::

    ρ = (mean(r·b) − (M + 1)/2 · p) / sqrt(var(r) · p(1 − p)),   p = mean(b),
    var(r) = (M² − 1)/12 − Σ_ties (t³ − t)/(12 M)

equal to ``pearsonr(rankdata(a), b)`` (tested) at a fraction of the cost. Memory is O(max_samples²).
The set-level "plasticity" heuristic is not included (it is not a per-model score).

Defect covered: TencentARC/SFDA ``PARC_Score`` subsamples for N > 15000 but then scores the full
array (``targets = X[...]``); here the subsample is what gets scored.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ._base import register
from ._shared import pca

__all__ = ["parc", "subsample_indices", "rank_biserial_corr"]


def subsample_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the rows PARC scores: all rows, or a seeded uniform draw of ``max_samples``."""
    if max_samples is None or n <= max_samples:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_samples), replace=False))


@register(
    "parc",
    citation="Bolya, Mittapalli, Hoffman, Scalable Diverse Model Selection for Accessible Transfer Learning, NeurIPS 2021",
    stochastic=True,
)
def parc(X, y, *, probs=None, seed: int = 0, n_dims: int | None = 32, max_samples: int | None = 3000) -> float:
    """PARC score (×100); see the module docstring."""
    idx = subsample_indices(len(X), max_samples, seed)
    if len(idx) < len(X):
        X, y = X[idx], y[idx]
    if len(np.unique(y)) < 2:
        raise DataError("parc: the subsample contains fewer than 2 classes; raise max_samples")
    n, d = X.shape
    if n_dims is not None and d > n_dims:
        X = pca(X, int(min(n_dims, n)))
    sd = X.std(0)
    X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)  # a boolean mask, not two int64 index arrays of M entries
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant row: correlation undefined, distance 1
        a = np.corrcoef(X)[upper]
    np.subtract(1.0, a, out=a)  # the upper triangle of RDM_f, in place
    np.nan_to_num(a, copy=False, nan=1.0)
    cross = (y[:, None] != y[None, :])[upper]
    del upper
    return float(100.0 * rank_biserial_corr(a, cross))


def rank_biserial_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation between the average ranks of ``a`` and the boolean ``b`` (closed form, see above)."""
    m = len(a)
    n1 = int(np.count_nonzero(b))
    if n1 in (0, m):
        raise DataError("parc: need pairs from both the same and different classes")
    s = np.sort(a)
    a0 = np.sort(a[~b])  # within-class pairs (usually the smaller group); sorted queries search faster
    lo, hi = np.searchsorted(s, a0, side="left"), np.searchsorted(s, a0, side="right")
    rank_sum0 = float(np.sum(lo + hi + 1)) / 2.0  # average 1-based rank of each entry of a0
    rank_sum1 = m * (m + 1) / 2.0 - rank_sum0
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    t = np.diff(np.r_[starts, m]).astype(np.float64)
    var_r = (m * m - 1) / 12.0 - float(np.sum(t**3 - t)) / (12.0 * m)
    if var_r <= 0:
        raise DataError("parc: every pair of samples is equally far apart (constant features); PARC is undefined")
    p = n1 / m
    cov = rank_sum1 / m - (m + 1) / 2.0 * p
    return cov / np.sqrt(var_r * p * (1.0 - p))
