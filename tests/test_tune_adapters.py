"""Unified-view adapters (He et al., ICLR 2022): identities, zero-init exactness, counts, round trips."""

import copy
import dataclasses

import pytest
import torch
from test_tune_common import logits, text_batch, text_data, text_model

from transferkit.tune import rebuild, tune
from transferkit.tune.adapters import (BottleneckAdapter, adapted_classifier, adapter_spec, add_adapters,
                                       gated_prefix_attention, prefix_attention)
from transferkit.tune.registry import split_config

H, L, FF, C = 32, 2, 64, 2
HEAD = H * C + C


def test_prefix_concatenation_equals_gated_form():
    """He et al. Eq. 7: attention over [P_k; K], [P_v; V] = (1-λ)·Attn(q,K,V) + λ·softmax(q P_kᵀ) P_v."""
    g = torch.Generator().manual_seed(0)
    B, heads, T, S, l, d = 2, 3, 5, 6, 4, 8
    q, k, v = (torch.randn(B, heads, n, d, generator=g, dtype=torch.float64) for n in (T, S, S))
    pk, pv = (torch.randn(heads, l, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 4:] = False
    concat = prefix_attention(q, k, v, pk, pv, mask)
    gated = gated_prefix_attention(q, k, v, pk, pv, mask)
    assert (concat - gated).abs().max() < 1e-12
    concat32 = prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(), mask)
    gated32 = gated_prefix_attention(q.float(), k.float(), v.float(), pk.float(), pv.float(), mask)
    assert (concat32 - gated32).abs().max() < 1e-5
    # zero prefix keys and values: the output is plain attention shrunk by 1 - λ, λ = l / (l + Σ_j e^{s_j})
    logits_ = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~mask, float("-inf"))
    plain = torch.softmax(logits_, -1) @ v
    lam = l / (l + torch.exp(logits_).sum(-1, keepdim=True))
    zero = torch.zeros(heads, l, d, dtype=torch.float64)
    assert torch.allclose(prefix_attention(q, k, v, zero, zero, mask), (1 - lam) * plain, atol=1e-12)


def test_prefix_inside_bert_is_concatenated_attention(tiny_bert_dir):
    """The encoder-level prefix (KV cache + grown mask) computes exactly prefix_attention per layer."""
    model = text_model(tiny_bert_dir)
    hf = copy.deepcopy(model.backbone.model).eval()
    add_adapters(hf, prefix_length=3)
    x = text_batch(model)
    sa = hf.encoder.layer[1].attention.self
    seen = {}
    h1 = sa.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", a[0] if a else kw["hidden_states"]),
                                      with_kwargs=True)
    h2 = sa.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0]))
    with torch.no_grad():
        hf(**x)
        h1.remove()
        h2.remove()
        hs = seen["x"]
        B, T, _ = hs.shape
        split = lambda t: t.view(B, T, 2, H // 2).transpose(1, 2)  # noqa: E731
        pk, pv = hf.prefix_encoder.key_values(B)[1]
        mask = x["attention_mask"].bool()[:, None, None, :]
        ref = prefix_attention(split(sa.query(hs)), split(sa.key(hs)), split(sa.value(hs)), pk, pv, mask)
    ref = ref.transpose(1, 2).reshape(B, T, H)
    assert (ref - seen["out"]).abs().max() < 1e-5
    # padding stays invisible: a padded sentence gives the same pooled features as alone
    both = model.preprocess(["good movie", "the food was not very good at all"])
    alone = model.preprocess(["good movie"])
    enc = copy.deepcopy(model.backbone)
    enc.model = hf
    with torch.no_grad():
        assert torch.allclose(enc(both)[:1], enc(alone), atol=1e-5)


SPECS = {
    "seq-ffn": dict(ffn="sequential"),
    "seq-both": dict(attn="sequential", ffn="sequential"),
    "par-attn": dict(attn="parallel"),
    "par-ffn-learnable": dict(ffn="parallel", scale=4.0, learnable_scale=True),
    "par-both-dropout": dict(attn="parallel", ffn="parallel", dropout=0.1),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_zero_initialised_adapters_reproduce_the_base_exactly(tiny_bert_dir, name):
    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    clf, new = adapted_classifier(model, C, {"bottleneck": 5, **SPECS[name]})
    base = model.classifier(C, seed=0)
    assert torch.equal(logits(clf, x), logits(base, x))
    # and a deep copy keeps its own working adapters
    twin = copy.deepcopy(clf)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n in new and n.endswith("up.weight"):
                p.normal_()
    assert not torch.allclose(logits(twin, x), logits(base, x))
    assert torch.equal(logits(clf, x), logits(base, x))


def test_adapters_change_outputs_once_trained_up_projection_nonzero(tiny_bert_dir):
    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    for spec in SPECS.values():
        clf, new = adapted_classifier(model, C, {"bottleneck": 5, "init": "normal", **spec})
        assert not torch.equal(logits(clf, x), logits(model.classifier(C, seed=0), x))


@pytest.mark.parametrize("method,opts,expected", [
    ("adapter", {"bottleneck": 8}, L * (2 * H * 8 + 8 + H) + HEAD),
    ("adapter", {"bottleneck": 8, "position": "both"}, 2 * L * (2 * H * 8 + 8 + H) + HEAD),
    ("parallel-adapter", {"bottleneck": 8}, L * (2 * H * 8 + 8 + H) + HEAD),
    ("scaled-parallel-adapter", {"bottleneck": 8, "learnable_scale": True}, L * (2 * H * 8 + 8 + H + 1) + HEAD),
    ("mam", {"bottleneck": 8, "prefix_length": 3, "prefix_hidden": 16},
     (3 * H + H * 16 + 16 + 16 * 2 * L * H + 2 * L * H) + L * (2 * H * 8 + 8 + H) + HEAD),
    ("mam", {"bottleneck": 8, "prefix_length": 3, "prefix_hidden": None}, 3 * 2 * L * H + L * (2 * H * 8 + 8 + H) + HEAD),
])
def test_adapter_parameter_counts(tiny_bert_dir, method, opts, expected):
    from transferkit.tune._common import count_trainable

    options, _ = split_config(method, opts)
    clf, _ = adapted_classifier(text_model(tiny_bert_dir), C, adapter_spec(method, dataclasses.asdict(options)))
    assert count_trainable(clf) == expected


@pytest.mark.parametrize("method", ["adapter", "parallel-adapter", "scaled-parallel-adapter", "mam"])
def test_tune_with_adapters_and_rebuild_from_delta(tiny_bert_dir, sentiment_csv, tmp_path, method):
    from transferkit.delta import Delta

    model = text_model(tiny_bert_dir)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tr, te = text_data(sentiment_csv)
    cfg = {"epochs": 1, "lr": 1e-2, "bottleneck": 8}
    if method == "mam":
        cfg.update(prefix_length=3, prefix_hidden=16)
    res = tune(model, tr, te, method=method, config=cfg, out_dir=tmp_path, progress=False)
    assert 0 <= res.metrics["test_accuracy"] <= 1
    x = text_batch(model)
    trained = logits(res.module, x)
    assert not torch.allclose(trained, logits(model.classifier(C, seed=0), x))
    # frozen backbone weights are bitwise unchanged in the trained copy, and the caller's model too
    tuned_bb = res.module.backbone.state_dict()
    assert all(torch.equal(tuned_bb[k], v) for k, v in before.items())
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    again = rebuild(model, Delta.load(tmp_path / "delta"))
    assert torch.allclose(logits(again, x), trained, atol=1e-6)


def test_bottleneck_adapter_validation():
    from transferkit.errors import ConfigError

    with pytest.raises(ConfigError):
        BottleneckAdapter(4, 2, mode="diagonal")
    with pytest.raises(ConfigError):
        BottleneckAdapter(4, 0)
    with pytest.raises(ConfigError, match="position"):
        adapter_spec("adapter", {"position": "everywhere"})


def test_adapters_on_mpnet_and_prefix_refused():
    from transformers import MPNetConfig, MPNetModel

    from transferkit.errors import ConfigError

    torch.manual_seed(0)
    hf = MPNetModel(MPNetConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=40), add_pooling_layer=False).eval()
    ids = torch.randint(5, 30, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    adapted = copy.deepcopy(hf)
    new = add_adapters(adapted, attn="parallel", ffn="sequential", bottleneck=4)
    assert len(new) == 2 * 2 * 4  # 2 layers × 2 sites × (down, up) × (weight, bias)
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
        for n, p in adapted.named_parameters():
            if n in new and n.endswith("up.weight"):
                p.normal_()
        assert not torch.allclose(adapted(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
    with pytest.raises(ConfigError, match="cache"):
        add_adapters(copy.deepcopy(hf), prefix_length=2)
