"""aTLAS: λ=0 is the base, ∂L/∂λ = <∂L/∂θ_b, τ_b>, trainable counts, learned scaling beats uniform TA."""

import pytest
import torch
from torch import nn

from transferkit.delta import Delta, apply
from transferkit.errors import ConfigError
from transferkit.merge import task_arithmetic
from transferkit.merge.atlas import AnisotropicScaling, few_shot, fit_atlas


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _deltas(model, n=2, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = {k: scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        if i == 1:
            t.pop("0.bias")  # a Delta may lack a tensor: it counts as a zero task vector there
        out.append(Delta("mlp", "full", t))
    return out


def test_zero_coefficients_give_the_base_model_and_counts():
    model = _mlp()
    x = torch.randn(4, 5)
    want = model(x)
    comp = AnisotropicScaling(model, _deltas(model))
    assert torch.equal(comp(x), want)
    assert comp.n_trainable == 2 * 4 and [n for n, p in comp.named_parameters() if p.requires_grad] == ["coef"]
    assert AnisotropicScaling(model, _deltas(model), partition=3).n_trainable == 2 * 4 * 3
    assert AnisotropicScaling(model, _deltas(model), blockwise=False).n_trainable == 2
    # the base is never modified; composing is functional
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        comp.coef.fill_(0.7)
    comp(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError):
        AnisotropicScaling(model, [Delta("mlp", "full", {"nope": torch.zeros(1)})])


def test_uniform_coefficients_equal_task_arithmetic():
    model = _mlp()
    deltas = _deltas(model)
    comp = AnisotropicScaling(model, deltas, blockwise=False)
    with torch.no_grad():
        comp.coef.fill_(0.3)
    ref = apply(_mlp(), task_arithmetic(deltas, 0.3))
    x = torch.randn(6, 5)
    assert torch.allclose(comp(x), ref(x), atol=1e-6)
    merged = apply(_mlp(), comp.merged_delta())
    assert torch.allclose(merged(x), ref(x), atol=1e-6)
    assert torch.allclose(comp.merged_model()(x), ref(x), atol=1e-6)


@pytest.mark.parametrize("partition", [1, 3])
def test_gradient_wrt_lambda_is_inner_product_of_parameter_gradient_and_task_vector(partition):
    model = _mlp()
    deltas = _deltas(model, n=3)
    comp = AnisotropicScaling(model, deltas, partition=partition, seed=2)
    with torch.no_grad():
        comp.coef.copy_(torch.randn(comp.coef.shape, generator=torch.Generator().manual_seed(5)))
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    loss = nn.functional.cross_entropy(comp(x), y)
    (g_coef,) = torch.autograd.grad(loss, comp.coef)

    # reference: the composed weights as plain leaf tensors, ordinary autograd for ∂L/∂θ_b
    theta = {n: t.detach().clone().requires_grad_(True) for n, t in comp.composed_parameters().items()}
    ref_model = _mlp()
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            p.copy_(theta[n])
    loss_ref = nn.functional.cross_entropy(torch.func.functional_call(ref_model, theta, (x,)), y)
    grads = dict(zip(theta, torch.autograd.grad(loss_ref, list(theta.values()))))
    assert torch.allclose(loss, loss_ref)
    for b, name in enumerate(comp.block_names):
        tau = getattr(comp, f"tau_{b}")
        for t in range(3):
            for k in range(partition):
                sel = torch.ones_like(tau[t], dtype=torch.bool) if partition == 1 else getattr(comp, f"groups_{b}") == k
                want = (grads[name] * tau[t] * sel).sum()
                assert torch.allclose(g_coef[t, b, k], want, atol=1e-6), (name, t, k)


def _two_block_problem(seed=0, n_classes=4, d=8):
    """logits = A x1 + B x2; task 1's vector fixes A but corrupts B, task 2's the reverse."""
    g = torch.Generator().manual_seed(seed)

    class TwoBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(d, n_classes, bias=False)
            self.b = nn.Linear(d, n_classes, bias=False)

        def forward(self, x):
            return self.a(x[:, :d]) + self.b(x[:, d:])

    torch.manual_seed(seed)
    base, teacher = TwoBlock(), TwoBlock()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(8.0)
    sb, st = base.state_dict(), teacher.state_dict()
    noise = lambda: 3.0 * torch.randn(n_classes, d, generator=g)  # noqa: E731
    tau1 = Delta("two", "full", {"a.weight": st["a.weight"] - sb["a.weight"], "b.weight": noise()})
    tau2 = Delta("two", "full", {"a.weight": noise(), "b.weight": st["b.weight"] - sb["b.weight"]})
    X = torch.randn(1200, 2 * d, generator=g)
    with torch.no_grad():
        y = teacher(X).argmax(1)
    return base, [tau1, tau2], X, y, TwoBlock


def _accuracy(model, X, y):
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def test_learned_anisotropic_scaling_beats_uniform_task_arithmetic():
    base, deltas, X, y, TwoBlock = _two_block_problem()
    Xtr, ytr = few_shot(X[:400], y[:400], shots=16, seed=0)   # few-shot: 16 labelled examples per class
    Xte, yte = X[400:], y[400:]
    assert len(ytr) == 4 * 16
    best_ta = 0.0
    for lam in [i / 10 for i in range(11)]:
        m = TwoBlock()
        m.load_state_dict(base.state_dict())
        best_ta = max(best_ta, _accuracy(apply(m, task_arithmetic(deltas, lam)), Xte, yte))
    comp = AnisotropicScaling(base, deltas)
    res = fit_atlas(comp, (Xtr, ytr), epochs=30, lr=0.05, weight_decay=0.0, batch_size=16)
    acc = _accuracy(comp, Xte, yte)
    assert res.history and "train_loss" in res.history[-1]
    assert acc > best_ta + 0.1, (acc, best_ta)
    c = res.coefficients
    # the learned coefficients pick each task's useful block and suppress its harmful one
    assert c["task_0"]["a.weight"] > c["task_0"]["b.weight"] and c["task_1"]["b.weight"] > c["task_1"]["a.weight"]
    # the learned Delta applied to the base reproduces the composed model
    m = TwoBlock()
    m.load_state_dict(base.state_dict())
    assert abs(_accuracy(apply(m, res.delta), Xte, yte) - acc) < 1e-6
    assert res.delta.meta["method"] == "atlas" and res.delta.meta["n_trainable"] == 4


def _negation_problem(seed=0, d=6, n=600):
    """Outputs [a(x), b(x)]: the target head reads a, the control head reads b.

    The base's b is the control teacher (control solved, as a pre-trained model with its zero-shot
    head), its a is random (target near chance). τ moves a to the target teacher but also adds noise
    to b, so uniform negation −λτ cannot forget the target without breaking the control.
    """
    g = torch.Generator().manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(d, 2, bias=False)
            self.b = nn.Linear(d, 2, bias=False)

        def forward(self, x):
            return torch.cat([self.a(x[:, :d]), self.b(x[:, :d])], 1)

    base = Net()
    with torch.no_grad():
        base.a.weight.copy_(0.1 * torch.randn(2, d, generator=g))
        base.b.weight.copy_(torch.randn(2, d, generator=g))
    teacher_a = torch.randn(2, d, generator=g)
    tau = Delta("neg", "full", {"a.weight": 4.0 * (teacher_a - base.a.weight.detach()),
                                "b.weight": 1.5 * torch.randn(2, d, generator=g)})

    def data(task, m):
        x = torch.randn(m, d, generator=g)
        w = teacher_a if task == 0 else base.b.weight.detach()
        return torch.cat([x, torch.full((m, 1), float(task))], 1), (x @ w.T).argmax(1)

    return base, tau, data(0, n), data(1, n), data(0, n), data(1, n), Net


def _task_ce(model, batch):
    x, y = batch["inputs"], batch["labels"]
    out = model(x)
    logits = torch.where(x[:, -1:].bool(), out[:, 2:], out[:, :2])
    loss = nn.functional.cross_entropy(logits, y)
    return loss, {"loss": float(loss.detach())}


def _task_acc(model, data):
    x, y = data
    with torch.no_grad():
        out = model(x)
    logits = out[:, 2:] if bool(x[0, -1]) else out[:, :2]
    return float((logits.argmax(1) == y).float().mean())


def test_atlas_negation_forgets_the_target_where_uniform_negation_breaks_the_control():
    from transferkit.merge import fit_negation, negate

    base, tau, tgt, ctr, tgt_eval, ctr_eval, Net = _negation_problem()
    t0, c0 = _task_acc(base, tgt_eval), _task_acc(base, ctr_eval)
    assert c0 == 1.0 and 0.2 < t0 < 0.8
    evaluate = lambda m: (_task_acc(m, tgt_eval), {"control": _task_acc(m, ctr_eval)})  # noqa: E731
    res = fit_negation(AnisotropicScaling(base, [tau]), tgt, ctr, _task_ce, evaluate, epochs=15, lr=0.05,
                       weight_decay=0.0, batch_size=32)
    m = Net()
    m.load_state_dict(base.state_dict())
    apply(m, res.delta)
    t1, c1 = _task_acc(m, tgt_eval), _task_acc(m, ctr_eval)
    assert res.epoch >= 1 and res.history[res.epoch]["target_acc"] == t1
    assert t1 < t0 - 0.25 and c1 >= 0.95 * c0, (t0, t1, c0, c1)
    lam = res.coefficients["task_0"]
    assert lam["a.weight"] < 0 and abs(lam["b.weight"]) < abs(lam["a.weight"]) / 3, lam
    # one λ for the whole vector: every λ that forgets as much breaks the control
    for k in range(1, 41):
        u = Net()
        u.load_state_dict(base.state_dict())
        apply(u, negate(tau, k / 10))
        assert not (_task_acc(u, tgt_eval) <= t1 + 0.02 and _task_acc(u, ctr_eval) >= 0.95 * c0), k / 10


def test_atlas_negation_keeps_the_best_qualifying_epoch_and_stops_when_a_control_falls():
    from transferkit.merge import fit_negation

    base, tau, tgt, ctr, *_ = _negation_problem()
    comp = AnisotropicScaling(base, [tau])
    script = [(0.9, 0.80), (0.6, 0.79), (0.4, 0.77), (0.2, 0.70), (0.1, 0.80)]  # epoch 3 breaks the control
    seen = []

    def evaluate(m):
        seen.append(m.coef.detach().clone())
        t, c = script[len(seen) - 1]
        return t, {"control": c}

    res = fit_negation(comp, tgt, ctr, _task_ce, evaluate, epochs=4, lr=0.05, batch_size=32)
    assert len(seen) == 4 and res.epoch == 2  # stopped after epoch 3, kept epoch 2 (lowest qualifying target)
    assert [h["controls_kept"] for h in res.history[1:]] == [True, True, False]
    assert torch.equal(comp.coef.detach(), seen[2])  # epoch 2's coefficients, not the last ones
    # none qualifying keeps λ = 0: the base model
    seen.clear()
    script[1:] = [(0.95, 0.80), (0.96, 0.80)]
    res = fit_negation(AnisotropicScaling(base, [tau]), tgt, ctr, _task_ce, evaluate, epochs=2)
    assert res.epoch == 0 and all(float(v.abs().max()) == 0 for v in res.delta.tensors.values())
    with pytest.raises(ConfigError, match="keep"):
        fit_negation(AnisotropicScaling(base, [tau]), tgt, ctr, _task_ce, evaluate, keep=1.5)
    with pytest.raises(ConfigError, match="epochs"):
        fit_negation(AnisotropicScaling(base, [tau]), tgt, ctr, _task_ce, evaluate, epochs=0)
    with pytest.raises(ConfigError, match="hold examples"):
        fit_negation(AnisotropicScaling(base, [tau]), tgt, (ctr[0][:0], ctr[1][:0]), _task_ce, evaluate)
