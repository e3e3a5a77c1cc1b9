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

import contextvars
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import registry
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
from .learned import learned_fit, learned_rank, learned_scores

__all__ = [
    "METRICS",
    "Metric",
    "register",
    "score",
    "rank_features",
    "resolve_metrics",
    "available_cores",
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
    "learned_scores",
    "learned_fit",
    "learned_rank",
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
                raise ConfigError(f"unknown metric {name!r}{registry.did_you_mean(name, METRICS)}; "
                                  f"known: {', '.join(sorted(METRICS))}")
            if name not in out:
                out.append(name)
    if not out:
        raise ConfigError("no metric given")
    return out


def check_options(names: list[str], options: Any) -> dict[str, dict]:
    """Per-metric options checked against each metric's typed options (one-line ConfigError);
    returns only the keys given, so every metric keeps its own defaults for the rest."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"rank options must be a mapping of metric → options, got {type(options).__name__}")
    for name, opts in options.items():
        if name not in names:
            raise ConfigError(f"options given for metric {name!r}, which is not being computed "
                              f"({', '.join(names)}){registry.did_you_mean(name, names)}")
        registry.get("rank", name).parse(opts)
    return {name: dict(opts or {}) for name, opts in options.items()}


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


# Order in which a concurrent pass hands metrics to its workers: the metric that first needs the
# centred eigendecomposition (the longest chain: Gram matrix, D×D eigh, PCA) first, then the costly
# metrics that do not need it (they run on the other worker meanwhile), then the rest, which reuse it.
_CONCURRENT_ORDER = ("gbc", "linear_probe", "tmi", "sfda", "parc", "ped", "nleep", "logme", "hscore",
                     "shrinkage_hscore", "transrate", "leep", "nce")


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Below this N·D·min(N, D) (the order of the pass's linear algebra) a concurrent pass is not worth its
# fixed cost (thread pool and thread-limit switches, ~10 ms): the whole pass takes tens of milliseconds.
_CONCURRENT_MIN_WORK = 2.5e7


def _auto_workers(shape: tuple[int, int] | None = None) -> int:
    """2 when ≥ 2 cores are usable (and the features, if given, are large enough to gain from it), else 1."""
    if available_cores() < 2:
        return 1
    if shape is not None and float(shape[0]) * shape[1] * min(shape) < _CONCURRENT_MIN_WORK:
        return 1
    return 2


def _run_metric(m: Metric, X, y, probs, seed, opts):
    """(value or TransferkitError, wall s, thread CPU s) of one metric."""
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        val: Any = float(m.impl(X, y, probs=probs, seed=seed, **opts))
    except TransferkitError as e:
        val = e
    return val, time.perf_counter() - t0, time.thread_time() - c0


def _pass_concurrent(todo: list[str], X, y, probs, seed, options, workers: int) -> dict:
    """Run the metrics of one model's shared pass on ``workers`` threads; {name: (value or error, wall s, CPU s)}.

    Must be called inside :func:`shared_pass`: every worker runs in a copy of the caller's context,
    so all of them share its memo (each shared computation is done once, by whichever worker needs it
    first; the other waits for it). BLAS and OpenMP run one thread per worker: OpenBLAS's thread count is
    process-wide, so it is limited once here for the whole pass (restored afterwards); OpenMP's is
    per thread, so each worker limits its own. Each LAPACK/BLAS call then runs in the calling worker's
    thread with the GIL released, so the two workers' linear algebra runs in parallel, and every
    result is computed exactly as by a sequential pass with one BLAS thread (same values, bit for bit).
    """
    from threadpoolctl import threadpool_limits

    rank = {n: i for i, n in enumerate(_CONCURRENT_ORDER)}
    queue = sorted(todo, key=lambda n: rank.get(n, len(rank)))
    lock = threading.Lock()
    results: dict[str, tuple] = {}
    failed: list[Exception] = []

    def worker():
        with threadpool_limits(1, user_api="openmp"):
            while True:
                with lock:
                    if failed or not queue:
                        return
                    name = queue.pop(0)
                try:
                    r = _run_metric(METRICS[name], X, y, probs, seed, options.get(name, {}))
                except Exception as e:  # noqa: BLE001 — not a data error: re-raised by the caller, as a sequential pass would
                    with lock:
                        failed.append(e)
                    return
                with lock:
                    results[name] = r

    contexts = [contextvars.copy_context() for _ in range(workers)]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers, thread_name_prefix="transferkit-rank") as ex:
        for f in [ex.submit(ctx.run, worker) for ctx in contexts]:
            f.result()
    if failed:
        raise failed[0]
    return results


def rank_features(features_by_model: dict, metrics, *, seed: int = 0, options: dict[str, dict] | None = None,
                  workers: int | None = None) -> dict[str, Any]:
    """Score every model with every metric and rank the models per metric.

    Parameters
    ----------
    features_by_model : {model name: Features} — features of the **same** target samples and labels.
    metrics : list of metric names (or ``"all"``, or a comma-separated string).
    seed : passed to every metric.
    options : optional per-metric keyword options, e.g. ``{"nleep": {"component_ratio": 3}}``.
    workers : threads that score one model's metrics concurrently. None (default): 2 when the process
        may use ≥ 2 CPU cores (``os.sched_getaffinity``) and the model's features are not tiny
        (N·D·min(N, D) ≥ 2.5e7, e.g. N = 1000, D = 160; below that the whole pass takes tens of
        milliseconds and threads only add overhead), else 1. 1 runs the metrics one after another
        (BLAS/OpenMP threads as configured). With 2 the independent parts of the pass (e.g. the centred
        eigendecomposition and SFDA/TMI/the linear probe) run in parallel, BLAS limited to one thread per
        worker (a process-wide setting while the pass runs); scores equal those of a sequential pass
        with one BLAS thread bit for bit (and those of any sequential pass up to BLAS round-off).

    Returns
    -------
    dict with
      ``scores``  {metric: {model: float}} (models that could not be scored are absent),
      ``ranking`` {metric: [model, ...]} best first,
      ``time_s``  {metric: {model: seconds}}: the metric's cost within its model's pass. Sequential
                  pass (``workers=1``): wall seconds. Concurrent pass: CPU seconds of the worker thread that
                  ran it (its BLAS runs in that thread), not counting waits for a shared result that the
                  other worker was computing; a per-metric wall time would count the other worker's load.
                  Either way, computations shared by several metrics — the centred eigendecomposition,
                  PCA — are charged to the metric that ran them first (under concurrency, which one can
                  vary between runs), and the sum over metrics is the pass's cost, not its wall time,
      ``pass_s``  {model: {"wall", "cpu", "workers"}}: wall and process CPU seconds of the model's whole
                  pass and the worker threads used,
      ``skipped`` [{"model", "metric", "reason"}] for (model, metric) pairs that were not scored
                  (missing input such as source probabilities, or a metric-specific data error),
      ``metrics`` {metric: {"citation", "needs"}}.
    """
    names = resolve_metrics(metrics)
    options = check_options(names, options)
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
        "pass_s": {},
        "skipped": [],
        "metrics": {n: {"citation": METRICS[n].citation, "needs": sorted(METRICS[n].needs)} for n in names},
    }
    for model, (X, y, probs) in validated.items():
        missing = {name: _missing(METRICS[name], probs) for name in names}
        todo = [name for name in names if not missing[name]]
        w = min(_auto_workers(X.shape) if workers is None else max(1, int(workers)), len(todo))
        t0, c0 = time.perf_counter(), time.process_time()
        with shared_pass():  # one eigendecomposition / PCA of this model's features serves every metric
            if w > 1:
                results = _pass_concurrent(todo, X, y, probs, seed, options, w)
            else:
                results = {name: _run_metric(METRICS[name], X, y, probs, seed, options.get(name, {})) for name in todo}
        out["pass_s"][model] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "workers": max(w, 1)}
        for name in names:  # in the order asked for, whatever order the workers finished in
            if missing[name]:
                out["skipped"].append({"model": model, "metric": name, "reason": missing[name]})
                continue
            val, wall, cpu = results[name]
            if isinstance(val, TransferkitError):
                out["skipped"].append({"model": model, "metric": name, "reason": str(val)})
                continue
            out["time_s"][name][model] = cpu if w > 1 else wall
            out["scores"][name][model] = val
    for name in names:
        sc = out["scores"][name]
        out["ranking"][name] = sorted(sc, key=lambda k: (np.isnan(sc[k]), -sc[k] if not np.isnan(sc[k]) else 0.0, k))
    return out
