"""Source-model ensemble selection: OSBORN-style submodular objective, MS-LEEP and E-LEEP baselines.

Seed paper: Vimal K B, S. Bachu, T. Garg, N. L. Narasimhan, R. Konuru, V. N. Balasubramanian,
"Building a Winning Team: Selecting Source Model Ensembles using a Submodular Transferability
Estimation Approach" (OSBORN), ICCV 2023. No public code release was identified; the objective below
follows the paper's ingredients (image-domain difference and task difference via optimal transport,
and a model-cohesiveness term over the members) in a form whose submodularity we can state and test.
Weights and normalisations are our choices (the paper's are unverified).
Baselines: A. Agostinelli, J. Uijlings, T. Mensink, V. Ferrari, "Transferability Metrics for Selecting
Source Model Ensembles", CVPR 2022 (MS-LEEP, E-LEEP; our reading of their definitions, see below).

OSBORN-style objective (``method="osborn"``)
--------------------------------------------
For a subset S of the candidate models::

    F(S) = Σ_{m∈S} a_m  −  λ · Σ_{{m,m'} ⊆ S} r(m, m')          (F(∅) = 0)

* **Per-model utility** a_m = f₀ + (1 − f₀)·(weighted mean of the available terms) ∈ [f₀, 1], with
  ``utility_floor`` f₀ = 0.5: min-max puts the worst candidate's terms at 0, and without a floor it would
  be worth nothing merely for being last (and the objective would rarely be monotone). Terms:
  - transferability t̃_m: a registry metric (``transferability="logme"``) min-max normalised over
    the candidates (or a dict of precomputed scores);
  - domain term 1 − d̃_m: d_m = W₂ distance (exact OT, POT ``ot.emd2``) between the model's features
    of **source** samples and of the target samples, both divided by the pooled RMS spread so models
    with different feature scales are comparable; min-max normalised over the candidates;
  - task term 1 − h_m / log C: h_m = H(Y_target | Y_source) under the OT coupling π of the domain term
    (OTCE-style: P(a, b) = Σ_ij π_ij [y^s_i = a][y^t_j = b]); C = number of target classes.
* **Cohesion / redundancy** r(m, m') ∈ [0, 1]: max(0, Pearson correlation) of the two members'
  per-sample error vectors e_m,i = 1 − p_m(y_i | x_i) on the target, where p_m is the model's empirical
  target predictor (LEEP's Σ_z P̂(y|z) θ(x)_z when the model has source-head probabilities, else the
  shrinkage-LDA posterior of its features). Members that fail on the same samples are redundant;
  λ ≥ 0 (``cohesion_weight``, default 0.5) penalises that, so the objective rewards a team of
  individually good members whose mistakes do not coincide (errors that are uncorrelated or
  anti-correlated cost nothing). Rewarding raw agreement instead (a positive pairwise term) would be
  supermodular and void the guarantee below.

**Guarantee and its conditions.** With r ≥ 0 and λ ≥ 0, F is submodular: the marginal gain
Δ(m | S) = a_m − λ Σ_{m'∈S} r(m, m') can only shrink as S grows (diminishing returns). Greedy
selection of k members (add the largest gain each step) satisfies F(G) ≥ (1 − 1/e)·max_{|S|≤k} F(S)
**if F is also monotone** on the sets the proof touches (|S| ≤ 2k) — Nemhauser, Wolsey & Fisher
(1978). For this pairwise form that holds iff a_m − λ·(sum of the 2k − 1 largest r(m, ·)) ≥ 0 for every
m; the result reports ``submodular`` and ``monotone``. When it fails (a weak model with redundant
errors), F'(S) = F(S) + c·|S| with c = ``offset`` (the largest deficit) is monotone submodular and has
the same maximisers among sets of size k and the same greedy choices, so greedy still certifies
F(G) ≥ (1 − 1/e)·F(OPT_k) − c·k/e (OPT_k: the best set of size exactly k). ``guarantee`` is "1-1/e" and
``bound = {"factor": 1 − 1/e, "additive": c·k/e}`` (additive = 0 when F itself is monotone).

**Without source data** (the common case for hub models): the domain term needs the source-domain
features of every model (``source_features={model: Features | array}``); without them it is dropped.
The task term then falls back to the model's own source head: with target-sample source probabilities
θ(x) the OT coupling is replaced by the soft assignment of target samples to source classes,
P(z, y) = (1/N) Σ_i θ(x_i)_z [y_i = y], and h_m = H(Y | Z) (a soft NCE). If neither source labels nor
probabilities are available for every model, the task term is dropped. Dropped terms are listed in
``notes``; the utility is then the mean of the remaining terms, so it never depends on a term that
only some models can provide.

Baselines (set functions over S; maximised greedily or exhaustively — they are not submodular in
general, so ``guarantee`` is None):

* **MS-LEEP(S)** = (1/N) Σ_i log( (1/|S|) Σ_{m∈S} EEP_m(y_i | x_i) ), EEP_m(y|x) = Σ_z P̂_m(y|z) θ_m(x)_z,
  i.e. LEEP of the averaged members' empirical predictors. MS-LEEP({m}) = LEEP(m).
* **E-LEEP(S)**: LEEP of the ensemble viewed as one source model whose label space is the product of
  the members' label spaces, θ_S(x)_{(z_1..z_k)} = Π_m θ_m(x)_{z_m} (members' heads independent given
  x). The product space is exponential, so each θ_m(x) is truncated to its ``top_r = 3`` largest
  entries (renormalised) per sample; exact when top_r ≥ every member's number of source classes.
  E-LEEP({m}) = LEEP(m) in that case.
Both need source-head probabilities for every candidate.

:func:`ensemble_accuracy` is the oracle used to judge selections: accuracy of the averaged
probabilities of the members' (fine-tuned) predictions.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ._base import one_hot
from .etran import candidates, minmax
from .leep import empirical_predictor

__all__ = [
    "select_ensemble",
    "PairwiseObjective",
    "osborn_objective",
    "ms_leep",
    "e_leep",
    "greedy_maximize",
    "exhaustive_maximize",
    "ensemble_accuracy",
]

CITATION_OSBORN = ("K B et al., Building a Winning Team: Selecting Source Model Ensembles using a Submodular "
                   "Transferability Estimation Approach, ICCV 2023")
CITATION_MSLEEP = "Agostinelli et al., Transferability Metrics for Selecting Source Model Ensembles, CVPR 2022"
_TINY = np.finfo(np.float64).tiny


# ----------------------------------------------------------------------------- set functions
@dataclass
class PairwiseObjective:
    """F(S) = Σ_{m∈S} a[m] − lam · Σ_{pairs in S} R[m, m'] over models ``names``.

    ``a`` (n,), ``R`` (n, n) symmetric with zero diagonal, entries ≥ 0 for the submodularity claim.
    """

    names: list
    a: np.ndarray
    R: np.ndarray
    lam: float = 0.5
    terms: dict = field(default_factory=dict)

    def __post_init__(self):
        self.a = np.asarray(self.a, dtype=np.float64)
        self.R = np.asarray(self.R, dtype=np.float64)
        n = len(self.names)
        if self.a.shape != (n,) or self.R.shape != (n, n):
            raise DataError(f"objective: a must be ({n},) and R ({n}, {n})")
        self.R = 0.5 * (self.R + self.R.T)
        np.fill_diagonal(self.R, 0.0)
        self._idx = {m: i for i, m in enumerate(self.names)}

    def _ids(self, S) -> list[int]:
        return [self._idx[m] for m in S]

    def value(self, S: Sequence) -> float:
        ids = self._ids(S)
        if not ids:
            return 0.0
        sub = self.R[np.ix_(ids, ids)]
        return float(self.a[ids].sum() - self.lam * 0.5 * sub.sum())

    def gain(self, m, S: Sequence) -> float:
        i = self._idx[m]
        return float(self.a[i] - self.lam * self.R[i, self._ids(S)].sum())

    @property
    def submodular(self) -> bool:
        return bool(self.lam >= 0 and (self.R >= -1e-12).all())

    def _worst_redundancy(self, size: int) -> np.ndarray:
        n = len(self.names)
        j = max(0, min(size - 1, n - 1))
        return np.sort(self.R, axis=1)[:, ::-1][:, :j].sum(1) if j else np.zeros(n)

    def monotone_up_to(self, size: int) -> bool:
        """Δ(m | S) ≥ 0 for every m and every S ∌ m with |S| ≤ size − 1 (exact for this pairwise form)."""
        if not self.submodular:
            return False
        return bool((self.a - self.lam * self._worst_redundancy(size) >= -1e-12).all())

    def monotone_offset(self, size: int) -> float:
        """Smallest c ≥ 0 making F(S) + c·|S| monotone on sets of size ≤ ``size`` (0 if F already is)."""
        return float(max(0.0, np.max(self.lam * self._worst_redundancy(size) - self.a)))


class _SetFunction:
    """A set function given by a callable value(S); gains by differences."""

    def __init__(self, names, fn: Callable[[tuple], float]):
        self.names = list(names)
        self._fn = fn
        self._cache: dict[frozenset, float] = {}

    def value(self, S) -> float:
        key = frozenset(S)
        if not key:
            return 0.0
        if key not in self._cache:
            self._cache[key] = float(self._fn(tuple(sorted(S, key=self.names.index))))
        return self._cache[key]

    def gain(self, m, S) -> float:
        return self.value(list(S) + [m]) - self.value(S)


def greedy_maximize(obj, k: int) -> tuple[list, list[float]]:
    """Add the member with the largest marginal gain k times (ties: candidate order). Returns (S, gains)."""
    S: list = []
    gains: list[float] = []
    for _ in range(min(k, len(obj.names))):
        best, best_g = None, -math.inf
        for m in obj.names:
            if m in S:
                continue
            g = obj.gain(m, S)
            if g > best_g + 1e-15:
                best, best_g = m, g
        S.append(best)
        gains.append(float(best_g))
    return S, gains


def exhaustive_maximize(obj, k: int, *, exact_size: bool = True) -> tuple[list, float]:
    """Brute force over all subsets of size k (or ≤ k with ``exact_size=False``). Returns (S, F(S))."""
    best, best_v = None, -math.inf
    sizes = [k] if exact_size else range(1, k + 1)
    for s in sizes:
        for S in itertools.combinations(obj.names, s):
            v = obj.value(list(S))
            if v > best_v + 1e-15:
                best, best_v = list(S), v
    return best, float(best_v)


# ----------------------------------------------------------------------------- LEEP-family baselines
def _eep(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, C) empirical predictor Σ_z P̂(y|z) θ(x)_z of one model."""
    return probs @ empirical_predictor(probs, y).T


def ms_leep(probs_list: Sequence[np.ndarray], y: np.ndarray) -> float:
    """MS-LEEP of an ensemble: mean log of the averaged members' empirical predictions of y_i."""
    y = np.asarray(y)
    avg = np.mean([_eep(np.asarray(p, np.float64), y)[np.arange(len(y)), y] for p in probs_list], axis=0)
    return float(np.mean(np.log(np.maximum(avg, _TINY))))


def _topr(p: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    r = min(r, p.shape[1])
    idx = np.argsort(-p, axis=1, kind="stable")[:, :r]
    val = np.take_along_axis(p, idx, axis=1)
    val = val / np.maximum(val.sum(1, keepdims=True), _TINY)
    return idx, val


def e_leep(probs_list: Sequence[np.ndarray], y: np.ndarray, *, top_r: int = 3) -> float:
    """E-LEEP: LEEP over the product of the members' source label spaces (top-r truncated per member)."""
    y = np.asarray(y)
    N = len(y)
    C = int(y.max()) + 1
    tops = [_topr(np.asarray(p, np.float64), top_r) for p in probs_list]
    # per sample: all combinations of the members' top-r labels with product weights
    combos = list(itertools.product(*[range(t[0].shape[1]) for t in tops]))
    keys = np.stack([np.stack([tops[m][0][:, c[m]] for m in range(len(tops))], 1) for c in combos], 1)  # (N, K, k)
    w = np.stack([np.prod([tops[m][1][:, c[m]] for m in range(len(tops))], axis=0) for c in combos], 1)  # (N, K)
    flat = keys.reshape(-1, keys.shape[-1])
    uniq, inv = np.unique(flat, axis=0, return_inverse=True)
    inv = inv.reshape(N, -1)
    joint = np.zeros((len(uniq), C))
    np.add.at(joint, (inv, np.repeat(y[:, None], inv.shape[1], 1)), w / N)
    pz = joint.sum(1, keepdims=True)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)  # P̂(y | z-tuple)
    eep = (w * cond[inv, y[:, None]]).sum(1)
    return float(np.mean(np.log(np.maximum(eep, _TINY))))


# ----------------------------------------------------------------------------- OSBORN-style terms
def _source_arrays(src) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(src, tuple):
        X, ys = (tuple(src) + (None,))[:2]
    elif hasattr(src, "X"):
        X, ys = src.X, getattr(src, "y", None)
    else:
        X, ys = src, None
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2 or not np.isfinite(X).all():
        raise DataError(f"ensemble: source features must be a finite (M, D) array with M >= 2, got shape {X.shape}")
    if ys is not None:
        ys = np.unique(np.asarray(ys), return_inverse=True)[1].reshape(-1)
        if len(ys) != len(X):
            raise DataError("ensemble: source labels must have one entry per source sample")
    return X, ys


def _ot_terms(Xs: np.ndarray, ys, Xt: np.ndarray, yt: np.ndarray, *, max_samples: int, rng) -> tuple[float, float | None]:
    """(W₂ domain distance, H(Y_t | Y_s) under the coupling or None) in the model's feature space."""
    import ot

    if Xs.shape[1] != Xt.shape[1]:
        raise DataError(f"ensemble: source features have {Xs.shape[1]} columns but target features {Xt.shape[1]}")
    if len(Xs) > max_samples:
        i = np.sort(rng.choice(len(Xs), max_samples, replace=False))
        Xs, ys = Xs[i], (None if ys is None else ys[i])
    if len(Xt) > max_samples:
        j = np.sort(rng.choice(len(Xt), max_samples, replace=False))
        Xt, yt = Xt[j], yt[j]
    pooled = np.vstack([Xs, Xt])
    scale = np.sqrt(np.mean(np.sum((pooled - pooled.mean(0)) ** 2, 1)))
    scale = scale if scale > 0 else 1.0
    M = ot.dist(Xs / scale, Xt / scale, metric="sqeuclidean")
    a = np.full(len(Xs), 1.0 / len(Xs))
    b = np.full(len(Xt), 1.0 / len(Xt))
    pi = ot.emd(a, b, M, numItermax=1_000_000)
    w2 = float(np.sqrt(max(float(np.sum(pi * M)), 0.0)))
    if ys is None:
        return w2, None
    joint = one_hot(ys).T @ pi @ one_hot(yt, int(yt.max()) + 1)
    return w2, _cond_entropy(joint)


def _cond_entropy(joint: np.ndarray) -> float:
    """H(Y | Z) for a joint table P(z, y) (rows z, columns y)."""
    joint = joint / joint.sum()
    pz = joint.sum(1, keepdims=True)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)
    mask = joint > 0
    return float(-np.sum(joint[mask] * np.log(cond[mask])))


def _predictor(X, y, probs) -> np.ndarray:
    if probs is not None:
        return _eep(probs, y)
    from .sfda import fda_proba

    return fda_proba(X, y)[0]


def _error_similarity(P: Mapping[str, np.ndarray], y: np.ndarray, names: list) -> np.ndarray:
    """max(0, Pearson correlation) of the members' per-sample error vectors e_m,i = 1 − p_m(y_i | x_i)."""
    E = np.stack([1.0 - P[m][np.arange(len(y)), y] for m in names])  # (n, N)
    E = E - E.mean(1, keepdims=True)
    nrm = np.linalg.norm(E, axis=1)
    den = np.outer(nrm, nrm)
    R = np.divide(E @ E.T, den, out=np.zeros((len(names), len(names))), where=den > 1e-12)
    np.fill_diagonal(R, 0.0)
    return np.clip(R, 0.0, 1.0)


def osborn_objective(features_by_model: Mapping[str, Any], *, source_features: Mapping[str, Any] | None = None,
                     transferability: str | Mapping[str, float] | None = "logme", cohesion_weight: float = 0.5,
                     weights: Mapping[str, float] | None = None, ot_samples: int = 500, seed: int = 0,
                     predictor: str = "auto", utility_floor: float = 0.5) -> PairwiseObjective:
    """Build the OSBORN-style objective F(S) (see the module docstring) over the candidate models.

    ``weights`` ({"transferability", "domain", "task"}, default 1 each) weight the utility terms before
    averaging. ``predictor`` = "auto" (source head if present, else LDA), "leep" or "lda" picks the
    per-model target predictor used by the cohesion term. The returned object carries ``terms`` with
    the per-model raw and normalised values and ``terms["notes"]``.
    """
    cands = candidates(features_by_model, name="ensemble")
    names = list(cands)
    y = next(iter(cands.values()))[1]
    C = int(y.max()) + 1
    notes: list[str] = []
    w = {"transferability": 1.0, "domain": 1.0, "task": 1.0}
    if weights:
        unknown = set(weights) - set(w)
        if unknown:
            raise ConfigError(f"ensemble: unknown weight(s) {', '.join(sorted(unknown))}")
        w.update(weights)
    rng = np.random.default_rng(seed)
    utility: dict[str, dict[str, float]] = {}
    raw: dict[str, dict[str, float]] = {m: {} for m in names}

    # per-model transferability
    if transferability is not None and w["transferability"]:
        if isinstance(transferability, str):
            from . import rank_features
            from ..features import Features

            feats = {m: Features(X.astype(np.float32), y, None if p is None else p.astype(np.float32)) for m, (X, _, p) in cands.items()}
            res = rank_features(feats, [transferability], seed=seed)
            t = res["scores"][transferability]
            if set(t) != set(names) or not all(np.isfinite(v) for v in t.values()):
                notes.append(f"transferability term dropped: {transferability} could not score every model")
                t = None
        else:
            t = {m: float(transferability[m]) for m in names} if set(names) <= set(transferability) else None
            if t is None:
                raise DataError("ensemble: precomputed transferability scores must cover every candidate")
        if t is not None:
            utility["transferability"] = minmax(t, name="ensemble transferability")
            for m in names:
                raw[m]["transferability"] = float(t[m])

    # domain and task differences
    have_src = source_features is not None and all(m in source_features for m in names)
    if source_features is not None and not have_src:
        notes.append("source features given for only some models: domain/task OT terms use none of them")
    task_h: dict[str, float] | None = None
    if have_src and (w["domain"] or w["task"]):
        dom, task_h = {}, {}
        for m in names:
            Xs, ys = _source_arrays(source_features[m])
            d, h = _ot_terms(Xs, ys, cands[m][0], y, max_samples=ot_samples, rng=rng)
            dom[m] = d
            raw[m]["domain_w2"] = d
            if h is None:
                task_h = None
            elif task_h is not None:
                task_h[m] = h
        if w["domain"]:
            utility["domain"] = {m: 1.0 - v for m, v in minmax(dom, name="ensemble domain").items()}
        if task_h is None:
            notes.append("task term: source features carry no source labels")
    else:
        notes.append("domain term dropped: no source-domain features (pass source_features={model: features of source samples})")
    if w["task"]:
        if task_h is None and all(cands[m][2] is not None for m in names):
            task_h = {m: _cond_entropy(cands[m][2].T @ one_hot(y, C)) for m in names}
            notes.append("task term: H(Y|Z) from the source head's probabilities on the target (no source labels)")
        if task_h is None:
            notes.append("task term dropped: needs labelled source features or source-head probabilities for every model")
        else:
            utility["task"] = {m: float(np.clip(1.0 - task_h[m] / np.log(C), 0.0, 1.0)) for m in names}
            for m in names:
                raw[m]["task_entropy"] = float(task_h[m])
    if not utility:
        raise DataError("ensemble: no utility term available (transferability disabled and no source information)")
    wsum = sum(w[t] for t in utility)
    if not 0.0 <= utility_floor < 1.0:
        raise ConfigError(f"ensemble: utility_floor must be in [0, 1), got {utility_floor}")
    a = np.array([utility_floor + (1.0 - utility_floor) * sum(w[t] * utility[t][m] for t in utility) / wsum for m in names])

    # cohesion / redundancy
    if predictor not in ("auto", "leep", "lda"):
        raise ConfigError(f"ensemble: predictor must be auto, leep or lda, got {predictor!r}")
    if predictor == "leep" and any(cands[m][2] is None for m in names):
        raise DataError("ensemble: predictor='leep' needs source-head probabilities for every model")
    P = {m: _predictor(X, y, None if predictor == "lda" else p) for m, (X, _, p) in cands.items()}
    R = _error_similarity(P, y, names)
    terms = {"utility": {m: float(a[i]) for i, m in enumerate(names)}, "normalised": utility, "raw": raw,
             "redundancy": {m: {m2: float(R[i, j]) for j, m2 in enumerate(names) if j != i} for i, m in enumerate(names)},
             "notes": notes}
    return PairwiseObjective(names, a, R, float(cohesion_weight), terms)


# ----------------------------------------------------------------------------- public API
def select_ensemble(features_by_model: Mapping[str, Any], k: int, method: str = "osborn", *,
                    source_features: Mapping[str, Any] | None = None, search: str = "greedy", seed: int = 0,
                    **opts) -> dict[str, Any]:
    """Select k source models for an ensemble on the target.

    Parameters
    ----------
    features_by_model : {model: Features | (X, y[, probs])} on the same target samples.
    k : ensemble size (capped at the number of candidates).
    method : "osborn" (submodular objective), "ms-leep" or "e-leep" (need source-head probabilities).
    source_features : {model: Features | (X_source, y_source) | X_source} — each model's features of
        samples from its own source domain (osborn only; see the module docstring for the fallback).
    search : "greedy" (default) or "exhaustive" (all C(n, k) subsets; small n only).
    seed : seeds the metric, the OT subsampling.
    opts : osborn: ``transferability``, ``cohesion_weight``, ``weights``, ``ot_samples``, ``predictor``,
        ``utility_floor``;
        e-leep: ``top_r``.

    Returns
    -------
    dict with ``selected`` (in pick order), ``value`` F(selected), ``gains`` (marginal gain of each
    pick; for exhaustive search the gains along the selected order), ``scores`` {model: F({model})},
    ``method``, ``search``, ``submodular``, ``monotone``, ``guarantee`` ("1-1/e" or None), ``bound``
    ({"factor", "additive"}: F(selected) >= factor*F(OPT_k) - additive, osborn greedy only), ``terms``
    (osborn), ``notes`` and ``citation``.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"ensemble: k must be a positive integer, got {k!r}")
    method = method.lower().replace("_", "-")
    if search not in ("greedy", "exhaustive"):
        raise ConfigError(f"ensemble: search must be greedy or exhaustive, got {search!r}")
    notes: list[str] = []
    if method == "osborn":
        obj = osborn_objective(features_by_model, source_features=source_features, seed=seed, **opts)
        notes += obj.terms["notes"]
        k = min(int(k), len(obj.names))
        submodular = obj.submodular
        monotone = obj.monotone_up_to(2 * k)
        offset = obj.monotone_offset(2 * k) if submodular else None
        citation = CITATION_OSBORN
        terms = obj.terms
    elif method in ("ms-leep", "e-leep"):
        if source_features is not None:
            notes.append(f"{method}: source_features are not used")
        cands = candidates(features_by_model, name=method, need_probs=True)
        y = next(iter(cands.values()))[1]
        probs = {m: c[2] for m, c in cands.items()}
        if method == "ms-leep":
            if opts:
                raise ConfigError(f"ms-leep takes no options, got {', '.join(opts)}")
            obj = _SetFunction(cands, lambda S: ms_leep([probs[m] for m in S], y))
        else:
            top_r = int(opts.pop("top_r", 3))
            if opts:
                raise ConfigError(f"e-leep: unknown option(s) {', '.join(opts)}")
            obj = _SetFunction(cands, lambda S: e_leep([probs[m] for m in S], y, top_r=top_r))
        k = min(int(k), len(obj.names))
        submodular = monotone = offset = None
        citation = CITATION_MSLEEP
        terms = None
    else:
        raise ConfigError(f"ensemble: unknown method {method!r}; use osborn, ms-leep or e-leep")

    if search == "greedy":
        selected, gains = greedy_maximize(obj, k)
    else:
        selected, _ = exhaustive_maximize(obj, k)
        gains = [obj.gain(m, selected[:i]) for i, m in enumerate(selected)]
    guarantee = "1-1/e" if (search == "greedy" and submodular) else None
    bound = None
    if guarantee:
        bound = {"factor": 1.0 - 1.0 / math.e, "additive": float(offset) * k / math.e}
        if not monotone:
            notes.append(f"objective not monotone on sets of size <= 2k; the (1-1/e) bound holds for F + {offset:.4g}*|S|, "
                         f"i.e. F(greedy) >= (1-1/e)*F(OPT) - {bound['additive']:.4g}")
    return {
        "selected": selected,
        "value": float(obj.value(selected)),
        "gains": [float(g) for g in gains],
        "scores": {m: float(obj.value([m])) for m in obj.names},
        "method": method,
        "search": search,
        "submodular": submodular,
        "monotone": monotone,
        "guarantee": guarantee,
        "bound": bound,
        "terms": terms,
        "notes": notes,
        "citation": citation,
    }


def ensemble_accuracy(probs_by_model: Mapping[str, np.ndarray], y, members: Sequence) -> float:
    """Accuracy of the averaged class probabilities of ``members`` (the oracle for ensemble selection)."""
    if not members:
        raise DataError("ensemble_accuracy: no members given")
    y = np.asarray(y)
    avg = np.mean([np.asarray(probs_by_model[m], dtype=np.float64) for m in members], axis=0)
    if avg.ndim != 2 or len(avg) != len(y):
        raise DataError(f"ensemble_accuracy: probabilities must be (N, C) with N={len(y)}")
    return float(np.mean(avg.argmax(1) == y))
