"""Transferability metrics: score how well a frozen model's features will transfer to a target task.

Every metric is a function ``f(X, y, *, probs=None, seed=0, **opts) -> float`` (numpy or torch
inputs, float64 inside, higher = better transfer) registered in :data:`METRICS` with its name,
citation and the inputs it needs (``"features"`` and/or ``"probs"``, the source head's softmax).

>>> from transferkit.rank import METRICS, score, rank_features, logme
>>> sorted(METRICS)  # doctest: +SKIP
['gbc', 'hscore', 'leep', 'linear_probe', 'logme', 'nce', 'nleep', 'parc', 'ped', 'sfda',
 'shrinkage_hscore', 'tmi', 'transrate']
>>> logme(X, y)                         # doctest: +SKIP
>>> score(features, "leep")             # doctest: +SKIP
>>> rank_features({"resnet": f1, "vit": f2}, ["logme", "leep"])   # doctest: +SKIP

Set-level rankers (ETran, NCTI, PARC+plasticity, ensembles) are not per-model metrics and are not
in this registry. :mod:`transferkit.rank.evaluate` judges scores against measured accuracies.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, TransferkitError
from ._base import METRICS, Metric, register, validate
from ._shared import shared_pass
from .gbc import gbc
from .hscore import hscore, shrinkage_hscore
from .leep import leep
from .linear_probe import linear_probe
from .logme import LogMEFit, logme, logme_fit
from .nce import nce, nce_from_labels
from .nleep import nleep
from .parc import parc
from .sfda import sfda
from .tmi import tmi
from .transrate import transrate
from .ped import ped  # last: wraps the others
# set-level rankers and selection (not registry metrics: their values depend on the candidate set)
from .etran import etran_components, etran_rank
from .ncti import ncti_components, ncti_rank
from .ensemble import ensemble_accuracy, select_ensemble
from .auto import aggregate_ranks, auto_rank

__all__ = [
    "METRICS",
    "Metric",
    "register",
    "score",
    "rank_features",
    "resolve_metrics",
    "logme",
    "logme_fit",
    "LogMEFit",
    "linear_probe",
    "leep",
    "nce",
    "nce_from_labels",
    "nleep",
    "hscore",
    "shrinkage_hscore",
    "transrate",
    "gbc",
    "parc",
    "sfda",
    "tmi",
    "ped",
    "etran_rank",
    "etran_components",
    "ncti_rank",
    "ncti_components",
    "select_ensemble",
    "ensemble_accuracy",
    "auto_rank",
    "aggregate_ranks",
]


def resolve_metrics(metrics) -> list[str]:
    """Expand ``"all"`` / a comma-separated string / a list into known metric names (order kept)."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    out: list[str] = []
    for m in metrics:
        names = list(METRICS) if m == "all" else [m]
        for name in names:
            if name not in METRICS:
                raise ConfigError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("no metric given")
    return out


def _missing(metric: Metric, probs) -> str | None:
    if "probs" in metric.needs and probs is None:
        return "needs source-head probabilities (probs), which this model's features do not carry"
    return None


def score(features, metric: str, **opts) -> float:
    """Score one :class:`~transferkit.features.Features` with one registered metric.

    ``opts`` go to the metric (``seed`` included). Raises :class:`DataError` on bad or missing input.
    """
    (name,) = resolve_metrics([metric])
    m = METRICS[name]
    reason = _missing(m, features.probs)
    if reason:
        raise DataError(f"{name}: {reason}")
    X, y, probs = validate(features.X, features.y, features.probs, needs=m.needs | {"features"}, name=name)
    return float(m.impl(X, y, probs=probs, **opts))


def rank_features(features_by_model: dict, metrics, *, seed: int = 0, options: dict[str, dict] | None = None) -> dict[str, Any]:
    """Score every model with every metric and rank the models per metric.

    Parameters
    ----------
    features_by_model : {model name: Features} — features of the **same** target samples and labels.
    metrics : list of metric names (or ``"all"``, or a comma-separated string).
    seed : passed to every metric.
    options : optional per-metric keyword options, e.g. ``{"nleep": {"component_ratio": 3}}``.

    Returns
    -------
    dict with
      ``scores``  {metric: {model: float}} (models that could not be scored are absent),
      ``ranking`` {metric: [model, ...]} best first,
      ``time_s``  {metric: {model: wall seconds}} (within one model's pass, computations shared by
                  several metrics — the centred eigendecomposition, PCA — are charged to the first),
      ``skipped`` [{"model", "metric", "reason"}] for (model, metric) pairs that were not scored
                  (missing input such as source probabilities, or a metric-specific data error),
      ``metrics`` {metric: {"citation", "needs"}}.
    """
    names = resolve_metrics(metrics)
    options = options or {}
    if not features_by_model:
        raise DataError("rank: no models given")
    validated = {}
    y_ref = None
    for model, feats in features_by_model.items():
        X, y, probs = validate(feats.X, feats.y, feats.probs, name=f"rank[{model}]")
        if y_ref is None:
            y_ref = y
        elif len(y) != len(y_ref) or not np.array_equal(y, y_ref):
            raise DataError(f"rank: model {model!r} has different target labels than the first model; features must share one target set")
        validated[model] = (X, y, probs)
    out: dict[str, Any] = {
        "scores": {n: {} for n in names},
        "ranking": {},
        "time_s": {n: {} for n in names},
        "skipped": [],
        "metrics": {n: {"citation": METRICS[n].citation, "needs": sorted(METRICS[n].needs)} for n in names},
    }
    for model, (X, y, probs) in validated.items():
        with shared_pass():  # one eigendecomposition / PCA of this model's features serves every metric
            for name in names:
                m = METRICS[name]
                reason = _missing(m, probs)
                if reason:
                    out["skipped"].append({"model": model, "metric": name, "reason": reason})
                    continue
                t0 = time.perf_counter()
                try:
                    val = float(m.impl(X, y, probs=probs, seed=seed, **options.get(name, {})))
                except TransferkitError as e:
                    out["skipped"].append({"model": model, "metric": name, "reason": str(e)})
                    continue
                out["time_s"][name][model] = time.perf_counter() - t0
                out["scores"][name][model] = val
    for name in names:
        sc = out["scores"][name]
        out["ranking"][name] = sorted(sc, key=lambda k: (np.isnan(sc[k]), -sc[k] if not np.isnan(sc[k]) else 0.0, k))
    return out
