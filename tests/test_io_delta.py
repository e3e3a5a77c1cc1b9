"""io (atomic writes, safe loading) and the Delta type."""

import pickle

import pytest
import torch
from torch import nn

from transferkit.delta import NEW, Delta, apply, as_additive, from_states, to_dense
from transferkit.errors import ModelError
from transferkit.io import atomic_path, load_weights, save_safetensors, write_json


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed")
    assert target.read_text().strip().endswith("}")
    assert '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_directory_replace(tmp_path):
    d = tmp_path / "run"
    for i in range(2):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(str(i))
    assert (d / "f").read_text() == "1"


def test_load_weights_roundtrip_and_errors(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    save_safetensors(state, tmp_path / "m.safetensors")
    assert torch.equal(load_weights(tmp_path / "m.safetensors")["w"], state["w"])
    torch.save(state, tmp_path / "m.pth")
    assert torch.equal(load_weights(tmp_path / "m.pth")["b"], state["b"])
    # truncated safetensors
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_weights(tmp_path / "cut.safetensors")
    # a pickle carrying an arbitrary object is refused (weights_only=True)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": object()}, f)
    with pytest.raises(ModelError):
        load_weights(tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_delta_from_states_apply_reproduces_tuned(tmp_path):
    base, tuned = _net(), _net()
    with torch.no_grad():
        tuned[0].weight.add_(0.5)
        tuned[2].bias.sub_(1.0)
    d = from_states(base.state_dict(), tuned.state_dict(), base_name="toy")
    assert d.kind == "full" and set(d.tensors) == {"0.weight", "2.bias"}
    d.save(tmp_path / "delta")
    d2 = Delta.load(tmp_path / "delta")
    restored = apply(_net(), d2)
    x = torch.randn(5, 4)
    assert torch.allclose(restored(x), tuned(x), atol=1e-6)
    # applying with scale -1 undoes it
    apply(restored, d2, scale=-1.0)
    assert torch.allclose(restored(x), base(x), atol=1e-6)
    assert set(to_dense(d2)) == {"0.weight", "2.bias"}


def test_delta_new_tensors_are_set_not_added():
    base = {"w": torch.zeros(2)}
    tuned = {"w": torch.zeros(2), "head.weight": torch.ones(3, 2)}
    d = from_states(base, tuned, base_name="toy")
    assert d.kind == "head" and list(d.tensors) == [NEW + "head.weight"]
    model = nn.Module()
    model.head = nn.Linear(2, 3, bias=False)
    apply(model, d)
    apply(model, d)  # idempotent: set, not added
    assert torch.equal(model.head.weight, torch.ones(3, 2))


def test_delta_shape_mismatch_is_an_error():
    d = Delta("toy", "full", {"0.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelError, match="shape"):
        apply(_net(), d)
    with pytest.raises(ModelError, match="unknown delta kind"):
        Delta("toy", "weird", {})


# --------------------------------------------------------------------------- mask deltas


def _mask_for(net, p=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=gen) >= p for k, v in net.state_dict().items()}


def test_mask_apply_zeroes_exactly_the_masked_entries_and_all_ones_is_identity():
    net, ref = _net(), _net()
    masks = _mask_for(net)
    apply(net, Delta("toy", "mask", masks))
    for k, theta in ref.state_dict().items():
        got = net.state_dict()[k]
        assert torch.equal(got[~masks[k]], torch.zeros_like(got[~masks[k]]))  # masked: exactly 0
        assert torch.equal(got[masks[k]], theta[masks[k]])  # kept: bit-identical
    ones = _net()
    apply(ones, Delta("toy", "mask", {k: torch.ones_like(v, dtype=torch.bool) for k, v in ones.state_dict().items()}))
    assert all(torch.equal(a, b) for a, b in zip(ones.state_dict().values(), ref.state_dict().values()))


def test_mask_and_its_complement_partition_the_weights():
    masks = _mask_for(_net(), seed=3)
    a, b, ref = _net(), _net(), _net()
    apply(a, Delta("toy", "mask", masks))
    apply(b, Delta("toy", "mask", {k: ~m for k, m in masks.items()}))
    for k, theta in ref.state_dict().items():
        assert torch.equal(a.state_dict()[k] + b.state_dict()[k], theta)
        assert not torch.any((a.state_dict()[k] != 0) & (b.state_dict()[k] != 0))


def test_mask_to_dense_is_the_additive_equivalent_for_its_base():
    base = _net()
    masks = _mask_for(base, p=0.3, seed=1)
    d = Delta("toy", "mask", masks)
    dense = to_dense(d, base)
    masked = apply(_net(), d)
    for k, theta in base.state_dict().items():
        assert torch.equal(theta + dense[k], masked.state_dict()[k])
        assert torch.equal(dense[k], -theta * (~masks[k]))  # −θ ⊙ (1 − m), computed a second way
    assert torch.equal(to_dense(d, base.state_dict())["0.weight"], dense["0.weight"])  # a state dict works too
    with pytest.raises(ModelError, match="needs the base"):
        to_dense(d)  # what every merge method calls: refused
    full = as_additive(d, base)
    assert full.kind == "full" and full.base == "toy"
    x = torch.randn(3, 4)
    assert torch.equal(apply(_net(), full)(x), masked(x))


def test_mask_delta_save_load_keeps_bool_and_checks_values_and_shapes(tmp_path):
    net = _net()
    masks = _mask_for(net, seed=2)
    d = Delta("toy", "mask", {**masks, NEW + "head.weight": torch.ones(3, 8)}, {"sparsity": 0.5})
    d2 = Delta.load(d.save(tmp_path / "mask"))
    assert d2.kind == "mask" and d2.meta == {"sparsity": 0.5}
    assert all(d2.tensors[k].dtype == torch.bool and torch.equal(d2.tensors[k], m) for k, m in masks.items())
    # 0/1 tensors of any dtype are masks; anything else is refused
    assert Delta("toy", "mask", {"w": torch.tensor([0.0, 1.0])}).tensors["w"].tolist() == [False, True]
    with pytest.raises(ModelError, match="boolean or 0/1"):
        Delta("toy", "mask", {"w": torch.tensor([0.0, 0.5])})
    # a mask saved for another shape: a one-line error, and the model is left untouched
    wrong = Delta("toy", "mask", {"0.weight": torch.ones(8, 4, dtype=torch.bool), "2.weight": torch.ones(4, 8, dtype=torch.bool)})
    loaded = Delta.load(wrong.save(tmp_path / "wrong"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ModelError, match="has shape") as err:
        apply(net, loaded)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ModelError, match="cannot be scaled"):
        apply(net, d2, scale=0.5)
