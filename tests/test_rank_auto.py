"""Auto ranker: rank aggregation over metrics (unanimity, robustness to skipped metrics, determinism)."""

import numpy as np
import pytest
from scipy.stats import rankdata

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


# ---------------------------------------------------------------------------------- method="consensus"
def _from_order(order, transform=float):
    """Scores (higher = better) that rank the models in ``order`` (best first)."""
    return {m: transform(len(order) - i) for i, m in enumerate(order)}


def test_consensus_drops_a_reversed_metric_that_pulls_mean_rank():
    """Three metrics agree (up to one swap); a fourth ranks nearly backwards. Consensus gives the fourth
    weight 0 and returns the agreeing order; mean_rank is pulled by it (b overtakes a)."""
    agree = ["a", "b", "c", "d", "e", "f"]
    sc = {"m1": _from_order(agree), "m2": _from_order(["b", "a", "c", "d", "e", "f"], lambda v: 10 * v - 3),
          "m3": _from_order(agree, np.exp), "rev": _from_order(["f", "e", "d", "b", "c", "a"])}
    three = aggregate_ranks({k: sc[k] for k in ("m1", "m2", "m3")})
    assert three["ranking"] == agree  # the agreeing order
    mean = aggregate_ranks(sc)
    assert mean["ranking"][:2] == ["b", "a"] and mean["ranking"] != agree  # pulled toward "rev"
    cons = aggregate_ranks(sc, method="consensus")
    assert cons["ranking"] == agree
    assert cons["weights"]["rev"] == 0.0
    assert all(cons["weights"][k] > 0.2 for k in ("m1", "m2", "m3"))
    assert sum(cons["weights"].values()) == pytest.approx(1.0)
    assert cons["used"] == ["m1", "m2", "m3", "rev"] and cons["weights_note"] is None
    # the other methods report the weights they used
    assert mean["weights"] == {k: 0.25 for k in sc}
    assert aggregate_ranks(sc, weights={"m1": 3.0})["weights"] == {"m1": 0.5, "m2": 1 / 6, "m3": 1 / 6, "rev": 1 / 6}


def _noisy_metrics(seed=3, n_models=9):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=n_models)
    models = [f"model{i}" for i in range(n_models)]
    sc = {}
    for j, noise in enumerate((0.3, 0.6, 1.0, 1.5)):
        sc[f"m{j}"] = dict(zip(models, truth + noise * rng.normal(size=n_models)))
    sc["m3"] = {m: float(np.round(v)) for m, v in sc["m3"].items()}  # coarse: tied ranks
    sc["anti"] = dict(zip(models, -truth + 0.5 * rng.normal(size=n_models)))
    return sc, models


def test_consensus_weights_match_power_iteration():
    from scipy.stats import spearmanr

    sc, models = _noisy_metrics()
    res = aggregate_ranks(sc, models, method="consensus")
    names = list(sc)
    C = spearmanr(np.array([[sc[k][m] for m in models] for k in names]).T).correlation
    v = np.ones(len(names))
    for _ in range(5000):  # C is PSD: power iteration converges to the leading eigenvector
        v = C @ v
        v /= np.linalg.norm(v)
    v = -v if v.sum() < 0 else v
    w = np.clip(v, 0, None) / np.clip(v, 0, None).sum()
    assert w[names.index("anti")] == 0.0 and (w[:4] > 0).all()  # the case exercises clipping
    assert [res["weights"][k] for k in names] == pytest.approx(list(w), abs=1e-9)
    # auto(m) = Σ_j w_j ρ_j(m), ρ_j the normalised ranks
    rho = {k: dict(zip(models, (rankdata([sc[k][m] for m in models]) - 1) / (len(models) - 1))) for k in names}
    expect = {m: sum(w[i] * rho[k][m] for i, k in enumerate(names)) for m in models}
    assert res["scores"] == pytest.approx(expect, abs=1e-12)
    assert res["ranking"] == sorted(models, key=lambda m: (-expect[m], m))


def test_consensus_invariant_to_metric_order_and_monotone_transforms():
    sc, models = _noisy_metrics(seed=5)
    res = aggregate_ranks(sc, models, method="consensus")
    rev = aggregate_ranks(dict(reversed(list(sc.items()))), list(reversed(models)), method="consensus")
    assert rev["weights"] == pytest.approx(res["weights"], abs=1e-12)
    assert rev["scores"] == pytest.approx(res["scores"], abs=1e-12) and rev["ranking"] == res["ranking"]
    mono = dict(sc, m2={m: np.exp(3 * v) - 5 for m, v in sc["m2"].items()})
    tr = aggregate_ranks(mono, models, method="consensus")
    assert tr["weights"] == pytest.approx(res["weights"], abs=1e-12) and tr["ranking"] == res["ranking"]
    # ... whereas changing one metric's order does change the weights
    other = dict(sc, m2={m: -v for m, v in sc["m2"].items()})
    assert aggregate_ranks(other, models, method="consensus")["weights"] != pytest.approx(res["weights"])


def test_consensus_incomplete_constant_and_too_few_metrics():
    sc, models = _noisy_metrics(seed=7)
    partial = dict(sc, partial={m: v for m, v in sc["m0"].items() if m != models[0]})
    res = aggregate_ranks(partial, models, method="consensus")
    assert "partial" not in res["weights"] and "partial" not in res["used"] and "partial" not in res["normalised"]
    assert any(s["metric"] == "partial" and "every model" in s["reason"] for s in res["skipped"])
    assert res["weights"] == pytest.approx(aggregate_ranks(sc, models, method="consensus")["weights"])
    assert "partial" in aggregate_ranks(partial, models)["used"]  # mean_rank still lets it vote
    # a metric constant over the models gets weight 0
    const = aggregate_ranks(dict(sc, flat={m: 1.0 for m in models}), models, method="consensus")
    assert const["weights"]["flat"] == 0.0 and "constant over the models, weight 0: flat" in const["weights_note"]
    # fewer than 3 complete metrics: equal weights and a note (the eigenvector of two anti-correlated
    # metrics would give all the weight to one of them)
    two = {"m0": sc["m0"], "anti": sc["anti"], "partial": partial["partial"]}
    res = aggregate_ranks(two, models, method="consensus")
    assert res["weights"] == {"m0": 0.5, "anti": 0.5}
    assert "equal weights" in res["weights_note"] and "2 metric" in res["weights_note"]
    assert any(s["metric"] == "partial" for s in res["skipped"])


def test_consensus_rejects_user_weights(zoo):
    sc = {"m1": {"a": 1, "b": 0}, "m2": {"a": 0, "b": 1}, "m3": {"a": 1, "b": 0}}
    with pytest.raises(ConfigError, match="consensus"):
        aggregate_ranks(sc, method="consensus", weights={"m1": 2.0})
    with pytest.raises(ConfigError, match="consensus"):
        auto_rank(zoo, ["logme", "sfda", "leep"], method="consensus", weights={"logme": 2.0})


def test_consensus_on_features(zoo):
    res = auto_rank(zoo, ["logme", "sfda", "nleep", "leep"], method="consensus")
    assert res["ranking"] == [f"s{s}" for s in reversed(SHIFTS)]
    assert set(res["weights"]) == set(res["used"]) and sum(res["weights"].values()) == pytest.approx(1.0)
