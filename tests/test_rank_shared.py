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
