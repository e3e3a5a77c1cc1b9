"""The shared computations of a scoring pass: exact PCA, the closed-form rank correlation, and that
sharing changes no metric's value."""

import numpy as np
import pytest
from scipy.stats import rankdata

from transferkit.features import Features
from transferkit.rank import METRICS, rank_features
from transferkit.rank._shared import pca, shared_pass, spectrum
from transferkit.rank.parc import rank_biserial_corr
from transferkit.rank.tmi import kl_entropy


def gauss(n, d, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    X = rng.normal(size=(n, d)) * np.linspace(3, 0.1, d) + rng.normal(size=(c, d))[y] + 7.0
    return X, y


@pytest.mark.parametrize("n,d", [(300, 20), (15, 40)])
@pytest.mark.parametrize("k", [0.8, 0.5, 5])
def test_pca_matches_sklearn_full_up_to_sign(n, d, k):
    from sklearn.decomposition import PCA

    X, _ = gauss(n, d)
    ref = PCA(n_components=k, svd_solver="full").fit_transform(X)
    ours = pca(X, k)
    assert ours.shape == ref.shape
    sign = np.sign(np.sum(ours * ref, axis=0))
    np.testing.assert_allclose(ours * sign, ref, atol=1e-8 * np.abs(ref).max())


def test_spectrum_is_the_centred_gram_eigensystem_both_routes():
    for n, d in [(200, 10), (8, 30)]:
        X, _ = gauss(n, d)
        Xc = X - X.mean(0)
        w, V = spectrum(X)
        assert np.all(np.diff(w) <= 1e-9 * w[0])
        np.testing.assert_allclose((Xc.T @ Xc) @ V, V * w, atol=1e-8 * w[0])
        ref = np.sort(np.linalg.eigvalsh(Xc.T @ Xc))[::-1][: len(w)]
        np.testing.assert_allclose(w, np.clip(ref, 0, None), atol=1e-8 * w[0])


@pytest.mark.parametrize("ties", [False, True])
def test_rank_biserial_equals_pearson_of_rankdata(ties):
    rng = np.random.default_rng(3)
    a = rng.normal(size=5000)
    if ties:
        a = np.round(a, 1)  # ~60 distinct values: heavy ties
    b = rng.random(5000) < 0.7
    expect = np.corrcoef(rankdata(a), b.astype(float))[0, 1]
    assert rank_biserial_corr(a, b) == pytest.approx(expect, rel=1e-10, abs=1e-13)


def test_kl_entropy_block_route_equals_kd_tree():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(300, 40)) * 3
    blocks = kl_entropy(Z)  # d > 32: pairwise distances in row blocks
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    r = np.maximum(cKDTree(Z).query(Z, k=4, p=np.inf)[0][:, 3], 1.0)
    assert blocks == pytest.approx(-digamma(3) + digamma(300) + 40 * np.mean(np.log(2 * r)), rel=1e-12)
    Z2 = rng.normal(size=(2100, 33)) * 3  # n > 2000: several row blocks of cdist instead of one pdist
    r2 = np.maximum(cKDTree(Z2).query(Z2, k=4, p=np.inf)[0][:, 3], 1.0)
    assert kl_entropy(Z2) == pytest.approx(-digamma(3) + digamma(2100) + 33 * np.mean(np.log(2 * r2)), rel=1e-12)


def test_shared_pass_changes_no_metric_value_and_memoises():
    X, y = gauss(400, 48, c=5, seed=1)
    rng = np.random.default_rng(2)
    P = rng.dirichlet(np.ones(12), size=400)
    alone = {n: m(X, y, probs=P if "probs" in m.needs else None, seed=0) for n, m in METRICS.items()}
    res = rank_features({"a": Features(X=X.astype(np.float32).astype(np.float64), y=y, probs=P)}, "all")
    for name, val in alone.items():
        assert res["scores"][name]["a"] == pytest.approx(val, rel=1e-7, abs=1e-10), name
    with shared_pass():
        assert pca(X, 0.8) is pca(X, 0.8) and spectrum(X) is spectrum(X)
    assert pca(X, 0.8) is not pca(X, 0.8)  # outside a pass nothing is kept


def test_nleep_and_gbc_unchanged_against_sklearn_pca_path():
    """The exact shared PCA gives the values the sklearn PCA path gave (same GMM, same seed)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    from transferkit.rank import gbc, nleep
    from transferkit.rank.leep import empirical_predictor

    X, y = gauss(300, 30, c=3, seed=4)
    Z = PCA(n_components=0.8, svd_solver="full").fit_transform(X)
    theta = GaussianMixture(15, covariance_type="diag", random_state=0, reg_covar=1e-6).fit(Z).predict_proba(Z)
    cond = empirical_predictor(theta, y)
    expect = np.mean(np.log(np.einsum("nz,nz->n", theta, cond[y])))
    assert nleep(X, y, seed=0) == pytest.approx(expect, rel=1e-6)
    assert gbc(X, y) == pytest.approx(gbc(Z, y, pca=None), rel=1e-9)


@pytest.mark.parametrize("n,d", [(300, 20), (20, 50)])
def test_ledoit_wolf_shrinkage_closed_form_equals_sklearn(n, d):
    from sklearn.covariance import ledoit_wolf_shrinkage as sk

    from transferkit.rank.hscore import ledoit_wolf_shrinkage

    X, _ = gauss(n, d)
    Xc = X - X.mean(0)
    assert ledoit_wolf_shrinkage(Xc, spectrum(X)[0]) == pytest.approx(sk(Xc, assume_centered=True), rel=1e-9)


@pytest.mark.parametrize("case", ["constant", "n<d", "one-in-class"])
def test_degenerate_inputs_give_a_number_or_a_clear_error_never_nan(case):
    import warnings

    from transferkit.errors import DataError

    rng = np.random.default_rng(0)
    X, y = {"constant": (np.ones((60, 8)), np.arange(60) % 3),
            "n<d": (rng.normal(size=(12, 50)), np.arange(12) % 3),
            "one-in-class": (rng.normal(size=(31, 5)), np.r_[np.arange(30) % 2, 2])}[case]
    P = rng.dirichlet(np.ones(5), size=len(y))
    for name, m in METRICS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            try:
                v = m(X, y, probs=P if "probs" in m.needs else None)
            except DataError as e:
                assert name in str(e) and "\n" not in str(e)
                continue
        assert np.isfinite(v), (name, v)


# ---------------------------------------------------------------- speed-ups that must not change values
def _ped_dynamics_stepping_the_samples(X, y, dt=0.1, nsigma=0.6, exit_ratio=0.5, max_steps=6, eps=1e-3):
    """PED as the reference runs it: recompute class means and radii from the moved (N, D) array each step."""
    mean, std = X.mean(0), np.maximum(X.std(0), eps)
    Xs = (X - mean) / std
    first, steps = None, 0
    while steps < max_steps:
        C = int(y.max()) + 1
        mu = np.stack([Xs[y == c].mean(0) for c in range(C)])
        R = np.sqrt(np.stack([Xs[y == c].var(0) for c in range(C)]).sum(1))
        diff = mu[:, None] - mu[None]
        dist = np.linalg.norm(diff, axis=-1)
        F = np.maximum(nsigma * (R[:, None] + R[None]) - dist, 0.0)
        np.fill_diagonal(F, 0.0)
        unit = np.divide(diff, dist[..., None], out=np.zeros_like(diff), where=dist[..., None] > 0)
        disp = (unit * np.minimum(0.5 * dt**2 * F, F)[..., None]).sum(1)
        total = np.abs(disp).sum()
        first = total if first is None else first
        if first == 0 or total / first <= exit_ratio:
            break
        Xs = Xs + disp[y]
        steps += 1
    return Xs * std + mean, steps


def test_ped_dynamics_on_class_statistics_equals_stepping_the_samples():
    from transferkit.rank.ped import ped_dynamics

    for seed in range(3):
        X, y = gauss(300, 12, c=4, seed=seed)
        X = X * 0.2  # overlapping classes: several steps
        ref, ref_steps = _ped_dynamics_stepping_the_samples(X, y)
        ours, steps = ped_dynamics(X, y)
        assert steps == ref_steps and steps >= 2
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_within_scatter_and_class_translates_share_it():
    from transferkit.rank import ped, sfda
    from transferkit.rank._shared import declare_class_translate, within_scatter

    X, y = gauss(200, 10, c=3, seed=3)
    expect = sum(np.cov(X[y == c], rowvar=False, bias=True) * np.sum(y == c) for c in range(3))
    np.testing.assert_allclose(within_scatter(X, y), expect, rtol=1e-10, atol=1e-10 * np.abs(expect).max())
    Xm = X + np.array([[0.0] * 10, [3.0] * 10, [-1.0] * 10])[y]
    declare_class_translate(Xm, X, y)  # outside a pass: nothing is recorded
    assert within_scatter(Xm, y) is not within_scatter(Xm, y)
    with shared_pass():
        declare_class_translate(Xm, X, y)
        assert within_scatter(Xm, y) is within_scatter(X, y)
        np.testing.assert_allclose(within_scatter(Xm, y), expect, rtol=1e-10, atol=1e-10 * np.abs(expect).max())
        in_pass = sfda(Xm, y)
    assert in_pass == pytest.approx(sfda(Xm, y), rel=1e-10)  # the shared scatter changes SFDA only by round-off
    Xo, yo = gauss(300, 12, c=4, seed=1)
    Xo = Xo * 0.2
    from transferkit.rank.ped import ped_dynamics

    Xmo, steps = ped_dynamics(Xo, yo)
    assert steps >= 1
    assert ped(Xo, yo) == pytest.approx(sfda(Xmo, yo), rel=1e-10)  # ped's own pass reuses X's scatter


def test_memo_computes_each_entry_once_across_threads_and_forgets_failures():
    import contextvars
    import threading
    import time as _time

    from transferkit.rank._shared import _memo

    X = np.zeros(3)
    calls = []

    def slow():
        calls.append(1)
        _time.sleep(0.05)
        return object()

    got = []
    with shared_pass():
        ctxs = [contextvars.copy_context() for _ in range(4)]
        threads = [threading.Thread(target=lambda c=c: got.append(c.run(_memo, X, "k", slow))) for c in ctxs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1 and all(g is got[0] for g in got)

        def boom():
            raise ValueError("x")

        for _ in range(2):
            with pytest.raises(ValueError):
                _memo(X, "bad", boom)
        assert _memo(X, "bad", lambda: 5) == 5  # a failed computation is not kept


def _pass_inputs():
    X, y = gauss(500, 40, c=5, seed=6)
    X = X * 0.3
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(15), size=len(y))
    return {"a": Features(X=X, y=y, probs=P), "b": Features(X=X[:, ::-1] * 1.5 + 1.0, y=y, probs=P)}


def test_concurrent_pass_equals_sequential_pass_bit_for_bit():
    from threadpoolctl import threadpool_limits

    feats = _pass_inputs()
    with threadpool_limits(1):
        seq = rank_features(feats, "all", seed=3, workers=1)
    con = rank_features(feats, "all", seed=3, workers=2)
    assert con["scores"] == seq["scores"]  # exactly equal, every metric, every model
    assert con["ranking"] == seq["ranking"] and con["skipped"] == seq["skipped"]
    free = rank_features(feats, "all", seed=3, workers=1)  # default BLAS threads: equal up to round-off
    for name, by_model in free["scores"].items():
        for model, v in by_model.items():
            assert con["scores"][name][model] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, model)
    for res, w in [(seq, 1), (con, 2)]:
        assert set(res["pass_s"]) == {"a", "b"}
        for p in res["pass_s"].values():
            assert p["workers"] == w and p["wall"] > 0 and p["cpu"] >= 0
        assert all(len(t) == 2 and min(t.values()) >= 0 for t in res["time_s"].values())


def test_concurrent_pass_skips_and_errors_like_the_sequential_one(monkeypatch):
    from transferkit.rank import _auto_workers, available_cores
    from transferkit.rank._base import METRICS as REG

    assert available_cores() >= 1 and _auto_workers() == (2 if available_cores() >= 2 else 1)
    assert _auto_workers((60, 8)) == 1  # tiny features: threads would only add overhead
    X, y = gauss(120, 8, c=3, seed=2)
    feats = {"a": Features(X=X, y=y)}  # no probs: leep / nce skipped
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        seq = rank_features(feats, "all", workers=1)
    con = rank_features(feats, "all", workers=2)
    assert con["skipped"] == seq["skipped"] and {s["metric"] for s in con["skipped"]} == {"leep", "nce"}
    assert con["scores"] == seq["scores"] and set(con["scores"]["logme"]) == {"a"}

    from transferkit.errors import DataError

    def data_error(X, y, **kw):
        raise DataError("tmi: bad data")

    def broken(X, y, **kw):
        raise RuntimeError("not a data error")

    monkeypatch.setitem(REG, "tmi", REG["tmi"].__class__("tmi", data_error, data_error, "c"))
    res = rank_features(feats, "all", workers=2)
    assert {"model": "a", "metric": "tmi", "reason": "tmi: bad data"} in res["skipped"]
    assert res["scores"]["tmi"] == {} and set(res["scores"]["sfda"]) == {"a"}
    monkeypatch.setitem(REG, "tmi", REG["tmi"].__class__("tmi", broken, broken, "c"))
    with pytest.raises(RuntimeError, match="not a data error"):
        rank_features(feats, "all", workers=2)
