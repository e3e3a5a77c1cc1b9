"""Transductive multi-view zero-shot learning (transferkit.adapt.zeroshot): multi-view CCA against the canonical
correlations computed directly and by scikit-learn, label propagation's closed form against its iteration, item
order invariance, unseen classes only, a real Fashion-MNIST split above chance, one-line errors."""

import numpy as np
import pytest
import scipy.sparse as sp

from transferkit import registry
from transferkit.adapt.zeroshot import ZeroShotOptions, knn_graph, mvcca, propagate, zero_shot
from transferkit.errors import ConfigError, DataError

UNSEEN = ["T-shirt/top", "Trouser", "Sneaker"]


def correlated(n=400, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    X = z @ rng.normal(size=(2, 5)) + rng.normal(size=(n, 5))
    Y = z @ rng.normal(size=(2, 4)) + 0.5 * rng.normal(size=(n, 4)) + 3.0
    return X, Y


def test_two_view_mvcca_gives_the_canonical_correlations():
    from sklearn.cross_decomposition import CCA

    X, Y = correlated()
    (Wx, Wy), lam, means = mvcca([X, Y], dim=2)
    for j in range(2):  # λ = 1 + ρ, and ρ is the correlation of the two projections
        rho = np.corrcoef((X - means[0]) @ Wx[:, j], (Y - means[1]) @ Wy[:, j])[0, 1]
        assert lam[j] - 1 == pytest.approx(rho, abs=1e-8)
    u, v = CCA(n_components=1, max_iter=5000, tol=1e-12).fit(X, Y).transform(X, Y)
    assert lam[0] - 1 == pytest.approx(np.corrcoef(u[:, 0], v[:, 0])[0, 1], abs=1e-6)
    # D-orthonormal: Σ_v W_vᵀ Σ_vv W_v = I
    gram = sum(W.T @ np.cov(Z, rowvar=False) @ W for W, Z in ((Wx, X), (Wy, Y)))
    np.testing.assert_allclose(gram, np.eye(2), atol=1e-8)


def test_mvcca_of_three_views_maximises_the_summed_covariance():
    # the top direction's eigenvalue equals Rayleigh quotient wᵀCw / wᵀDw of the stacked projection
    X, Y = correlated()
    Z = X[:, :3] + np.random.default_rng(1).normal(size=(len(X), 3))
    Ws, lam, _ = mvcca([X, Y, Z], dim=1, reg=0.1)
    Zs = [V - V.mean(0) for V in (X, Y, Z)]
    proj = [V @ W[:, 0] for V, W in zip(Zs, Ws)]
    total = sum(proj)
    within = sum((p ** 2).sum() for p in proj) + 0.1 * sum(
        np.trace(np.cov(V, rowvar=False)) / V.shape[1] * (W[:, 0] ** 2).sum() * (len(X) - 1) for V, W in zip(Zs, Ws))
    assert lam[0] == pytest.approx((total ** 2).sum() / within, rel=1e-8)
    rng = np.random.default_rng(2)
    for _ in range(200):  # and no other direction does better
        ws = [rng.normal(size=V.shape[1]) for V in Zs]
        t = sum(V @ w for V, w in zip(Zs, ws))
        d = sum(((V @ w) ** 2).sum() + 0.1 * np.trace(np.cov(V, rowvar=False)) / V.shape[1] * (w ** 2).sum()
                * (len(X) - 1) for V, w in zip(Zs, ws))
        assert (t ** 2).sum() / d <= lam[0] + 1e-9


def test_label_propagation_closed_form_equals_its_iteration():
    rng = np.random.default_rng(0)
    A = rng.random((30, 30)) * (rng.random((30, 30)) < 0.2)
    W = A + A.T
    W[5, :] = W[:, 5] = 0  # an isolated node keeps 0 + (1 − α) Y
    Y = np.zeros((30, 3))
    Y[:3] = np.eye(3)
    Y[5, 1] = 1.0
    alpha = 0.8
    d = W.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0.0)
    S = inv[:, None] * W * inv[None, :]
    F = Y.copy()
    for _ in range(500):
        F = alpha * S @ F + (1 - alpha) * Y
    np.testing.assert_allclose(propagate(sp.csr_matrix(W), Y, alpha), F, atol=1e-10)


def test_knn_graph_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(25, 4))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    G = knn_graph(X, 3).toarray()
    naive = np.zeros((25, 25))
    for i in range(25):
        sims = [(X[i] @ X[j], j) for j in range(25) if j != i]
        for s, j in sorted(sims, reverse=True)[:3]:
            naive[i, j] = naive[j, i] = max(s, 0.0)
    np.testing.assert_allclose(G, naive, atol=1e-12)


def synthetic(seed=0):
    """Seen/unseen items whose features are noisy linear images of their class vectors."""
    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(8)]
    vecs = {"a": dict(zip(classes, rng.normal(size=(8, 6)))), "b": dict(zip(classes, rng.normal(size=(8, 5))))}
    M = rng.normal(size=(11, 20))
    y = rng.integers(0, 8, size=300)
    X = np.concatenate([[vecs["a"][classes[i]] for i in y], [vecs["b"][classes[i]] for i in y]], 1) @ M
    X += 0.3 * rng.normal(size=X.shape)
    seen = y < 5
    return X[seen], y[seen], X[~seen], y[~seen] - 5, classes[:5], classes[5:], vecs


def test_only_unseen_classes_are_predicted_and_the_result_is_reproducible():
    Xs, ys, Xt, yt, seen, unseen, vecs = synthetic()
    res = zero_shot(Xs, ys, Xt, seen, unseen, descriptions=vecs, options={"dim": 8})
    assert res.classes == unseen
    assert set(np.unique(res.predictions)) <= {0, 1, 2}
    assert res.scores.shape == (len(Xt), 3)
    assert all(set(np.unique(p)) <= {0, 1, 2} for p in res.baselines.values())
    again = zero_shot(Xs, ys, Xt, seen, unseen, descriptions=vecs, options={"dim": 8})
    np.testing.assert_array_equal(res.predictions, again.predictions)
    assert res.accuracy(yt)["dap"] > 0.6  # the class vectors determine the features: far above chance


@pytest.fixture(scope="module")
def fashion():
    from transferkit.adapt.zeroshot import describe
    from transferkit.data import load_dataset
    from transferkit.features import extract

    ds = load_dataset("fashion-mnist", limit=1000, seed=0)
    f = extract("digits-mnist", ds, progress=False, cache=False)
    desc = describe(ds.classes, ["paraphrase-minilm-l3-v2", "all-mpnet-base-v2"])
    unseen = [ds.classes.index(c) for c in UNSEEN]
    seen = [i for i in range(10) if i not in unseen]
    s, t = np.isin(ds.y, seen), np.isin(ds.y, unseen)
    return (f.X[s], np.searchsorted(seen, ds.y[s]), f.X[t], np.searchsorted(unseen, ds.y[t]),
            [ds.classes[i] for i in seen], UNSEEN, desc)


@pytest.mark.slow
def test_real_split_beats_chance_and_transduction_helps(fashion):
    Xs, ys, Xt, yt, seen, unseen, desc = fashion
    acc = zero_shot(Xs, ys, Xt, seen, unseen, descriptions=desc).accuracy(yt)
    assert acc["zero_shot"] == acc["views"] > acc["dap"] > 0.45  # 3 unseen classes: chance 1/3; measured 0.95, 0.84
    assert acc["tmv"] > 0.45  # the paper's embedding (measured 0.63)


@pytest.mark.slow
def test_predictions_follow_the_items_when_their_order_changes(fashion):
    Xs, ys, Xt, yt, seen, unseen, desc = fashion
    opts = ZeroShotOptions(space="embedding")
    res = zero_shot(Xs, ys, Xt, seen, unseen, descriptions=desc, options=opts)
    rng = np.random.default_rng(1)
    pt, ps = rng.permutation(len(Xt)), rng.permutation(len(Xs))
    moved = zero_shot(Xs[ps], ys[ps], Xt[pt], seen, unseen, descriptions=desc, options=opts)
    np.testing.assert_array_equal(moved.predictions, res.predictions[pt])
    for name in ("dap", "embed", "tmv", "views"):
        assert (moved.baselines[name] == res.baselines[name][pt]).mean() > 0.99, name  # float rounding only
    np.testing.assert_allclose(moved.scores, res.scores[pt], atol=1e-8)


def test_bad_inputs_are_one_line_errors():
    Xs, ys, Xt, _, seen, unseen, vecs = synthetic()
    with pytest.raises(ConfigError, match="both seen and unseen") as e:
        zero_shot(Xs, ys, Xt, seen, [seen[0], *unseen], descriptions=vecs)
    assert "\n" not in str(e.value)
    partial = {"a": vecs["a"], "b": {c: v for c, v in vecs["b"].items() if c != unseen[1]}}
    with pytest.raises(ConfigError, match=f"class '{unseen[1]}' has no description in view 'b'"):
        zero_shot(Xs, ys, Xt, seen, unseen, descriptions=partial)
    with pytest.raises(ConfigError, match="at least 2 unseen"):
        zero_shot(Xs, ys, Xt, seen, unseen[:1], descriptions=vecs)
    with pytest.raises(DataError, match="no item"):
        zero_shot(Xs[ys != 2], ys[ys != 2], Xt, seen, unseen, descriptions=vecs)
    with pytest.raises(DataError, match="seen labels must index"):
        zero_shot(Xs, ys + 1, Xt, seen, unseen, descriptions=vecs)
    with pytest.raises(DataError, match="one D"):
        zero_shot(Xs, ys, Xt[:, :3], seen, unseen, descriptions=vecs)
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        zero_shot(Xs, ys, Xt, seen, unseen, descriptions=vecs, options={"alpah": 0.5})


def test_registered_as_a_zero_shot_method_of_the_adapt_stage():
    m = registry.get("adapt", "tmv-zsl")
    assert m.info["kind"] == "zero-shot" and m.fn is zero_shot
    assert "Fu" in m.paper and "2015" in m.paper
