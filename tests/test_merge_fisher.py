"""Fisher: per-example diagonal Fisher vs brute force, vs the batch-squared shortcut, expected vs
empirical, and Fisher-weighted merging (identity, hand-computed weights, normalisation, fallback)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from transferkit.delta import Delta, apply, from_states
from transferkit.errors import ConfigError, DataError
from transferkit.merge import compute_fisher, fisher_merge


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


def _data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


def _brute_force(model, x, y=None):
    """Per-example loop: (1/N) sum_x sum_c p(c|x) (d log p(c|x))^2, or the gold label only."""
    params = list(model.parameters())
    fisher = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i:i + 1]), dim=-1)[0]
        classes = [int(y[i])] if y is not None else range(logp.shape[0])
        for c in classes:
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            weight = 1.0 if y is not None else logp[c].exp().item()
            for f, g in zip(fisher, grads):
                f += weight * g ** 2
    return {n: f / x.shape[0] for (n, _), f in zip(model.named_parameters(), fisher)}


def _close(a, b, **kw):
    return all(torch.allclose(a[k], b[k], **kw) for k in a)


def test_per_example_fisher_matches_brute_force_loop():
    model, (x, y) = _mlp(), _data()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    ref = _brute_force(model, x)
    for method in ("vmap", "loop"):
        f = compute_fisher(model, batches, method=method)
        assert set(f) == set(ref)
        assert _close(f, ref, rtol=1e-4, atol=1e-7), method
    ref_emp = _brute_force(model, x, y)
    assert _close(compute_fisher(model, batches, empirical=True), ref_emp, rtol=1e-4, atol=1e-7)
    assert _close(compute_fisher(model, batches, empirical=True, method="loop"), ref_emp, rtol=1e-4, atol=1e-7)


def test_batch_squared_shortcut_is_not_the_diagonal_fisher():
    # MergeLM-style defect: square the gradient of a batch sum instead of summing per-example squares
    model, (x, y) = _mlp(), _data()
    loss = torch.log_softmax(model(x), -1).gather(1, y[:, None]).mean()
    shortcut = {n: g ** 2 for (n, _), g in zip(model.named_parameters(),
                                               torch.autograd.grad(loss, list(model.parameters())))}
    emp = compute_fisher(model, [(x, y)], empirical=True)
    assert not _close(shortcut, emp, rtol=0.1)
    total_s = sum(v.sum() for v in shortcut.values())
    total_e = sum(v.sum() for v in emp.values())
    assert total_s < 0.8 * total_e  # cross-example terms cancel: mean^2 <= mean of squares
    # the expected-Fisher version of the shortcut (sum_y sqrt(p) log p, batch gradient squared) too
    lp = torch.log_softmax(model(x), -1)
    obj = (lp.detach().exp().sqrt() * lp).sum()
    sc2 = {n: g ** 2 / x.shape[0] for (n, _), g in zip(model.named_parameters(),
                                                     torch.autograd.grad(obj, list(model.parameters())))}
    assert not _close(sc2, compute_fisher(model, [x]), rtol=0.1)


def test_expected_fisher_differs_from_empirical_and_needs_no_labels():
    model, (x, y) = _mlp(), _data()
    exp_f = compute_fisher(model, [x])  # bare tensors: no labels needed for the expected Fisher
    emp_f = compute_fisher(model, [(x, y)], empirical=True)
    assert not _close(exp_f, emp_f, rtol=0.05)
    with pytest.raises(DataError, match="labels"):
        compute_fisher(model, [x], empirical=True)


def test_compute_fisher_dict_batches_logits_attribute_and_n_examples():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, features=None):
            return SimpleNamespace(logits=self.body(features))

    model, (x, y) = Wrapped(), _data()
    f = compute_fisher(model, [{"features": x[:4], "labels": y[:4]}, {"features": x[4:], "labels": y[4:]}],
                       n_examples=5)
    ref = _brute_force(model.body, x[:5])
    assert _close({k[len("body."):]: v for k, v in f.items()}, ref, rtol=1e-4, atol=1e-7)
    assert model.training  # the training flag is restored


def test_fisher_merge_of_identical_models_is_that_model():
    model, (x, _) = _mlp(), _data()
    f = compute_fisher(model, [x])
    merged = fisher_merge([model, _mlp()], [f, f])
    for k, v in model.state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-6)
    d = Delta("toy", "full", {k: 0.1 * v for k, v in model.state_dict().items()})
    md = fisher_merge([d, d, d], [f, f, f])
    assert _close(md.tensors, d.tensors, atol=1e-7)


def test_fisher_merge_weights_hand_computed_and_normalisation():
    d1 = Delta("toy", "full", {"w": torch.tensor([1.0, 1.0])})
    d2 = Delta("toy", "full", {"w": torch.tensor([3.0, 3.0])})
    f1, f2 = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}
    out = fisher_merge([d1, d2], [f1, f2], normalize=False, floor=0.0)
    assert torch.allclose(out.tensors["w"], torch.tensor([(1 + 9) / 4, (3 + 3) / 4]))
    # normalisation makes the result invariant to a Fisher's overall scale
    big = {"w": 100 * f2["w"]}
    assert torch.allclose(fisher_merge([d1, d2], [f1, big]).tensors["w"], fisher_merge([d1, d2], [f1, f2]).tensors["w"])
    assert not torch.allclose(fisher_merge([d1, d2], [f1, big], normalize=False).tensors["w"],
                              fisher_merge([d1, d2], [f1, f2], normalize=False).tensors["w"])
    # coefficients lambda
    out = fisher_merge([d1, d2], [f1, f1], weights=[0.25, 0.75], normalize=False, floor=0.0)
    assert torch.allclose(out.tensors["w"], torch.tensor([2.5, 2.5]))


def test_fisher_merge_falls_back_to_target_where_all_fishers_vanish():
    d1 = Delta("toy", "full", {"w": torch.tensor([1.0, 1.0, 1.0])})
    d2 = Delta("toy", "full", {"w": torch.tensor([3.0, 3.0, 3.0])})
    f1, f2 = {"w": torch.tensor([0.0, 1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 2.0])}
    out = fisher_merge([d1, d2], [f1, f2], normalize=False)
    assert torch.allclose(out.tensors["w"], torch.tensor([1.0, 2.0, 3.0]), atol=1e-5)
    assert out.meta["fallback_fraction"] == pytest.approx(1 / 3)
    # flooring every model instead gives the plain average where all Fishers vanish
    both = fisher_merge([d1, d2], [f1, f2], normalize=False, favor_target=False)
    assert torch.allclose(both.tensors["w"][0], torch.tensor(2.0))
    # all-zero Fishers (norm 0) must not produce NaN
    zero = {"w": torch.zeros(3)}
    assert torch.allclose(fisher_merge([d1, d2], [zero, zero]).tensors["w"], d1.tensors["w"])


def test_fisher_merge_state_dicts_buffers_heads_and_errors():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        a[1].running_mean.fill_(1.0)
        b[1].running_mean.fill_(3.0)
        b[1].num_batches_tracked.fill_(7)
    fa = {n: torch.ones_like(p) for n, p in a.named_parameters()}
    merged = fisher_merge([a, b], [fa, fa], exclude=["1."])
    assert torch.equal(merged["1.running_mean"], a[1].running_mean)  # excluded -> target
    merged = fisher_merge([a, b], [fa, fa])
    assert torch.allclose(merged["1.running_mean"], torch.full((2,), 2.0))  # no Fisher -> lambda-average
    assert int(merged["1.num_batches_tracked"]) == 0  # integer buffer -> target, never averaged
    assert torch.allclose(merged["0.weight"], (a[0].weight + b[0].weight) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="different bases"):
        fisher_merge([Delta("x", "full", {}), Delta("y", "full", {})], [{}, {}])
    with pytest.raises(ConfigError, match="Fishers for"):
        fisher_merge([a, b], [fa])


def test_fisher_merge_of_deltas_equals_merge_of_models():
    base = _mlp(0)
    m1, m2 = _mlp(1), _mlp(2)
    x, _ = _data()
    f1, f2 = compute_fisher(m1, [x]), compute_fisher(m2, [x])
    models = fisher_merge([m1, m2], [f1, f2])
    d1 = from_states(base.state_dict(), m1.state_dict(), base_name="mlp")
    d2 = from_states(base.state_dict(), m2.state_dict(), base_name="mlp")
    via_delta = apply(_mlp(0), fisher_merge([d1, d2], [f1, f2])).state_dict()
    assert _close(via_delta, models, atol=1e-5)
