"""LogME: the logarithm of the maximum marginal evidence of a Bayesian linear model on the features.

Papers: K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021; K. You, Y. Liu, Z. Zhang, J. Wang, M. I. Jordan, M. Long, "Ranking and
Tuning Pre-trained Models: A New Paradigm for Exploiting Model Hubs", JMLR 23 (2022).

Model, per target column y ∈ R^N (one-hot column of each class for classification; each column of
a real-valued target for regression) and features F ∈ R^{N×D} (float64, not centred)::

    y = F w + ε,   w ~ N(0, α⁻¹ I_D),   ε ~ N(0, β⁻¹ I_N)
    A = α I_D + β FᵀF,   m = β A⁻¹ Fᵀ y
    L(α, β) = D/2 log α + N/2 log β − ½ log|A| − β/2 ‖y − F m‖² − α/2 ‖m‖² − N/2 log 2π

The score is max_{α,β} L / N averaged over target columns (higher is better). It is a per-sample
log density: it can be positive and is only comparable within one target task.

Maximisation uses the JMLR fixed-point iteration on one thin SVD F = U S Vᵀ (rank k, σ = s²,
x = Uᵀy, r₀ = ‖y‖² − ‖x‖², t = α/β)::

    γ = Σ σ/(σ + t),  ‖m‖² = Σ σx²/(t + σ)²,  ‖y − Fm‖² = Σ x²/(1 + σ/t)² + r₀
    α ← γ / (‖m‖² + 1e-5),   β ← (N − γ) / (‖y − Fm‖² + 1e-5)

Defaults follow the reference (thuml/LogME ``_fit_fixed_point``): start α = β = 1, at most
``max_iter=11`` iterations, stop when |Δt|/t ≤ ``tol=1e-3``.

**N > D: no second eigendecomposition.** The fixed point needs γ, ‖m‖², ‖y − Fm‖² and log|A|, all
functions of the resolvent (FᵀF + tI)⁻¹ applied to Fᵀy. FᵀF = XcᵀXc + N μμᵀ (μ the column means) is
a rank-one update of the centred scatter, whose eigendecomposition XcᵀXc = W Λ Wᵀ is shared with
H-score, TransRate and PCA within a scoring pass (:func:`~transferkit.rank._shared.spectrum`). In that
basis, with d = λ + t, z = Wᵀμ, a = WᵀXcᵀy, n_y = Σ_i y_i (so WᵀFᵀy = a + n_y z), h = 1 + N Σ z²/d
and Sherman–Morrison::

    m̃ = Wᵀm = a/d − N (z/d)(zᵀ(a/d))/h + n_y (z/d)/h,      ‖m‖² = ‖m̃‖²
    γ = Σ λ/d + t N Σ z²/d² / h,      ‖y − Fm‖² = ‖y‖² − (a + n_y z)ᵀm̃ − t‖m̃‖²
    log|A| = D log β + Σ log d + log h

— the same quantities as the SVD formulas above (exact identities, O(D·K) per iteration), without the
D×D eigendecomposition of the uncentred FᵀF. Numerically zero directions of F need no rank cut here
(they contribute λ/d → 0, log d → log t: the padded log|A|). ``pad_logdet=False`` (comparison only)
and N ≤ D use the thin-SVD route.

Deviations from the reference code:

* **log|A| has D terms.** log|A| = Σ_{i≤k} log(α + βσ_i) + (D − k)·log α. The reference omits the
  (D − k)·log α term for the D − k zero eigenvalues of FᵀF (thuml/LogME issue #23), which is wrong
  whenever N < D and inflates the score of high-dimensional models in few-shot settings.
  ``pad_logdet=False`` reproduces the reference value, for comparison only.
* The returned evidence is evaluated exactly at the final (α, β) (m, ‖m‖² and the residual are
  recomputed at t = α/β), so it equals the directly computed log N(y; 0, β⁻¹I + α⁻¹FFᵀ) / N; the
  reference evaluates it with the m of the previous iterate (differences are tiny).
* The rank k uses a relative tolerance (``max(N, D)·eps·s_max``) instead of an absolute 1e-10.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import one_hot, register, validate
from ._shared import centred, spectrum

__all__ = ["logme", "logme_fit", "LogMEFit"]

_EPS = 1e-5
_LOG2PI = np.log(2.0 * np.pi)


@dataclass
class LogMEFit:
    """Result of :func:`logme_fit`.

    score : mean over targets of the per-sample log evidence.
    evidences : (K,) per-target log evidence / N.
    alphas, betas : (K,) hyper-parameters at the fixed point.
    weights : (K, D) posterior mean weights m (``F @ weights.T`` gives the predictions).
    n_iter : (K,) fixed-point iterations used per target.
    rank : numerical rank k of F (N > D: the rank of the centred features, plus one if the mean lies
        outside their row space).
    """

    score: float
    evidences: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    weights: np.ndarray
    n_iter: np.ndarray
    rank: int


def _svd_projection(F: np.ndarray, Y: np.ndarray):
    """Return s (k,), V (D, k) of the thin SVD F = U S Vᵀ (numerically zero singular values dropped) and x = UᵀY (k, K)."""
    N, D = F.shape
    if N > D:
        # eigen-decomposition of the D×D Gram matrix is cheaper than the SVD of a tall F, and
        # UᵀY = S⁻¹Vᵀ(FᵀY) never forms the N×k matrix U
        sig, V = np.linalg.eigh(F.T @ F)
        sig, V = sig[::-1], V[:, ::-1]
        s = np.sqrt(np.clip(sig, 0.0, None))
        keep = s > max(N, D) * np.finfo(np.float64).eps * max(s[0], 1e-300) * 10
        s, V = s[keep], V[:, keep]
        return s, V, (V.T @ (F.T @ Y)) / s[:, None]
    U, s, Vt = np.linalg.svd(F, full_matrices=False)
    keep = s > max(N, D) * np.finfo(np.float64).eps * max(s[0] if len(s) else 0.0, 1e-300)
    return s[keep], Vt[keep].T, U[:, keep].T @ Y


def _stats(t, sigma, x2, r0):
    """γ, ‖m‖², ‖y − Fm‖² at t = α/β; sigma (k, 1), x2 (k, K), t and r0 (K,)."""
    den = sigma + t
    gamma = (sigma / den).sum(0)
    m2 = (sigma * x2 / den**2).sum(0)
    res2 = (x2 * (t / den) ** 2).sum(0) + r0
    return gamma, m2, res2


def log_evidence(alpha, beta, sigma, m2, res2, N: int, D: int, pad_logdet: bool = True):
    """L(α, β)/N given the spectrum ``sigma`` (k nonzero eigenvalues of FᵀF) and the fit terms."""
    sigma = np.asarray(sigma).reshape(-1, 1)
    k = sigma.shape[0]
    logdet = np.log(alpha + beta * sigma).sum(0)
    if pad_logdet:
        logdet = logdet + (D - k) * np.log(alpha)
    L = 0.5 * D * np.log(alpha) + 0.5 * N * np.log(beta) - 0.5 * logdet - 0.5 * beta * res2 - 0.5 * alpha * m2 - 0.5 * N * _LOG2PI
    return L / N


def logme_fit(X, y, *, regression: bool = False, max_iter: int = 11, tol: float = 1e-3, pad_logdet: bool = True) -> LogMEFit:
    """Fit LogME and return the score with α, β and the posterior weights per target.

    Parameters
    ----------
    X : (N, D) features.
    y : (N,) class ids, or (N,) / (N, K) real targets when ``regression=True``.
    regression : treat ``y`` as real-valued targets instead of class ids.
    max_iter, tol : fixed-point stopping rule (defaults of the reference implementation).
    pad_logdet : include the (D − k)·log α term of log|A| (correct). False reproduces the
        reference's omission (thuml/LogME issue #23); for comparison only.
    """
    F, Y, _ = validate(X, y, needs={"features"}, name="logme", regression=regression)
    return _fit(F, Y, regression, max_iter, tol, pad_logdet)


def _fixed_point(stats, N: int, K: int, max_iter: int, tol: float):
    """α, β and iterations per target: α = γ/‖m‖², β = (N − γ)/‖y − Fm‖² until |Δt|/t ≤ tol (t = α/β).

    ``stats(t, cols)`` returns γ, ‖m‖², ‖y − Fm‖² for the targets ``cols`` (a boolean mask) at ``t``.
    """
    alpha = np.ones(K)
    beta = np.ones(K)
    n_iter = np.zeros(K, dtype=np.int64)
    active = np.ones(K, dtype=bool)
    for _ in range(max_iter):
        if not active.any():
            break
        a = active.copy()
        t = alpha[a] / beta[a]
        gamma, m2, res2 = stats(t, a)
        alpha[a] = gamma / (m2 + _EPS)
        beta[a] = (N - gamma) / (res2 + _EPS)
        n_iter[a] += 1
        done = np.abs(alpha[a] / beta[a] - t) / t <= tol
        active[np.flatnonzero(a)[done]] = False
    return alpha, beta, n_iter


def _fit(F, Y, regression, max_iter, tol, pad_logdet) -> LogMEFit:
    if not regression:
        Y = one_hot(Y)
    N, D = F.shape
    if N > D and pad_logdet:
        return _fit_centred(F, Y, max_iter, tol)
    s, V, xs = _svd_projection(F, Y)  # xs = UᵀY (k, K)
    k = len(s)
    sigma = (s**2)[:, None]
    x2 = xs**2
    r0 = np.clip((Y**2).sum(0) - x2.sum(0), 0.0, None)
    alpha, beta, n_iter = _fixed_point(lambda t, a: _stats(t, sigma, x2[:, a], r0[a]), N, Y.shape[1], max_iter, tol)
    t = alpha / beta
    _, m2, res2 = _stats(t, sigma, x2, r0)
    ev = log_evidence(alpha, beta, sigma, m2, res2, N, D, pad_logdet=pad_logdet)
    weights = (V @ (s[:, None] * xs / (t + sigma))).T  # (K, D)
    return LogMEFit(float(np.mean(ev)), ev, alpha, beta, weights, n_iter, k)


class _Rank1Resolvent:
    """γ, ‖m‖², ‖y − Fm‖², log|FᵀF + tI| and m̃ from the centred eigensystem (see the module docstring)."""

    def __init__(self, F: np.ndarray, Y: np.ndarray):
        self.N = len(F)
        self.w, W = spectrum(F)  # N > D: all D eigenpairs of XcᵀXc, w ≥ 0 descending
        self.W = W
        self.z = W.T @ F.mean(0)  # (D,)
        self.a = W.T @ (centred(F).T @ Y)  # (D, K)
        self.ny = Y.sum(0)  # (K,)
        self.yy = (Y**2).sum(0)

    def stats(self, t: np.ndarray, cols=slice(None)):
        w, z, N = self.w[:, None], self.z[:, None], self.N
        a, ny, yy = self.a[:, cols], self.ny[cols], self.yy[cols]
        d = w + t  # (D, K)
        zd = z / d
        s1 = (z * zd).sum(0)  # Σ z²/d
        h = 1.0 + N * s1
        m = a / d - zd * (N * (zd * a).sum(0) / h) + zd * (ny / h)  # m̃ = Wᵀ(FᵀF + tI)⁻¹Fᵀy
        gamma = (w / d).sum(0) + t * N * (zd**2).sum(0) / h
        m2 = (m**2).sum(0)
        res2 = np.clip(yy - (a * m).sum(0) - ny * (z * m).sum(0) - t * m2, 0.0, None)
        logdet = np.log(d).sum(0) + np.log1p(N * s1)  # log|FᵀF + tI|
        return gamma, m2, res2, logdet, m

    def rank(self) -> int:
        w, z, N, D = self.w, self.z, self.N, len(self.w)
        tol = (max(N, D) * np.finfo(np.float64).eps * 10) ** 2 * max(float(w[0]) + N * float(z @ z), 1e-300)
        keep = w > tol
        return int(keep.sum()) + int(N * float(z[~keep] @ z[~keep]) > tol)


def _fit_centred(F, Y, max_iter, tol) -> LogMEFit:
    """The fixed point of :func:`_fit` for N > D from the shared centred eigensystem (rank-one update)."""
    N, D = F.shape
    R = _Rank1Resolvent(F, Y)
    alpha, beta, n_iter = _fixed_point(lambda t, a: R.stats(t, a)[:3], N, Y.shape[1], max_iter, tol)
    t = alpha / beta
    _, m2, res2, logdet, m = R.stats(t)
    logdet_A = D * np.log(beta) + logdet  # A = β(FᵀF + tI)
    L = 0.5 * D * np.log(alpha) + 0.5 * N * np.log(beta) - 0.5 * logdet_A - 0.5 * beta * res2 - 0.5 * alpha * m2 - 0.5 * N * _LOG2PI
    ev = L / N
    return LogMEFit(float(np.mean(ev)), ev, alpha, beta, (R.W @ m).T, n_iter, R.rank())


@register(
    "logme",
    citation="You et al., LogME: Practical Assessment of Pre-trained Models for Transfer Learning, ICML 2021; "
    "You et al., Ranking and Tuning Pre-trained Models, JMLR 2022",
    regression_ok=True,
)
def logme(X, y, *, probs=None, seed: int = 0, regression: bool = False, max_iter: int = 11, tol: float = 1e-3, pad_logdet: bool = True) -> float:
    """LogME score (mean per-sample log maximum evidence). See the module docstring."""
    return _fit(X, y, regression, max_iter, tol, pad_logdet).score
