"""distill: ``freeze_bn`` (kd, kl_dp) — a student whose head was fitted on a frozen BatchNorm backbone keeps the
running statistics it was fitted with; without it (the paper's train mode) they are re-estimated (issue 17)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_distill_kd import CLASSES, _pre, digits, toy_zoo, trained_teacher
from torch import nn

from transferkit.distill import Net, distill
from transferkit.distill._common import predictions
from transferkit.zoo.base import Classifier


def _probed_student(train):
    """A linear probe: a new head fitted on the eval-mode features of a BatchNorm backbone whose running
    statistics (the defaults, 0 and 1) come from elsewhere and do not fit these data."""
    zoo = toy_zoo("student", hidden=16, bn=True, seed=2)
    clf = Classifier(zoo.backbone, 16, 10, seed=2).eval()
    with torch.no_grad():
        feats = zoo.backbone(_pre(train.X))
    opt = torch.optim.Adam(clf.head.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(clf.head(feats), torch.as_tensor(np.asarray(train.y), dtype=torch.long)).backward()
        opt.step()
    return Net("student", zoo, clf, CLASSES)


def _bn(module):
    return next(m for m in module.modules() if isinstance(m, nn.BatchNorm1d))


@pytest.fixture(scope="module")
def setup():
    train, test = digits(n=300)
    return train, test, trained_teacher(train, epochs=3), _probed_student(train)


def test_kl_dp_with_frozen_bn_and_no_step_leaves_the_probed_student_as_it_was(setup):
    train, test, teacher, student = setup
    before = predictions(student.module, student, test)
    start = {k: v.clone() for k, v in _bn(student.module).named_buffers()}
    cfg = {"epochs": 1, "lr": 1e-12, "seed": 0}
    res = distill([teacher], student, train, test, method="kl_dp", config={**cfg, "freeze_bn": True})
    bn = _bn(res.student)
    assert all(torch.equal(v, dict(bn.named_buffers())[k]) for k, v in start.items())  # statistics, count
    assert np.array_equal(predictions(res.student, student, test), before)
    assert res.metrics["transfer_delta"] == 0.0
    # the paper's train mode re-estimates them from the batches, and the probe's predictions move without a step
    res = distill([teacher], student, train, test, method="kl_dp", config=cfg)
    bn = _bn(res.student)
    assert int(bn.num_batches_tracked) > 0 and not torch.allclose(bn.running_mean, start["running_mean"])
    assert not np.array_equal(predictions(res.student, student, test), before)


@pytest.mark.parametrize("method", ["kd", "kl_dp"])
def test_frozen_bn_still_trains_the_affine_weights_and_leaves_no_patch_behind(setup, method):
    train, test, teacher, student = setup
    start = {k: v.clone() for k, v in _bn(student.module).state_dict().items()}
    res = distill([teacher], student, train, test, method=method,
                  config={"epochs": 1, "lr": 1e-2, "seed": 0, "freeze_bn": True})
    bn = _bn(res.student)
    assert torch.equal(bn.running_mean, start["running_mean"]) and torch.equal(bn.running_var, start["running_var"])
    assert int(bn.num_batches_tracked) == 0
    assert not torch.equal(bn.weight, start["weight"])  # γ, β are trained
    res.student.train()  # after the run the layer is an ordinary BatchNorm again
    assert bn.training and "train" not in vars(bn)
