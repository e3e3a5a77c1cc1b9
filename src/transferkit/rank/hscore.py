"""H-score and shrinkage (regularised) H-score.

Papers: Y. Bao, Y. Li, S.-L. Huang, L. Zhang, L. Zheng, A. Zamir, L. Guibas, "An Information-Theoretic
Approach to Transferability in Task Transfer Learning", ICIP 2019 (H-score); S. Ibrahim,
N. Ponomareva, R. Mazumder, "Newer is not always better: Rethinking transferability metrics, their
peculiarities, stability and performance" (ECML-PKDD 2022 / arXiv 2110.06893) (shrinkage H-score).

H-score::

    H = tr( cov(f)⁺ · cov(E[f | y]) )

where E[f | y] replaces every sample by its class mean, covariances are unbiased (N − 1) and the
pseudo-inverse drops eigenvalues below ``rcond = 1e-15`` × the largest (as tllib ``h_score``). Both
scores use the eigendecomposition of the centred Gram matrix shared within a scoring pass
(:mod:`transferkit.rank._shared`). It is
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
from ._shared import centred, spectrum

__all__ = ["hscore", "shrinkage_hscore", "ledoit_wolf_shrinkage"]


def _between_factor(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """M (C, D) with MᵀM = Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ = (N − 1)·cov(E[f | y])."""
    means, counts = class_means(X, y)
    mu = X.mean(0)
    return np.sqrt(counts)[:, None] * (means - mu)


def ledoit_wolf_shrinkage(Xc: np.ndarray, w: np.ndarray) -> float:
    """Ledoit–Wolf shrinkage intensity of centred ``Xc`` given the eigenvalues ``w`` of XcᵀXc.

    The estimator of sklearn's ``ledoit_wolf_shrinkage(Xc, assume_centered=True)`` (Ledoit & Wolf,
    "A well-conditioned estimator for large-dimensional covariance matrices", 2004) in O(N·D): its
    two D×D sums are Σ_ij (X²ᵀX²)_ij = Σ_k ‖x_k‖⁴ and Σ_ij (XᵀX)_ij² = ‖XᵀX‖_F² = Σ w².
    """
    n, d = Xc.shape
    beta_ = float(np.sum(np.einsum("nd,nd->n", Xc, Xc) ** 2))
    delta_ = float(np.sum(w**2)) / n**2
    trace = float(np.sum(w)) / n  # tr(emp)
    mu = trace / d
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


@register(
    "hscore",
    citation="Bao et al., An Information-Theoretic Approach to Transferability in Task Transfer Learning, ICIP 2019",
)
def hscore(X, y, *, probs=None, seed: int = 0, rcond: float = 1e-15) -> float:
    """H-score tr(cov(f)⁺ cov(E[f|y])) with the matrix product."""
    w, V = spectrum(X)  # eigenpairs of (N − 1)·cov(f)
    keep = w > rcond * max(float(w[0]), 0.0)
    proj = _between_factor(X, y) @ V[:, keep]
    return float(np.sum(proj**2 / w[keep]))


@register(
    "shrinkage_hscore",
    citation="Ibrahim, Ponomareva, Mazumder, Newer is not always better: Rethinking transferability metrics, "
    "their peculiarities, stability and performance, ECML-PKDD 2022",
)
def shrinkage_hscore(X, y, *, probs=None, seed: int = 0) -> float:
    """Ledoit–Wolf regularised H-score tr(Σ_α⁻¹ (1 − α) cov(E[f|y]))."""
    n, d = X.shape
    w, V = spectrum(X)
    alpha = ledoit_wolf_shrinkage(centred(X), w)
    # sklearn's LedoitWolf: the biased covariance emp = XcᵀXc/n shrunk towards mu·I, mu = tr(emp)/d.
    # Σ_α shares emp's eigenvectors; the between-class factor lies in the span of the centred rows,
    # so the eigenpairs of the thin spectrum are all that the quadratic form needs.
    lam = (1.0 - alpha) * w / n + alpha * float(w.sum()) / (n * d)
    keep = lam > 0  # all of them unless α = 0; then zero eigenvalues are dropped as by a pseudo-inverse
    proj = _between_factor(X, y) @ V[:, keep]
    return (1.0 - alpha) * float(np.sum(proj**2 / lam[keep])) / (n - 1)
