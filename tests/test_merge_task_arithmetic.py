"""Task arithmetic (addition, negation, analogy), averaging and soups, heads and base checks."""

import pytest
import torch
from torch import nn

from transferkit.delta import NEW, Delta, apply, from_states
from transferkit.errors import ConfigError
from transferkit.merge import (analogy, attach_head, average, greedy_soup, negate, task_arithmetic,
                               uniform_soup)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _tuned(seed):
    base, tuned = _net(), _net()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return from_states(base.state_dict(), tuned.state_dict(), base_name="toy"), tuned


def test_negation_with_lambda_applies_minus_lambda_tau():
    tau, tuned = _tuned(1)
    model = apply(_net(), negate(tau, lam=0.5))
    for name, p in model.state_dict().items():
        expected = _net().state_dict()[name] - 0.5 * (tuned.state_dict()[name] - _net().state_dict()[name])
        assert torch.allclose(p, expected, atol=1e-6)
    # negating with lam then adding with lam returns to the base
    back = apply(model, task_arithmetic([tau], lam=0.5))
    x = torch.randn(5, 4)
    assert torch.allclose(back(x), _net()(x), atol=1e-5)
    assert negate(tau, 0.5).meta["method"] == "negation"


def test_addition_per_task_lambdas_and_analogy():
    (t1, _), (t2, _), (t3, _) = _tuned(1), _tuned(2), _tuned(3)
    out = task_arithmetic([t1, t2], lam=[0.8, 0.3])
    for k in out.tensors:
        assert torch.allclose(out.tensors[k], 0.8 * t1.tensors[k] + 0.3 * t2.tensors[k])
    an = analogy(t1, t2, t3, lam=0.7)  # tau_D ~ tau_C + tau_B - tau_A
    for k in an.tensors:
        assert torch.allclose(an.tensors[k], 0.7 * (t3.tensors[k] + t2.tensors[k] - t1.tensors[k]), atol=1e-7)
    with pytest.raises(ConfigError, match="weights"):
        task_arithmetic([t1, t2], lam=[1.0])


def test_missing_tensors_count_as_zero_and_integer_buffers_are_skipped():
    a = Delta("toy", "full", {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)})
    b = Delta("toy", "full", {"v": torch.ones(3)})
    out = task_arithmetic([a, b], lam=2.0)
    assert torch.equal(out.tensors["w"], 2 * torch.ones(2)) and torch.equal(out.tensors["v"], 2 * torch.ones(3))
    assert "bn.num_batches_tracked" not in out.tensors and out.meta["skipped"] == ["bn.num_batches_tracked"]


def test_heads_are_dropped_and_attach_head_restores_one_task_head():
    a = Delta("toy", "full", {"w": torch.ones(2), NEW + "head": torch.full((3,), 1.0)})
    b = Delta("toy", "full", {"w": 3 * torch.ones(2), NEW + "head": torch.full((3,), 2.0)})
    merged = average([a, b])
    assert set(merged.tensors) == {"w"} and merged.meta["heads_dropped"] == [NEW + "head"]
    for_b = attach_head(merged, b)
    assert torch.equal(for_b.tensors[NEW + "head"], torch.full((3,), 2.0))
    assert torch.equal(for_b.tensors["w"], 2 * torch.ones(2))
    with pytest.raises(ConfigError, match="different bases"):
        attach_head(merged, Delta("other", "head", {NEW + "head": torch.ones(3)}))


def test_mismatched_bases_and_bad_inputs_are_config_errors():
    a = Delta("toy", "full", {"w": torch.ones(2)})
    with pytest.raises(ConfigError, match="different bases: 'other', 'toy'"):
        task_arithmetic([a, Delta("other", "full", {"w": torch.ones(2)})])
    with pytest.raises(ConfigError, match="Delta objects"):
        task_arithmetic([{"w": torch.ones(2)}])
    with pytest.raises(ConfigError, match="at least 1"):
        average([])


def test_weighted_average_normalises_weights():
    a = Delta("toy", "full", {"w": torch.zeros(2)})
    b = Delta("toy", "full", {"w": torch.ones(2)})
    assert torch.allclose(average([a, b], weights=[1, 3]).tensors["w"], torch.full((2,), 0.75))
    assert torch.allclose(average([a, b]).tensors["w"], torch.full((2,), 0.5))
    with pytest.raises(ConfigError, match="sum to 0"):
        average([a, b], weights=[1, -1])


def test_uniform_soup_averages_heads_and_greedy_soup_skips_a_bad_ingredient():
    target = torch.tensor([1.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    good = [Delta("toy", "full", {"w": target + 0.3 * torch.randn(3, generator=g), NEW + "h": torch.ones(2) * i})
            for i in range(3)]
    bad = Delta("toy", "full", {"w": target + 5.0, NEW + "h": torch.zeros(2)})
    soup = uniform_soup(good)
    assert torch.allclose(soup.tensors[NEW + "h"], torch.ones(2))

    calls = []

    def evaluate(d):  # held-out "accuracy": closeness to the target
        calls.append(1)
        return -float((d.tensors["w"] - target).norm())

    singles = [evaluate(uniform_soup([d])) for d in good + [bad]]
    gs = greedy_soup(good + [bad], evaluate)
    assert 3 not in gs.meta["ingredients"]
    assert gs.meta["score"] >= max(singles)
    assert gs.meta["ingredients"][0] == max(range(4), key=lambda i: singles[i])
    n = len(calls)
    greedy_soup(good + [bad], evaluate, scores=singles)
    assert len(calls) - n == 3  # only the candidates are evaluated when scores are given
