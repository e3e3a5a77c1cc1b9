"""SFDA: Self-challenging Fisher Discriminant Analysis.

Paper: W. Shao, X. Zhao, Y. Ge, Z. Zhang, L. Yang, X. Wang, Y. Shan, P. Luo, "Not All Models Are
Equal: Predicting Model Transferability in a Self-challenging Fisher Space", ECCV 2022
(reference: TencentARC/SFDA ``metrics.py``).

1. Regularised FDA. S_w = Σ_c prior_c·cov_c (biased covariances); λ = max(exp(−5·λ_max(S_w)), 1e-10)
   with λ_max from 3 power iterations (start vector 1/√D); S̃_w = (1 − λ)S_w + λ(tr S_w / D)·I. The
   reference projects on the eigenvectors V of ``eigh(S_b, S̃_w)`` and uses coef = μVVᵀ. With all D
   generalised eigenvectors VᵀS̃_wV = I, hence VVᵀ = S̃_w⁻¹ and coef = μS̃_w⁻¹ exactly (S_b cancels);
   this implementation solves with S̃_w directly (Cholesky; pseudo-inverse if S̃_w is singular).
   intercept = −½ diag(μ coefᵀ) + log prior; p(y|x) = softmax(x coefᵀ + b).
2. ConfMix. p ← softmax(p) (the reference's deliberate second softmax, which softens); for each
   sample of class c: x ← p_c(x)·x + (1 − p_c(x))·μ̄_{−c}, μ̄_{−c} the mean of the other classes' means.
3. Refit FDA on the mixed features with the same λ; score = mean_i p(y_i | x_i) (no log, as in the paper).

Defect covered: the reference mutates the caller's X in place during ConfMix; this implementation
never writes to its input.

Cost. S_w comes from the centred scatter shared within a scoring pass
(:func:`~transferkit.rank._shared.within_scatter`); the Cholesky factor of S̃_w is memoised per (S_w, λ)
in a pass, so features that are class translates of X (PED's moved features, whose S_w is that of X)
reuse it: SFDA on them costs O(N·D·C + D²·C) for the first FDA instead of O(N·D² + D³).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ._base import class_means, register
from ._shared import _memo, within_scatter

__all__ = ["sfda", "fda_proba", "sfda_shrinkage"]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _factor(W: np.ndarray, Sw: np.ndarray, lam: float):
    """(Cholesky factor of S̃_w = (1 − λ)S_w + λ(tr S_w / D)·I, None) or (None, its pseudo-inverse) if singular.

    Memoised per (W, λ) within a pass; ``W`` is the unnormalised within-class scatter, S_w = W / N.
    """

    def shrunk():
        D = Sw.shape[0]
        S = (1.0 - lam) * Sw
        S[np.diag_indices(D)] += lam * np.trace(Sw) / D
        return S

    def compute():
        try:
            return scipy.linalg.cho_factor(shrunk(), overwrite_a=True, check_finite=False), None
        except np.linalg.LinAlgError:  # the failed factorisation may have overwritten its input: rebuild S̃_w
            return None, np.linalg.pinv(shrunk(), hermitian=True)

    return _memo(W, ("sfda_factor", lam), compute)


def sfda_shrinkage(Sw: np.ndarray, n_power: int = 3) -> float:
    """λ = max(exp(−5·λ_max), 1e-10) with λ_max from ``n_power`` power iterations."""
    v = np.full(Sw.shape[0], 1.0 / np.sqrt(Sw.shape[0]))
    for _ in range(n_power):
        w = Sw @ v
        nrm = np.linalg.norm(w)
        if nrm == 0:
            return 1.0
        v = w / nrm
    lam_max = float(v @ Sw @ v)
    return float(max(np.exp(-5.0 * lam_max), 1e-10))


def fda_proba(X: np.ndarray, y: np.ndarray, shrinkage: float | None = None):
    """Fit the regularised FDA of step 1 and return (p(y|x) (N, C), λ used)."""
    means, counts = class_means(X, y)
    prior = counts / counts.sum()
    W = within_scatter(X, y)  # Σ_c prior_c · cov_c (biased, prior_c = n_c / N) = W / N
    Sw = W / len(X)
    lam = sfda_shrinkage(Sw) if shrinkage is None else float(shrinkage)
    cho, pinv = _factor(W, Sw, lam)
    if cho is not None:
        coef = scipy.linalg.cho_solve(cho, means.T, check_finite=False).T
    else:
        coef = (pinv @ means.T).T
    intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(prior)
    return _softmax(X @ coef.T + intercept), lam


@register(
    "sfda",
    citation="Shao et al., Not All Models Are Equal: Predicting Model Transferability in a Self-challenging Fisher Space, ECCV 2022",
)
def sfda(X, y, *, probs=None, seed: int = 0) -> float:
    """SFDA score (mean p(y_i | x_i) after ConfMix); never mutates ``X``."""
    n = len(y)
    C = int(y.max()) + 1
    p, lam = fda_proba(X, y)
    p = _softmax(p)  # second softmax, as in the reference
    means, _ = class_means(X, y)
    others = (means.sum(0, keepdims=True) - means) / (C - 1)  # μ̄_{−c}
    pc = p[np.arange(n), y][:, None]
    X_mix = others[y]  # = pc·X + (1 − pc)·μ̄_{−y}, in a new array (the input is left untouched), two temporaries fewer
    X_mix *= 1.0 - pc
    X_mix += pc * X
    p2, _ = fda_proba(X_mix, y, shrinkage=lam)
    return float(np.mean(p2[np.arange(n), y]))
