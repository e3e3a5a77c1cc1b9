"""Test-time adaptation: BN re-estimation equals recomputed statistics, Tent only moves BN affine parameters
and predicts online (before its update), CoTTA's EMA / anchor gating / restore probability, reset identities,
one-item batches refused."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.adapt import adapt, tta
from transferkit.data import make_dataset
from transferkit.errors import ConfigError
from transferkit.zoo.base import ImagePreprocess, ZooModel

CLASSES = ["0", "1", "2"]


class Net(nn.Module):
    """conv → BN → ReLU → pool → dropout → linear: the shape of the digit CNNs, small."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 16, 8)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return torch.relu(self.fc(self.drop(h.flatten(1))))


def toy_model(seed=0):
    torch.manual_seed(seed)
    backbone, head = Net(), nn.Linear(8, 3)
    with torch.no_grad():  # source statistics far from the target's: adaptation has something to do
        backbone.bn.running_mean.fill_(0.3)
        backbone.bn.running_var.fill_(2.0)
    return ZooModel("toy", "image", backbone, head, 8, ImagePreprocess(8, [0.5], [0.5], 1), {}, list(CLASSES))


def toy_data(n=60, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for c in range(3):  # a class-dependent bright stripe
        X[y == c, 2 * c: 2 * c + 2, :] += 120
    X = np.clip(X.astype(int) + shift, 0, 255).astype(np.uint8)
    return make_dataset(f"toy{shift}", X, y, classes=CLASSES)


def keep_head(**o):
    return {"source_epochs": 0, **o}


def test_bn_reestimation_equals_the_statistics_of_the_whole_stream():
    model = toy_model()
    net = copy.deepcopy(model.backbone).eval()
    X = model.preprocess(toy_data(50).X)
    with tta.BNReestimate(net):
        for i in range(0, 50, 20):  # batches of 20, 20, 10
            net(X[i: i + 20])
    conv = model.backbone.conv(X).detach().double()
    assert torch.allclose(net.bn.running_mean.double(), conv.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net.bn.running_var.double(), conv.transpose(0, 1).reshape(4, -1).var(1), atol=1e-5)


def test_bn_method_predicts_each_batch_with_the_statistics_seen_so_far():
    model, src, tgt = toy_model(), toy_data(30), toy_data(40, seed=1, shift=60)
    res = adapt(model, src, tgt, tgt, method="bn", options=keep_head(batch_size=20, shuffle=False))
    ref = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.head)).eval()
    X = model.preprocess(tgt.X)
    conv = ref[0].conv(X).detach()
    expected = []
    for end in (20, 40):  # batch k is normalised with the statistics of items 0..end
        seen = conv[:end].transpose(0, 1).reshape(4, -1)
        ref[0].bn.running_mean.copy_(seen.mean(1))
        ref[0].bn.running_var.copy_(seen.var(1))
        expected.append(ref(X[end - 20: end]).argmax(-1))
    assert np.array_equal(res.predictions["adapted"], torch.cat(expected).numpy())
    assert res.metrics["source_only_accuracy"] != res.metrics["accuracy"]


def test_tent_updates_only_the_bn_affine_parameters():
    model, data = toy_model(), toy_data(60, shift=60)
    res = adapt(model, toy_data(30), data, data, method="tent", options=keep_head(batch_size=20, lr=0.05))
    before = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
              **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
    after = res.module.state_dict()
    changed = {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}
    assert changed == {"backbone.bn.weight", "backbone.bn.bias"}
    assert "backbone.bn.running_mean" not in after  # batch statistics: running estimates dropped
    assert len(res.history) == 3 and all(h["train_entropy"] >= 0 for h in res.history)


def test_tent_predicts_each_batch_before_its_update_and_reset_every_batch_is_the_batch_statistics_model():
    """Reset after every batch: each batch is predicted by the source model on batch statistics; so is Tent's
    first batch. Dropout is off (the predictions are deterministic)."""
    model, data = toy_model(), toy_data(60, shift=60)
    opts = keep_head(batch_size=20, lr=0.5, shuffle=False)
    reset = adapt(model, toy_data(30), data, data, method="reset", options={**opts, "reset_every": 1})
    tent = adapt(model, toy_data(30), data, data, method="tent", options=opts)
    ref = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.head)).eval()
    tta.configure_bn(ref)
    X = model.preprocess(data.X)
    expected = torch.cat([ref(X[i: i + 20]).argmax(-1) for i in range(0, 60, 20)]).numpy()
    assert np.array_equal(reset.predictions["adapted"], expected)
    assert np.array_equal(tent.predictions["adapted"][:20], expected[:20])
    assert not np.array_equal(tent.predictions["adapted"], expected)  # lr 0.5: later batches see the updates


def test_tta_never_sees_target_labels_and_streams_in_a_seeded_order():
    model, data = toy_model(), toy_data(60, shift=60)
    a = adapt(model, toy_data(30), data, data, method="tent", options=keep_head(batch_size=20), seed=3)
    b = adapt(model, toy_data(30), data, data, method="tent", options=keep_head(batch_size=20), seed=3)
    assert np.array_equal(a.predictions["adapted"], b.predictions["adapted"])
    assert a.metrics["target_labels_ignored"] == 60 and a.metrics["n_scored"] == 60


def test_a_one_item_last_batch_and_an_empty_stream_are_refused():
    with pytest.raises(ConfigError, match="one-item batch"):
        tta.stream_order(41, 20, True, 0)
    model, data = toy_model(), toy_data(41, shift=60)
    with pytest.raises(ConfigError, match="one-item batch"):
        adapt(model, toy_data(30), data, data, method="tent", options=keep_head(batch_size=20))
    assert len(tta.stream_order(40, 20, False, 0)) == 40


def test_a_model_without_batchnorm_is_refused_by_bn_and_tent():
    model = toy_model()
    model.backbone.bn = nn.Identity()
    data = toy_data(40)
    for method in ("bn", "tent"):
        with pytest.raises(ConfigError, match="BatchNorm"):
            adapt(model, data, data, data, method=method, options=keep_head(batch_size=20))


def _cotta(options):
    model = toy_model()
    clf = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.head))
    tta.configure_bn(clf)
    return clf, tta.CoTTAObjective(clf, tta.CoTTAOptions(**options))


def test_cotta_restore_resets_each_element_with_its_probability():
    clf, obj = _cotta({"ema": 0.0, "restore": 0.2})
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(1.0)
    torch.manual_seed(0)
    obj.after_step(0, 1, clf)
    restored = sum(int((p == obj.source[n]).sum()) for n, p in clf.named_parameters())
    total = sum(p.numel() for p in clf.parameters())
    sd = (total * 0.2 * 0.8) ** 0.5
    assert abs(restored - 0.2 * total) < 5 * sd
    # ema 0: the teacher took the student's values before the restore
    for t, n in zip(obj.teacher.parameters(), obj.source):
        assert torch.allclose(t, obj.source[n] + 1.0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_cotta_restore_extremes(p):
    clf, obj = _cotta({"restore": p})
    with torch.no_grad():
        for q in clf.parameters():
            q.add_(1.0)
    obj.after_step(0, 1, clf)
    for n, q in clf.named_parameters():
        assert torch.equal(q, obj.source[n]) == (p == 1.0)


def test_cotta_teacher_is_an_ema_of_the_student():
    clf, obj = _cotta({"ema": 0.9, "restore": 0.0})
    teacher = [t.clone() for t in obj.teacher.parameters()]
    with torch.no_grad():
        for q in clf.parameters():
            q.add_(1.0)
    obj.after_step(0, 1, clf)
    for t0, t, s in zip(teacher, obj.teacher.parameters(), clf.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s)


def test_cotta_augments_only_when_the_anchor_is_unsure():
    toy = toy_model()
    x = toy.preprocess(toy_data(20).X)
    for threshold, augmented in ((0.0, 0.0), (1.0, 1.0)):
        clf, obj = _cotta({"anchor_threshold": threshold, "n_augment": 3})
        torch.manual_seed(0)
        loss, logs, out = obj(clf, {"inputs": x})
        assert logs["augmented"] == augmented and out["prediction"].shape == (20,)
        if not augmented:  # the target is the teacher's clean prediction
            assert torch.equal(out["prediction"], obj.teacher(x).argmax(-1))


def test_cotta_runs_through_the_engine_and_reports_the_teachers_online_predictions():
    model, data = toy_model(), toy_data(40, shift=60)
    res = adapt(model, toy_data(30), data, data, method="cotta", options=keep_head(batch_size=20, n_augment=2))
    assert res.predictions["adapted"].shape == (40,) and set(res.predictions["adapted"]) <= {0, 1, 2}
    assert len(res.history) == 2 and "train_anchor_confidence" in res.history[0]


def test_augment_keeps_shape_and_changes_the_images():
    x = toy_model().preprocess(toy_data(8).X)
    torch.manual_seed(0)
    y = tta.augment(x)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(x, y)


def test_periodic_reset_restarts_from_the_source_every_reset_every_batches():
    """reset_every=2 on 4 batches: batches 0–1 are Tent's, batch 2 is predicted by the source model again
    (on batch statistics), batch 3 by the model adapted on batch 2 only."""
    model, data = toy_model(), toy_data(80, shift=60)
    opts = keep_head(batch_size=20, lr=0.5, shuffle=False)
    reset = adapt(model, toy_data(30), data, data, method="reset", options={**opts, "reset_every": 2})
    tent = adapt(model, toy_data(30), data, data, method="tent", options=opts)
    later = adapt(model, toy_data(30), data.subset(range(40, 80)), data.subset(range(40, 80)), method="tent",
                  options=opts)
    assert np.array_equal(reset.predictions["adapted"][:40], tent.predictions["adapted"][:40])
    assert np.array_equal(reset.predictions["adapted"][40:], later.predictions["adapted"])
    assert not np.array_equal(reset.predictions["adapted"], tent.predictions["adapted"])


def test_adapt_leaves_the_callers_random_state_alone():
    model, data = toy_model(), toy_data(40, shift=60)
    torch.manual_seed(0)
    adapt(model, toy_data(30), data, data, method="cotta", options={"source_epochs": 1, "batch_size": 20,
                                                                    "n_augment": 2})
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
