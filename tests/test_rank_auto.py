"""Auto ranker: rank aggregation over metrics (unanimity, robustness to skipped metrics, determinism)."""

import numpy as np
import pytest

from transferkit.errors import ConfigError, DataError
from transferkit.features import Features
from transferkit.rank import METRICS, aggregate_ranks, auto_rank, rank_features

SHIFTS = (0.2, 0.5, 0.9, 1.5)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread avoids oversubscription on shared CI cores (results unchanged)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def zoo():
    rng = np.random.default_rng(0)
    n, c, d = 200, 4, 12
    y = np.arange(n) % c
    rng.shuffle(y)
    M = np.random.default_rng(1).normal(size=(c, d))
    W = np.random.default_rng(2).normal(size=(c, 6))
    out = {}
    for i, s in enumerate(SHIFTS):
        r = np.random.default_rng(10 + i)
        logits = 2 * s * W[y] + r.normal(size=(n, 6))
        p = np.exp(logits - logits.max(1, keepdims=True))
        out[f"s{s}"] = Features(r.normal(size=(n, d)) + s * M[y], y, p / p.sum(1, keepdims=True))
    return out


def test_unanimity():
    """If every metric orders the models the same way, auto gives that order (any monotone rescaling)."""
    base = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    scores = {"m1": base, "m2": {k: 10 * v - 7 for k, v in base.items()}, "m3": {k: np.exp(v) for k, v in base.items()}}
    for method in ("mean_rank", "median_rank", "zscore"):
        res = aggregate_ranks(scores, method=method)
        assert res["ranking"] == ["a", "b", "c", "d"]
        assert res["used"] == ["m1", "m2", "m3"]
    res = aggregate_ranks(scores)
    assert res["scores"] == {"a": 1.0, "b": pytest.approx(2 / 3), "c": pytest.approx(1 / 3), "d": 0.0}


def test_unanimity_on_features(zoo):
    res = auto_rank(zoo, ["logme", "sfda", "leep"])
    expect = [f"s{s}" for s in reversed(SHIFTS)]
    for m in ("logme", "sfda", "leep"):
        assert sorted(res["per_metric"][m], key=lambda k: -res["per_metric"][m][k]) == expect
    assert res["ranking"] == expect and res["used"] == ["logme", "sfda", "leep"]


def test_robust_to_a_skipped_metric(zoo):
    """A metric that needs source probabilities is skipped for models without them; NaN casts no vote."""
    no_probs = {m: (Features(f.X, f.y) if m in ("s0.2", "s0.9", "s1.5") else f) for m, f in zoo.items()}
    res = auto_rank(no_probs, ["logme", "leep", "sfda"])
    assert res["ranking"] == [f"s{s}" for s in reversed(SHIFTS)]
    assert "leep" not in res["used"]  # scored only one model
    assert any(s.get("metric") == "leep" and "need at least 2" in s["reason"] for s in res["skipped"])
    assert any(s.get("model") == "s0.2" and s["metric"] == "leep" for s in res["skipped"])
    # NaN and missing entries in precomputed scores
    sc = {"m1": {"a": 2.0, "b": 1.0, "c": 0.0}, "m2": {"a": float("nan"), "b": 5.0, "c": 1.0}, "m3": {"a": 1.0}}
    agg = aggregate_ranks(sc, ["a", "b", "c"])
    assert agg["used"] == ["m1", "m2"] and agg["skipped"][0]["metric"] == "m3"
    assert agg["scores"]["a"] == 1.0  # only m1 voted for a
    assert agg["ranking"] == ["a", "b", "c"]
    # a model no metric scored is ranked last with a NaN score
    agg = aggregate_ranks({"m1": {"a": 1.0, "b": 0.0}}, ["a", "b", "z"])
    assert np.isnan(agg["scores"]["z"]) and agg["ranking"][-1] == "z"


def test_determinism_and_ties(zoo):
    a = auto_rank(zoo, ["logme", "sfda", "nleep"], seed=1)
    b = auto_rank(zoo, ["logme", "sfda", "nleep"], seed=1)
    assert a["scores"] == b["scores"] and a["ranking"] == b["ranking"]
    tie = aggregate_ranks({"m1": {"b": 1.0, "a": 0.0}, "m2": {"b": 0.0, "a": 1.0}})
    assert tie["scores"]["a"] == tie["scores"]["b"] and tie["ranking"] == ["a", "b"]  # ties by name


def test_order_invariance_of_models_and_metrics(zoo):
    a = auto_rank(zoo, ["logme", "sfda"])
    b = auto_rank(dict(reversed(list(zoo.items()))), ["sfda", "logme"])
    assert a["scores"] == pytest.approx(b["scores"]) and a["ranking"] == b["ranking"]


def test_median_resists_one_outlying_metric():
    good = {"a": 3, "b": 2, "c": 1, "d": 0}
    sc = {"m1": good, "m2": good, "m3": {"a": 0, "b": 1, "c": 2, "d": 3}}
    assert aggregate_ranks(sc, method="median_rank")["ranking"] == ["a", "b", "c", "d"]
    w = aggregate_ranks(sc, weights={"m3": 5.0})
    assert w["ranking"][0] == "d"  # weights are honoured


def test_set_level_rankers_can_vote(zoo):
    res = auto_rank(zoo, ["etran", "ncti", "logme"])
    assert res["used"] == ["etran", "ncti", "logme"]
    assert res["ranking"][0] == "s1.5"


def test_not_a_registry_metric_and_bad_input(zoo):
    assert "auto" not in METRICS
    with pytest.raises(ConfigError, match="unknown metric 'auto'"):
        rank_features(zoo, ["auto"])
    with pytest.raises(ConfigError):
        auto_rank(zoo, ["auto"])
    with pytest.raises(ConfigError):
        auto_rank(zoo, [])
    with pytest.raises(ConfigError, match="method"):
        aggregate_ranks({"m": {"a": 1, "b": 0}}, method="vote")
    with pytest.raises(DataError):
        aggregate_ranks({})
