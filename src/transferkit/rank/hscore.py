"""H-score and shrinkage (regularised) H-score.

Papers: Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas, "An Information-Theoretic
Approach to Transferability in Task Transfer Learning", ICIP 2019 (H-score); S. Ibrahim,
N. Ponomareva, R. Mazumder, "Newer is not always better: Rethinking transferability metrics, their
peculiarities, stability and performance" (ECML-PKDD 2022 / arXiv 2110.06893) (shrinkage H-score).

H-score::

    H = tr( cov(f)⁺ · cov(E[f | y]) )

where E[f | y] replaces every sample by its class mean, covariances are unbiased (N − 1) and the
pseudo-inverse drops eigenvalues below ``rcond = 1e-15`` × the largest (as tllib ``h_score``). It is
invariant to any invertible linear map of the features (in particular rotations) and is
ill-conditioned when D is large relative to N; the shrinkage variant fixes that::

    H_α = tr( Σ_α⁻¹ · (1 − α) cov(E[f | y]) )

with Σ_α the Ledoit–Wolf shrunk covariance of the centred features (sklearn ``LedoitWolf``, biased)
and α its estimated shrinkage intensity.

Deviation note: google-research/stable_transfer ``hscore.py`` multiplies pinv(cov) and cov_g
element-wise (Σ_i A_ii B_ii) instead of taking the matrix product; this implementation uses the
matrix product (``tr(A B)``) as in the paper.
"""

from __future__ import annotations

import numpy as np

from ._base import class_means, register

__all__ = ["hscore", "shrinkage_hscore"]


def _between_factor(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """M (C, D) with MᵀM = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ = (N − 1)·cov(E[f | y])."""
    means, counts = class_means(X, y)
    mu = X.mean(0)
    return np.sqrt(counts)[:, None] * (means - mu)


def _pinv_psd(S: np.ndarray, rcond: float) -> np.ndarray:
    w, V = np.linalg.eigh(S)
    cut = rcond * max(float(np.abs(w).max()), 0.0)
    inv = np.where(np.abs(w) > cut, 1.0 / np.where(w == 0, 1.0, w), 0.0)
    return (V * inv) @ V.T


@register(
    "hscore",
    citation="Bao et al., An Information-Theoretic Approach to Transferability in Task Transfer Learning, ICIP 2019",
)
def hscore(X, y, *, probs=None, seed: int = 0, rcond: float = 1e-15) -> float:
    """H-score tr(cov(f)⁺ cov(E[f|y])) with the matrix product."""
    n = len(X)
    Xc = X - X.mean(0)
    cov_f = Xc.T @ Xc / (n - 1)
    M = _between_factor(X, y)
    P = _pinv_psd(cov_f, rcond)
    return float(np.einsum("cd,de,ce->", M, P, M) / (n - 1))


@register(
    "shrinkage_hscore",
    citation="Ibrahim, Ponomareva, Mazumder, Newer is not always better: Rethinking transferability metrics, "
    "their peculiarities, stability and performance, ECML-PKDD 2022",
)
def shrinkage_hscore(X, y, *, probs=None, seed: int = 0) -> float:
    """Ledoit–Wolf regularised H-score tr(Σ_α⁻¹ (1 − α) cov(E[f|y]))."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve
    from sklearn.covariance import ledoit_wolf_shrinkage

    n, d = X.shape
    Xc = X - X.mean(0)
    alpha = float(ledoit_wolf_shrinkage(Xc, assume_centered=True))
    emp = Xc.T @ Xc / n  # sklearn's LedoitWolf: biased covariance shrunk towards mu·I
    cov = (1.0 - alpha) * emp
    cov.flat[:: d + 1] += alpha * np.trace(emp) / d
    M = _between_factor(X, y)
    try:  # Σ_α is positive definite whenever α > 0: a Cholesky solve instead of an eigendecomposition
        quad = float(np.sum(M * cho_solve(cho_factor(cov, lower=True, check_finite=False), M.T,
                                          check_finite=False).T))
    except LinAlgError:
        quad = float(np.einsum("cd,de,ce->", M, _pinv_psd(cov, 1e-15), M))
    return (1.0 - alpha) * quad / (n - 1)
