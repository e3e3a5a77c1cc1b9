"""Closed forms, brute force, invariances and upstream-defect regressions for each metric."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import spearmanr

from transferkit.rank import METRICS, gbc, hscore, leep, nce, nleep, parc, ped, sfda, shrinkage_hscore, tmi, transrate
from transferkit.rank.parc import subsample_indices
from transferkit.rank.ped import ped_dynamics
from transferkit.rank.sfda import fda_proba, sfda_shrinkage
from transferkit.rank.tmi import kl_entropy
from transferkit.rank.transrate import coding_rate


def gauss(n=300, d=16, c=4, shift=1.0, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    M = np.random.default_rng(1000 + seed).normal(size=(c, d))
    X = scale * rng.normal(size=(n, d)) + shift * M[y]
    return X, y


def source_probs(y, strength, cs=8, seed=0):
    rng = np.random.default_rng(seed)
    W = np.random.default_rng(99).normal(size=(int(y.max()) + 1, cs))
    logits = strength * W[y] + rng.normal(size=(len(y), cs))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


# ---------------------------------------------------------------- LEEP / NCE
def test_leep_brute_force_3x3():
    theta = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    y = np.array([0, 1, 2, 0, 2, 1])
    n = len(y)
    joint = np.zeros((3, 3))
    for i in range(n):
        for z in range(3):
            joint[y[i], z] += theta[i, z] / n
    total = 0.0
    for i in range(n):
        s = 0.0
        for z in range(3):
            s += joint[y[i], z] / joint[:, z].sum() * theta[i, z]
        total += np.log(s)
    assert leep(None, y, probs=theta) == pytest.approx(total / n, rel=1e-12)
    assert leep(None, y, probs=theta) <= 0


def test_leep_uses_log_not_mean_probability():
    """TencentARC/SFDA LEEP() returns mean p ("log ignored"); LEEP is mean log p."""
    X, y = gauss(200)
    p = source_probs(y, 1.0)
    val = leep(None, y, probs=p)
    assert val < 0
    from transferkit.rank.leep import empirical_predictor

    eep = np.einsum("nz,nz->n", p, empirical_predictor(p, y)[y])
    assert val == pytest.approx(np.mean(np.log(eep)))
    assert val != pytest.approx(np.mean(eep), abs=1e-3)


def test_leep_one_hot_equals_nce_and_zero_when_deterministic():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 6, 200)
    y = rng.integers(0, 3, 200)
    oh = np.eye(6)[z]
    assert leep(None, y, probs=oh) == pytest.approx(nce(None, y, probs=oh), rel=1e-12)
    ydet = z % 3  # y a deterministic function of z
    assert nce(None, ydet, probs=oh) == pytest.approx(0.0, abs=1e-12)
    assert leep(None, ydet, probs=oh) == pytest.approx(0.0, abs=1e-12)
    assert nce(None, y, probs=oh) < 0


def test_nce_brute_force():
    z = np.array([0, 0, 1, 1, 1, 2])
    y = np.array([0, 1, 1, 1, 0, 0])
    # H(Y|Z) = P(z=0)H(.5,.5) + P(z=1)H(2/3,1/3) + 0
    h = 2 / 6 * np.log(2) + 3 / 6 * -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert nce(None, y, probs=np.eye(3)[z]) == pytest.approx(-h, rel=1e-12)


def test_leep_nce_label_relabelling_invariant():
    X, y = gauss(200)
    p = source_probs(y, 1.0)
    perm = np.array([3, 1, 0, 2])
    assert leep(None, perm[y], probs=p) == pytest.approx(leep(None, y, probs=p), rel=1e-12)
    assert nce(None, perm[y], probs=p) == pytest.approx(nce(None, y, probs=p), rel=1e-12)


# ---------------------------------------------------------------- H-score
def test_hscore_brute_force_matrix_product_not_elementwise():
    X, y = gauss(120, 8, c=3)
    g = np.zeros_like(X)
    for c in range(3):
        g[y == c] = X[y == c].mean(0)
    A = np.linalg.pinv(np.cov(X, rowvar=False), rcond=1e-15)
    B = np.cov(g, rowvar=False)
    assert hscore(X, y) == pytest.approx(np.trace(A @ B), rel=1e-9)
    # stable_transfer hscore.py: tr(pinv(cov) * cov_g) element-wise — a different number
    assert np.trace(A * B) != pytest.approx(hscore(X, y), rel=1e-3)


def test_hscore_invariant_to_rotation_and_invertible_maps():
    X, y = gauss(200, 10, c=3)
    Q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
    assert hscore(X @ Q, y) == pytest.approx(hscore(X, y), rel=1e-8)
    S = np.diag(np.arange(1, 11.0))
    assert hscore(X @ S + 5.0, y) == pytest.approx(hscore(X, y), rel=1e-8)


def test_shrinkage_hscore_brute_force_and_limit():
    from sklearn.covariance import LedoitWolf

    X, y = gauss(150, 12, c=3)
    lw = LedoitWolf().fit(X)
    g = np.zeros_like(X)
    for c in range(3):
        g[y == c] = X[y == c].mean(0)
    expect = np.trace(np.linalg.inv(lw.covariance_) @ ((1 - lw.shrinkage_) * np.cov(g, rowvar=False)))
    assert shrinkage_hscore(X, y) == pytest.approx(expect, rel=1e-8)
    # with N >> D shrinkage vanishes and it approaches the plain H-score
    Xb, yb = gauss(4000, 6, c=3)
    assert shrinkage_hscore(Xb, yb) == pytest.approx(hscore(Xb, yb), rel=0.02)
    # N < D: the plain H-score saturates at C − 1 whatever the features; the shrinkage one still ranks
    weak, ys = gauss(30, 200, c=3, shift=0.1)
    strong, _ = gauss(30, 200, c=3, shift=2.0)
    assert hscore(weak, ys) == pytest.approx(2.0, rel=1e-6) and hscore(strong, ys) == pytest.approx(2.0, rel=1e-6)
    assert shrinkage_hscore(strong, ys) > shrinkage_hscore(weak, ys) + 0.1


# ---------------------------------------------------------------- TransRate
def test_transrate_brute_force_slogdet():
    X, y = gauss(60, 9, c=3)
    eps = 1e-4

    def R(Z):
        n, d = Z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + Z.T @ Z / (n * eps))[1]

    Z = X - X.mean(0)
    expect = R(Z) - np.mean([R(Z[y == c]) for c in range(3)])
    assert transrate(X, y) == pytest.approx(expect, rel=1e-9)
    # the n×n Gram route (n < d) gives the same coding rate
    W = np.random.default_rng(0).normal(size=(5, 40))
    assert coding_rate(W) == pytest.approx(R(W), rel=1e-9)


# ---------------------------------------------------------------- GBC
@pytest.mark.parametrize("gtype", ["diagonal", "spherical"])
def test_gbc_brute_force_and_nonpositive(gtype):
    X, y = gauss(90, 5, c=3, shift=1.5)
    total = 0.0
    stats = [(X[y == c].mean(0), np.maximum(X[y == c].var(0), 1e-4)) for c in range(3)]
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            (m1, v1), (m2, v2) = stats[i], stats[j]
            if gtype == "spherical":
                v1, v2 = np.full(5, v1.mean()), np.full(5, v2.mean())
            vb = (v1 + v2) / 2
            db = np.sum((m1 - m2) ** 2 / vb) / 8 + 0.5 * np.sum(np.log(vb) - 0.5 * np.log(v1) - 0.5 * np.log(v2))
            total += np.exp(-db)
    assert gbc(X, y, pca=None, gaussian_type=gtype) == pytest.approx(-total, rel=1e-9)
    assert gbc(X, y, gaussian_type=gtype) <= 0


# ---------------------------------------------------------------- PARC
def test_parc_brute_force_spearman_small():
    X, y = gauss(60, 8, c=3)
    Z = (X - X.mean(0)) / X.std(0)
    rf = 1 - np.corrcoef(Z)
    ry = np.round(1 - np.corrcoef(np.eye(3)[y]), 12)  # exact ties (corrcoef leaves ~1e-16 noise)
    iu = np.triu_indices(60, 1)
    expect = 100 * spearmanr(rf[iu], ry[iu]).statistic
    assert parc(X, y, n_dims=None) == pytest.approx(expect, rel=1e-9)


def test_parc_subsampling_really_subsamples():
    """TencentARC/SFDA PARC_Score builds a subsample and then scores the full array."""
    X, y = gauss(400, 40, c=4)
    idx = subsample_indices(400, 150, seed=3)
    assert len(idx) == 150 and len(np.unique(idx)) == 150
    full_sub = parc(X, y, max_samples=150, seed=3)
    assert full_sub == pytest.approx(parc(X[idx], y[idx], max_samples=None, seed=3), rel=1e-9)
    out = np.setdiff1d(np.arange(400), idx)
    X2 = X.copy()
    X2[out] = np.random.default_rng(9).normal(size=(len(out), 40)) * 100  # rows outside the subsample
    assert parc(X2, y, max_samples=150, seed=3) == pytest.approx(full_sub, rel=1e-9)
    X3 = X.copy()
    X3[idx[:50]] *= -3
    assert parc(X3, y, max_samples=150, seed=3) != pytest.approx(full_sub, rel=1e-6)


# ---------------------------------------------------------------- SFDA
def _reference_fda_proba(X, y, lam):
    """FDA as described in the paper/reference: generalised eigh(S_b, S̃_w), coef = μVVᵀ."""
    C, D = int(y.max()) + 1, X.shape[1]
    prior = np.bincount(y) / len(y)
    means = np.stack([X[y == c].mean(0) for c in range(C)])
    Sw = sum(prior[c] * np.cov(X[y == c], rowvar=False, bias=True) for c in range(C))

    def shrink(S):
        return (1 - lam) * S + lam * np.trace(S) / D * np.eye(D)

    St = shrink(np.cov(X, rowvar=False, bias=True))
    Swt = shrink(Sw)
    ev, V = scipy.linalg.eigh(St - Swt, Swt)
    V = V[:, np.argsort(ev)[::-1]]
    coef = means @ V @ V.T
    b = -0.5 * np.diag(means @ coef.T) + np.log(prior)
    logits = X @ coef.T + b
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_sfda_fda_matches_generalised_eigen_formulation():
    X, y = gauss(200, 12, c=4, scale=0.3)
    p, lam = fda_proba(X, y)
    np.testing.assert_allclose(p, _reference_fda_proba(X, y, lam), rtol=1e-6, atol=1e-9)
    Sw = sum((np.bincount(y)[c] / 200) * np.cov(X[y == c], rowvar=False, bias=True) for c in range(4))
    lam_max = np.linalg.eigvalsh(Sw)[-1]
    assert sfda_shrinkage(Sw, n_power=200) == pytest.approx(max(np.exp(-5 * lam_max), 1e-10), rel=1e-6)


def test_sfda_never_mutates_input():
    """The reference ConfMix writes into the caller's X."""
    X, y = gauss(200, 12, c=4)
    X64 = np.ascontiguousarray(X, dtype=np.float64)
    before = X64.copy()
    sfda(X64, y)
    np.testing.assert_array_equal(X64, before)
    X32 = X.astype(np.float32)
    b32 = X32.copy()
    sfda(X32, y)
    ped(X64, y)
    np.testing.assert_array_equal(X32, b32)
    np.testing.assert_array_equal(X64, before)


def test_sfda_in_unit_interval_and_handles_n_lt_d():
    X, y = gauss(40, 100, c=4, scale=5.0)  # large λ_max → λ = 1e-10, singular S_w
    v = sfda(X, y)
    assert 0 < v <= 1


# ---------------------------------------------------------------- N-LEEP
def test_nleep_seeded_and_log_scale():
    X, y = gauss(300, 16, c=3, shift=1.5)
    a = nleep(X, y, seed=1)
    assert a == nleep(X, y, seed=1)
    assert a <= 0  # mean log p, not mean p (TencentARC/SFDA NLEEP defect)
    full = nleep(X, y, seed=1, covariance_type="full", component_ratio=2)
    assert full <= 0


# ---------------------------------------------------------------- TMI
def test_kl_entropy_known_distributions():
    rng = np.random.default_rng(0)
    U = rng.uniform(0, 10, size=(3000, 2))
    assert kl_entropy(U, k=3, min_dist=0.0) == pytest.approx(2 * np.log(10), abs=0.08)
    G = rng.normal(scale=2.0, size=(3000, 3))
    assert kl_entropy(G, k=3, min_dist=0.0) == pytest.approx(1.5 * np.log(2 * np.pi * np.e * 4), abs=0.12)


def test_tmi_tracks_intra_class_variance_not_separation():
    X1, y = gauss(300, 8, c=3, shift=0.0, scale=3.0)
    X2, _ = gauss(300, 8, c=3, shift=0.0, scale=6.0)
    assert tmi(X2, y) > tmi(X1, y)
    # shifting whole classes (more separation) leaves within-class k-NN distances unchanged
    Xs = X1 + 50 * np.eye(3, 8)[y]
    assert tmi(Xs, y) == pytest.approx(tmi(X1, y), rel=1e-9)


def test_tmi_brute_force_one_class():
    X, y = gauss(40, 3, c=2, shift=0.0, scale=4.0)
    from scipy.special import digamma

    Z = X - X.mean(0)
    vals = []
    for c in range(2):
        Zc = Z[y == c]
        D = np.abs(Zc[:, None, :] - Zc[None, :, :]).max(-1)
        r = np.maximum(np.sort(D, axis=1)[:, 3], 1.0)
        h = -digamma(3) + digamma(len(Zc)) + 3 * np.mean(np.log(2 * r))
        vals.append(len(Zc) / 40 * h)
    assert tmi(X, y) == pytest.approx(np.mean(vals), rel=1e-9)


# ---------------------------------------------------------------- PED
def test_ped_pushes_overlapping_classes_apart():
    X, y = gauss(300, 8, c=3, shift=0.5)
    Xm, steps = ped_dynamics(X, y)
    assert steps >= 1
    d0 = np.linalg.norm(X[y == 0].mean(0) - X[y == 1].mean(0))
    d1 = np.linalg.norm(Xm[y == 0].mean(0) - Xm[y == 1].mean(0))
    assert d1 > d0
    # within-class geometry is preserved (every sample of a class moves by the same vector)
    np.testing.assert_allclose(Xm[y == 0] - Xm[y == 0].mean(0), X[y == 0] - X[y == 0].mean(0), atol=1e-9)
    assert ped(X, y) >= sfda(X, y) - 1e-9


def test_ped_no_motion_for_well_separated_classes_and_reference_option():
    X, y = gauss(300, 4, c=3, shift=50.0, scale=0.1)
    Xm, steps = ped_dynamics(X, y, nsigma=0.3)
    assert steps == 0 and np.allclose(Xm, X)
    assert ped(X, y, base="logme", nsigma=0.3) == pytest.approx(METRICS["logme"](X, y), rel=1e-9)
    Xo, yo = gauss(200, 8, c=3, shift=0.5)
    ref = np.random.default_rng(5).normal(size=(500, 8)) * 3
    assert np.isfinite(ped(Xo, yo, reference=ref))
    assert ped(Xo, yo, reference=ref) != pytest.approx(ped(Xo, yo), rel=1e-9)
