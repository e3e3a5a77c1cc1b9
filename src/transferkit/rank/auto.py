"""Auto ranker: combine several transferability metrics by rank aggregation.

No single metric wins everywhere (Agostinelli et al., "How stable are transferability metrics
evaluations?", ECCV 2022), so the auto ranker scores every candidate with several metrics and
aggregates their **rankings**, which is insensitive to the metrics' incomparable units and scales::

    for each metric j that scored n_j ≥ 2 models (finite values):
        ρ_j(m) = (rank_j(m) − 1) / (n_j − 1) ∈ [0, 1]     (average ranks for ties; 1 = best)
    auto(m) = mean_j ρ_j(m) over the metrics that scored m   ("mean_rank", normalised Borda count)

``method="median_rank"`` takes the median instead (robust to one outlying metric) and
``method="zscore"`` averages per-metric z-scores (uses magnitudes, less robust). Optional ``weights``
weight the metrics in the mean. A metric that cannot score a model (missing source probabilities, a
data error) or returns NaN simply casts no vote for it; a metric that scores fewer than two models is
not used. Ties in the final score are broken by model name, so the result is deterministic.

The metric list may include the set-level rankers ``"etran"`` and ``"ncti"``: rank aggregation only
needs an ordering, so their candidate-relative scores are as usable as per-model ones.

**Not a registry metric.** ``auto`` is a function of the whole candidate set (a model's normalised
rank moves when another model is added), so it does not fit the per-model
``f(X, y) -> float`` contract of :data:`~transferkit.rank.METRICS` and is not registered there
(``rank_features(..., ["auto"])`` stays an unknown-metric error; ``"all"`` keeps meaning every
per-model metric). Use :func:`auto_rank` on features, or :func:`aggregate_ranks` on scores already
computed by :func:`~transferkit.rank.rank_features` (no recomputation).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from ..errors import ConfigError, DataError, TransferkitError

__all__ = ["auto_rank", "aggregate_ranks", "DEFAULT_METRICS", "SET_RANKERS"]

DEFAULT_METRICS = ("logme", "sfda", "nleep", "shrinkage_hscore", "leep")
SET_RANKERS = ("etran", "ncti")
METHODS = ("mean_rank", "median_rank", "zscore")


def aggregate_ranks(scores_by_metric: Mapping[str, Mapping[str, float]], models: Sequence | None = None, *,
                    method: str = "mean_rank", weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Aggregate ``{metric: {model: score}}`` (higher = better) into one score per model.

    Returns ``scores`` {model: aggregate, NaN if no metric scored it}, ``ranking`` (best first; unscored
    models last), ``used`` (metrics that voted), ``skipped`` [{"metric", "reason"}] and ``normalised``
    {metric: {model: normalised rank or z-score}}.
    """
    if method not in METHODS:
        raise ConfigError(f"auto: unknown method {method!r}; use {', '.join(METHODS)}")
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
    scores: dict[str, float] = {}
    for m in models:
        votes = [(normalised[j][m], float(weights.get(j, 1.0))) for j in used if m in normalised[j]]
        if not votes:
            scores[m] = float("nan")
        elif method == "median_rank":
            scores[m] = float(np.median([x for x, _ in votes]))
        else:
            x, w = np.array(votes).T
            scores[m] = float(np.sum(x * w) / np.sum(w))
    ranking = sorted(models, key=lambda m: (np.isnan(scores[m]), -scores[m] if not np.isnan(scores[m]) else 0.0, str(m)))
    return {"scores": scores, "ranking": ranking, "used": used, "skipped": skipped, "normalised": normalised,
            "method": method}


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
    method : "mean_rank" (default), "median_rank" or "zscore".
    weights : optional {metric: weight} for the aggregation.

    Returns
    -------
    dict with ``scores`` {model: aggregate in [0, 1] for rank methods}, ``ranking`` (best first),
    ``used`` (metrics that voted), ``skipped`` (metrics not used, and (model, metric) pairs a metric
    could not score, with reasons), ``per_metric`` {metric: {model: raw score}}, ``normalised`` and
    ``time_s`` {metric: seconds}.
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
            "per_metric": per_metric, "normalised": agg["normalised"], "method": method, "time_s": time_s}
