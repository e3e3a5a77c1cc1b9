"""LoRA merging in ΔW space (cat exact, SVD optimal with its error reported, dense), the lora and
sparse Delta kinds, and PEFT-defect regressions."""

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.delta import Delta, apply, to_dense
from transferkit.errors import ConfigError, ModelError
from transferkit.merge import ab_linear_error, merge_lora, task_arithmetic, ties

SHAPES = {"0": (6, 4), "2": (3, 6)}  # module: (out, in)


def _adapter(seed, r=2, scaling=2.0, base="toy", modules=("0", "2")):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for m in modules:
        out, inp = SHAPES[m]
        t[f"{m}.lora_A"] = torch.randn(r, inp, generator=g, dtype=torch.float64)
        t[f"{m}.lora_B"] = torch.randn(out, r, generator=g, dtype=torch.float64)
    return Delta(base, "lora", t, {"scaling": scaling})


def _exact(adapters, weights):
    out = {}
    for d, w in zip(adapters, weights):
        for m in SHAPES:
            if f"{m}.lora_A" in d.tensors:
                s = d.meta["scaling"]
                s = s[m] if isinstance(s, dict) else s
                dw = w * s * d.tensors[f"{m}.lora_B"] @ d.tensors[f"{m}.lora_A"]
                out[f"{m}.weight"] = out.get(f"{m}.weight", 0) + dw
    return out


def _close(a, b, **kw):
    return set(a) == set(b) and all(torch.allclose(a[k].double(), b[k].double(), **kw) for k in a)


def test_lora_delta_kind_to_dense_and_apply():
    d = _adapter(0, scaling={"0": 2.0, "2": 0.5})
    dense = to_dense(d)
    assert torch.allclose(dense["0.weight"], 2.0 * d.tensors["0.lora_B"] @ d.tensors["0.lora_A"])
    assert torch.allclose(dense["2.weight"], 0.5 * d.tensors["2.lora_B"] @ d.tensors["2.lora_A"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    apply(net, d)
    assert torch.allclose(net[0].weight, before["0.weight"] + dense["0.weight"].float(), atol=1e-6)
    assert torch.equal(net[0].bias, before["0.bias"])
    # scaling derived once from alpha and r; rsLoRA uses alpha/sqrt(r) (PEFT PR #3449 over-scaled by sqrt(r))
    a = Delta("toy", "lora", {k: v for k, v in d.tensors.items()}, {"lora_alpha": 16, "r": 2})
    rs = Delta("toy", "lora", {k: v for k, v in d.tensors.items()}, {"lora_alpha": 16, "r": 2, "use_rslora": True})
    bA = d.tensors["0.lora_B"] @ d.tensors["0.lora_A"]
    assert torch.allclose(to_dense(a)["0.weight"], 8.0 * bA)
    assert torch.allclose(to_dense(rs)["0.weight"], 16 / 2 ** 0.5 * bA)
    with pytest.raises(ModelError, match="scaling"):
        to_dense(Delta("toy", "lora", dict(d.tensors)))


def test_sparse_delta_kind_to_dense_apply_and_roundtrip(tmp_path):
    d = Delta("toy", "sparse", {"w.indices": torch.tensor([0, 5, 3]), "w.values": torch.tensor([1.0, -2.0, 0.5])},
              {"shapes": {"w": [2, 3]}})
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, -2.0]])
    assert torch.equal(to_dense(d)["w"], expected)
    d.save(tmp_path / "s")
    assert torch.equal(to_dense(Delta.load(tmp_path / "s"))["w"], expected)
    m = nn.Module()
    m.w = nn.Parameter(torch.ones(2, 3))
    apply(m, d, scale=2.0)
    assert torch.equal(m.w.data, 1 + 2 * expected)
    # other merge methods densify sparse deltas
    full = Delta("toy", "full", {"w": torch.ones(2, 3)})
    assert torch.equal(task_arithmetic([d, full]).tensors["w"], expected + 1)
    assert ties([d, full], k=1.0).tensors["w"].shape == (2, 3)
    with pytest.raises(ModelError, match="no matching"):
        to_dense(Delta("toy", "sparse", {"w.values": torch.tensor([1.0])}, {"shapes": {"w": [2, 3]}}))
    with pytest.raises(ModelError, match="out of range"):
        to_dense(Delta("toy", "sparse", {"w.indices": torch.tensor([6]), "w.values": torch.tensor([1.0])},
                       {"shapes": {"w": [2, 3]}}))


def test_merge_in_delta_w_space_equals_weighted_sum_dense_and_cat():
    ads = [_adapter(1, r=2, scaling=2.0), _adapter(2, r=3, scaling=0.5), _adapter(3, r=1, scaling=1.0, modules=("0",))]
    w = [0.7, -0.4, 1.3]
    exact = _exact(ads, w)
    dense = merge_lora(ads, w, how="dense")
    assert dense.kind == "full" and _close(dense.tensors, exact, atol=1e-12)
    cat = merge_lora(ads, w, how="cat")
    assert cat.kind == "lora" and cat.meta["r"] == {"0": 6, "2": 5}  # ranks add
    assert _close(to_dense(cat), exact, atol=1e-12)


def test_svd_full_rank_exact_and_low_rank_error_is_the_eckart_young_optimum():
    ads = [_adapter(1, r=2), _adapter(2, r=3)]
    w = [1.0, 0.5]
    exact = _exact(ads, w)
    full = merge_lora(ads, w, how="svd", rank=5)
    assert _close(to_dense(full), exact, atol=1e-10)
    assert full.meta["svd_error_total"] == pytest.approx(0.0, abs=1e-7)
    errs = []
    for r in (1, 2, 3):
        low = merge_lora(ads, w, how="svd", rank=r)
        approx = to_dense(low)
        num = den = 0.0
        for key, dw in exact.items():
            m = key[: -len(".weight")]
            # second way: the optimum from the singular values of the dense matrix (numpy)
            s = np.linalg.svd(dw.numpy(), compute_uv=False)
            opt = np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())
            direct = float((dw - approx[key]).norm() / dw.norm())
            assert low.meta["svd_error"][m] == pytest.approx(opt, rel=1e-6, abs=1e-9)
            assert direct == pytest.approx(opt, rel=1e-6, abs=1e-9)
            num += float((dw - approx[key]).norm() ** 2)
            den += float(dw.norm() ** 2)
            assert low.meta["r"][m] == min(r, len(s))
        assert low.meta["svd_error_total"] == pytest.approx((num / den) ** 0.5, rel=1e-6)
        errs.append(low.meta["svd_error_total"])
    assert errs[0] > errs[1] > errs[2] > 0
    assert merge_lora(ads, w).meta["rank"] == 3  # default rank: the largest adapter rank


@pytest.mark.parametrize("how", ["svd", "cat", "dense"])
def test_single_adapter_weight_one_is_identity(how, tmp_path):
    d = _adapter(4, r=3, scaling=2.5)
    merged = merge_lora([d], [1.0], how=how)
    merged.save(tmp_path / "m")
    assert _close(to_dense(Delta.load(tmp_path / "m")), to_dense(merged), atol=0)
    assert _close(to_dense(merged), to_dense(d), atol=1e-12)
    # scaling applied exactly once (PEFT PR #3111 applied it twice on the SVD path)
    assert not _close(to_dense(merged), {k: 2.5 * v for k, v in to_dense(d).items()}, atol=1e-6)
    if how != "dense":
        assert merged.meta["scaling"] == {"0": 1.0, "2": 1.0}


def test_ab_linear_merging_has_cross_terms_but_delta_w_merging_does_not():
    # PEFT issue #1155 / PR #3013: combining A's and B's linearly gives B_i A_j cross terms
    ads = [_adapter(1, r=2), _adapter(2, r=2)]
    w = [1.0, -1.0]
    err = ab_linear_error(ads, w)
    assert err["total"] > 0.5
    assert ab_linear_error(ads[:1], [1.0])["total"] == pytest.approx(0.0, abs=1e-6)
    assert _close(to_dense(merge_lora(ads, w, how="cat")), _exact(ads, w), atol=1e-12)


def test_lora_errors_bases_dora_and_kinds():
    with pytest.raises(ConfigError, match="different bases"):
        merge_lora([_adapter(1), _adapter(2, base="other")])
    dora = _adapter(1)
    dora.tensors["0.lora_magnitude_vector"] = torch.ones(6)
    with pytest.raises(ConfigError, match="DoRA"):
        merge_lora([dora])
    with pytest.raises(ConfigError, match="lora deltas"):
        merge_lora([Delta("toy", "full", {"w": torch.ones(2)})])
    with pytest.raises(ConfigError, match="how"):
        merge_lora([_adapter(1)], how="linear")
    bad = _adapter(1)
    del bad.tensors["0.lora_B"]
    with pytest.raises(ModelError, match="lora_B"):
        to_dense(bad)


def test_lora_extras_summed_and_heads_dropped():
    a = _adapter(1)
    a.tensors["0.bias"] = torch.ones(6, dtype=torch.float64)
    a.tensors["new.head.weight"] = torch.ones(2, 3)
    b = _adapter(2)
    out = merge_lora([a, b], [0.5, 0.5], how="cat")
    assert torch.allclose(out.tensors["0.bias"], 0.5 * torch.ones(6, dtype=torch.float64))
    assert out.meta["heads_dropped"] == ["new.head.weight"] and "new.head.weight" not in out.tensors
    assert "0.bias" in to_dense(out)
