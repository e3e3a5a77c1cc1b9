"""Judge transferability scores against measured (fine-tuned or linear-probe) accuracies.

All functions take ``scores = {model: score}`` (higher = predicted better) and
``accs = {model: accuracy}`` over the same models.

* :func:`weighted_tau` — ``scipy.stats.weightedtau(score, acc)`` with scipy's defaults, the
  convention of the transferability literature (LogME, SFDA, PED, ETran): hyperbolic weigher
  1/(r + 1), ``rank=True`` (the weighted τ is computed under the ranking by each variable and the
  two are averaged, i.e. symmetrised) and ``additive=True``. Weights favour the top of the
  ranking, so both arguments must be oriented higher-is-better (negate lower-is-better scores).
* :func:`kendall_tau`, :func:`pearson`, :func:`spearman` — plain correlations.
* :func:`rel_at_k` — max{acc(m) : m among the k best-scored models} / max_m acc(m); rel@1 is the
  relative accuracy of the model the score picks.
* :func:`regret` — best achievable accuracy − accuracy of the model the score picks (≥ 0).
* :func:`recall_at_k` — |top-k by score ∩ top-k by accuracy| / k. (TencentARC/SFDA ``recall_k``
  slices ``dict.keys()[:k]``, a TypeError on Python 3; here it works on plain dicts.)

Ties in the score are broken by model name (ascending), so selections are deterministic.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from ..errors import DataError

__all__ = ["weighted_tau", "kendall_tau", "pearson", "spearman", "rel_at_k", "regret", "recall_at_k", "top_k", "evaluate_scores"]


def _aligned(scores: dict, accs: dict) -> tuple[list, np.ndarray, np.ndarray]:
    if set(scores) != set(accs):
        missing = sorted(set(scores) ^ set(accs))
        raise DataError(f"scores and accuracies must cover the same models; mismatched: {', '.join(map(str, missing))}")
    if len(scores) < 2:
        raise DataError(f"need at least 2 models to evaluate a ranking, got {len(scores)}")
    models = sorted(scores)
    s = np.array([float(scores[m]) for m in models])
    a = np.array([float(accs[m]) for m in models])
    if not (np.isfinite(s).all() and np.isfinite(a).all()):
        raise DataError("scores and accuracies must be finite")
    return models, s, a


def weighted_tau(scores: dict, accs: dict) -> float:
    """Weighted Kendall τ_w (scipy defaults: hyperbolic weigher, symmetrised over both rankings)."""
    _, s, a = _aligned(scores, accs)
    return float(stats.weightedtau(s, a).statistic)


def kendall_tau(scores: dict, accs: dict) -> float:
    _, s, a = _aligned(scores, accs)
    return float(stats.kendalltau(s, a).statistic)


def pearson(scores: dict, accs: dict) -> float:
    _, s, a = _aligned(scores, accs)
    if s.std() == 0 or a.std() == 0:
        return float("nan")
    return float(np.corrcoef(s, a)[0, 1])


def spearman(scores: dict, accs: dict) -> float:
    _, s, a = _aligned(scores, accs)
    return float(stats.spearmanr(s, a).statistic)


def top_k(scores: dict, k: int) -> list:
    """The k best-scored models, best first (ties broken by model name)."""
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    return sorted(scores, key=lambda m: (-float(scores[m]), str(m)))[:k]


def rel_at_k(scores: dict, accs: dict, k: int = 1) -> float:
    """Best accuracy among the top-k scored models ÷ best accuracy overall."""
    _aligned(scores, accs)
    best = max(float(v) for v in accs.values())
    if best <= 0:
        raise DataError("rel@k needs a positive best accuracy")
    return max(float(accs[m]) for m in top_k(scores, k)) / best


def regret(scores: dict, accs: dict) -> float:
    """Best accuracy − accuracy of the top-scored model."""
    _aligned(scores, accs)
    return max(float(v) for v in accs.values()) - float(accs[top_k(scores, 1)[0]])


def recall_at_k(scores: dict, accs: dict, k: int = 1) -> float:
    """Fraction of the k most accurate models that are among the k best-scored ones."""
    _aligned(scores, accs)
    return len(set(top_k(scores, k)) & set(top_k(accs, k))) / min(k, len(scores))


def evaluate_scores(scores: dict, accs: dict, ks=(1, 3)) -> dict:
    """All of the above in one dict: weighted_tau, kendall_tau, pearson, spearman, rel@k, regret."""
    out = {
        "weighted_tau": weighted_tau(scores, accs),
        "kendall_tau": kendall_tau(scores, accs),
        "pearson": pearson(scores, accs),
        "spearman": spearman(scores, accs),
        "regret": regret(scores, accs),
        "selected": top_k(scores, 1)[0],
    }
    for k in ks:
        out[f"rel@{k}"] = rel_at_k(scores, accs, k)
        out[f"recall@{k}"] = recall_at_k(scores, accs, k)
    return out
