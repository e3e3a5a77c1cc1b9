"""DANN: the paper's and tllib's schedules at their published values, the gradient reversal's sign and scale
through the objective, the annealed lr through the engine, training on source + unlabelled target."""

import math

import numpy as np
import pytest
import torch
from test_adapt_tta import CLASSES, toy_data, toy_model
from torch import nn

from transferkit import registry
from transferkit.adapt import adapt, dann
from transferkit.engine import TrainConfig, train
from transferkit.errors import ConfigError, DataError


def test_paper_lambda_schedule_values():
    assert dann.paper_lambda(0.0) == 0.0
    assert dann.paper_lambda(0.5) == pytest.approx(0.987, abs=5e-4)
    assert dann.paper_lambda(1.0) == pytest.approx(0.99991, abs=5e-6)


def test_tllib_warm_start_is_much_slower_than_the_paper():
    assert dann.tllib_lambda(0) == 0.0
    assert dann.tllib_lambda(1000, alpha=1.0, max_iters=1000) == pytest.approx(0.462, abs=5e-4)
    assert dann.tllib_lambda(4000) == pytest.approx(0.964, abs=5e-4)  # ≈ 0.96 only at i ≈ 4N
    # the same 1000 iterations under the paper's schedule are at 0.987 half way
    assert dann.paper_lambda(500 / 999) > 0.98 > dann.tllib_lambda(1000)


def test_annealed_lr_values():
    assert dann.annealed_lr(0.0) == 1.0
    assert dann.annealed_lr(1.0) == pytest.approx(11 ** -0.75)
    assert dann.annealed_lr(0.5) == pytest.approx(6 ** -0.75)


@pytest.mark.parametrize("schedule", ["paper", "tllib"])
def test_before_step_sets_the_scheduled_coefficient(schedule):
    obj = dann.DANNObjective(8, dann.DannOptions(schedule=schedule, hidden=4))
    for step in (0, 3, 9):
        obj.before_step(step, 10)
        want = dann.paper_lambda(step / 9) if schedule == "paper" else dann.tllib_lambda(step)
        assert obj.grl.lambda_ == pytest.approx(want)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def _batch(n_s=6, n_t=4):
    g = torch.Generator().manual_seed(1)
    return {"source": {"inputs": torch.randn(n_s, 5, generator=g), "labels": torch.arange(n_s) % 3},
            "target": {"inputs": torch.randn(n_t, 5, generator=g)}}


def _grads(model, obj, batch, ce_only=False):
    model.zero_grad()
    obj.zero_grad()
    if ce_only:
        feats = model.backbone(batch["source"]["inputs"])
        loss = nn.functional.cross_entropy(model.head(feats), batch["source"]["labels"])
    else:
        loss, _ = obj(model, batch)
    loss.backward()
    return ([p.grad.clone() for p in model.backbone.parameters()],
            [p.grad.clone() if p.grad is not None else None for p in obj.discriminator.parameters()])


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_gradient_reversal_multiplies_the_feature_gradient_by_minus_lambda(lam):
    """backbone gradient of the domain term = −λ × its gradient without the GRL; the discriminator's own
    gradient is not reversed."""
    model, batch = Toy(), _batch()
    obj = dann.DANNObjective(8, dann.DannOptions(hidden=16))
    obj.grl.lambda_ = lam
    with_grl, disc_grl = _grads(model, obj, batch)
    ce, _ = _grads(model, obj, batch, ce_only=True)
    obj.grl.lambda_ = -1.0  # backward × (+1): the domain term's gradient without reversal
    plain, disc_plain = _grads(model, obj, batch)
    for g, c, p in zip(with_grl, ce, plain):
        assert torch.allclose(g - c, -lam * (p - c), atol=1e-6)
    assert not torch.allclose(with_grl[0], ce[0])  # the weight's (the bias's is 0: the discriminator's BN)
    for a, b in zip(disc_grl, disc_plain):
        assert torch.allclose(a, b, atol=1e-6)


def test_domain_loss_weighs_the_two_domains_equally_whatever_their_batch_sizes():
    model = Toy()
    obj = dann.DANNObjective(8, dann.DannOptions(hidden=16))
    _, logs = obj(model, _batch(6, 2))
    feats = model.backbone(torch.cat([_batch(6, 2)["source"]["inputs"], _batch(6, 2)["target"]["inputs"]]))
    d = obj.discriminator(feats).squeeze(-1)
    bce = nn.functional.binary_cross_entropy_with_logits
    want = 0.5 * (bce(d[:6], torch.ones(6)) + bce(d[6:], torch.zeros(2)))
    assert float(logs["domain"]) == pytest.approx(float(want.detach()), rel=1e-5)


def test_the_engine_follows_the_annealed_lr_and_lambda_schedule():
    model = Toy()
    obj = dann.DANNObjective(8, dann.DannOptions(hidden=16))
    g = torch.Generator().manual_seed(0)
    data = {"source": (torch.randn(40, 5, generator=g), torch.arange(40) % 3),
            "target": (torch.randn(40, 5, generator=g), torch.full((40,), -1))}
    res = train(model, data, obj, TrainConfig(max_steps=5, batch_size=8, lr=0.01, optimizer="sgd", momentum=0.9,
                                              log_every=1, progress=False))
    assert [h["lr"] for h in res.history] == pytest.approx([0.01 * dann.annealed_lr(s / 4) for s in range(5)])
    assert [h["train_lambda"] for h in res.history] == pytest.approx([dann.paper_lambda(s / 4) for s in range(5)])


def test_dann_trains_on_source_and_unlabelled_target_and_scores_only_the_held_out_part(monkeypatch):
    seen = {}
    real = registry.get("adapt", "dann")

    def spy(model, source, target_train, target_test_X, **kw):
        seen.update(source=source, target=target_train, test_X=target_test_X)
        return real.fn(model, source, target_train, target_test_X, **kw)

    table = dict(registry._REGISTRY["adapt"])
    table["dann"] = registry.Method("adapt", "dann", spy, real.paper, real.summary, real.options, dict(real.info))
    monkeypatch.setitem(registry._REGISTRY, "adapt", table)
    src, tgt = toy_data(60), toy_data(40, seed=1, shift=40)
    res = adapt(toy_model(), src, tgt, tgt, method="dann", options={"epochs": 2, "batch_size": 16, "hidden": 16})
    assert (seen["target"].y == -1).all() and np.array_equal(seen["source"].y, src.y)
    assert isinstance(seen["test_X"], np.ndarray)  # items only, never the held-out labels
    assert 0 <= res.metrics["accuracy"] <= 1 and res.metrics["steps"] == 8
    # the last record averages the second epoch's steps 4..7 of 8, weighted by their sizes (60 = 3 × 16 + 12)
    want = np.average([dann.paper_lambda(s / 7) for s in range(4, 8)], weights=[16, 16, 16, 12])
    assert res.history[-1]["train_lambda"] == pytest.approx(want)


def test_dann_selects_by_a_label_free_scorer_and_restores_the_best_epoch():
    src, tgt = toy_data(60), toy_data(40, seed=1, shift=40)
    res = adapt(toy_model(), src, tgt, tgt, method="dann",
                options={"epochs": 3, "batch_size": 16, "hidden": 16, "select_by": "snd"})
    vals = {h["step"]: h["val_snd"] for h in res.history if "val_snd" in h}
    assert len(vals) == 3 and res.metrics["best_step"] == max(vals, key=vals.get)
    assert res.metrics["selected_snd"] == pytest.approx(max(vals.values()))


def test_bad_inputs_are_one_line_errors():
    src = toy_data(30)
    other = toy_data(30)
    other.classes = ["a", "b", "c"]
    with pytest.raises(DataError, match="label map"):
        adapt(toy_model(), src, other, other, method="dann")
    with pytest.raises(ConfigError, match="must be one of paper, tllib"):
        adapt(toy_model(), src, src, src, method="dann", options={"schedule": "slow"})
    with pytest.raises(ConfigError, match="not an adapt method"):
        adapt(toy_model(), src, src, src, method="snd")
    with pytest.raises(ConfigError, match="did you mean 'dann'"):
        adapt(toy_model(), src, src, src, method="dan")
    with pytest.raises(DataError, match="is empty"):
        adapt(toy_model(), src, src.subset([]), src, method="dann")


def test_images_of_different_sizes_are_resized_to_the_model_input_before_combining():
    from transferkit.adapt._common import match_images
    from transferkit.data import make_dataset

    big = make_dataset("big", np.zeros((4, 20, 20), np.uint8) + 200, [0, 1, 2, 0], classes=CLASSES)
    small = toy_data(6)
    a, b = match_images(toy_model(), big, small)
    assert a.X.shape[1:] == b.X.shape[1:] == (8, 8) and (a.X == 200).all()
    assert math.isclose(float(b.X.mean()), float(small.X.mean()))  # already at the input size: unchanged


def test_tllib_schedule_takes_numpy_integers():
    """tllib's warm-start layer used ``np.float``, removed in NumPy 1.24 (its open PR #265)."""
    value = dann.tllib_lambda(np.int64(1000))
    assert isinstance(value, float) and value == pytest.approx(0.462, abs=5e-4)


def test_the_domain_discriminator_outputs_a_logit_that_carries_gradient():
    """skada's DomainClassifier ends in a softmax over one output (constantly 1): its domain loss carries no
    gradient. Ours outputs one logit per item and the domain loss moves every discriminator layer."""
    model, batch = Toy(), _batch()
    obj = dann.DANNObjective(8, dann.DannOptions(hidden=16))
    obj.grl.lambda_ = 1.0
    feats = model.backbone(torch.cat([batch["source"]["inputs"], batch["target"]["inputs"]]))
    d = obj.discriminator(feats).squeeze(-1)
    assert d.shape == (10,) and float(d.detach().std()) > 0
    _, disc = _grads(model, obj, batch)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in disc)


def test_checkpoint_selection_never_sees_the_held_out_target(monkeypatch):
    """tllib validates on the target *test* set (issues #105, #141). Here selection scores the unlabelled target
    training items only."""
    from transferkit.adapt import scorers

    seen = []
    real = scorers.make_scorer

    def spy(*a, **k):
        s = real(*a, **k)
        inner = s.compute
        s.compute = lambda *x: seen.append(len(x[0])) or inner(*x)
        return s

    monkeypatch.setattr(scorers, "make_scorer", spy)
    src, train_part, test_part = toy_data(60), toy_data(40, seed=1, shift=40), toy_data(20, seed=2, shift=40)
    adapt(toy_model(), src, train_part, test_part, method="dann",
          options={"epochs": 2, "batch_size": 16, "hidden": 16, "select_by": "entropy"})
    assert seen == [40, 40]  # one score per epoch, on the 40 training items, never the 20 held out


def test_a_seed_gives_one_run_whatever_the_global_random_state():
    src, tgt = toy_data(60), toy_data(40, seed=1, shift=40)
    runs = []
    for draw in (0, 5):
        torch.manual_seed(123)
        torch.rand(draw)
        runs.append(adapt(toy_model(), src, tgt, tgt, method="dann",
                          options={"epochs": 1, "batch_size": 16, "hidden": 16}, seed=7).module.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
