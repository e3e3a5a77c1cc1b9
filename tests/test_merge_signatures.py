"""Robust weight signatures: orthogonal projection, shallow layers, int8 storage, patching, BN re-estimation."""

import pytest
import torch
from torch import nn

from transferkit.delta import apply
from transferkit.errors import ConfigError, ModelError
from transferkit.merge.signatures import (Signature, compose, dequantize_int8, patch, quantize_int8,
                                          reestimate_bn, robust_signature, shallow_names)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def _finetune(state, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


@pytest.fixture
def states():
    pre = {k: v.clone() for k, v in _cnn().state_dict().items()}
    return pre, _finetune(pre, 1), _finetune(pre, 2), _finetune(pre, 3)


def test_shallow_layer_selection():
    state = _cnn().state_dict()
    assert shallow_names(state, 1) == ["0.weight", "0.bias", "1.weight", "1.bias"]  # conv0 + its BN affine
    two = shallow_names(state, 2)
    assert two[-2:] == ["4.weight", "4.bias"] and "3.weight" in two and "6.weight" not in two
    assert not any("running" in n or "num_batches" in n for n in shallow_names(state, None))
    assert shallow_names(state, lambda n: n.startswith("9.")) == ["9.weight", "9.bias"]
    assert shallow_names(state, ["3.weight"]) == ["3.weight"]
    with pytest.raises(ConfigError):
        shallow_names(state, 0)


def test_signature_is_orthogonal_to_the_clean_task_vector_per_tensor(states):
    pre, clean, noisy, _ = states
    sig = robust_signature(pre, clean, noisy, layers=2, name="gauss")
    assert set(sig.tensors) == set(shallow_names(pre, 2)) and sig.meta["name"] == "gauss"
    for n, s in sig.tensors.items():
        t_clean = (clean[n] - pre[n]).double().flatten()
        t_c = (noisy[n] - pre[n]).double().flatten()
        assert abs(float(torch.dot(s.double().flatten(), t_clean))) < 1e-5 * float(t_clean.norm() * t_c.norm())
        # what was removed is parallel to the clean direction: s = τ_c − β τ_clean
        beta = torch.dot(t_c, t_clean) / torch.dot(t_clean, t_clean)
        assert torch.allclose(s.double().flatten(), t_c - beta * t_clean, atol=1e-6)
    # a tensor the clean fine-tune did not move keeps τ_c unchanged
    clean2 = dict(clean, **{"0.bias": pre["0.bias"].clone()})
    sig2 = robust_signature(pre, clean2, noisy, layers=1)
    assert torch.allclose(sig2.tensors["0.bias"], noisy["0.bias"] - pre["0.bias"])


def test_quantisation_error_bound_and_compact_storage(states, tmp_path):
    pre, clean, noisy, _ = states
    sig = robust_signature(pre, clean, noisy, layers=None)
    for v in sig.tensors.values():
        q, s = quantize_int8(v)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        assert float((dequantize_int8(q, s) - v).abs().max()) <= float(s) / 2 + 1e-7
    assert torch.equal(dequantize_int8(*quantize_int8(torch.zeros(3))), torch.zeros(3))
    path = sig.save(tmp_path / "gauss.safetensors")
    back = Signature.load(path)
    assert set(back.tensors) == set(sig.tensors) and back.meta["name"] == "corruption"
    for k, v in sig.tensors.items():
        assert torch.allclose(back.tensors[k], sig.quantized().tensors[k])
    big = Signature({"w": torch.randn(256, 128), "b": torch.randn(256)})
    q8 = big.save(tmp_path / "q8.safetensors")
    full = big.save(tmp_path / "full.safetensors", quantize=False)
    assert q8.stat().st_size < 0.3 * full.stat().st_size  # int8 + a scale per tensor vs float32
    with pytest.raises(ModelError):
        (tmp_path / "x.safetensors").write_bytes(b"garbage")
        Signature.load(tmp_path / "x.safetensors")


def test_alpha_zero_is_identity_and_composition_is_the_sum(states):
    pre, clean, noisy, blurry = states
    s1 = robust_signature(pre, clean, noisy, layers=2, name="noise")
    s2 = robust_signature(pre, clean, blurry, layers=3, name="blur")
    same = patch(clean, [s1, s2], [0.0, 0.0])
    assert all(torch.equal(same[k], clean[k]) for k in clean)
    both = patch(clean, [s1, s2], [0.5, 0.8])
    for k in clean:
        want = clean[k].clone()
        if k in s1.tensors:
            want = want + 0.5 * s1.tensors[k]
        if k in s2.tensors:
            want = want + 0.8 * s2.tensors[k]
        assert torch.allclose(both[k], want, atol=1e-6), k
    step = patch(patch(clean, s1, 0.5), s2, 0.8)  # patching twice == patching with the sum
    assert all(torch.allclose(step[k], both[k], atol=1e-6) for k in clean)
    summed = compose([s1, s2], [0.5, 0.8])
    assert torch.allclose((0.5 * s1 + 0.8 * s2).tensors["6.weight"], summed.tensors["6.weight"])
    assert summed.meta["composed_of"] == ["noise", "blur"]
    # a model is patched in place; as a Delta it is the same update
    model = _cnn()
    model.load_state_dict(clean)
    patch(model, [s1, s2], [0.5, 0.8])
    other = _cnn()
    other.load_state_dict(clean)
    apply(other, summed.to_delta("clean"))
    x = torch.randn(2, 3, 9, 9)
    model.eval(), other.eval()
    assert torch.allclose(model(x), other(x), atol=1e-6)


def test_bn_reestimation_sets_running_stats_to_the_batch_statistics():
    model = _cnn()
    model.train()
    conv0, bn = model[0], model[1]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 9, 9, generator=g) * 3 + 1 for _ in range(2)]
    before = bn.running_mean.clone()
    reestimate_bn(model, [(b, torch.zeros(8)) for b in batches])
    assert model.training and bn.momentum == 0.1  # modes and momentum restored
    with torch.no_grad():
        acts = [conv0(b) for b in batches]
    means = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts])
    vars_ = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts])
    assert not torch.allclose(bn.running_mean, before)
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)  # cumulative average of batch means
    assert torch.allclose(bn.running_var, vars_.mean(0), atol=1e-4)
    assert int(bn.num_batches_tracked) == 2
    # one batch: exactly that batch's statistics; blend mixes old and new
    old = bn.running_mean.clone()
    reestimate_bn(model, [{"inputs": batches[0]}], blend=0.5)
    assert torch.allclose(bn.running_mean, 0.5 * old + 0.5 * means[0], atol=1e-5)
    with pytest.raises(ConfigError):
        reestimate_bn(model, [])
    assert torch.allclose(bn.running_mean, 0.5 * old + 0.5 * means[0], atol=1e-5)  # untouched on error
