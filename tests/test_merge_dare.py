"""DARE: unbiasedness, exact 1/(1-p) rescale, p=0 identity, seeding, large-delta warning, defects."""

import warnings

import pytest
import torch

from transferkit.delta import NEW, Delta
from transferkit.errors import ConfigError
from transferkit.merge import LargeDeltaWarning, dare, dare_merge


def _delta(scale=1e-3, n=1000):
    g = torch.Generator().manual_seed(0)
    return Delta("toy", "full", {"w": scale * torch.randn(n, generator=g, dtype=torch.float64),
                                 "b": scale * torch.randn(10, generator=g, dtype=torch.float64),
                                 NEW + "head": torch.ones(3)})


def test_dare_p0_is_identity_and_p1_refused():
    d = _delta()
    out = dare(d, p=0.0)
    for k, v in d.tensors.items():
        assert torch.equal(out.tensors[k], v)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        dare(d, p=1.0)


def test_dare_rescales_by_exactly_one_over_one_minus_p_not_l1():
    d = _delta()
    p = 0.9
    out = dare(d, p=p, seed=3)
    w, tw = d.tensors["w"], out.tensors["w"]
    kept = tw != 0
    assert 0.05 < kept.double().mean() < 0.15
    assert torch.equal(tw[kept], w[kept] / (1 - p))  # exact factor on every kept entry
    # mergekit's DARE matches the L1 norm instead; the exact rescale does not (regression)
    assert abs(float(tw.abs().sum() / w.abs().sum()) - 1.0) > 1e-6
    assert torch.equal(out.tensors[NEW + "head"], d.tensors[NEW + "head"])  # heads are set, not dropped


def test_dare_is_unbiased_over_seeds():
    d = _delta(n=500)
    w = d.tensors["w"]
    mean = sum(dare(d, p=0.9, seed=s).tensors["w"] for s in range(1000)) / 1000
    # per-entry std of the mean is |w|*sqrt(p/(1-p))/sqrt(1000) ~ 0.095|w|
    assert float((mean - w).norm() / w.norm()) < 0.15
    assert abs(float((mean @ w) / (w @ w)) - 1.0) < 0.05  # projection onto w: E = 1
    # without the rescale, the mean would be (1-p) w
    assert float((mean - 0.1 * w).norm() / w.norm()) > 0.8


def test_dare_seeded_reproducible_and_per_tensor_masks_independent_of_other_tensors():
    d = _delta()
    a, b, c = dare(d, 0.5, seed=7), dare(d, 0.5, seed=7), dare(d, 0.5, seed=8)
    assert torch.equal(a.tensors["w"], b.tensors["w"])
    assert not torch.equal(a.tensors["w"], c.tensors["w"])
    only_w = Delta("toy", "full", {"w": d.tensors["w"]})
    assert torch.equal(dare(only_w, 0.5, seed=7).tensors["w"], a.tensors["w"])
    assert a.meta["dare_p"] == 0.5 and a.meta["dare_seed"] == 7


def test_dare_warns_on_large_deltas_only():
    with pytest.warns(LargeDeltaWarning, match="large deltas"):
        dare(_delta(scale=0.05), p=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dare(_delta(scale=1e-3), p=0.9)


def test_dare_refuses_finetuned_weights():
    # dropping fine-tuned weights instead of deltas fails badly (MergeLM issue #3): only Deltas accepted
    with pytest.raises(ConfigError, match="Delta"):
        dare({"w": torch.randn(4)}, p=0.5)


def test_dare_merge_with_ties_and_task_arithmetic():
    d1, d2 = _delta(), Delta("toy", "full", {"w": 1e-3 * torch.ones(1000, dtype=torch.float64)})
    lin = dare_merge([d1, d2], p=0.5, seed=1, lam=0.5)
    assert lin.meta["method"] == "dare_task_arithmetic"
    expected = 0.5 * (dare(d1, 0.5, 1).tensors["w"] + dare(d2, 0.5, 2).tensors["w"])
    assert torch.allclose(lin.tensors["w"], expected)
    t = dare_merge([d1, d2], p=0.5, seed=1, merge="ties", k=0.5, scope="per_tensor")
    assert t.meta["method"] == "dare_ties" and t.meta["trim_scope"] == "per_tensor"
    with pytest.raises(ConfigError, match="different bases"):
        dare_merge([d1, Delta("x", "full", {"w": torch.ones(2)})])
