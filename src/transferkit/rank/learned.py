"""Learned ranker: combine transferability metrics with weights learned on measured zoo results.

No single metric wins on every zoo, and the label-free rank aggregation of :mod:`~transferkit.rank.auto`
is below the best single metric on every stored zoo. This ranker instead **learns** how much to trust
each metric from targets where the truth was measured: the project's stored zoo benchmarks
(``benchmarks/rank_zoo.py`` results, shipped as the package table ``zoo_results.json``, built by
``scripts/learned_ranker_table.py``: per result file, zoo and target, every candidate's metric scores and
its measured fine-tuning and linear-probe accuracy). The model::

    for each training record r (one target measured under one protocol) and metric j:
        x_rj(m) = z-score of metric j's scores over r's candidates ("zscore", default; 0 if constant)
                  or ρ_j(m) − ½, ρ_j = (rank_j − 1)/(n − 1) ∈ [0, 1], average ranks for ties ("rank")
        y_r(m)  = z-score of the measured accuracy of m within r
    β = argmin_{β ≥ 0}  Σ_r ω_r/n_r Σ_m (x_r(m)·β − y_r(m))²  +  λ‖β‖²       (NNLS, λ = ``ridge`` = 1)
        ω_r = 1 / (number of records of r's target): every target counts once, however many
              protocols measured it
    learned(m) = Σ_j β_j x_j(m) on the target being ranked (higher = better)

Normalising within each target makes the metrics' incomparable units comparable; non-negative weights
keep every metric oriented as its paper intends and make the fit a sparse, readable metric selection;
the ridge term spreads weight over correlated metrics instead of betting on one. ``ground_truth`` picks
the accuracy learned from (``"finetune"`` by default, or ``"linear"``). Defaults: λ = 1 was fixed
beforehand, not tuned; the z-score default was chosen by leave-one-target-out over the 6 stored targets
(mean τ_w 0.325 vs 0.248 for ranks). That choice saw every target, so the honest estimate of the whole
procedure is the nested row of ``benchmarks/results/rank_learned.md`` (the normalisation picked by an
inner leave-one-target-out on the training targets only).

**Missing metrics** are handled explicitly. On the target being ranked, a metric is used only if it is
in the table and scored every candidate with a finite value; the others are listed in ``skipped``
with the reason (e.g. LEEP/NCE need a source head, so they are absent for text encoders) and the
weights are refitted on the training records **restricted to the used metrics** (a fit takes
milliseconds), so no metric is imputed for the target. In a training record a metric that is absent
(or constant) contributes x = 0 — no evidence either way on that record's pairs.

**Leave-one-target-out.** ``exclude_targets`` drops every record of those targets — all protocols, all
result files — from the fit; ``benchmarks/rank_learned.py`` ranks each stored target with a model
trained on the other targets only and compares it with every single metric and with ``auto``.

Relation to the literature, and what is ours: Agostinelli et al., "How stable are transferability
metrics evaluations?" (ECCV 2022) show that metric rankings change with the experimental setup and
discuss combining metrics; Öztürk et al., "Zero-shot AutoML with pretrained models" (ICML 2022)
meta-learn from measured results on other datasets which pretrained model (and fine-tuning pipeline)
to pick for a new one. The rule here — non-negative ridge regression of within-target standardised
accuracy on within-target metric ranks, trained on the project's own zoo results — is ours, not
taken from either paper, and it is only as general as the 6 targets (3 image, 3 text, 7 candidates
each) it was learned from: on a zoo unlike those, prefer checking it against a measured ground truth.

Use :func:`learned_scores` on scores already computed (``{model: {metric: score}}``; this is what the
``auto`` search calls), :func:`learned_fit` for the weights and reasons too, or the set-level ranker
``learned`` (:func:`learned_rank`, ``transferkit rank --metrics ...,learned``), which computes the
metrics it needs (:func:`needed_metrics`) from the features itself.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import nnls
from scipy.stats import rankdata

from ..errors import ConfigError, DataError, TransferkitError
from ._base import register_set_level

__all__ = ["learned_scores", "learned_fit", "learned_rank", "needed_metrics", "fit_weights", "load_table",
           "GROUND_TRUTHS", "NORMALISE"]

GROUND_TRUTHS = ("finetune", "linear")
NORMALISE = ("zscore", "rank")
RIDGE = 1.0
SET_LEVEL = ("etran", "ncti")


@functools.lru_cache(maxsize=1)
def _packaged() -> str:
    return resources.files("transferkit.rank").joinpath("zoo_results.json").read_text()


def load_table() -> dict[str, Any]:
    """The packaged training table (a fresh copy): ``version``, ``sources`` (file, sha256, command),
    ``metrics`` and ``records`` [{"source", "zoo", "target", "models", "scores" {metric: {model: score}},
    "finetune" {model: acc}, "linear" {model: acc}, ...}]."""
    return json.loads(_packaged())


def _normalised(values: Mapping[str, float], models: Sequence[str], how: str) -> np.ndarray | None:
    """Within-target normalised scores of ``models`` (centred), or None unless every model has a finite value."""
    v = np.array([float(values[m]) if m in values and values[m] is not None else math.nan for m in models])
    if len(v) < 2 or not np.isfinite(v).all():
        return None
    if how == "zscore":
        sd = v.std()
        return (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)
    return (rankdata(v, method="average") - 1.0) / (len(v) - 1.0) - 0.5


def _check(ground_truth: str, normalise: str, ridge: float) -> None:
    if ground_truth not in GROUND_TRUTHS:
        raise ConfigError(f"learned: unknown ground truth {ground_truth!r}; use {', '.join(GROUND_TRUTHS)}")
    if normalise not in NORMALISE:
        raise ConfigError(f"learned: unknown normalise {normalise!r}; use {', '.join(NORMALISE)}")
    if not ridge >= 0:
        raise ConfigError(f"learned: ridge must be >= 0, got {ridge!r}")


def fit_weights(records: Sequence[Mapping], metrics: Sequence[str], *, ground_truth: str = "finetune",
                normalise: str = NORMALISE[0], ridge: float = RIDGE) -> dict[str, float]:
    """Non-negative ridge weights {metric: β_j ≥ 0} of ``metrics`` fitted on ``records`` (module docstring)."""
    _check(ground_truth, normalise, ridge)
    if not records:
        raise DataError("learned: no training records")
    count: dict[str, int] = {}
    for r in records:
        count[r["target"]] = count.get(r["target"], 0) + 1
    X, y = [], []
    for r in records:
        models = sorted(r[ground_truth])
        acc = np.array([float(r[ground_truth][m]) for m in models])
        if len(models) < 2 or acc.std() == 0:
            continue  # no ordering to learn from
        cols = [_normalised(r["scores"].get(j, {}), models, normalise) for j in metrics]
        w = math.sqrt(1.0 / count[r["target"]] / len(models))
        X.append(w * np.column_stack([c if c is not None else np.zeros(len(models)) for c in cols]))
        y.append(w * (acc - acc.mean()) / acc.std())
    if not X:
        raise DataError("learned: no training record has a measured ordering")
    k = len(metrics)
    A = np.vstack([*X, math.sqrt(ridge) * np.eye(k)])
    b = np.concatenate([*y, np.zeros(k)])
    beta = nnls(A, b)[0]
    return {j: float(x) for j, x in zip(metrics, beta)}


def learned_fit(scores: Mapping[str, Mapping[str, float]], *, exclude_targets: Sequence[str] = (),
                ground_truth: str = "finetune", normalise: str = NORMALISE[0], ridge: float = RIDGE,
                table: Mapping | None = None) -> dict[str, Any]:
    """Rank the candidates of one target from their metric scores with weights learned on the table.

    Parameters
    ----------
    scores : {model: {metric: score}} (higher = better; NaN / None / absent = not scored).
    exclude_targets : target names whose records are left out of the fit (every protocol and file).
    ground_truth, normalise, ridge : see the module docstring.
    table : a training table like :func:`load_table`'s (default: the packaged one).

    Returns
    -------
    dict with ``scores`` {model: learned score}, ``ranking`` (best first, ties by name), ``weights``
    {metric: β} over ``used``, ``used``, ``skipped`` [{"metric", "reason"}] and ``trained_on``
    ["source/zoo/target", ...]. Raises a one-line :class:`ConfigError` when none of the table's
    metrics scored every candidate, or none of those that did has a positive weight.
    """
    _check(ground_truth, normalise, ridge)
    table = load_table() if table is None else table
    models = sorted(scores, key=str)
    if len(models) < 2:
        raise DataError(f"learned: need at least 2 candidate models, got {len(models)}")
    known = list(table["metrics"])
    given = sorted({j for sc in scores.values() for j in sc})
    skipped = [{"metric": j, "reason": "not in the learned ranker's training table"} for j in given if j not in known]
    cols: dict[str, np.ndarray] = {}
    for j in known:
        col = _normalised({m: scores[m][j] for m in models if j in scores[m]}, models, normalise)
        if col is not None:
            cols[j] = col
        elif j in given:
            n = sum(1 for m in models if scores[m].get(j) is not None and math.isfinite(float(scores[m][j])))
            skipped.append({"metric": j, "reason": f"scored {n} of {len(models)} candidates; needs all of them"})
    if not cols:
        raise ConfigError(f"learned: none of the metrics it was trained on was computed for every candidate "
                          f"(got {', '.join(given) or 'none'}); compute some of: {', '.join(known)}")
    excluded = set(exclude_targets)
    records = [r for r in table["records"] if r["target"] not in excluded]
    weights = fit_weights(records, list(cols), ground_truth=ground_truth, normalise=normalise, ridge=ridge)
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"learned: no computed metric has a positive learned weight ({', '.join(cols)}); "
                          f"compute more of: {', '.join(known)}")
    total = np.sum([weights[j] * cols[j] for j in cols], axis=0)
    out = {m: float(v) for m, v in zip(models, total)}
    return {"scores": out, "ranking": sorted(models, key=lambda m: (-out[m], str(m))), "weights": weights,
            "used": list(cols), "skipped": skipped,
            "trained_on": [f"{r['source']}/{r['zoo']}/{r['target']}" for r in records]}


def learned_scores(scores: Mapping[str, Mapping[str, float]], *, exclude_targets: Sequence[str] = (),
                   ground_truth: str = "finetune", table: Mapping | None = None) -> dict[str, float]:
    """{model: learned score} (higher = better) from ``{model: {metric: score}}``; see :func:`learned_fit`."""
    return learned_fit(scores, exclude_targets=exclude_targets, ground_truth=ground_truth, table=table)["scores"]


def needed_metrics(ground_truth: str = "finetune") -> list[str]:
    """The metrics worth computing for :func:`learned_scores`: those with a positive weight in the fit on the
    whole table, with and without the metrics that need source-head probabilities. A metric whose weight is
    0 at the optimum of this convex fit does not move the optimum when removed, so computing only these
    (when all of them can be computed) gives the same ranking as computing every metric of the table."""
    from . import METRICS

    table = load_table()
    full = list(table["metrics"])
    no_probs = [j for j in full if j not in METRICS or "probs" not in METRICS[j].needs]
    out: list[str] = []
    for metrics in (full, no_probs):
        w = fit_weights(table["records"], metrics, ground_truth=ground_truth)
        out += [j for j in metrics if w[j] > 0 and j not in out]
    return out


def learned_rank(features_by_model: Mapping[str, Any], *, seed: int = 0, metrics: str = "needed",
                 ground_truth: str = "finetune") -> dict[str, float]:
    """Learned combination of metrics (non-negative weights fitted on the project's measured zoo results).

    Computes ``metrics`` on the features — ``"needed"`` (default: :func:`needed_metrics`, the ones with a
    positive learned weight), ``"all"`` (every metric of the training table, set-level ETran/NCTI
    included) or a comma-separated list — and returns {model: learned score}; see :func:`learned_fit`.
    """
    from . import rank_features
    from .etran import etran_rank
    from .ncti import ncti_rank

    _check(ground_truth, NORMALISE[0], RIDGE)
    known = load_table()["metrics"]
    names = {"all": known, "needed": needed_metrics(ground_truth)}.get(metrics.strip()) or [
        m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ConfigError(f"learned: metrics must be 'needed', 'all' or some of {', '.join(known)}; got {metrics!r}")
    per_model = [m for m in names if m not in SET_LEVEL]
    by_metric = rank_features(features_by_model, per_model, seed=seed)["scores"] if per_model else {}
    for name, fn in (("etran", etran_rank), ("ncti", ncti_rank)):
        if name in names:
            try:
                by_metric[name] = fn(features_by_model, seed=seed)
            except TransferkitError:  # e.g. too few samples: not computed, so not used (refit without it)
                continue
    scores = {m: {j: sc[m] for j, sc in by_metric.items() if m in sc} for m in features_by_model}
    return learned_scores(scores, ground_truth=ground_truth)


register_set_level("learned", learned_rank, citation="ours: non-negative ridge over within-target metric z-scores, "
                   "learned on the project's measured zoo results (cf. Agostinelli et al., ECCV 2022; "
                   "Öztürk et al., Zero-shot AutoML with pretrained models, ICML 2022)")
