"""NCTI: Neural-Collapse-inspired Transferability Index, a **set-level** ranker.

Paper: Z. Wang, Y. Luo, L. Zheng, Z. Huang, M. Baktashmotlagh, "How Far Pre-trained Models Are from
Neural Collapse on the Target Dataset Informs their Transferability", ICCV 2023 (reference code:
BUserName/NCTI ``metrics.py::NCTI_Score`` and ``evaluate_metric_group1_cpu.py``; read to compare, not
copied).

Per candidate model, on its target features F (N×D) and labels y:

1. PCA to ``n_pca = 64`` dimensions (capped at min(D, N − 1)), computed exactly from the smaller Gram
   matrix (deterministic; the reference's sklearn PCA may pick an unseeded randomised solver).
2. Shrinkage λ = max(exp(−Σ of the top-32 PCA explained variances), 1e-10). If λ hits the 1e-10
   floor (large-variance features, the usual case for real CNN features), LDA uses sklearn's ``svd``
   solver (no shrinkage), otherwise the ``eigen`` solver with shrinkage λ. Note that this choice
   depends on the feature scale, as in the reference.
3. Three terms, all from that LDA:
   * S_seli = ‖Z − mean(Z)‖_* (nuclear norm of the centred LDA projection Z of the features;
     simplex-encoded-label interpolation: large when the class means span a simplex),
   * S_ncc  = mean_i p(y_i | x_i) (nearest-class-centre classifiability),
   * S_vc   = log Σ_c ‖P_c‖_* with P_c the rows of the LDA posterior matrix for the samples of class c
     (within-class variability: small when each class's predictions collapse to one vector).

NCTI = minmax(S_ncc) + minmax(S_seli) − minmax(S_vc), the min-max taken **across the candidates**.

Why set-level: the min-max normalisation makes one model's NCTI depend on the other candidates
(the three terms have incomparable units, and their relative weight is set by their spread over the
candidate set), so NCTI is exposed as ``ncti_rank({model: Features}) -> {model: score}`` and not as a
per-model registry metric. :func:`ncti_components` returns the raw candidate-independent terms.

Defects of the reference code covered here (regression tests in ``tests/test_rank_setlevel.py``):

* ``PCA(n_components=64)`` raises when D < 64 or N < 64 (e.g. small probes, 32-D features); capped here.
* The PCA is unseeded (sklearn picks a randomised solver for large inputs): exact and deterministic here.
* Min-max divides by zero when a term is constant across the candidates (or there is one
  candidate), giving NaN for every model; a constant term maps to 0 here.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from ..errors import DataError
from ._base import register_set_level, validate
from .etran import candidates, minmax, ranking_of

__all__ = ["ncti_rank", "ncti_components"]

CITATION = ("Wang et al., How Far Pre-trained Models Are from Neural Collapse on the Target Dataset Informs "
            "their Transferability, ICCV 2023")


def _pca(X: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact PCA scores (N, n) and explained variances (n,) via the smaller Gram matrix (deterministic)."""
    N, D = X.shape
    Xc = X - X.mean(0)
    if D <= N:
        ev, V = np.linalg.eigh(Xc.T @ Xc / (N - 1))
        ev, V = ev[::-1][:n], V[:, ::-1][:, :n]
        return Xc @ V, np.clip(ev, 0.0, None)
    ev, U = np.linalg.eigh(Xc @ Xc.T / (N - 1))
    ev, U = np.clip(ev[::-1][:n], 0.0, None), U[:, ::-1][:, :n]
    return U * np.sqrt(ev * (N - 1)), ev


def _components(X: np.ndarray, y: np.ndarray, *, n_pca: int, n_shrink: int, seed: int) -> dict[str, Any]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    N, D = X.shape
    C = int(y.max()) + 1
    n = int(min(n_pca, D, N - 1))
    if n < 1:
        raise DataError(f"ncti: need at least 2 samples, got {N}")
    if not (X.max(0) > X.min(0)).any():
        raise DataError("ncti: features have no variance (constant features)")
    Z, ev = _pca(X, n)
    if not np.isfinite(ev).all() or ev.max(initial=0.0) <= 0:
        raise DataError("ncti: features have no variance (constant features)")
    lam = float(max(np.exp(-ev[:n_shrink].sum()), 1e-10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lda = None
        if lam > 1e-10:
            try:
                lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=lam).fit(Z, y)
                solver_used = "eigen"
            except (np.linalg.LinAlgError, ValueError):
                lda = None
        if lda is None:
            lda = LinearDiscriminantAnalysis(solver="svd").fit(Z, y)
            solver_used = "svd"
        low = lda.transform(Z)
        P = lda.predict_proba(Z)
    low = low - low.mean(0, keepdims=True)
    seli = float(np.linalg.norm(low, ord="nuc"))
    ncc = float(np.mean(P[np.arange(N), y]))
    vc_sum = sum(float(np.linalg.norm(P[y == c], ord="nuc")) for c in range(C) if np.any(y == c))
    vc = float(np.log(vc_sum))
    if not np.isfinite([seli, ncc, vc]).all():
        raise DataError("ncti: non-finite term (degenerate features)")
    return {"seli": seli, "ncc": ncc, "vc": vc, "shrinkage": lam, "solver": solver_used, "n_pca": n}


def ncti_components(X, y, *, n_pca: int = 64, n_shrink: int = 32, seed: int = 0) -> dict[str, Any]:
    """Raw NCTI terms of one model: ``seli``, ``ncc``, ``vc`` (+ ``shrinkage``, ``solver``, ``n_pca``)."""
    Xv, yv, _ = validate(X, y, None, name="ncti")
    return _components(Xv, yv, n_pca=n_pca, n_shrink=n_shrink, seed=seed)


def ncti_rank(features_by_model: Mapping[str, Any], *, n_pca: int = 64, n_shrink: int = 32, seed: int = 0,
              details: bool = False):
    """Rank a candidate set with NCTI = minmax(ncc) + minmax(seli) − minmax(vc).

    ``seed`` is accepted for a uniform ranker signature; NCTI is deterministic here.

    Returns ``{model: score}`` (in [−1, 2], higher = better) or, with ``details=True``, a dict with
    ``scores``, ``ranking``, ``components`` (raw terms per model), ``normalised`` and ``citation``.
    """
    cands = candidates(features_by_model, name="ncti")
    comps = {}
    for model, (X, y, _) in cands.items():
        try:
            comps[model] = _components(X, y, n_pca=n_pca, n_shrink=n_shrink, seed=seed)
        except DataError as e:
            raise DataError(f"ncti[{model}]: {e}") from None
    normed = {t: minmax({m: comps[m][t] for m in comps}, name=f"ncti {t}") for t in ("ncc", "seli", "vc")}
    scores = {m: normed["ncc"][m] + normed["seli"][m] - normed["vc"][m] for m in comps}
    if not details:
        return scores
    return {"scores": scores, "ranking": ranking_of(scores), "components": comps, "normalised": normed,
            "citation": CITATION}


register_set_level('ncti', ncti_rank, citation=CITATION)
