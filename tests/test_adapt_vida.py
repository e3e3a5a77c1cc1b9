"""ViDA: the adapters start at identity (and add exactly their scaled low-rank outputs once moved), their
shapes and initial scales, only the adapters train, homeostatic scaling for a known uncertainty (both scales:
the upstream defect), online predictions, determinism, the one-item-batch refusal, and a real digit shift."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.adapt import adapt, tta, vida
from transferkit.errors import ConfigError
from transferkit.zoo.base import ImagePreprocess, ZooModel

from test_adapt_tta import CLASSES, toy_data  # the same toy shift as the other TTA tests


class Net(nn.Module):
    """conv → BN → ReLU → pool → linear, small."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 8)

    def forward(self, x):
        return torch.relu(self.fc(F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)))


def toy_model(seed=0):
    torch.manual_seed(seed)
    return ZooModel("toy", "image", Net(), nn.Linear(8, 3), 8, ImagePreprocess(8, [0.5], [0.5], 1), {},
                    list(CLASSES))


def keep_head(**o):
    return {"source_epochs": 0, "batch_size": 20, **o}


def test_adapters_start_at_identity_and_add_their_scaled_outputs():
    net = toy_model().backbone.eval()
    x = torch.randn(5, 1, 8, 8)
    adapted = copy.deepcopy(net)
    adapters = vida.inject(adapted, 2, 6)
    assert len(adapters) == 2 and torch.equal(adapted(x), net(x))  # B = 0: the source model exactly
    with torch.no_grad():
        for a in adapters:
            a.low_up.weight.normal_()
            a.high_up.weight.normal_()
    vida.set_scales(adapted, 0.7, 1.3)
    c, f = adapted.conv.vida, adapted.fc.vida
    # the same forward pass written out with the functional ops
    h = F.conv2d(x, net.conv.weight, net.conv.bias, padding=1)
    for down, up, s in ((c.low_down, c.low_up, 0.7), (c.high_down, c.high_up, 1.3)):
        h = h + s * F.conv2d(F.conv2d(x, down.weight, padding=1), up.weight)
    h = F.max_pool2d(torch.relu(net.bn(h)), 2).flatten(1)
    z = h @ net.fc.weight.T + net.fc.bias + 0.7 * h @ f.low_down.weight.T @ f.low_up.weight.T \
        + 1.3 * h @ f.high_down.weight.T @ f.high_up.weight.T
    assert torch.allclose(adapted(x), torch.relu(z), atol=1e-5)
    assert not torch.allclose(adapted(x), net(x), atol=1e-3)
    # the layers keep their own parameter names; the adapters are named apart
    assert {n for n, _ in adapted.named_parameters()} - set(vida.adapter_names(adapted)) == \
        {n for n, _ in net.named_parameters()}


def test_adapter_shapes_and_initialisation():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    a = vida.ViDAAdapter(conv, 1, 128)
    assert a.low_down.weight.shape == (1, 16, 3, 3) and a.low_up.weight.shape == (32, 1, 1, 1)
    assert a.high_down.weight.shape == (128, 16, 3, 3) and a.high_up.weight.shape == (32, 128, 1, 1)
    assert a.high_down.stride == (2, 2) and a.high_down(torch.zeros(1, 16, 9, 9)).shape == (1, 128, 5, 5)
    lin = vida.ViDAAdapter(nn.Linear(64, 10), 4, 128)
    assert lin.low_down.weight.shape == (4, 64) and lin.low_up.weight.shape == (10, 4)
    assert lin.high_down.weight.shape == (128, 64) and lin.high_up.weight.shape == (10, 128)
    # A ~ N(0, std 1/r²) (the reference's), B = 0, both scales 1
    assert abs(float(a.high_down.weight.detach().std()) * 128 ** 2 - 1) < 0.05
    assert abs(float(lin.low_down.weight.detach().std()) * 4 ** 2 - 1) < 0.15
    assert not a.low_up.weight.any() and not a.high_up.weight.any()
    assert (a.scale_low, a.scale_high) == (1.0, 1.0)
    with pytest.raises(ConfigError, match="no Conv2d or Linear"):
        vida.inject(nn.Sequential(nn.ReLU()), 1, 2)


def test_uncertainty_and_allotment_by_hand():
    views = torch.tensor([[[0.0, 2.0]], [[2.0, 2.0]], [[4.0, 2.0]]])  # 3 views, 1 item, 2 classes
    assert float(vida.uncertainty(views)) == pytest.approx(0.1 * (4.0 + 0.0) / 2)  # unbiased variance 4 and 0
    assert vida.allot(0.3, 0.2) == pytest.approx((0.7, 1.3))  # uncertain: the high-rank adapter up
    assert vida.allot(0.2, 0.2) == pytest.approx((0.8, 1.2))  # at the threshold: up too
    assert vida.allot(0.1, 0.2) == pytest.approx((1.1, 0.9))  # confident: the low-rank adapter up


@pytest.mark.parametrize("u, expected", [(0.3, (0.7, 1.3)), (0.01, (1.01, 0.99))])
def test_a_known_uncertainty_sets_both_scales_on_student_and_teacher(monkeypatch, u, expected):
    """The reference sets only the low-rank scale (``elif``); both must move."""
    monkeypatch.setattr(vida, "uncertainty", lambda views: torch.tensor(u))
    model, data = toy_model(), toy_data(40, shift=60)
    res = adapt(model, toy_data(30), data, data, method="vida", options=keep_head(threshold=0.2))
    scales = {(a.scale_low, a.scale_high) for a in res.module.modules() if isinstance(a, vida.ViDAAdapter)}
    assert len(scales) == 1 and next(iter(scales)) == pytest.approx(expected)
    assert all((h["train_lambda_low"], h["train_lambda_high"]) == pytest.approx(expected) for h in res.history)


def test_only_the_adapters_train_unless_model_lr_is_set():
    model, data = toy_model(), toy_data(60, shift=60)
    before = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
              **{f"head.{k}": v for k, v in model.head.state_dict().items()}}

    def changed(res):
        after = res.module.state_dict()
        return {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}

    res = adapt(model, toy_data(30), data, data, method="vida", options=keep_head(lr=0.05, ema=0.5, restore=0.0))
    assert changed(res) == set()
    ups = [a.low_up.weight for a in res.module.modules() if isinstance(a, vida.ViDAAdapter)]
    assert ups and all(w.abs().sum() > 0 for w in ups)  # the adapters moved away from B = 0
    assert all(h["train_uncertainty"] >= 0 for h in res.history) and len(res.history) == 3
    # the reference's behaviour: every parameter trains (model_lr > 0)
    res = adapt(model, toy_data(30), data, data, method="vida",
                options=keep_head(lr=0.05, model_lr=0.05, ema=0.5, restore=0.0))
    assert {"backbone.conv.weight", "backbone.fc.weight", "head.weight"} <= changed(res)


def _objective(**options):
    clf = nn.Sequential(copy.deepcopy(toy_model().backbone), copy.deepcopy(toy_model().head))
    vida.inject(clf[0], 1, 4)
    names = set(vida.adapter_names(clf))
    for n, p in clf.named_parameters():  # as the engine's trainable selection leaves them
        p.requires_grad_(n in names)
    return clf, vida.ViDAObjective(clf, vida.ViDAOptions(**options)), names


def test_restore_and_ema_touch_only_the_trainable_parameters():
    clf, obj, names = _objective(ema=0.9, restore=0.3)
    teacher = {n: t.clone() for n, t in obj.teacher.named_parameters()}
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(1.0)
    stepped = {n: p.clone() for n, p in clf.named_parameters()}
    torch.manual_seed(0)
    obj.after_step(0, 1, clf)
    restored = sum(int((p == obj.initial[n]).sum()) for n, p in clf.named_parameters() if n in names)
    total = sum(p.numel() for n, p in clf.named_parameters() if n in names)
    assert abs(restored - 0.3 * total) < 5 * (total * 0.3 * 0.7) ** 0.5
    for n, p in clf.named_parameters():
        if n not in names:  # frozen: neither restored nor averaged into the teacher
            assert torch.equal(p, stepped[n])
    for n, t in obj.teacher.named_parameters():  # the EMA of the stepped student, before the restore
        expected = 0.9 * teacher[n] + 0.1 * stepped[n] if n in names else teacher[n]
        assert torch.allclose(t, expected)


def test_online_first_batch_is_the_batch_statistics_source_model_and_runs_are_seeded():
    model, data = toy_model(), toy_data(60, shift=60)
    opts = keep_head(lr=0.5, ema=0.0, shuffle=False)
    res = adapt(model, toy_data(30), data, data, method="vida", options=opts, seed=1)
    ref = nn.Sequential(copy.deepcopy(model.backbone), copy.deepcopy(model.head)).eval()
    tta.configure_bn(ref)
    X = model.preprocess(data.X)
    expected = torch.cat([ref(X[i: i + 20]).argmax(-1) for i in range(0, 60, 20)]).numpy()
    assert np.array_equal(res.predictions["adapted"][:20], expected[:20])  # predicted before the first update
    assert not np.array_equal(res.predictions["adapted"], expected)  # ema 0, lr 0.5: later batches see updates
    again = adapt(model, toy_data(30), data, data, method="vida", options=opts, seed=1)
    assert np.array_equal(again.predictions["adapted"], res.predictions["adapted"])
    assert again.history == res.history
    other = adapt(model, toy_data(30), data, data, method="vida", options=opts, seed=2)
    assert other.history != res.history  # other adapters' A, other augmentations


def test_one_item_last_batch_and_bad_options_are_refused():
    model, data = toy_model(), toy_data(41, shift=60)
    with pytest.raises(ConfigError, match="one-item batch"):
        adapt(model, toy_data(30), data, data, method="vida", options=keep_head())
    with pytest.raises(ConfigError, match="n_augment"):
        adapt(model, toy_data(30), data, data, method="vida", options=keep_head(n_augment=1))


@pytest.mark.assets
def test_real_digit_shift_online_vs_source_only():
    """MNIST → OpenCV digits with the USPS CNN (BatchNorm), 400 items each; ViDA's online predictions stay
    near the source model's (a 2-batch stream, EMA 0.999: the teacher barely moves) and far above chance."""
    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model("digits-usps")
    src = load_dataset("mnist", limit=400, seed=0)
    train, test, _ = make_split("opencv-digits", limit=400, sample_seed=0, seed=0, test_size=0.3)
    opts = {"source_epochs": 1, "batch_size": 60}
    res = adapt(model, src, train, test, method="vida", options=opts, seed=0)
    m = res.metrics
    assert m["n_scored"] == 120 and m["target_labels_ignored"] == 280
    assert m["accuracy"] > 0.7 and abs(m["accuracy"] - m["source_only_accuracy"]) <= 0.05
    lows = {h["train_lambda_low"] for h in res.history}
    assert len(res.history) == 2 and len(lows) == 2  # the scales follow each batch's uncertainty
    again = adapt(model, src, train, test, method="vida", options=opts, seed=0)
    assert np.array_equal(again.predictions["adapted"], res.predictions["adapted"])
