"""PARC: Pairwise Annotation Representation Comparison.

Paper: D. Bolya, R. Mittapalli, J. Hoffman, "Scalable Diverse Model Selection for Accessible
Transfer Learning", NeurIPS 2021 (reference: dbolya/parc ``methods.py::PARC``).

1. If N > ``max_samples`` (default 3000), draw ``max_samples`` rows uniformly without replacement
   (seeded) and score **only those** (see the defect note).
2. PCA to ``n_dims = 32`` dimensions (randomised solver, ``random_state=seed``; the reference fixes
   1919), then standardise each dimension.
3. RDM_f = 1 − corrcoef(rows of the features) and RDM_y = 1 − corrcoef(one-hot labels) (N×N).
4. PARC = 100 × Spearman(upper triangle of RDM_f, upper triangle of RDM_y).

RDM_y takes two values (0 within a class, C/(C−1) across), so its ranks are an affine function of
the cross-class indicator and the Spearman correlation equals the Pearson correlation between the
ranks of RDM_f and that indicator; only one ranking is computed. Memory is O(max_samples²).
The set-level "plasticity" heuristic is not included (it is not a per-model score).

Defect covered: TencentARC/SFDA ``PARC_Score`` subsamples for N > 15000 but then scores the full
array (``targets = X[...]``); here the subsample is what gets scored.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ._base import register

__all__ = ["parc", "subsample_indices"]


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
    from scipy.stats import rankdata
    from sklearn.decomposition import PCA

    idx = subsample_indices(len(X), max_samples, seed)
    X, y = X[idx], y[idx]
    if len(np.unique(y)) < 2:
        raise DataError("parc: the subsample contains fewer than 2 classes; raise max_samples")
    n, d = X.shape
    if n_dims is not None and d > n_dims:
        k = int(min(n_dims, n))
        X = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit_transform(X)
    sd = X.std(0)
    X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
    rf = 1.0 - np.corrcoef(X)
    iu = np.triu_indices(n, 1)
    a = rankdata(np.nan_to_num(rf[iu], nan=1.0))
    del rf
    b = (y[iu[0]] != y[iu[1]]).astype(np.float64)
    if b.std() == 0:
        raise DataError("parc: need pairs from both the same and different classes")
    r = np.corrcoef(a, b)[0, 1]
    return float(100.0 * r)
