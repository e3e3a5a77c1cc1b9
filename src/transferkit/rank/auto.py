"""Auto ranker: combine several transferability metrics by rank aggregation.

No single metric wins everywhere (Agostinelli et al., "How stable are transferability metrics
evaluations?", ECCV 2022), so the auto ranker scores every candidate with several metrics and
aggregates their **rankings**, which is insensitive to the metrics' incomparable units and scales::

    for each metric j that scored n_j ≥ 2 models (finite values):
        ρ_j(m) = (rank_j(m) − 1) / (n_j − 1) ∈ [0, 1]     (average ranks for ties; 1 = best)
    auto(m) = mean_j ρ_j(m) over the metrics that scored m   ("mean_rank", normalised Borda count)

``method="median_rank"`` takes the median instead (robust to one outlying metric; it ignores the
values of ``weights``) and ``method="zscore"`` averages per-metric z-scores (uses magnitudes, less
robust). Optional ``weights`` weight the metrics in the mean. A metric that cannot score a model
(missing source probabilities, a data error) or returns NaN simply casts no vote for it; a metric that
scores fewer than two models is not used. Ties in the final score are broken by model name, so the
result is deterministic.

``method="consensus"`` learns the metric weights from the metrics' agreement alone — the spectral
meta-learner of Parisi, Strino, Nadler & Kluger, "Ranking and combining multiple predictors without
labeled data", PNAS 111(4):1253–1258, 2014. If the metrics' errors are roughly independent given the
unknown true ranking, the off-diagonal part of their covariance matrix is rank one, with a vector
proportional to each metric's agreement with the truth; so a metric that agrees with the others gets
weight and one that contradicts them gets little or none. As in the paper's simplest form, the
leading eigenvector of the whole matrix stands in for that vector; correlations of ranks are used
(untied normalised ranks all have the same variance, so this is the covariance up to a constant). It
uses **no labels** (no measured accuracy) — only the candidates' scores::

    J = the metrics that scored every model with a finite value   (the others: ``skipped``, no weight)
    C_jk = Spearman correlation of metrics j, k ∈ J over the models  (= Pearson correlation of ρ_j, ρ_k)
    v = leading eigenvector of C (``np.linalg.eigh``), sign chosen so that Σ_j v_j > 0
    w_j = max(v_j, 0) / Σ_k max(v_k, 0)       (a metric constant over the models: w_j = 0;
                                                all zero → equal weights)
    auto(m) = Σ_{j ∈ J} w_j ρ_j(m)

With fewer than 3 metrics in J the correlation matrix says nothing useful and the weights fall back to
equal (``weights_note`` says so). User ``weights`` cannot be combined with it (ConfigError). Caveat:
with few candidates (a zoo of ≈ 7 models) each Spearman correlation is estimated from 7 points and is
noisy (its standard error is about 1/√(n−1) ≈ 0.4), so the learned weights are noisy too; the rule is
fixed, not tuned. The result's ``weights`` holds the weights used, for every method.

The metric list may include the set-level rankers ``"etran"`` and ``"ncti"``: rank aggregation only
needs an ordering, so their candidate-relative scores are as usable as per-model ones.

**Not a per-model metric.** ``auto`` is a function of the whole candidate set (a model's normalised
rank moves when another model is added), so it does not fit the per-model
``f(X, y) -> float`` contract of :data:`~transferkit.rank.METRICS` and is not in it (the method
registry lists it, with ETran and NCTI, as a ``set-level`` rank method)
(``rank_features(..., ["auto"])`` stays an unknown-metric error; ``"all"`` keeps meaning every
per-model metric). Use :func:`auto_rank` on features, or :func:`aggregate_ranks` on scores already
computed by :func:`~transferkit.rank.rank_features` (no recomputation).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from ..errors import ConfigError, DataError, TransferkitError
from ._base import register_set_level

__all__ = ["auto_rank", "aggregate_ranks", "DEFAULT_METRICS", "SET_RANKERS"]

DEFAULT_METRICS = ("logme", "sfda", "nleep", "shrinkage_hscore", "leep")
SET_RANKERS = ("etran", "ncti")
METHODS = ("mean_rank", "median_rank", "zscore", "consensus")
MIN_CONSENSUS_METRICS = 3


def _check_method(method: str, weights) -> None:
    if method not in METHODS:
        raise ConfigError(f"auto: unknown method {method!r}; use {', '.join(METHODS)}")
    if method == "consensus" and weights:
        raise ConfigError("auto: method 'consensus' learns its own metric weights; do not pass weights")


def aggregate_ranks(scores_by_metric: Mapping[str, Mapping[str, float]], models: Sequence | None = None, *,
                    method: str = "mean_rank", weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Aggregate ``{metric: {model: score}}`` (higher = better) into one score per model.

    Returns ``scores`` {model: aggregate, NaN if no metric scored it}, ``ranking`` (best first; unscored
    models last), ``used`` (metrics that voted), ``skipped`` [{"metric", "reason"}], ``normalised``
    {metric: {model: normalised rank or z-score}}, ``weights`` {metric: weight} over ``used`` summing to 1
    (mean_rank / zscore: the given weights normalised — a model that some metric did not score is
    averaged over the metrics that did; median_rank: equal; consensus: the learned weights) and
    ``weights_note`` (None, or why the consensus weights are not the spectral ones).
    """
    _check_method(method, weights)
    if models is None:
        models = sorted({m for sc in scores_by_metric.values() for m in sc}, key=str)
    models = list(models)
    if not models:
        raise DataError("auto: no models to rank")
    weights = dict(weights or {})
    normalised: dict[str, dict[str, float]] = {}
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    for metric, sc in scores_by_metric.items():
        vals = {m: float(sc[m]) for m in models if m in sc and sc[m] is not None and np.isfinite(float(sc[m]))}
        if len(vals) < 2:
            skipped.append({"metric": metric, "reason": f"scored {len(vals)} model(s) with a finite value; need at least 2"})
            continue
        if weights.get(metric, 1.0) <= 0:
            skipped.append({"metric": metric, "reason": "weight 0"})
            continue
        names = list(vals)
        v = np.array([vals[m] for m in names])
        if method == "zscore":
            sd = v.std()
            z = (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)
        else:
            z = (rankdata(v, method="average") - 1.0) / (len(v) - 1.0)
        normalised[metric] = {m: float(x) for m, x in zip(names, z)}
        used.append(metric)
    note = None
    if method == "consensus":
        for metric in [j for j in used if len(normalised[j]) < len(models)]:
            skipped.append({"metric": metric, "reason": f"scored {len(normalised[metric])} of {len(models)} models; "
                                                        "consensus weights need every model scored"})
            used.remove(metric)
            del normalised[metric]
        cw, note = consensus_weights(np.array([[normalised[j][m] for m in models] for j in used]), used)
        used_w = dict(zip(used, cw))
    elif method == "median_rank":
        used_w = {j: 1.0 / len(used) for j in used}
    else:
        total = sum(float(weights.get(j, 1.0)) for j in used)
        used_w = {j: float(weights.get(j, 1.0)) / total for j in used}
    scores: dict[str, float] = {}
    for m in models:
        votes = [(normalised[j][m], float(weights.get(j, 1.0))) for j in used if m in normalised[j]]
        if not votes:
            scores[m] = float("nan")
        elif method == "median_rank":
            scores[m] = float(np.median([x for x, _ in votes]))
        elif method == "consensus":  # every used metric scored every model
            scores[m] = float(sum(used_w[j] * normalised[j][m] for j in used))
        else:
            x, w = np.array(votes).T
            scores[m] = float(np.sum(x * w) / np.sum(w))
    ranking = sorted(models, key=lambda m: (np.isnan(scores[m]), -scores[m] if not np.isnan(scores[m]) else 0.0, str(m)))
    return {"scores": scores, "ranking": ranking, "used": used, "skipped": skipped, "normalised": normalised,
            "method": method, "weights": used_w, "weights_note": note}


def consensus_weights(rho: np.ndarray, names: Sequence[str] | None = None) -> tuple[list[float], str | None]:
    """Spectral meta-learner weights (Parisi et al., PNAS 2014) of the metrics in the rows of ``rho``.

    ``rho`` is (metrics × models) normalised ranks, ``names`` the metrics' names (for the note). Returns the
    weights (summing to 1; an empty list for no metric) and a note, or None, saying where they are not
    the clipped leading eigenvector of the metrics' Spearman correlation matrix.
    """
    k = rho.shape[0]
    if k == 0:
        return [], "no metric scored every model: no consensus"
    if k < MIN_CONSENSUS_METRICS:
        return [1.0 / k] * k, (f"only {k} metric(s) scored every model (need {MIN_CONSENSUS_METRICS} for "
                               "consensus weights): equal weights")
    w = np.zeros(k)
    live = rho.std(axis=1) > 0  # a metric constant over the models has no correlation: weight 0
    names = list(names) if names is not None else [f"row {i}" for i in range(k)]
    flat = [n for n, ok in zip(names, live) if not ok]
    notes = [f"constant over the models, weight 0: {', '.join(flat)}"] if flat else []
    if live.any():
        c = np.corrcoef(rho[live]) if live.sum() > 1 else np.ones((1, 1))
        v = np.linalg.eigh(c)[1][:, -1]
        v = -v if v.sum() < 0 else v
        w[live] = np.clip(v, 0.0, None)
    if w.sum() <= 0:
        notes.append("every consensus weight was 0: equal weights")
        w = np.ones(k)
    return [float(x) for x in w / w.sum()], "; ".join(notes) or None


def auto_rank(features_by_model: Mapping[str, Any], metrics: Sequence[str] | str = DEFAULT_METRICS, *, seed: int = 0,
              options: Mapping[str, dict] | None = None, method: str = "mean_rank",
              weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Score the candidates with every metric in ``metrics`` and aggregate the rankings.

    Parameters
    ----------
    features_by_model : {model: Features} on the same target samples.
    metrics : registry metric names and/or the set-level rankers "etran", "ncti" (list or
        comma-separated string; "all" expands to every registry metric).
    seed, options : passed to the metrics as in :func:`~transferkit.rank.rank_features`.
    method : "mean_rank" (default), "median_rank", "zscore" or "consensus" (weights learned from the
        metrics' agreement, see the module docstring).
    weights : optional {metric: weight} for the aggregation (not with "consensus").

    Returns
    -------
    dict with ``scores`` {model: aggregate in [0, 1] for rank methods}, ``ranking`` (best first),
    ``used`` (metrics that voted), ``skipped`` (metrics not used, and (model, metric) pairs a metric
    could not score, with reasons), ``per_metric`` {metric: {model: raw score}}, ``normalised``,
    ``weights`` {metric: weight used}, ``weights_note`` and ``time_s`` {metric: seconds}.
    """
    import time

    from . import rank_features, resolve_metrics

    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = list(metrics)
    if not metrics:
        raise ConfigError("auto: no metric given")
    set_level = [m for m in metrics if m in SET_RANKERS]
    per_model = [m for m in metrics if m not in SET_RANKERS]
    if "auto" in per_model:
        raise ConfigError("auto: 'auto' cannot be one of its own metrics")
    _check_method(method, weights)  # before any metric is computed
    per_model = resolve_metrics(per_model) if per_model else []
    options = dict(options or {})
    per_metric: dict[str, dict[str, float]] = {}
    skipped: list[dict[str, str]] = []
    time_s: dict[str, float] = {}
    if per_model:
        res = rank_features(features_by_model, per_model, seed=seed, options=options)
        for name in per_model:
            per_metric[name] = res["scores"][name]
            time_s[name] = float(sum(res["time_s"][name].values()))
        skipped += [{"metric": s["metric"], "model": s["model"], "reason": s["reason"]} for s in res["skipped"]]
    for name in set_level:
        from .etran import etran_rank
        from .ncti import ncti_rank

        fn = {"etran": etran_rank, "ncti": ncti_rank}[name]
        t0 = time.perf_counter()
        try:
            per_metric[name] = fn(features_by_model, seed=seed, **options.get(name, {}))
        except TransferkitError as e:
            skipped.append({"metric": name, "reason": str(e)})
            continue
        finally:
            time_s[name] = time.perf_counter() - t0
    # order the aggregation by the requested metric order
    ordered = {m: per_metric[m] for m in metrics if m in per_metric}
    agg = aggregate_ranks(ordered, list(features_by_model), method=method, weights=weights)
    return {"scores": agg["scores"], "ranking": agg["ranking"], "used": agg["used"], "skipped": skipped + agg["skipped"],
            "per_metric": per_metric, "normalised": agg["normalised"], "method": method, "weights": agg["weights"],
            "weights_note": agg["weights_note"], "time_s": time_s}


register_set_level("auto", auto_rank, citation="rank aggregation (normalised Borda count); consensus weights: Parisi, "
                   "Strino, Nadler & Kluger, Ranking and combining multiple predictors without labeled data, PNAS 2014")
