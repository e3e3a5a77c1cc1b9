"""Ensemble selection: submodularity, greedy vs brute force, MS-LEEP / E-LEEP, OT terms, fallbacks."""

import math

import numpy as np
import pytest

from transferkit.errors import ConfigError, DataError
from transferkit.features import Features
from transferkit.rank import ensemble_accuracy, leep, select_ensemble
from transferkit.rank.ensemble import (PairwiseObjective, e_leep, exhaustive_maximize, greedy_maximize, ms_leep,
                                       osborn_objective)

N, C, D = 150, 3, 6


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread avoids oversubscription on shared CI cores (results unchanged)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _probs(logits):
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def zoo():
    rng = np.random.default_rng(0)
    y = np.arange(N) % C
    M = rng.normal(size=(C, D))
    out = {}
    for i, s in enumerate([0.2, 0.5, 0.8, 1.2, 1.6]):
        r = np.random.default_rng(10 + i)
        X = r.normal(size=(N, D)) + s * M[y]
        W = r.normal(size=(C, 4))
        out[f"m{i}"] = Features(X, y, _probs(2 * s * W[y] + r.normal(size=(N, 4))))
    return out


def random_objective(rng, n, lam):
    a = rng.uniform(0, 1, n)
    R = rng.uniform(0, 1, (n, n))
    return PairwiseObjective([f"x{i}" for i in range(n)], a, (R + R.T) / 2, lam)


def test_pairwise_objective_is_submodular_on_random_instances():
    """Diminishing returns Δ(m|A) ≥ Δ(m|B) for A ⊆ B, m ∉ B (theory: r ≥ 0, λ ≥ 0)."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(3, 7))
        obj = random_objective(rng, n, float(rng.uniform(0, 1)))
        assert obj.submodular
        names = obj.names
        for _ in range(20):
            B = [m for m in names if rng.random() < 0.5]
            A = [m for m in B if rng.random() < 0.5]
            rest = [m for m in names if m not in B]
            if not rest:
                continue
            m = rest[int(rng.integers(len(rest)))]
            assert obj.gain(m, A) >= obj.gain(m, B) - 1e-12
            assert obj.value(B + [m]) - obj.value(B) == pytest.approx(obj.gain(m, B))


def test_negative_weight_breaks_submodularity_and_is_reported():
    obj = PairwiseObjective(["a", "b", "c"], [0.5, 0.5, 0.5], np.full((3, 3), 0.5), lam=-1.0)
    assert not obj.submodular and not obj.monotone_up_to(4)
    assert obj.gain("c", ["a", "b"]) > obj.gain("c", ["a"])  # increasing returns: supermodular


def test_greedy_equals_brute_force_when_modular_and_within_bound_otherwise():
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(3, 7))
        k = int(rng.integers(1, n + 1))
        # λ = 0: modular objective, greedy is exactly optimal
        obj0 = random_objective(rng, n, 0.0)
        g0, _ = greedy_maximize(obj0, k)
        _, best0 = exhaustive_maximize(obj0, k)
        assert obj0.value(g0) == pytest.approx(best0)
        # λ > 0: within (1 − 1/e)·OPT − c·k/e, c the monotonicity offset (0 when monotone)
        obj = random_objective(rng, n, float(rng.uniform(0, 1.5)))
        g, gains = greedy_maximize(obj, k)
        _, best = exhaustive_maximize(obj, k)
        c = obj.monotone_offset(2 * k)
        assert obj.value(g) >= (1 - 1 / math.e) * best - c * k / math.e - 1e-9
        assert obj.value(g) == pytest.approx(sum(gains))
        if obj.monotone_up_to(2 * k):
            assert c == 0.0
            assert obj.value(g) >= (1 - 1 / math.e) * best - 1e-9


def test_greedy_is_optimal_for_k1_and_k2_small_pairwise():
    """k = 1 greedy is exact; brute force agrees on tiny instances with near-zero redundancy."""
    rng = np.random.default_rng(2)
    obj = random_objective(rng, 5, 1e-3)
    for k in (1, 2):
        g, _ = greedy_maximize(obj, k)
        assert obj.value(g) == pytest.approx(exhaustive_maximize(obj, k)[1])


def test_monotonicity_condition_is_exact():
    obj = PairwiseObjective(["a", "b", "c"], [0.3, 0.9, 0.9], [[0, 0.5, 0.5], [0.5, 0, 0.1], [0.5, 0.1, 0]], lam=0.4)
    # a: 0.3 − 0.4·(0.5 + 0.5) < 0 with both others present; fine with one
    assert obj.monotone_up_to(2) and not obj.monotone_up_to(3)
    assert obj.gain("a", ["b"]) >= 0 > obj.gain("a", ["b", "c"])
    assert obj.monotone_offset(3) == pytest.approx(0.1)


def test_ms_leep_and_e_leep_reduce_to_leep_for_one_member(zoo):
    f = zoo["m3"]
    ref = leep(f.X, f.y, probs=f.probs)
    assert ms_leep([f.probs.astype(np.float64)], f.y) == pytest.approx(ref, rel=1e-6)
    assert e_leep([f.probs.astype(np.float64)], f.y, top_r=4) == pytest.approx(ref, rel=1e-6)  # exact: r ≥ C_s
    r = select_ensemble(zoo, 1, "ms-leep")
    best = max(zoo, key=lambda m: leep(zoo[m].X, zoo[m].y, probs=zoo[m].probs))
    assert r["selected"] == [best] and r["guarantee"] is None


def test_ms_leep_closed_form_two_members():
    y = np.array([0, 1, 0, 1])
    p1 = np.eye(2)[[0, 1, 0, 1]]  # perfect one-hot head: EEP(y_i) = 1
    p2 = np.full((4, 2), 0.5)      # uninformative: EEP(y_i) = P(y_i) = 0.5
    assert ms_leep([p1, p2], y) == pytest.approx(np.log(0.75))
    # product space of a perfect and an uninformative head is as good as the perfect head
    assert e_leep([p1, p2], y, top_r=2) == pytest.approx(0.0, abs=1e-12)


def test_select_ensemble_api_and_determinism(zoo):
    for method in ("osborn", "ms-leep", "e-leep"):
        r = select_ensemble(zoo, 3, method)
        assert len(r["selected"]) == 3 == len(set(r["selected"])) == len(r["gains"])
        assert set(r["scores"]) == set(zoo)
        assert r["value"] == pytest.approx(sum(r["gains"]))
        assert select_ensemble(zoo, 3, method)["selected"] == r["selected"]
    r = select_ensemble(zoo, 2, "osborn")
    assert r["submodular"] and r["guarantee"] == "1-1/e"
    assert r["bound"]["factor"] == pytest.approx(1 - 1 / math.e)
    # exhaustive search is never worse than greedy on the same objective
    ex = select_ensemble(zoo, 2, "osborn", search="exhaustive")
    assert ex["value"] >= r["value"] - 1e-12 and ex["guarantee"] is None
    assert select_ensemble(zoo, 99, "ms-leep")["selected"].__len__() == len(zoo)


def test_osborn_candidate_order_invariance(zoo):
    a = select_ensemble(zoo, 2, "osborn")
    b = select_ensemble(dict(reversed(list(zoo.items()))), 2, "osborn")
    assert set(a["selected"]) == set(b["selected"])
    assert a["scores"] == pytest.approx(b["scores"])


def test_osborn_prefers_complementary_members_over_redundant_copies():
    """Two identical strong models + a weaker one with different errors: with a full cohesion penalty
    (an exact duplicate adds nothing to an averaged ensemble) the second pick is the complementary
    model; without a penalty, the duplicate."""
    rng = np.random.default_rng(3)
    n = 300
    y = np.arange(n) % 2
    strong = np.c_[y + 0.6 * rng.normal(size=n), rng.normal(size=n)]
    other = np.c_[rng.normal(size=n), y + 0.9 * rng.normal(size=n)]
    f = {"a": Features(strong, y), "a_copy": Features(strong.copy(), y), "b": Features(other, y)}
    with_pen = select_ensemble(f, 2, "osborn", cohesion_weight=1.0)
    without = select_ensemble(f, 2, "osborn", cohesion_weight=0.0)
    assert with_pen["selected"][0] in ("a", "a_copy") and with_pen["selected"][1] == "b"
    assert set(without["selected"]) == {"a", "a_copy"}
    assert with_pen["terms"]["redundancy"]["a"]["a_copy"] == pytest.approx(1.0)


def test_osborn_ot_domain_and_task_terms(zoo):
    """With source features: the model whose source domain matches the target (small W₂) and whose
    source labels determine the target labels (H(Y_t|Y_s) = 0) gets the best utility."""
    pytest.importorskip("ot")
    y = zoo["m0"].y
    src = {}
    for i, m in enumerate(zoo):
        X = zoo[m].X
        if m == "m1":
            src[m] = Features(X.copy(), y)  # same domain, labels aligned with the target's
        else:
            r = np.random.default_rng(i)
            src[m] = Features(X + 3.0 + r.normal(size=X.shape), r.integers(0, 4, len(X)))
    obj = osborn_objective(zoo, source_features=src, transferability=None)
    raw = obj.terms["raw"]
    assert raw["m1"]["domain_w2"] == pytest.approx(0.0, abs=1e-6)
    assert raw["m1"]["task_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert min(raw, key=lambda m: raw[m]["domain_w2"]) == "m1"
    assert max(obj.terms["utility"], key=obj.terms["utility"].get) == "m1"
    assert select_ensemble(zoo, 1, "osborn", source_features=src, transferability=None)["selected"] == ["m1"]
    # unlabelled source features: domain term only, task term from the source heads
    unl = {m: s.X for m, s in src.items()}
    o2 = osborn_objective(zoo, source_features=unl, transferability=None)
    assert set(o2.terms["normalised"]) == {"domain", "task"}
    assert any("source head" in n for n in o2.terms["notes"])


def test_osborn_fallbacks_without_source_data(zoo):
    r = select_ensemble(zoo, 2, "osborn")
    assert any("domain term dropped" in n for n in r["notes"])
    assert set(r["terms"]["normalised"]) == {"transferability", "task"}  # task from source-head probs
    no_probs = {m: Features(f.X, f.y) for m, f in zoo.items()}
    r2 = select_ensemble(no_probs, 2, "osborn")
    assert set(r2["terms"]["normalised"]) == {"transferability"}
    assert any("task term dropped" in n for n in r2["notes"])
    with pytest.raises(DataError, match="no utility term"):
        select_ensemble(no_probs, 2, "osborn", transferability=None)
    with pytest.raises(DataError, match="probabilities"):
        select_ensemble(no_probs, 2, "ms-leep")


def test_bad_arguments(zoo):
    with pytest.raises(ConfigError, match="unknown method"):
        select_ensemble(zoo, 2, "nope")
    with pytest.raises(ConfigError, match="positive integer"):
        select_ensemble(zoo, 0)
    with pytest.raises(ConfigError, match="search"):
        select_ensemble(zoo, 2, search="random")


def test_ensemble_accuracy_oracle():
    y = np.array([0, 1, 1])
    p = {"a": np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), "b": np.array([[0.6, 0.4], [0.1, 0.9], [0.6, 0.4]])}
    assert ensemble_accuracy(p, y, ["a"]) == pytest.approx(2 / 3)
    assert ensemble_accuracy(p, y, ["a", "b"]) == pytest.approx(1.0)
    with pytest.raises(DataError):
        ensemble_accuracy(p, y, [])
