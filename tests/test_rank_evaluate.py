"""Weighted Kendall τ, Pearson, rel@k and regret."""

import numpy as np
import pytest
from scipy.stats import weightedtau

from transferkit.errors import DataError
from transferkit.rank.evaluate import evaluate_scores, kendall_tau, pearson, recall_at_k, regret, rel_at_k, spearman, top_k, weighted_tau

ACC = {"a": 0.90, "b": 0.80, "c": 0.70, "d": 0.60, "e": 0.50}


def test_weighted_tau_conventions():
    same = {m: 10 * v for m, v in ACC.items()}
    rev = {m: -v for m, v in ACC.items()}
    assert weighted_tau(same, ACC) == pytest.approx(1.0)
    assert weighted_tau(rev, ACC) == pytest.approx(-1.0)
    s = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.4, "e": 0.2}
    # scipy defaults (hyperbolic weigher, rank=True i.e. symmetrised): argument order does not matter
    assert weighted_tau(s, ACC) == pytest.approx(weighted_tau(ACC, s))
    keys = sorted(ACC)
    assert weighted_tau(s, ACC) == pytest.approx(weightedtau([s[k] for k in keys], [ACC[k] for k in keys]).statistic)
    # errors at the top are penalised more than errors at the bottom
    top_swap = dict(same, a=same["b"] - 1e-3)
    bottom_swap = dict(same, e=same["d"] + 1e-3)
    assert weighted_tau(top_swap, ACC) < weighted_tau(bottom_swap, ACC)


def test_correlations():
    s = {m: np.log(v) for m, v in ACC.items()}
    assert spearman(s, ACC) == pytest.approx(1.0)
    assert kendall_tau(s, ACC) == pytest.approx(1.0)
    assert 0.99 < pearson(s, ACC) < 1.0


def test_rel_at_k_and_regret_hand_computed():
    s = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.1, "e": 0.3}  # picks b, then c, then e
    assert top_k(s, 3) == ["b", "c", "e"]
    assert rel_at_k(s, ACC, 1) == pytest.approx(0.80 / 0.90)
    assert rel_at_k(s, ACC, 3) == pytest.approx(0.80 / 0.90)
    assert rel_at_k(s, ACC, 5) == pytest.approx(1.0)
    assert regret(s, ACC) == pytest.approx(0.10)
    out = evaluate_scores(s, ACC, ks=(1, 2))
    assert out["selected"] == "b" and out["regret"] == pytest.approx(0.1) and "rel@2" in out


def test_ties_broken_by_name_and_errors():
    s = {m: 1.0 for m in ACC}
    assert top_k(s, 2) == ["a", "b"]
    with pytest.raises(DataError, match="same models"):
        weighted_tau({"a": 1.0, "b": 2.0}, ACC)
    with pytest.raises(DataError, match="at least 2"):
        regret({"a": 1.0}, {"a": 0.5})
    with pytest.raises(DataError, match="finite"):
        pearson({"a": np.nan, "b": 1.0}, {"a": 0.1, "b": 0.2})


def test_recall_at_k_on_plain_dicts():
    """TencentARC/SFDA recall_k slices dict.keys()[:k] (TypeError on Python 3)."""
    s = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.1, "e": 0.3}  # top-2 by score: b, c; by accuracy: a, b
    assert recall_at_k(s, ACC, 2) == pytest.approx(0.5)
    assert recall_at_k(s, ACC, 1) == 0.0
    assert recall_at_k(ACC, ACC, 3) == 1.0
    assert evaluate_scores(s, ACC, ks=(2,))["recall@2"] == pytest.approx(0.5)
