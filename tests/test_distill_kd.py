"""distill: Hinton KD — the loss identities, several teachers, frozen teachers, cached logits == live teacher."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferkit import registry
from transferkit.distill import Net, distill
from transferkit.distill._common import fit_val, train_student
from transferkit.distill.kd import KDOptions, kd_objective
from transferkit.engine import KDObjective, TrainConfig, kd_loss
from transferkit.engine.objectives import mix_teachers
from transferkit.errors import ConfigError
from transferkit.zoo.base import Classifier, ZooModel

CLASSES = [str(c) for c in range(10)]


def _pre(raw):
    return torch.as_tensor(np.asarray(raw), dtype=torch.float32).reshape(len(raw), -1) / 16.0


def toy_zoo(name, hidden=16, bn=False, seed=0, head=False):
    """A tiny image 'zoo model' over 8×8 digits (its head, when asked, predicts the ten digits)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(64, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU()]
    return ZooModel(name, "image", nn.Sequential(*layers), nn.Linear(hidden, 10) if head else None, hidden, _pre,
                    {"toy": name}, CLASSES if head else None)


def digits(n=400, seed=0):
    """The first ``n`` of sklearn's bundled 8×8 digits as a train/test pair (no download)."""
    from sklearn.datasets import load_digits

    from transferkit.data import make_dataset
    from transferkit.data.split import make_split

    d = load_digits()
    ds = make_dataset("digits8", d.images[:n].astype(np.uint8), d.target[:n], classes=CLASSES)
    train, test, _ = make_split(ds, dataset=ds, seed=seed)
    return train, test


def trained_teacher(train, bn=True, epochs=15):
    """A toy teacher fitted on ``train`` (BatchNorm, so a drifting running mean would show)."""
    from transferkit.engine import train as fit
    from transferkit.tune._common import Pairs, make_collate

    zoo = toy_zoo("teacher", hidden=32, bn=bn, seed=1)
    clf = Classifier(zoo.backbone, 32, 10, seed=1)
    fit(clf, Pairs(train.X, train.y), None, {"epochs": epochs, "lr": 1e-2, "progress": False},
        collate_fn=make_collate(_pre))
    return Net("teacher", zoo, clf.eval(), CLASSES)


# ---------------------------------------------------------------------------------------- the loss
def test_kd_gradient_is_T_over_B_times_probability_gap_and_T2_keeps_its_scale():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    norms = {}
    for T in (1.0, 4.0, 10.0, 20.0):
        z = s.clone().requires_grad_(True)
        kd_loss(z, t, T).backward()
        expected = (T / 8) * (F.softmax(s / T, -1) - F.softmax(t / T, -1))
        assert torch.allclose(z.grad, expected, atol=1e-6)
        norms[T] = float(z.grad.norm())
    # with T² the soft gradient tends to (z_s − z_t)/(B·C) (centred): it keeps its scale as T grows
    # (without the T² factor it would shrink 4× from T = 10 to 20)
    assert norms[20.0] / norms[10.0] == pytest.approx(1.0, abs=0.05)
    limit = float(((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).norm() / (8 * 10))
    assert norms[20.0] == pytest.approx(limit, rel=0.05)


def _loss(options, batch, student):
    return kd_objective(options)(None)(student, batch)[0]


def test_alpha_one_is_cross_entropy_and_alpha_mixes_the_two_terms():
    torch.manual_seed(0)
    student = nn.Linear(5, 3)
    x, y, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 3)
    batch = {"inputs": x, "labels": y, "teacher_logits": t}
    ce, kd = F.cross_entropy(student(x), y), kd_loss(student(x), t, 3.0)
    assert torch.allclose(_loss(KDOptions(temperature=3.0, alpha=1.0), batch, student), ce)
    assert torch.allclose(_loss(KDOptions(temperature=3.0, alpha=0.0), batch, student), kd)
    assert torch.allclose(_loss(KDOptions(temperature=3.0, alpha=0.3), batch, student), 0.3 * ce + 0.7 * kd)


def test_the_engine_objective_keeps_its_old_meaning():
    """KDObjective without the new arguments: kd + hard_weight·CE, as before."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, -1, 0, 1, 2])
    loss, logs = KDObjective(2.0, hard_weight=0.5, teacher=teacher)(student, {"inputs": x, "labels": y})
    has = y >= 0
    ce = F.cross_entropy(student(x)[has], y[has])
    expected = kd_loss(student(x), teacher(x), 2.0) + 0.5 * ce * has.float().mean()
    assert torch.allclose(loss, expected)


def test_several_teachers_are_their_weighted_softened_mixture():
    torch.manual_seed(0)
    z = torch.randn(4, 3, 7)
    T = 2.5
    mixed = mix_teachers(z, T, torch.tensor([0.2, 0.3, 0.5]))
    direct = 0.2 * F.softmax(z[:, 0] / T, -1) + 0.3 * F.softmax(z[:, 1] / T, -1) + 0.5 * F.softmax(z[:, 2] / T, -1)
    assert torch.allclose(F.softmax(mixed / T, -1), direct, atol=1e-6)
    # a weight of 1 on one teacher is that teacher
    one = mix_teachers(z, T, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(F.softmax(one / T, -1), F.softmax(z[:, 1] / T, -1), atol=1e-6)
    # live teachers in a list give the same loss as their stacked logits
    student, ts = nn.Linear(5, 7), [nn.Linear(5, 7) for _ in range(3)]
    x = torch.randn(4, 5)
    live = KDObjective(T, teacher=ts, teacher_weights=[1, 1, 2])(student, {"inputs": x})[0]
    stacked = torch.stack([t(x) for t in ts], 1).detach()
    cached = KDObjective(T, teacher_weights=[1, 1, 2])(student, {"inputs": x, "teacher_logits": stacked})[0]
    assert torch.allclose(live, cached)


@pytest.mark.parametrize("values, message", [
    ({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"), ({"teacher_weights": [-1.0, 2.0]}, "non-negative"),
    ({"tempreature": 2.0}, "did you mean"),
])
def test_bad_options_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("distill", "kd").parse(values)


# ---------------------------------------------------------------------------------------- training
def _student():
    return Net("student", toy_zoo("student", hidden=8, seed=2), None, None)


def _train(teacher, train, cache, epochs=2):
    from transferkit.distill._common import fresh_student

    student = _student()
    module = fresh_student(student, CLASSES, 0)
    fit, val = fit_val(train, 0.1, 0)
    cfg = TrainConfig(epochs=epochs, lr=1e-2, batch_size=16, progress=False)
    result, timing = train_student(module, student, [teacher], kd_objective(KDOptions()), fit, val, cfg, cache=cache)
    return module, result, timing


def test_teacher_is_frozen_and_unchanged_by_training():
    train, _ = digits()
    teacher = trained_teacher(train)
    before = copy.deepcopy(teacher.module.state_dict())
    flags = [p.requires_grad for p in teacher.module.parameters()]
    _train(teacher, train, cache=False)
    after = teacher.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert [p.requires_grad for p in teacher.module.parameters()] == flags
    assert not teacher.module.training


def test_cached_teacher_logits_give_the_same_training_as_the_live_teacher():
    train, _ = digits()
    teacher = trained_teacher(train)
    live, r_live, t_live = _train(teacher, train, cache=False)
    cached, r_cached, t_cached = _train(teacher, train, cache=True)
    assert t_cached["cached"] and not t_live["cached"]
    for (k, a), b in zip(live.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
    losses = lambda r: [h["train_loss"] for h in r.history if "train_loss" in h]  # noqa: E731
    assert losses(r_live) == pytest.approx(losses(r_cached), abs=1e-5)


def test_kd_learns_from_the_teacher_on_real_digits():
    """A small student distilled from a trained teacher reaches most of its accuracy (sklearn's 8×8 digits)."""
    train, test = digits(n=600)
    teacher = trained_teacher(train)
    res = distill([teacher], _student(), train, test, method="kd", config={"epochs": 30, "lr": 1e-2})
    m = res.metrics
    assert m["teacher_test_accuracy"]["teacher"] > 0.85
    assert m["test_accuracy"] > 0.8
    assert m["test_accuracy"] > m["teacher_test_accuracy"]["teacher"] - 0.1


def test_a_teacher_with_other_classes_is_refused():
    train, test = digits()
    foreign = Net("foreign", toy_zoo("foreign"), None, ["cat", "dog"])
    with pytest.raises(ConfigError, match="predicts"):
        distill([foreign], _student(), train, test, method="kd", config={"epochs": 1})


@pytest.mark.parametrize("bad", [nn.Linear(64, 10), 5, None])
def test_a_teacher_transferkit_cannot_freeze_and_reload_is_a_one_line_error(bad):
    """A bare module (no preprocessing, no head contract), a number or None as a teacher or student: a ConfigError
    naming what is accepted, before anything trains."""
    train, _ = digits(n=60)
    for teachers, student in (([bad], _student()), ([trained_teacher(train, epochs=1)], bad)):
        with pytest.raises(ConfigError, match="must be a catalogue model name.*from_module"):
            distill(teachers, student, train, None, method="kd", config={"epochs": 1})
