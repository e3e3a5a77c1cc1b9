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


@pytest.mark.parametrize("engine", [False, True])
def test_learned_anisotropic_scaling_beats_uniform_task_arithmetic(engine):
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
    res = fit_atlas(comp, (Xtr, ytr), epochs=30, lr=0.05, weight_decay=0.0, batch_size=16, engine=engine)
    acc = _accuracy(comp, Xte, yte)
    assert res.trainer == ("engine" if engine else "local")
    assert acc > best_ta + 0.1, (acc, best_ta)
    c = res.coefficients
    # the learned coefficients pick each task's useful block and suppress its harmful one
    assert c["task_0"]["a.weight"] > c["task_0"]["b.weight"] and c["task_1"]["b.weight"] > c["task_1"]["a.weight"]
    # the learned Delta applied to the base reproduces the composed model
    m = TwoBlock()
    m.load_state_dict(base.state_dict())
    assert abs(_accuracy(apply(m, res.delta), Xte, yte) - acc) < 1e-6
    assert res.delta.meta["method"] == "atlas" and res.delta.meta["n_trainable"] == 4
