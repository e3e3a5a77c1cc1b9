"""ParetoDA: the preference LP against a brute-force search of the simplex, the fixed-preference fallback, the
backbone's gradient = 3 Σ α_k ∇L_k (the heads' plain), TCM and the Bayesian refinement, the per-class
discriminator loss (the reference's overwritten mask), the guided mode actually running, training end to end."""

import logging

import numpy as np
import pytest
import torch
from test_adapt_tta import toy_data, toy_model
from torch import nn

from transferkit import registry
from transferkit.adapt import adapt, paretoda
from transferkit.adapt.paretoda import LPFailed, preference
from transferkit.engine import grad_reverse

SIMPLEX = np.array([(i, j, 400 - i - j) for i in range(401) for j in range(401 - i)], dtype=float) / 400


def brute_force(G, g_val, guided, relaxed=False, tol=1e-9):
    """The LP's optimum by enumerating the simplex, with the constraints written on d = Gᵀα directly."""
    gg = G @ g_val  # how each objective's gradient agrees with the held-out gradient
    D = SIMPLEX @ G  # one direction d = Gᵀα per row
    gd = D @ G.T  # (n, 3): g_j · d
    if guided:
        value = D @ g_val  # αᵀ G g_val: the held-out loss's first-order decrease
        if (gg > 0).any():
            star = int(np.argmax(gg))
            ok = gd[:, star] >= -tol
            for j in range(3):
                if gg[j] <= 0:
                    ok &= gd[:, j] >= gg[j] - tol
        else:
            ok = (gd >= -tol).all(1)
    else:
        value = gd.sum(1)
        ok = (gd >= -tol).all(1)
        if not relaxed:
            ok &= SIMPLEX @ gg >= min(gg.max(), 0) - tol
    if not ok.any():
        return -np.inf, None
    i = int(np.argmax(np.where(ok, value, -np.inf)))
    return float(value[i]), SIMPLEX[i]


def lp_value(G, g_val, alpha, guided):
    d = G.T @ alpha
    return float(g_val @ d) if guided else float((G @ d).sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["guided", "dominance", "relaxed"])
def test_the_lp_matches_a_brute_force_search_of_the_simplex(seed, mode):
    rng = np.random.default_rng(seed)
    G, g_val = rng.normal(size=(3, 5)), rng.normal(size=5)
    guided = mode == "guided"
    want, _ = brute_force(G, g_val, guided, relaxed=mode == "relaxed")
    try:
        alpha, got_mode = preference(G, g_val, 1.0 if guided else 0.0, relaxed=mode == "relaxed")
    except LPFailed:
        assert want == -np.inf  # the grid finds no feasible point either
        return
    assert got_mode == ("guided" if guided else "dominance")
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    got = lp_value(G, g_val, alpha, guided)
    assert want > -np.inf and got >= want - 1e-9  # optimal: at least the grid's best feasible value
    assert got <= want + 0.02 * max(1.0, abs(want))  # and the grid's best is close to it (grid step 1/400)
    # the LP's α satisfies the constraints (within the solver's tolerance)
    d, gg = G.T @ alpha, G @ g_val
    if guided and (gg > 0).any():
        for j in range(3):
            if gg[j] <= 0:
                assert G[j] @ d >= gg[j] - 1e-7
        assert G[int(np.argmax(gg))] @ d >= -1e-7
    elif not guided:
        assert (G @ d >= -1e-7).all()


def test_hand_made_guided_lp():
    """g_val = e1; objective 1 agrees with it, 2 is orthogonal, 3 opposes it. Moving along objective 1 alone
    (α = e1, d = e1) decreases the held-out loss most and leaves 2 unchanged and 3 no worse than g_val would."""
    G = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    alpha, mode = preference(G, np.array([1.0, 0.0]), val_loss=0.5)
    assert mode == "guided" and alpha == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    # objective 2 conflicts with g_val (g_2·g_val < 0): its constraint g_2·d ≥ g_2·g_val shapes α; the grid agrees
    G = np.array([[1.0, 0.0], [-0.5, 1.0], [0.2, -1.0]])
    g_val = np.array([1.0, 0.3])
    alpha, _ = preference(G, g_val, val_loss=0.5)
    want, want_alpha = brute_force(G, g_val, guided=True)
    assert lp_value(G, g_val, alpha, True) == pytest.approx(want, abs=5e-3)


# G1 = e1, G2 = 3 e2, G3 = (−2, 2), g_val = (1, −3): c_a = (1, −9, −8). The restricted dominance LP needs
# α1 ≥ 9α2 + 8α3 (αᵀc_a ≥ 0) and g3·d = −2α1 + 6α2 + 8α3 ≥ 0, so 12α2 + 8α3 ≤ 0: α = e1, where g3·d = −2 < 0.
INFEASIBLE = (np.array([[1.0, 0.0], [0.0, 3.0], [-2.0, 2.0]]), np.array([1.0, -3.0]))


def test_an_infeasible_lp_raises_and_the_relaxed_one_is_solved():
    G, g_val = INFEASIBLE
    with pytest.raises(LPFailed, match="infeasible"):
        preference(G, g_val, val_loss=0.0)
    alpha, mode = preference(G, g_val, val_loss=0.0, relaxed=True)  # C α ≥ 0 always has the min-norm point
    assert mode == "dominance" and (G @ (G.T @ alpha) >= -1e-9).all()
    with pytest.raises(LPFailed, match="non-finite"):
        preference(np.array([[np.nan, 0.0], [1.0, 1.0], [0.0, 1.0]]), np.ones(2), 1.0)
    with pytest.raises(LPFailed, match="zero"):
        preference(np.zeros((3, 4)), np.zeros(4), 1.0)


def test_the_objective_falls_back_to_the_fixed_preference_and_logs_it(caplog):
    obj = paretoda.ParetoDAObjective(4, 3, paretoda.ParetoDAOptions(hidden=4, cd_hidden=4, pref_source=2.0,
                                                                    pref_domain=1.0, pref_target=1.0))
    G, g_val = INFEASIBLE
    with caplog.at_level(logging.WARNING, logger="transferkit.adapt.paretoda"):
        alpha, mode = obj.choose(G, g_val, 0.0)
    assert mode == "fallback" and alpha == pytest.approx([0.5, 0.25, 0.25]) and obj.fallbacks == 1
    assert "preference LP failed" in caplog.text and "infeasible" in caplog.text
    alpha, mode = obj.choose(G, g_val, 1.0)  # the guided LP of the same gradients is feasible
    assert mode == "guided" and obj.fallbacks == 1


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.head = nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"source": {"inputs": torch.randn(6, 5, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 2])},
            "target": {"inputs": torch.randn(5, 5, generator=g) + 1.0},
            "val": {"inputs": torch.randn(4, 5, generator=g) + 1.0}}


@pytest.mark.parametrize("alpha", [(0.2, 0.5, 0.3), (1.0, 0.0, 0.0)])
def test_the_backbone_moves_along_3_sum_alpha_grad_and_the_heads_along_their_plain_losses(alpha, monkeypatch):
    model, batch = Toy(), _batch()
    opts = paretoda.ParetoDAOptions(hidden=6, cd_hidden=5, trade_off=0.7)
    obj = paretoda.ParetoDAObjective(8, 3, opts)
    obj.grl.lambda_ = 0.4
    monkeypatch.setattr(obj, "choose", lambda G, g, v: (np.array(alpha), "guided"))
    loss, logs = obj(model, batch)
    loss.backward()
    got_backbone = [p.grad.clone() for p in model.backbone.parameters()]
    got_head = [p.grad.clone() for p in model.head.parameters()]
    got_disc = [p.grad.clone() for p in obj.discriminator.parameters()]

    # a second way: each loss built from the modules directly, its gradients taken one by one
    xs, ys, xt = batch["source"]["inputs"], batch["source"]["labels"], batch["target"]["inputs"]
    feats = model.backbone(torch.cat([xs, xt]))
    ce = nn.functional.cross_entropy(model.head(feats[:6]), ys)
    d = obj.discriminator(grad_reverse(feats, 0.4)).squeeze(-1)
    bce = nn.functional.binary_cross_entropy_with_logits
    domain = opts.trade_off * 0.5 * (bce(d[:6], torch.ones(6)) + bce(d[6:], torch.zeros(5)))
    cd = obj.class_discriminators(feats.detach())
    p = torch.softmax(model.head(feats[6:]), -1) * torch.softmax(cd[6:], -1)[..., 0]
    rho = p / p.sum(-1, keepdim=True)
    mean = rho.mean(0)
    tcm = -(mean * mean.log()).sum() + (rho * rho.log()).sum(1).mean()
    shared = list(model.backbone.parameters())
    per = [torch.autograd.grad(x, shared, retain_graph=True) for x in (ce, domain, -tcm)]
    for i, g in enumerate(got_backbone):
        want = sum(3 * a * per[k][i] for k, a in enumerate(alpha))
        assert torch.allclose(g, want, atol=1e-5)
    for g, w in zip(got_head, torch.autograd.grad(ce, list(model.head.parameters()), retain_graph=True)):
        assert torch.allclose(g, w, atol=1e-6)  # L_T does not move the head
    for g, w in zip(got_disc, torch.autograd.grad(domain, list(obj.discriminator.parameters()), retain_graph=True)):
        assert torch.allclose(g, w, atol=1e-6)
    assert float(logs["tcm"]) == pytest.approx(float(tcm.detach()), rel=1e-4)
    assert logs["alpha_source"] == alpha[0] and logs["guided"] == 1.0


def test_tcm_and_the_bayesian_refinement():
    K = 4
    assert float(paretoda.tcm(torch.full((5, K), 0.25))) == pytest.approx(0.0, abs=1e-6)  # no information
    assert float(paretoda.tcm(torch.softmax(torch.randn(1, K).repeat(6, 1), -1))) == pytest.approx(0.0, abs=1e-6)
    assert float(paretoda.tcm(torch.eye(K).repeat(2, 1))) == pytest.approx(np.log(K), abs=1e-6)  # the maximum
    logits, cd = torch.randn(3, K), torch.randn(3, K, 2)
    rho = paretoda.refine(logits, cd)
    p, t = torch.softmax(logits, -1).numpy(), torch.softmax(cd, -1)[..., 0].numpy()
    for i in range(3):  # p(y | x, target) = p(y | x) P(target | x, y) / Σ_y' …
        want = [p[i, y] * t[i, y] / sum(p[i, z] * t[i, z] for z in range(K)) for y in range(K)]
        assert rho[i].numpy() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(paretoda.refine(logits, cd, "logits"), logits * torch.softmax(cd, -1)[..., 0])


def test_class_domain_loss_masks_each_source_sample_by_its_own_label():
    """The reference's ``binary_CE`` overwrote its per-sample mask inside the loop over samples, so the *last*
    label alone decided each class's source term (the whole batch or nothing)."""
    torch.manual_seed(0)
    K, labels = 3, torch.tensor([1, 2, 1, 0])  # the last sample is class 0
    cd_s, cd_t, rho = torch.randn(4, K, 2), torch.randn(5, K, 2), torch.softmax(torch.randn(5, K), -1)
    got = float(paretoda.class_domain_loss(cd_s, cd_t, rho, labels))

    def ce(logits, label):
        return float(-torch.log_softmax(logits, -1)[label])

    source = sum(ce(cd_s[j, i], 1) for i in range(K) for j in range(4) if labels[j] == i) / 4 / K
    target = sum(float(rho[j, i]) * ce(cd_t[j, i], 0) for i in range(K) for j in range(5)) / 5 / K
    assert got == pytest.approx(0.5 * (source + target), rel=1e-5)
    buggy_source = sum(ce(cd_s[j, 0], 1) for j in range(4)) / 4 / K  # only class 0 (the last label), every sample
    assert got != pytest.approx(0.5 * (buggy_source + target), rel=1e-3)
    # a class with no source sample in the batch gets no source term: its discriminator's source rows carry no grad
    cd_s.requires_grad_(True)
    paretoda.class_domain_loss(cd_s, cd_t, rho, torch.tensor([1, 1, 1, 1])).backward()
    assert float(cd_s.grad[:, 0].abs().sum()) == 0 and float(cd_s.grad[:, 1].abs().sum()) > 0


def test_held_out_split_is_disjoint_and_seeded():
    fit, val = paretoda.held_out_split(50, 0.1, seed=3)
    assert len(val) == 5 and len(fit) == 45 and not set(fit) & set(val) and set(fit) | set(val) == set(range(50))
    assert np.array_equal(val, paretoda.held_out_split(50, 0.1, seed=3)[1])
    assert not np.array_equal(val, paretoda.held_out_split(50, 0.1, seed=4)[1])
    assert len(paretoda.held_out_split(3, 0.01, 0)[1]) == 1 and len(paretoda.held_out_split(3, 0.99, 0)[0]) == 1


def test_paretoda_trains_end_to_end_with_the_guided_lp_and_never_trains_on_the_held_out_split(monkeypatch):
    """With the TCM surrogate the held-out loss −TCM is ≤ 0: the reference's switch (loss_val > eps) never takes
    the guided LP. Here it is taken, and α stays on the simplex."""
    seen = []
    real = paretoda.train

    def spy(model, streams, *a, **kw):
        seen.append({k: len(v) for k, v in streams.items()})
        return real(model, streams, *a, **kw)

    monkeypatch.setattr(paretoda, "train", spy)
    src, tgt = toy_data(60), toy_data(40, seed=1, shift=40)
    res = adapt(toy_model(), src, tgt, tgt, method="paretoda",
                options={"epochs": 2, "batch_size": 16, "hidden": 16, "cd_hidden": 8})
    assert seen == [{"source": 60, "target": 36, "val": 4}] and res.metrics["n_target_val"] == 4
    assert res.metrics["steps"] == 8 and res.metrics["lp_fallbacks"] == 0 and 0 <= res.metrics["accuracy"] <= 1
    recs = [h for h in res.history if "train_guided" in h]
    assert recs and all(h["train_val_loss"] <= 0 for h in recs) and all(h["train_guided"] == 1.0 for h in recs)
    for h in recs:
        a = [h["train_alpha_source"], h["train_alpha_domain"], h["train_alpha_target"]]
        assert min(a) >= 0 and sum(a) == pytest.approx(1.0)
    assert registry.get("adapt", "paretoda").info["kind"] == "training"


def test_a_failing_lp_trains_with_the_fixed_preference(monkeypatch):
    def fail(*a, **k):
        raise LPFailed("solver error")

    monkeypatch.setattr(paretoda, "preference", fail)
    src, tgt = toy_data(60), toy_data(40, seed=1, shift=40)
    res = adapt(toy_model(), src, tgt, tgt, method="paretoda",
                options={"epochs": 1, "batch_size": 16, "hidden": 16, "cd_hidden": 8, "pref_source": 0.6,
                         "pref_domain": 0.2, "pref_target": 0.2})
    assert res.metrics["lp_fallbacks"] == res.metrics["steps"] == 4
    assert res.metrics["alpha"] == pytest.approx([0.6, 0.2, 0.2])
    assert all(h["train_lp_fallback"] == 1.0 for h in res.history if "train_lp_fallback" in h)


@pytest.mark.assets
def test_paretoda_on_real_digits(one_thread):
    """sklearn-digits (8×8) → OpenCV digits (20×20) with the USPS CNN of the zoo."""
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    src = load_dataset("sklearn-digits", limit=400, seed=0)
    train, test, _ = make_split("opencv-digits", limit=400, sample_seed=0, seed=0, test_size=0.3)
    res = adapt(load_model("digits-usps"), src, train, test, method="paretoda",
                options={"epochs": 2, "batch_size": 32, "hidden": 64, "cd_hidden": 64})
    m = res.metrics
    assert m["steps"] == 26 and m["n_target_val"] == 28 and m["lp_fallbacks"] < m["steps"]
    assert sum(m["alpha"]) == pytest.approx(1.0) and m["accuracy"] > 0.3  # ten classes: far above chance


def test_paretoda_on_a_text_model(tiny_bert_dir, sentiment_csv):
    """Token batches of different lengths go through the backbone one stream at a time."""
    from dataclasses import replace

    from transferkit.data import load_dataset
    from transferkit.zoo import load_model

    ds = load_dataset(str(sentiment_csv))
    target = replace(ds.subset(range(40, 80)), name="reviews")
    res = adapt(load_model(str(tiny_bert_dir)), ds.subset(range(40)), target.subset(range(30)),
                target.subset(range(30, 40)), method="paretoda",
                options={"epochs": 1, "batch_size": 8, "hidden": 8, "cd_hidden": 8, "val_loss": "entropy"})
    m = res.metrics
    assert m["steps"] == 5 and m["n_target_val"] == 3 and 0 <= m["accuracy"] <= 1
    assert sum(m["alpha"]) == pytest.approx(1.0)
