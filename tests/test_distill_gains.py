"""distill: Fantastic Gains — flip counts against a second computation, the KL+DP partition rule and loss,
supervised and label-free transfer with the transfer delta."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_distill_kd import CLASSES, _pre, digits, toy_zoo, trained_teacher

from transferkit.data import UNLABELLED
from transferkit.distill import Net, distill, flips
from transferkit.distill.gains import KLDP, dp_targets
from transferkit.errors import ConfigError, DataError
from transferkit.zoo.base import Classifier


def _flips_by_loop(s, t, y, C):
    pos, neg = [0] * C, [0] * C
    n = [0] * C
    for a, b, c in zip(s, t, y):
        n[c] += 1
        pos[c] += a != c and b == c
        neg[c] += a == c and b != c
    return sum(pos) / len(y), sum(neg) / len(y), [p / max(k, 1) for p, k in zip(pos, n)], \
        [q / max(k, 1) for q, k in zip(neg, n)], pos


@pytest.mark.parametrize("C", [3, 13])  # any number of classes (the reference hard-codes ImageNet's 1000)
def test_flips_match_a_second_computation(C):
    rng = np.random.default_rng(C)
    y = rng.integers(0, C - 1, 200)  # the last class has no item: its shares are 0
    s = np.where(rng.random(200) < 0.6, y, rng.integers(0, C, 200))
    t = np.where(rng.random(200) < 0.7, y, rng.integers(0, C, 200))
    f = flips(s, t, y, C, top_p=0.34)
    pos, neg, pc_pos, pc_neg, pos_counts = _flips_by_loop(s, t, y, C)
    assert f["positive"] == pytest.approx(pos) and f["negative"] == pytest.approx(neg)
    assert f["per_class_positive"] == pytest.approx(pc_pos) and f["per_class_negative"] == pytest.approx(pc_neg)
    assert len(f["per_class_positive"]) == C and f["per_class_positive"][-1] == 0
    k = int(np.ceil(0.34 * C))
    assert f["top_p_share"] == pytest.approx(sum(sorted(pos_counts, reverse=True)[:k]) / sum(pos_counts))
    # swapping the models swaps positive and negative flips
    g = flips(t, s, y, C)
    assert g["positive"] == pytest.approx(f["negative"]) and g["negative"] == pytest.approx(f["positive"])


def test_dp_partition_takes_the_more_confident_model_in_the_true_class_ties_to_the_initial_student():
    # item 0: teacher surer of the true class; item 1: initial student surer; item 2: a tie (same logits);
    # item 3: teacher surer of its *top* class but less sure of the true one
    z = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]],
                      [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                      [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
                      [[1.0, 0.5, 0.0], [0.0, 0.0, 5.0]]])
    y = torch.tensor([1, 0, 2, 0])
    assert dp_targets(z, y).tolist() == [1, 0, 0, 0]
    # label-free: the top probability decides (item 3 now goes to the teacher)
    assert dp_targets(z, None).tolist() == [1, 0, 0, 1]
    # several teachers: the most confident of all, by a loop
    rng = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, 6, generator=rng)
    y = torch.randint(0, 6, (50,), generator=rng)
    p = z.softmax(-1)
    assert dp_targets(z, y).tolist() == [int(max(range(4), key=lambda k: (p[i, k, y[i]], -k))) for i in range(50)]


def test_kl_dp_loss_is_T2_KL_to_each_items_chosen_model():
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3)
    x, y, z = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), torch.randn(5, 2, 3)
    loss, logs = KLDP(temperature=2.0)(student, {"inputs": x, "labels": y, "teacher_logits": z})
    k = dp_targets(z, y)
    expected = sum(F.kl_div(F.log_softmax(student(x[i]) / 2, -1), F.softmax(z[i, k[i]] / 2, -1), reduction="sum")
                   for i in range(5)) / 5 * 4
    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(logs["from_teacher"]) == pytest.approx(float((k > 0).float().mean()))


def _weak_student(train):
    """A pretrained student that already predicts the digits, but poorly (trained briefly on a few items)."""
    from transferkit.engine import train as fit
    from transferkit.tune._common import Pairs, make_collate

    zoo = toy_zoo("student", hidden=16, seed=3)
    clf = Classifier(zoo.backbone, 16, 10, seed=3)
    few = train.subset(np.arange(60))
    fit(clf, Pairs(few.X, few.y), None, {"epochs": 3, "lr": 1e-2, "progress": False}, collate_fn=make_collate(_pre))
    return Net("student", zoo, clf.eval(), CLASSES)


@pytest.mark.parametrize("supervised", [True, False])
def test_kl_dp_transfers_and_reports_the_delta(supervised):
    train, test = digits(n=600)
    teacher, student = trained_teacher(train), _weak_student(train)
    start = copy.deepcopy(student.module.state_dict())
    data = train if supervised else dataclasses.replace(train, y=np.full(len(train), UNLABELLED))
    res = distill([teacher], student, data, test, method="kl_dp",
                  config={"epochs": 10, "lr": 3e-3, "supervised": supervised})
    m = res.metrics
    assert m["transfer_delta"] == pytest.approx(m["test_accuracy"] - m["start_test_accuracy"])
    assert m["transfer_delta"] > 0.05  # a strong teacher has much to give
    assert m["flips"]["teacher"]["positive"] > m["flips"]["teacher"]["negative"]
    # the given student is not modified (its frozen initial copy is what the partition compares with)
    assert all(torch.equal(v, student.module.state_dict()[k]) for k, v in start.items())


def test_supervised_kl_dp_refuses_unlabelled_items_and_needs_a_student_with_the_classes():
    train, test = digits()
    teacher = trained_teacher(train, epochs=1)
    unl = dataclasses.replace(train, y=np.where(np.arange(len(train)) % 2 == 0, train.y, UNLABELLED))
    with pytest.raises(DataError, match="supervised: false"):
        distill([teacher], _weak_student(train), unl, test, method="kl_dp", config={"epochs": 1})
    headless = Net("headless", toy_zoo("headless"), None, None)
    with pytest.raises(ConfigError, match="KL\\+DP transfers into a model that already predicts"):
        distill([teacher], headless, train, test, method="kl_dp", config={"epochs": 1})
