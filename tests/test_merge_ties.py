"""TIES-Merging: hand-computed 3-task examples for both trim scopes, sign election, aggregation."""

import pytest
import torch

from transferkit.delta import Delta
from transferkit.errors import ConfigError
from transferkit.merge import ties

# three task vectors over two tensors: "a" holds small entries, "b" entries ~10x larger
TAU = [
    {"a": [0.1, -0.3, 0.2, 0.0, 0.05], "b": [5.0, -1.0, 2.0, 0.5, -4.0]},
    {"a": [-0.2, -0.1, 0.4, 0.1, 0.0], "b": [-3.0, -2.0, 1.0, 6.0, 0.5]},
    {"a": [0.3, 0.2, -0.1, 0.0, -0.4], "b": [4.0, 1.0, -5.0, -0.5, 2.0]},
]


def _deltas(taus, base="toy"):
    return [Delta(base, "full", {k: torch.tensor(v, dtype=torch.float64) for k, v in t.items()}) for t in taus]


def test_ties_global_scope_hand_computed():
    # k=0.2 of 10 entries -> 2 kept per task, all from the large tensor "b":
    #   t1: b0=5, b4=-4   t2: b3=6, b0=-3   t3: b2=-5, b0=4
    # mass: b0 = 5-3+4 = 6 (+), b2 = -5, b3 = 6, b4 = -4; disjoint mean b0 = (5+4)/2 (t2 disagrees)
    out = ties(_deltas(TAU), k=0.2, scope="global")
    assert torch.allclose(out.tensors["a"], torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(out.tensors["b"], torch.tensor([4.5, 0.0, -5.0, 6.0, -4.0], dtype=torch.float64))
    assert out.meta["trim_scope"] == "global" and out.meta["aggregate"] == "mean" and out.meta["lam"] == 1.0
    assert out.meta["kept_fraction"] == [0.2, 0.2, 0.2]


def test_ties_per_tensor_scope_hand_computed_and_differs_from_global():
    # k=0.2 of 5 entries per tensor -> 1 kept per task per tensor:
    #   a: t1 a1=-0.3, t2 a2=0.4, t3 a4=-0.4      b: t1 b0=5, t2 b3=6, t3 b2=-5
    out = ties(_deltas(TAU), k=0.2, scope="per_tensor", lam=2.0)
    assert torch.allclose(out.tensors["a"], 2 * torch.tensor([0.0, -0.3, 0.4, 0.0, -0.4], dtype=torch.float64))
    assert torch.allclose(out.tensors["b"], 2 * torch.tensor([5.0, 0.0, -5.0, 6.0, 0.0], dtype=torch.float64))
    glob = ties(_deltas(TAU), k=0.2, scope="global", lam=2.0)
    assert not torch.allclose(out.tensors["a"], glob.tensors["a"])  # scales differ -> scopes differ
    # rescaling "a" to the scale of "b" lets global trimming reach it as well
    scaled = [dict(t, a=[10 * x for x in t["a"]]) for t in TAU]
    assert ties(_deltas(scaled), k=0.2, scope="global").tensors["a"].abs().sum() > 0
    assert ties(_deltas(TAU), k=0.2, scope="per-tensor").meta["trim_scope"] == "per_tensor"


SIGN = [[1.0, -2.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -2.0], [0.0, 1.0, 3.0, 0.0]]


def test_ties_elect_and_disjoint_mean_and_zero_mass_tie_break():
    # no trimming (k=1). mass = [0, -2, 1, -3] -> elected [?, -, +, -]; majority of elected signs is -,
    # so coordinate 0 (zero mass) takes "-" (reference); PEFT's ">= 0 -> +1" takes "+".
    deltas = _deltas([{"w": v} for v in SIGN])
    major = ties(deltas, k=1.0)
    assert torch.allclose(major.tensors["w"], torch.tensor([-1.0, -1.5, 3.0, -1.5], dtype=torch.float64))
    pos = ties(deltas, k=1.0, tie_break="positive")
    assert torch.allclose(pos.tensors["w"], torch.tensor([1.0, -1.5, 3.0, -1.5], dtype=torch.float64))
    # zeros never count in the disjoint mean (t3's 0 at coordinate 3 does not dilute -1.5)


def test_ties_sum_aggregate_and_lambda_defaults():
    deltas = _deltas([{"w": v} for v in SIGN])
    s = ties(deltas, k=1.0, agg="sum", lam=1.0)
    assert torch.allclose(s.tensors["w"], torch.tensor([-1.0, -3.0, 3.0, -3.0], dtype=torch.float64))
    assert ties(deltas, k=1.0, agg="sum").meta["lam"] == 0.3  # fusion_bench default for sums
    assert ties(deltas, k=1.0).meta["lam"] == 1.0  # paper: disjoint mean, lambda = 1


def test_ties_small_tensor_keeps_at_least_one_entry_per_tensor():
    # PEFT/mergekit keep int(k*d) entries: a 3-entry bias at k=0.2 would be emptied; we keep ceil(k*d) >= 1
    d = [Delta("toy", "full", {"bias": torch.tensor([0.1, -0.5, 0.2])})]
    out = ties(d, k=0.2, scope="per_tensor")
    assert torch.allclose(out.tensors["bias"], torch.tensor([0.0, -0.5, 0.0]))


def test_ties_skips_integer_tensors_drops_heads_and_checks_inputs():
    a = Delta("toy", "full", {"w": torch.ones(3), "bn.num_batches_tracked": torch.tensor(5),
                              "new.head.weight": torch.ones(2, 3)})
    b = Delta("toy", "full", {"w": -torch.ones(3) * 0.5})
    out = ties([a, b], k=1.0)
    assert set(out.tensors) == {"w"}
    assert out.meta["skipped"] == ["bn.num_batches_tracked"] and out.meta["heads_dropped"] == ["new.head.weight"]
    with pytest.raises(ConfigError, match="different bases"):
        ties([a, Delta("other", "full", {"w": torch.ones(3)})])
    with pytest.raises(ConfigError, match="0.2"):
        ties([a, b], k=20)
    with pytest.raises(ConfigError, match="scope"):
        ties([a, b], scope="layer")
    with pytest.raises(ConfigError, match="shape"):
        ties([a, Delta("toy", "full", {"w": torch.ones(4)})])
