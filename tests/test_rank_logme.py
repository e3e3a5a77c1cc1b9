"""LogME: fixed point vs the directly computed evidence, the N < D log-determinant defect, invariances."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from transferkit.rank import logme, logme_fit
from transferkit.rank.logme import _stats, _svd_projection, log_evidence


def _gauss(n, d, c=5, shift=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    X = rng.normal(size=(n, d))
    X[:, :c] += shift * np.eye(c)[y]
    return X, y


def _direct_evidence(F, t, alpha, beta):
    """log N(t; 0, β⁻¹I + α⁻¹FFᵀ) / N, computed from the N×N marginal covariance."""
    n = len(t)
    cov = np.eye(n) / beta + F @ F.T / alpha
    return multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(t) / n


def _direct_cholesky(F, t, alpha, beta):
    n = len(t)
    cov = np.eye(n) / beta + F @ F.T / alpha
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, t)
    return (-0.5 * z @ z - np.log(np.diag(L)).sum() - 0.5 * n * np.log(2 * np.pi)) / n


@pytest.mark.parametrize("n,d", [(120, 20), (40, 100), (30, 30)])
def test_fixed_point_equals_direct_evidence(n, d):
    X, y = _gauss(n, d, c=3)
    fit = logme_fit(X, y)
    Y = np.eye(3)[y]
    for c in range(3):
        direct = _direct_evidence(X, Y[:, c], fit.alphas[c], fit.betas[c])
        assert fit.evidences[c] == pytest.approx(direct, rel=1e-8, abs=1e-8)
        assert _direct_cholesky(X, Y[:, c], fit.alphas[c], fit.betas[c]) == pytest.approx(direct, rel=1e-8)
    assert fit.score == pytest.approx(np.mean(fit.evidences))
    assert fit.rank == min(n, d)


def test_reference_logdet_omission_differs_only_when_n_lt_d():
    """thuml/LogME issue #23: the fixed-point path drops (D − k)·log α from log|A|."""
    Xs, ys = _gauss(40, 100, c=3)
    padded = logme(Xs, ys)
    unpadded = logme(Xs, ys, pad_logdet=False)
    assert unpadded - padded > 0.1  # the omission inflates the score when N < D
    # and the padded value is the one matching the directly computed evidence
    fit = logme_fit(Xs, ys)
    Y = np.eye(3)[ys]
    direct = np.mean([_direct_evidence(Xs, Y[:, c], fit.alphas[c], fit.betas[c]) for c in range(3)])
    assert padded == pytest.approx(direct, rel=1e-8)
    assert unpadded != pytest.approx(direct, rel=1e-3)
    # harmless when N >= D (k = D)
    Xb, yb = _gauss(200, 30, c=3)
    assert logme(Xb, yb) == pytest.approx(logme(Xb, yb, pad_logdet=False), rel=1e-12)


def test_published_synthetic_magnitudes():
    """rank.md table (N=200, D=512, 5 classes): correct ≈ −0.59, reference-style ≈ +5.5."""
    X, y = _gauss(200, 512, c=5)
    assert -0.8 < logme(X, y) < -0.4
    assert logme(X, y, pad_logdet=False) > 3.0


def test_fixed_point_is_a_local_maximum_of_the_evidence():
    X, y = _gauss(60, 150, c=3, seed=1)
    F = X
    t = np.eye(3)[y][:, 0]
    fit = logme_fit(X, y, max_iter=500, tol=1e-12)
    a, b = fit.alphas[0], fit.betas[0]

    def L(al, be):
        return _direct_evidence(F, t, al, be)

    best = L(a, b)
    for fa, fb in [(1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95), (1.05, 1.05), (0.95, 0.95)]:
        assert L(a * fa, b * fb) < best


def test_weights_are_posterior_mean():
    X, y = _gauss(80, 10, c=2, seed=2)
    fit = logme_fit(X, y)
    t = np.eye(2)[y][:, 1]
    a, b = fit.alphas[1], fit.betas[1]
    A = a * np.eye(10) + b * X.T @ X
    m = b * np.linalg.solve(A, X.T @ t)
    np.testing.assert_allclose(fit.weights[1], m, rtol=1e-8, atol=1e-10)


def test_label_permutation_and_relabelling_invariance():
    X, y = _gauss(150, 40, c=4, seed=3)
    base = logme(X, y)
    perm = np.array([2, 0, 3, 1])
    assert logme(X, perm[y]) == pytest.approx(base, rel=1e-12)
    assert logme(X, 10 * y + 7) == pytest.approx(base, rel=1e-12)  # arbitrary integer ids
    p = np.random.default_rng(0).permutation(len(y))
    assert logme(X[p], y[p]) == pytest.approx(base, rel=1e-9)


def test_regression_targets():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(100, 8))
    T = np.stack([X @ rng.normal(size=8) + 0.1 * rng.normal(size=100), rng.normal(size=100)], 1)
    both = logme(X, T, regression=True)
    one = logme(X, T[:, 0], regression=True)
    two = logme(X, T[:, 1], regression=True)
    assert both == pytest.approx((one + two) / 2, rel=1e-12)
    assert one > two  # a linear target has far more evidence than noise
    fit = logme_fit(X, T[:, 0], regression=True)
    assert fit.evidences[0] == pytest.approx(_direct_evidence(X, T[:, 0], fit.alphas[0], fit.betas[0]), rel=1e-8)


def test_more_separation_scores_higher():
    scores = [logme(*_gauss(200, 32, c=4, shift=s, seed=5)) for s in (0.0, 1.0, 3.0)]
    assert scores[0] < scores[1] < scores[2]


def test_log_evidence_helper_matches_padded_spectrum():
    X, y = _gauss(30, 80, c=2, seed=6)
    t = np.eye(2)[y][:, :1]
    s, V, xs = _svd_projection(X, t)
    sigma = (s**2)[:, None]
    x2 = xs**2
    r0 = np.array([t[:, 0] @ t[:, 0] - x2.sum()])
    a, b = np.array([2.0]), np.array([3.0])
    _, m2, res2 = _stats(a / b, sigma, x2, r0)
    padded = log_evidence(a, b, np.concatenate([s**2, np.zeros(80 - len(s))]), m2, res2, 30, 80, pad_logdet=False)
    assert log_evidence(a, b, s**2, m2, res2, 30, 80)[0] == pytest.approx(padded[0], rel=1e-12)
    assert log_evidence(a, b, s**2, m2, res2, 30, 80)[0] == pytest.approx(_direct_evidence(X, t[:, 0], 2.0, 3.0), rel=1e-8)


@pytest.mark.parametrize("n,d", [(200, 30), (30, 80)])
def test_svd_projection_both_routes_equal_numpy_svd(n, d):
    X, y = _gauss(n, d, c=3, seed=7)
    Y = np.eye(3)[y]
    s, V, xs = _svd_projection(X, Y)
    U, s_ref, Vt = np.linalg.svd(X, full_matrices=False)
    k = len(s)
    np.testing.assert_allclose(s, s_ref[:k], rtol=1e-9)
    sign = np.sign(np.sum(V * Vt[:k].T, axis=0))  # singular vectors are defined up to sign
    np.testing.assert_allclose(xs * sign[:, None], U[:, :k].T @ Y, atol=1e-8)


def test_alpha_beta_reset_per_class():
    """flairNLP/transformer-ranker carries α, β over from one class to the next; each class here is
    fitted independently, so its evidence equals the single-column regression fit of that column."""
    X, y = _gauss(90, 25, c=4, seed=7)
    fit = logme_fit(X, y)
    Y = np.eye(4)[y]
    for c in range(4):
        single = logme_fit(X, Y[:, c], regression=True)
        assert fit.evidences[c] == pytest.approx(single.evidences[0], rel=1e-12)
        assert fit.alphas[c] == pytest.approx(single.alphas[0], rel=1e-12)
    # and the order of the classes does not matter
    rev = logme_fit(X, 3 - y)
    np.testing.assert_allclose(rev.evidences[::-1], fit.evidences, rtol=1e-12)


@pytest.mark.parametrize("offset,dead", [(0.0, 0), (30.0, 0), (5.0, 4)])
def test_centred_rank_one_route_equals_svd_route_and_direct_evidence(offset, dead):
    """N > D: LogME from the shared centred eigensystem (FᵀF = XcᵀXc + NμμᵀSherman–Morrison) equals the
    thin-SVD formulas and the directly computed evidence, also for a large feature mean and dead columns."""
    from transferkit.rank.logme import _Rank1Resolvent

    X, y = _gauss(150, 24, c=3, seed=8)
    X = X + offset
    X[:, :dead] = 0.0  # rank-deficient F (ReLU units that never fire)
    Y = np.eye(3)[y]
    t = np.array([0.05, 3.0, 400.0])
    gamma, m2, res2, logdet, _ = _Rank1Resolvent(X, Y).stats(t)
    s, _, xs = _svd_projection(X, Y)
    x2 = xs**2
    r0 = np.clip((Y**2).sum(0) - x2.sum(0), 0.0, None)
    g_ref, m2_ref, res2_ref = _stats(t, (s**2)[:, None], x2, r0)
    np.testing.assert_allclose(gamma, g_ref, rtol=1e-9)
    np.testing.assert_allclose(m2, m2_ref, rtol=1e-8)
    np.testing.assert_allclose(res2, res2_ref, rtol=1e-9)
    sig = np.concatenate([s**2, np.zeros(24 - len(s))])[:, None]
    np.testing.assert_allclose(logdet, np.log(sig + t).sum(0), rtol=1e-10)
    fit = logme_fit(X, y)
    assert fit.rank == 24 - dead
    for c in range(3):
        direct = _direct_evidence(X, Y[:, c], fit.alphas[c], fit.betas[c])
        assert fit.evidences[c] == pytest.approx(direct, rel=1e-8, abs=1e-8)
    A = fit.alphas[1] * np.eye(24) + fit.betas[1] * X.T @ X  # posterior mean weights
    np.testing.assert_allclose(fit.weights[1], fit.betas[1] * np.linalg.solve(A, X.T @ Y[:, 1]), rtol=1e-6, atol=1e-9)
