"""Checkpoint merges of Hugging Face fine-tunes (issue 14): buffers saved by one file only, and an
output directory that ``AutoModel.from_pretrained`` loads."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from transferkit.errors import ConfigError
from transferkit.merge.streaming import stream_merge

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg)  # with the pooler, as AutoModel builds it


def _perturbed(base_model, seed, scale):
    ft = _tiny_bert()
    ft.load_state_dict(base_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


@pytest.fixture
def hf_finetunes(tmp_path):
    """An 'original' base saved by an older transformers (it stores ``embeddings.position_ids``, an int64
    buffer) and two fine-tunes saved by ``save_pretrained`` today (which do not store it)."""
    base = _tiny_bert()
    a, b = _perturbed(base, 1, 0.01), _perturbed(base, 2, 0.02)
    dirs = {}
    for name, m in (("base", base), ("ft_a", a), ("ft_b", b)):
        d = tmp_path / name
        m.save_pretrained(d)
        dirs[name] = d
    # the base as an older library wrote it: the same weights plus the position_ids buffer
    w = dirs["base"] / "model.safetensors"
    st = load_file(str(w))
    assert "embeddings.position_ids" not in st
    st["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(st, str(w), metadata={"format": "pt"})
    assert "embeddings.position_ids" not in load_file(str(dirs["ft_a"] / "model.safetensors"))
    return dirs, {k: m.state_dict() for k, m in (("base", base), ("ft_a", a), ("ft_b", b))}


def test_merge_of_hf_finetunes_with_a_buffer_in_one_file_loads_as_an_hf_model(hf_finetunes, tmp_path):
    from transformers import AutoModel

    dirs, states = hf_finetunes
    out = tmp_path / "merged"
    res = stream_merge(dirs["base"], [dirs["ft_a"], dirs["ft_b"]], out, "task_arithmetic", lam=0.5)
    assert res.meta["skipped_buffers"] == ["embeddings.position_ids"]
    assert (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text()) == json.loads((dirs["base"] / "config.json").read_text())
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    got = model.state_dict()
    base = states["base"]
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            continue
        want = theta0 + (0.5 * (states["ft_a"][name] - theta0) + 0.5 * (states["ft_b"][name] - theta0))
        assert torch.allclose(got[name], want, atol=1e-6), name
    # the merged model is a working encoder
    with torch.no_grad():
        h = model(input_ids=torch.tensor([[2, 5, 6, 3]])).last_hidden_state
    assert h.shape == (1, 4, 32) and torch.isfinite(h).all()


def test_buffer_only_in_the_finetunes_is_skipped_too(hf_finetunes, tmp_path):
    """The other way round: a fine-tune carries the buffer, the base does not."""
    from transformers import AutoModel

    dirs, _ = hf_finetunes
    for d in ("base", "ft_a"):
        w = dirs[d] / "model.safetensors"
        st = load_file(str(w))
        if "embeddings.position_ids" in st:
            del st["embeddings.position_ids"]
        else:
            st["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
        save_file(st, str(w), metadata={"format": "pt"})
    out = tmp_path / "merged"
    res = stream_merge(dirs["base"], [dirs["ft_a"], dirs["ft_b"]], out, "ties", k=0.5)
    assert res.meta["skipped_buffers"] == ["embeddings.position_ids"]
    AutoModel.from_pretrained(out)


def test_a_float_tensor_missing_from_a_finetune_is_still_an_error(hf_finetunes, tmp_path):
    dirs, _ = hf_finetunes
    w = dirs["ft_b"] / "model.safetensors"
    st = load_file(str(w))
    del st["encoder.layer.1.output.dense.bias"]
    save_file(st, str(w), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="'encoder.layer.1.output.dense.bias' is in the base but not in"):
        stream_merge(dirs["base"], [dirs["ft_a"], dirs["ft_b"]], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # named in exclude: copied from the base
    res = stream_merge(dirs["base"], [dirs["ft_a"], dirs["ft_b"]], tmp_path / "o",
                       exclude=["encoder.layer.1.output.dense.bias"])
    assert res.meta["excluded"] == ["encoder.layer.1.output.dense.bias"]
