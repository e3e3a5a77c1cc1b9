"""The engine contract of objectives: frozen parts, parameter groups, step hooks, per-sample outputs,
gradient reversal, ``trainable`` predicates and scorer-based model selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from transferkit.engine import (
    CrossEntropy,
    GradientReversal,
    KDObjective,
    Objective,
    TrainConfig,
    grad_reverse,
    latest_checkpoint,
    lr_factor,
    train,
)
from transferkit.engine.checkpoint import load_checkpoint
from transferkit.errors import ConfigError


def toy(n, d=8, c=3, seed=0):
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(42)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    return centers[y] + torch.randn(n, d, generator=g), y


def mlp(d=8, c=3, hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c))


def bn_teacher(d=8, c=3, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, c))


def quiet(**kw):
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def test_gradient_reversal_is_identity_forward_and_negates_scaled_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.25 * w)
    # the layer form, with λ set later (as a before_step hook does)
    layer = GradientReversal()
    layer.lambda_ = 2.0
    x.grad = None
    (layer(x) * w).sum().backward()
    assert torch.allclose(x.grad, -2.0 * w)


class Recorder(CrossEntropy):
    """Records the order of hooks and forward passes, and checks the optimizer stepped in between."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.events, self.stop_after, self.before = [], stop_after, None

    def before_step(self, step, total):
        self.events.append(("before", step, total))

    def forward(self, model, batch):
        if self.events[-1][0] == "before":  # first micro-batch of the update: weights before it
            self.before = model[0].weight.detach().clone()
        self.events.append(("forward", None, None))
        return super().forward(model, batch)

    def after_step(self, step, total, model):
        assert not torch.equal(model[0].weight, self.before)  # the optimizer step came before this hook
        self.events.append(("after", step, total))
        return step == self.stop_after


def test_step_hooks_are_called_in_order_around_each_optimizer_step():
    x, y = toy(48)
    obj = Recorder()
    res = train(mlp(), (x, y), obj, quiet(max_steps=4, batch_size=6, grad_accum=2))
    want = []
    for s in range(4):
        want += [("before", s, 4), ("forward", None, None), ("forward", None, None), ("after", s, 4)]
    assert obj.events == want
    assert res.steps == 4 and not res.stopped_early

    # after_step returning True ends the run after that step
    obj = Recorder(stop_after=1)
    res = train(mlp(), (x, y), obj, quiet(max_steps=4, batch_size=6))
    assert res.steps == 2 and res.stopped_early and obj.events[-1] == ("after", 1, 4)


class ModeProbe(KDObjective):
    def __init__(self, teacher):
        super().__init__(temperature=2.0, hard_weight=0.5, teacher=teacher)
        self.teacher_modes = []

    def forward(self, model, batch):
        self.teacher_modes.append(self.teacher.training)
        return super().forward(model, batch)


def test_frozen_teacher_is_unchanged_in_eval_mode_and_outside_optimizer_and_checkpoints(tmp_path):
    x, y = toy(96)
    teacher = bn_teacher()
    teacher.train()  # as handed over by a user; BatchNorm in train mode would update its statistics
    with torch.no_grad():
        teacher(x)  # non-trivial running statistics
    before = copy.deepcopy(teacher.state_dict())
    student = mlp()
    obj = ModeProbe(teacher)
    train(student, (x, y), obj, quiet(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.1, checkpoint_every=3),
          out_dir=tmp_path)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and "1.running_mean" in after
    for k in before:  # weights and BatchNorm buffers (running_mean/var, num_batches_tracked)
        assert torch.equal(before[k], after[k]), k
    assert obj.teacher_modes and not any(obj.teacher_modes)  # eval mode during training
    assert obj.teacher is teacher and "teacher" in dict(obj.named_children())  # put back afterwards
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored

    path = latest_checkpoint(tmp_path / "checkpoints")
    tensors, state = load_checkpoint(path)
    assert not any("teacher" in k for group in tensors.values() for k in group)
    assert not any(k.startswith("teacher") for k in load_file(str(path / "objective.safetensors")))
    n_opt = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_opt == len(list(student.parameters()))  # only the student is optimised


def test_frozen_declarations_are_checked():
    x, y = toy(16)

    class Bad(CrossEntropy):
        frozen = ("teacher",)

        def __init__(self, teacher):
            super().__init__()
            self.teacher = teacher

    with pytest.raises(ConfigError, match="not an nn.Module"):
        train(mlp(), (x, y), Bad(None), quiet(max_steps=1))
    model = mlp()
    with pytest.raises(ConfigError, match="shares parameters"):
        train(model, (x, y), Bad(model[0]), quiet(max_steps=1))


class GroupProbe(CrossEntropy):
    """Head at 10× lr; records each update's effective lr per parameter (SGD: Δp = −lr (g + wd·p))."""

    def __init__(self, model):
        super().__init__()
        self.head = list(model[2].parameters())
        self.grads, self.prev, self.updates = {}, None, []
        for n, p in model.named_parameters():
            p.register_hook(lambda g, n=n: self.grads.__setitem__(n, g.clone()))

    def param_groups(self, model):
        return [{"params": self.head, "lr_scale": 10.0}]

    def forward(self, model, batch):
        self.prev = {n: p.detach().clone() for n, p in model.named_parameters()}
        return super().forward(model, batch)

    def after_step(self, step, total, model):
        self.updates.append({n: (p.detach() - self.prev[n], self.grads[n], self.prev[n])
                             for n, p in model.named_parameters()})


def test_param_groups_get_their_own_scheduled_lr_and_the_weight_decay_rule():
    x, y = toy(40)
    model = mlp()
    obj = GroupProbe(model)
    lr, wd, total = 0.05, 0.1, 4
    train(model, (x, y), obj, quiet(max_steps=total, batch_size=10, optimizer="sgd", lr=lr, weight_decay=wd,
                                    scheduler="linear", warmup_ratio=0.25, max_grad_norm=None))
    assert len(obj.updates) == total
    for s, update in enumerate(obj.updates):
        base = lr * lr_factor(s, total, 1, "linear")
        for name, (delta, grad, old) in update.items():
            scale = 10.0 if name.startswith("2.") else 1.0
            decay = wd * old if old.ndim >= 2 else 0.0
            assert torch.allclose(delta, -base * scale * (grad + decay), atol=1e-6), (s, name)


def test_param_groups_are_checked():
    x, y = toy(16)

    class Groups(CrossEntropy):
        def __init__(self, groups):
            super().__init__()
            self.groups = groups

        def param_groups(self, model):
            return self.groups(model)

    for groups, text in [
        (lambda m: [{"params": [nn.Parameter(torch.zeros(2))]}], "neither the model nor the objective"),
        (lambda m: [{"params": [m[0].weight]}, {"params": [m[0].weight]}], "more than one"),
        (lambda m: [{"params": [m[0].weight], "lr_scale": 0}], "lr_scale"),
        (lambda m: [{"params": [m[0].weight], "lr": 0.1}], "lr_scale"),
    ]:
        with pytest.raises(ConfigError, match=text):
            train(mlp(), (x, y), Groups(groups), quiet(max_steps=1))


def test_trainable_predicate_selects_parameters_for_the_run():
    x, y = toy(64)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    train(model, (x, y), CrossEntropy(), quiet(epochs=1, batch_size=16), trainable=lambda n, p: n.startswith("2."))
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[0].bias, before["0.bias"])
    assert not torch.equal(model[2].weight, before["2.weight"]) and not torch.equal(model[2].bias, before["2.bias"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="selects no parameter"):
        train(mlp(), (x, y), config=quiet(max_steps=1), trainable=lambda n, p: False)


class Scripted:
    """A label-free scorer with scripted values; remembers the weights and data it was called with."""

    name = "score"

    def __init__(self, values, higher_is_better):
        self.values, self.higher_is_better = list(values), higher_is_better
        self.seen = []

    def __call__(self, model, val_data):
        assert not model.training and not torch.is_grad_enabled()
        (inputs,) = val_data  # inputs only: no labels needed
        model(inputs)
        self.seen.append((val_data, copy.deepcopy(model.state_dict())))
        return self.values[len(self.seen) - 1]


@pytest.mark.parametrize("higher, best_eval", [(False, 1), (True, 2)])
def test_scorer_selects_and_restores_the_step_it_prefers(higher, best_eval):
    x, y = toy(64)
    xv = (toy(30, seed=3)[0],)
    scorer = Scripted([3.0, 1.0, 5.0, 2.0], higher)
    model = mlp()
    res = train(model, (x, y), CrossEntropy(), quiet(max_steps=8, batch_size=16, eval_every=2, restore_best=True),
                val_data=xv, metric=scorer)
    assert len(scorer.seen) == 4 and all(v is xv for v, _ in scorer.seen)
    assert [r["val_score"] for r in res.history if "val_score" in r] == [3.0, 1.0, 5.0, 2.0]
    assert res.best_step == 2 * (best_eval + 1) and res.metrics["restored_best"]
    assert res.metrics["val_score"] == scorer.values[best_eval]
    want = scorer.seen[best_eval][1]
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_metric_must_be_a_known_name_or_a_scorer():
    x, y = toy(16)
    with pytest.raises(ConfigError, match="scorer"):
        train(mlp(), (x, y), config=quiet(max_steps=1), metric=lambda m, d: 0.0)  # no name / direction
    with pytest.raises(ConfigError, match="metric"):
        train(mlp(), (x, y), config=quiet(max_steps=1), metric="f1")


class Outputs(CrossEntropy):
    """Returns per-sample outputs: the first input feature, the predicted class and the step."""

    def before_step(self, step, total):
        self.step = step

    def forward(self, model, batch):
        loss, logs = super().forward(model, batch)
        x = batch["inputs"]
        with torch.no_grad():
            pred = model(x).argmax(-1)
        return loss, logs, {"x0": x[:, 0], "pred": pred, "step": torch.full((len(x),), self.step)}


def test_per_sample_outputs_come_back_in_data_order():
    x, y = toy(50)
    res = train(mlp(), (x, y), Outputs(), quiet(epochs=1, batch_size=7, grad_accum=2))
    assert torch.equal(res.outputs["x0"], x[:, 0])  # shuffled batches, rows back in data order
    assert res.outputs["pred"].dtype == torch.long and res.outputs["pred"].shape == (50,)
    # several visits: the latest step wins
    res = train(mlp(), (x, y), Outputs(), quiet(epochs=2, batch_size=10))
    assert torch.equal(res.outputs["x0"], x[:, 0]) and bool((res.outputs["step"] >= 5).all())
    # unvisited samples: NaN (floating) / -1 (integer)
    res = train(mlp(), (x, y), Outputs(), quiet(max_steps=2, batch_size=10))
    seen = ~torch.isnan(res.outputs["x0"])
    assert int(seen.sum()) == 20 and torch.equal(res.outputs["x0"][seen], x[seen, 0])
    assert bool((res.outputs["step"][~seen] == -1).all())
    # a plain callable returning (loss, logs) still works and gives no outputs
    res = train(mlp(), (x, y), lambda m, b: (F.cross_entropy(m(b["inputs"]), b["labels"]), {}),
                quiet(max_steps=2, batch_size=10))
    assert res.outputs == {} and math.isfinite(res.metrics["train_loss"])


def test_base_objective_declares_nothing():
    obj = Objective()
    assert obj.frozen == () and obj.param_groups(mlp()) == [] and obj.after_step(0, 1, mlp()) is None


def test_tune_curve_plots_the_engine_train_loss(tmp_path):
    from transferkit.tune._common import plot_curve

    x, y = toy(64)
    res = train(mlp(), (x, y), CrossEntropy(), quiet(epochs=2, batch_size=16, log_every=1), val_data=toy(30, seed=1))
    fig = plot_curve(res.history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    want = [(r["step"], r["train_loss"]) for r in res.history if "train_loss" in r]
    assert len(want) == 8
    assert list(zip(lines["train loss"].get_xdata(), lines["train loss"].get_ydata())) == want
    val = [(r["step"], r["val_accuracy"]) for r in res.history if "val_accuracy" in r]
    assert list(zip(lines["val accuracy"].get_xdata(), lines["val accuracy"].get_ydata())) == val
