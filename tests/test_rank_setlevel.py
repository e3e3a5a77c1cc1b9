"""Set-level rankers ETran and NCTI: invariances, monotonicity, normalisation, reference defects."""

import numpy as np
import pytest
import scipy.linalg

from transferkit.errors import DataError
from transferkit.features import Features
from transferkit.rank import etran_components, etran_rank, ncti_components, ncti_rank
from transferkit.rank.etran import energy_score, lda_score, minmax
from transferkit.rank.sfda import fda_proba

SHIFTS = (0.3, 0.6, 1.0, 2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread avoids oversubscription on shared CI cores (results unchanged)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def make(shift, n=240, d=16, c=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    M = np.random.default_rng(123).normal(size=(c, d))
    X = scale * (rng.normal(size=(n, d)) + shift * M[y])
    return Features(X, y)


@pytest.fixture(scope="module")
def zoo():
    # one target (same y, seed 0), candidates differing only by class separation
    return {f"sep{s}": make(s) for s in SHIFTS}


@pytest.mark.parametrize("ranker", [etran_rank, ncti_rank])
def test_more_class_separation_ranks_higher(zoo, ranker):
    scores = ranker(zoo)
    vals = [scores[f"sep{s}"] for s in SHIFTS]
    assert all(a < b for a, b in zip(vals, vals[1:])), vals


@pytest.mark.parametrize("ranker", [etran_rank, ncti_rank])
def test_candidate_order_invariance(zoo, ranker):
    a = ranker(zoo)
    b = ranker(dict(reversed(list(zoo.items()))))
    assert a.keys() == b.keys()
    for m in a:
        assert b[m] == pytest.approx(a[m], abs=1e-12)


@pytest.mark.parametrize("ranker", [etran_rank, ncti_rank])
def test_sample_permutation_and_relabelling_invariance(zoo, ranker):
    a = ranker(zoo)
    idx = np.random.default_rng(1).permutation(240)
    perm = np.array([2, 3, 1, 0])
    moved = {m: Features(f.X[idx], 7 * perm[f.y[idx]] + 1) for m, f in zoo.items()}
    b = ranker(moved)
    for m in a:
        assert b[m] == pytest.approx(a[m], abs=1e-6)


def test_normalisation_range_and_details(zoo):
    d = etran_rank(zoo, details=True)
    assert d["ranking"][0] == "sep2.0" and d["ranking"][-1] == "sep0.3"
    for term, vals in d["normalised"].items():
        assert min(vals.values()) == 0.0 and max(vals.values()) == pytest.approx(1.0)
    assert max(d["scores"].values()) <= 1.0 + 1e-12 and min(d["scores"].values()) >= 0.0
    n = ncti_rank(zoo, details=True)
    assert set(n["normalised"]) == {"ncc", "seli", "vc"}
    assert all(-1.0 - 1e-12 <= v <= 2.0 + 1e-12 for v in n["scores"].values())


def test_set_level_value_depends_on_the_other_candidates(zoo):
    """The reason these are rankers, not registry metrics: adding a candidate changes existing scores."""
    sub = {k: zoo[k] for k in ("sep0.6", "sep1.0")}
    small, big = etran_rank(sub), etran_rank(zoo)
    assert small["sep1.0"] != pytest.approx(big["sep1.0"])
    # ...while the raw per-model components are candidate-independent
    assert etran_components(zoo["sep1.0"].X, zoo["sep1.0"].y)["lda"] == pytest.approx(
        etran_rank(zoo, details=True)["components"]["sep1.0"]["lda"])


@pytest.mark.parametrize("ranker", [etran_rank, ncti_rank])
def test_defect_minmax_constant_term_and_single_candidate_are_not_nan(zoo, ranker):
    """Reference tw.py / NCTI min-max divide by (max − min): NaN for a single or identical candidates."""
    one = ranker({"only": zoo["sep1.0"]})
    assert one == {"only": 0.0}
    same = ranker({"a": zoo["sep1.0"], "b": zoo["sep1.0"]})
    assert same["a"] == same["b"] == 0.0
    assert minmax({"a": 3.0, "b": 3.0}) == {"a": 0.0, "b": 0.0}
    with pytest.raises(DataError, match="non-finite"):
        minmax({"a": 1.0, "b": float("nan")})


def test_defect_energy_with_fewer_than_200_samples_is_finite():
    """Reference: mean of the lowest int(0.5*10)*N//1000 energies = mean of an empty array when N < 200."""
    X = np.random.default_rng(0).normal(size=(150, 8))
    e = energy_score(X)
    assert np.isfinite(e)
    from scipy.special import logsumexp

    assert e == pytest.approx(logsumexp(X, axis=1).min())  # 1 sample: the lowest energy
    assert energy_score(X, 1.0) == pytest.approx(logsumexp(X, axis=1).mean())


def test_defect_lda_uses_generalised_eigenproblem_not_eigh_of_nonsymmetric():
    """Reference ETran LDA: eigh(inv(Sw) @ Sb) on a non-symmetric matrix. Our coef = μ S̃w⁻¹ must equal
    the projection on all generalised eigenvectors V of (Sb, S̃w) (coef = μ V Vᵀ), and differ from the
    reference's construction on anisotropic data."""
    rng = np.random.default_rng(0)
    n, d, c = 300, 6, 3
    y = np.arange(n) % c
    A = rng.normal(size=(d, d))
    X = rng.normal(size=(n, d)) @ A + 1.5 * rng.normal(size=(c, d))[y]
    p_ours, lam = fda_proba(X, y)
    means = np.stack([X[y == k].mean(0) for k in range(c)])
    prior = np.bincount(y) / n
    Sw = sum(prior[k] * np.cov(X[y == k].T, bias=True) for k in range(c))
    Sws = (1 - lam) * Sw + lam * np.trace(Sw) / d * np.eye(d)
    St = np.cov(X.T, bias=True)
    Sts = (1 - lam) * St + lam * np.trace(St) / d * np.eye(d)
    Sb = Sts - Sws

    def proba(V):
        coef = means @ V @ V.T
        b = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(prior)
        z = X @ coef.T + b
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    _, V = scipy.linalg.eigh(Sb, Sws)
    np.testing.assert_allclose(p_ours, proba(V), atol=1e-8)
    _, Vbad = np.linalg.eigh(np.linalg.inv(Sws) @ Sb)  # the reference's call
    assert np.abs(proba(Vbad) - p_ours).max() > 1e-3
    assert lda_score(X, y) == pytest.approx(np.mean(p_ours[np.arange(n), y]))


def test_defect_ncti_small_dimension_and_sample_count():
    """Reference PCA(n_components=64) raises for D < 64 or N < 64; capped here."""
    f = {"a": make(1.0, n=40, d=8), "b": make(0.5, n=40, d=8)}
    s = ncti_rank(f, details=True)
    assert s["components"]["a"]["n_pca"] == 8
    assert all(np.isfinite(v) for v in s["scores"].values())


def test_ncti_seeded_and_deterministic(zoo):
    big = {m: Features(np.hstack([f.X, f.X @ np.random.default_rng(5).normal(size=(16, 120))]), f.y) for m, f in zoo.items()}
    a = ncti_rank(big, seed=3, details=True)
    b = ncti_rank(big, seed=3, details=True)
    assert a["scores"] == b["scores"]
    assert a["components"]["sep1.0"]["n_pca"] == 64


def test_etran_regression_term_and_weights(zoo):
    y = zoo["sep1.0"].y
    M = np.random.default_rng(9).normal(size=(4, 2))
    boxes = M[y] + 0.1 * np.random.default_rng(2).normal(size=(240, 2))
    d = etran_rank(zoo, regression_targets=boxes, details=True)
    assert set(d["normalised"]) == {"energy", "lda", "svd"}
    svd = {m: d["components"][m]["svd"] for m in zoo}
    assert svd["sep2.0"] > svd["sep0.3"] and all(-1 <= v <= 0 for v in svd.values())
    only_lda = etran_rank(zoo, weights={"lda": 1.0})
    assert max(only_lda, key=only_lda.get) == "sep2.0"
    with pytest.raises(DataError, match="regression_targets"):
        etran_rank(zoo, weights={"svd": 1.0})


def test_etran_energy_is_scale_dependent_documented(zoo):
    """Energy = logsumexp of raw features: scaling a model's features raises its energy term."""
    f = zoo["sep1.0"]
    d = etran_rank({"x1": f, "x3": Features(3 * f.X, f.y)}, details=True)
    assert d["components"]["x3"]["energy"] > d["components"]["x1"]["energy"]
    # LDA is scale-invariant up to the scale-dependent shrinkage λ = exp(−5·λ_max(S_w))
    assert d["components"]["x3"]["lda"] == pytest.approx(d["components"]["x1"]["lda"], abs=1e-3)


def test_errors_are_data_errors(zoo):
    with pytest.raises(DataError, match="no candidate"):
        etran_rank({})
    bad = {"a": zoo["sep1.0"], "b": make(1.0, seed=4)}  # different target labels
    with pytest.raises(DataError, match="different target labels"):
        ncti_rank(bad)
    good = make(1.0, n=60, d=5, c=3)
    const = {"a": Features(np.ones((60, 5)), good.y), "b": good}
    with pytest.raises(DataError, match="ncti\\[a\\]"):
        ncti_rank(const)
    # ETran on constant features is defined: LDA falls back to the prior, energy is finite
    s = etran_rank(const)
    assert all(np.isfinite(v) for v in s.values()) and s["b"] > s["a"]
    with pytest.raises(DataError):
        ncti_components(np.ones((10, 3)), np.zeros(10, dtype=int))
