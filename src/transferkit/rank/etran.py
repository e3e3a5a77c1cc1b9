"""ETran: energy-based transferability estimation, a **set-level** ranker.

Paper: M. Gholami, M. Akbari, X. Wang, B. Kamranian, Y. Zhang, "ETran: Energy-Based Transferability
Estimation", ICCV 2023 (reference code: mgholamikn/ETran, ``metrics.py`` and ``tw.py``; read to compare,
not copied).

Per candidate model m, with its target features F_m (N×D) and target labels y:

* **Energy score** S_en — how in-distribution the target is for the model. The reference computes
  e_i = logsumexp_d F_m[i, d] over the **penultimate features** (not logits) and averages the lowest
  ``energy_fraction`` of the e_i. The reference's fraction is ``int(0.5·10)·N // 1000`` samples, i.e.
  0.5 % (default here, ``energy_fraction=0.005``). Use ``energy_fraction=1.0`` for the plain mean.
* **Classification score** S_lda — mean p(y_i | x_i) of a shrinkage LDA fitted on (F_m, y):
  S_w = Σ_c prior_c·cov_c, λ = max(exp(−5·λ_max(S_w)), 1e-10), S̃_w = (1 − λ)S_w + λ(tr S_w/D)I,
  coef = μ S̃_w⁻¹ (the solution of the generalised eigenproblem S_b v = ℓ S̃_w v with all D
  eigenvectors, VVᵀ = S̃_w⁻¹), intercept = −½ diag(μ coefᵀ) + log prior, p = softmax. This is
  :func:`transferkit.rank.sfda.fda_proba` (step 1 of SFDA, without ConfMix).
* **Regression score** S_svd (only with ``regression_targets``, e.g. box coordinates for detection):
  −mean squared residual of the least-squares fit of the standardised targets on the centred
  features restricted to the top singular directions that hold ``svd_energy = 0.8`` of the spectral
  energy (a truncated-SVD solve; the truncation level is our choice, the public code has no
  runnable version of this score). In [−1, 0], higher is better.

ETran = Σ_k w_k · minmax_m(S_k(m)), the min-max taken **across the candidate models**. Default weights
(``tw.py``): 0.15·energy + 0.85·lda for classification; with regression targets the 0.85 is split
equally between lda and svd (the paper's detection weighting is not in the public code: unverified).

Why set-level, not a registry metric: after min-max normalisation a model's ETran value depends on
the other candidates (adding a model with a larger energy score lowers everyone else's normalised
energy term, and can reorder two models whose raw terms trade off). A per-model value cached in
:data:`~transferkit.rank.METRICS` would silently change meaning with the candidate set, so ETran is a
ranker over a candidate set: ``etran_rank({model: Features}) -> {model: score}``. The raw per-model
terms are available from :func:`etran_components` and are candidate-independent.

Defects of the reference code covered here (each has a regression test in
``tests/test_rank_setlevel.py``):

* ``np.linalg.eigh(inv(S̃_w) @ S_b)`` applies a symmetric eigen-solver to a non-symmetric matrix (it
  reads one triangle only), so its ``coef = μVVᵀ`` is not the LDA solution; here coef = μS̃_w⁻¹.
* The energy average over the lowest ``5·N // 1000`` samples is the mean of an **empty** array
  (NaN) whenever N < 200; here at least one sample is used.
* Min-max normalisation divides by zero (NaN for every model) when all candidates have the same
  value of a term, or when there is a single candidate; here a constant term is normalised to 0
  for every model (it carries no ranking information).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.special import logsumexp

from ..errors import DataError
from ._base import register_set_level, validate
from .sfda import fda_proba

__all__ = ["etran_rank", "etran_components", "energy_score", "lda_score", "svd_regression_score", "minmax"]

CITATION = "Gholami et al., ETran: Energy-Based Transferability Estimation, ICCV 2023"


# ----------------------------------------------------------------------------- shared set-level helpers
def candidates(features_by_model: Mapping[str, Any], *, name: str, need_probs: bool = False) -> dict[str, tuple]:
    """Validate a candidate set ``{model: Features | (X, y) | (X, y, probs)}``.

    Returns ``{model: (X float64, y 0..C-1, probs or None)}`` in the given order. All models must share
    one target label vector (features of the same target samples). Raises :class:`DataError`.
    """
    if not features_by_model:
        raise DataError(f"{name}: no candidate models given")
    out: dict[str, tuple] = {}
    y_ref = None
    for model, feats in features_by_model.items():
        if isinstance(feats, tuple):
            X, y, probs = (tuple(feats) + (None,))[:3]
        else:
            X, y, probs = feats.X, feats.y, getattr(feats, "probs", None)
        needs = {"features", "probs"} if need_probs else {"features"}
        Xv, yv, pv = validate(X, y, probs, needs=needs, name=f"{name}[{model}]")
        if y_ref is None:
            y_ref = yv
        elif len(yv) != len(y_ref) or not np.array_equal(yv, y_ref):
            raise DataError(f"{name}: model {model!r} has different target labels than the first model; "
                            "candidates must be features of the same target samples")
        out[model] = (Xv, yv, pv)
    return out


def minmax(values: Mapping[str, float], *, name: str = "term") -> dict[str, float]:
    """Min-max normalise ``{model: value}`` to [0, 1] across the candidates.

    A term that is constant across the candidates (or a single candidate) maps to 0.0 for every model
    instead of the reference's 0/0 = NaN. Non-finite inputs raise :class:`DataError`.
    """
    vals = np.array([float(v) for v in values.values()], dtype=np.float64)
    if not np.isfinite(vals).all():
        bad = [m for m, v in values.items() if not np.isfinite(v)]
        raise DataError(f"{name}: non-finite value for model(s) {', '.join(map(str, bad))}")
    lo, hi = float(vals.min()), float(vals.max())
    span = hi - lo
    if span <= 1e-12 * max(1.0, abs(hi), abs(lo)):
        return {m: 0.0 for m in values}
    return {m: (float(v) - lo) / span for m, v in values.items()}


def ranking_of(scores: Mapping[str, float]) -> list[str]:
    """Models best first; ties broken by model name."""
    return sorted(scores, key=lambda m: (-float(scores[m]), str(m)))


# ----------------------------------------------------------------------------- per-model ETran terms
def energy_score(X: np.ndarray, fraction: float = 0.005) -> float:
    """Mean of the lowest ``fraction`` of the per-sample energies logsumexp_d X[i, d] (≥ 1 sample)."""
    if not 0 < fraction <= 1:
        raise DataError(f"etran: energy_fraction must be in (0, 1], got {fraction}")
    e = np.sort(logsumexp(np.asarray(X, dtype=np.float64), axis=1))
    k = max(1, int(np.floor(fraction * len(e))))
    return float(e[:k].mean())


def lda_score(X: np.ndarray, y: np.ndarray) -> float:
    """Mean p(y_i | x_i) of the shrinkage LDA (coef = μS̃_w⁻¹; see the module docstring)."""
    p, _ = fda_proba(X, y)
    return float(np.mean(p[np.arange(len(y)), y]))


def svd_regression_score(X: np.ndarray, Y: np.ndarray, energy: float = 0.8) -> float:
    """−mean squared residual of standardised targets regressed on the top-``energy`` SVD directions."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] != X.shape[0] or not np.isfinite(Y).all():
        raise DataError(f"etran: regression targets must be finite with {X.shape[0]} rows, got shape {Y.shape}")
    sd = Y.std(0)
    Y = Y[:, sd > 0]
    if Y.shape[1] == 0:
        raise DataError("etran: every regression target is constant")
    Ys = (Y - Y.mean(0)) / Y.std(0)
    Xc = X - X.mean(0)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    if s.size == 0 or s[0] <= 0:
        return -1.0  # constant features explain nothing
    cum = np.cumsum(s**2) / np.sum(s**2)
    r = int(np.searchsorted(cum, energy - 1e-12) + 1)
    Ur = U[:, :r]
    resid = Ys - Ur @ (Ur.T @ Ys)
    return float(-np.mean(resid**2))


def etran_components(X, y, *, regression_targets=None, energy_fraction: float = 0.005,
                     svd_energy: float = 0.8) -> dict[str, float]:
    """The raw, candidate-independent ETran terms of one model: ``energy``, ``lda`` (+ ``svd``)."""
    Xv, yv, _ = validate(X, y, None, name="etran")
    out = {"energy": energy_score(Xv, energy_fraction), "lda": lda_score(Xv, yv)}
    if regression_targets is not None:
        out["svd"] = svd_regression_score(Xv, regression_targets, svd_energy)
    return out


def _default_weights(with_svd: bool) -> dict[str, float]:
    return {"energy": 0.15, "lda": 0.425, "svd": 0.425} if with_svd else {"energy": 0.15, "lda": 0.85}


def etran_rank(features_by_model: Mapping[str, Any], *, regression_targets=None, weights: Mapping[str, float] | None = None,
               energy_fraction: float = 0.005, svd_energy: float = 0.8, details: bool = False, seed: int = 0):
    """Rank a candidate set with ETran.

    Parameters
    ----------
    features_by_model : {model: Features | (X, y)} — features of the same target samples.
    regression_targets : optional (N,) / (N, K) real targets (e.g. box coordinates) adding the SVD term.
    weights : {"energy", "lda", "svd"} weights of the min-max-normalised terms (defaults: module doc).
    energy_fraction : fraction of lowest-energy samples averaged (reference: 0.005).
    svd_energy : spectral energy kept by the truncated-SVD regression.
    details : also return the raw and normalised terms.
    seed : unused (ETran is deterministic); accepted for a uniform ranker signature.

    Returns
    -------
    ``{model: score}`` (higher = better; in [0, Σw]) or, with ``details=True``, a dict with
    ``scores``, ``ranking`` (best first), ``components`` {model: raw terms}, ``normalised``
    {term: {model: value}}, ``weights`` and ``citation``.
    """
    cands = candidates(features_by_model, name="etran")
    with_svd = regression_targets is not None
    w = dict(_default_weights(with_svd) if weights is None else weights)
    unknown = set(w) - {"energy", "lda", "svd"}
    if unknown:
        raise DataError(f"etran: unknown weight(s) {', '.join(sorted(unknown))}; use energy, lda, svd")
    if w.get("svd", 0.0) and not with_svd:
        raise DataError("etran: an svd weight needs regression_targets")
    comps = {}
    for model, (X, y, _) in cands.items():
        c = {"energy": energy_score(X, energy_fraction), "lda": lda_score(X, y)}
        if with_svd:
            c["svd"] = svd_regression_score(X, regression_targets, svd_energy)
        comps[model] = c
    normed = {t: minmax({m: comps[m][t] for m in comps}, name=f"etran {t}") for t in w if w[t]}
    scores = {m: float(sum(w[t] * normed[t][m] for t in normed)) for m in comps}
    if not details:
        return scores
    return {"scores": scores, "ranking": ranking_of(scores), "components": comps, "normalised": normed,
            "weights": w, "citation": CITATION}


register_set_level('etran', etran_rank, citation=CITATION)
