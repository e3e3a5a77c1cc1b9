"""io (atomic writes, safe loading) and the Delta type."""

import pickle

import pytest
import torch
from torch import nn

from transferkit.delta import NEW, Delta, apply, from_states, to_dense
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
