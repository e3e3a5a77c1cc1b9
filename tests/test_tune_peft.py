"""LoRA, IA3, prefix and prompt tuning through Hugging Face PEFT: exactness, counts, PEFT round trip."""

import copy
import dataclasses

import pytest
import torch
from test_tune_common import image_data, image_model, logits, text_batch, text_data, text_model

from transferkit.delta import apply, to_dense
from transferkit.tune import load_peft, peft_base, tune
from transferkit.tune.peft_methods import merged_copy, wrap
from transferkit.tune.registry import split_config

H, L, FF, C = 32, 2, 64, 2  # tiny BERT of conftest: hidden, layers, FFN, classes of sentiment_csv
HEAD = H * C + C


def _wrap(model, method, **opts):
    options, _ = split_config(method, opts)
    return wrap(model, C, method, dataclasses.asdict(options))


def _perturb(pm, std=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return pm


@pytest.mark.parametrize("method,opts,expected", [
    ("lora", {"r": 4}, L * 2 * 4 * 2 * H + HEAD),            # r·(d_in + d_out) on query and value
    ("lora", {"r": 8}, L * 2 * 8 * 2 * H + HEAD),
    ("ia3", {}, L * (H + H + FF) + HEAD),                      # d_k + d_v + d_ff per layer
    ("prefix", {"num_virtual_tokens": 5}, 5 * 2 * L * H + HEAD),
    ("prompt", {"num_virtual_tokens": 5}, 5 * H + HEAD),
])
def test_trainable_parameter_counts_match_closed_form(tiny_bert_dir, method, opts, expected):
    from transferkit.tune._common import count_trainable

    pm, _ = _wrap(text_model(tiny_bert_dir), method, **opts)
    assert count_trainable(pm) == expected
    # only adapter tensors and the head copy train; the backbone is frozen
    assert all(("lora_" in n or "ia3_" in n or "modules_to_save" in n or "prompt_encoder" in n)
               for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_zero_initialised_adapter_equals_base_exactly(tiny_bert_dir, method):
    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    pm, _ = _wrap(model, method)
    base = model.classifier(C, seed=0)
    assert torch.equal(logits(pm, x), logits(base, x))  # LoRA B = 0, IA3 vectors = 1


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merged_lora_equals_unmerged(tiny_bert_dir, opts):
    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    pm, _ = _wrap(model, "lora", r=4, **opts)
    _perturb(pm)
    unmerged = logits(pm, x)
    merged = merged_copy(pm)
    assert type(merged).__name__ == "Classifier"
    assert torch.allclose(logits(merged, x), unmerged, atol=1e-5)
    assert not torch.allclose(unmerged, logits(model.classifier(C, seed=0), x), atol=1e-4)


def test_lora_delta_applied_to_base_equals_peft_model(tiny_bert_dir):
    from transferkit.tune.peft_methods import delta_of

    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    pm, base_state = _wrap(model, "lora", r=4, alpha=8)
    _perturb(pm)
    delta = delta_of(pm, base_state, "lora", model.name)
    assert delta.kind == "lora" and set(delta.meta["scaling"].values()) == {2.0}
    dense = to_dense(delta)
    assert set(dense) == {f"backbone.model.encoder.layer.{i}.attention.self.{m}.weight" for i in range(L)
                          for m in ("query", "value")}
    clf = model.classifier(C, seed=0)
    clf.backbone = copy.deepcopy(model.backbone)
    apply(clf, delta)
    assert torch.allclose(logits(clf, x), logits(pm, x), atol=1e-5)


@pytest.mark.parametrize("method,opts", [("lora", {"use_dora": True}), ("ia3", {})])
def test_non_factored_deltas_are_exact_merged_differences(tiny_bert_dir, method, opts):
    from transferkit.tune.peft_methods import delta_of

    model = text_model(tiny_bert_dir)
    x = text_batch(model)
    pm, base_state = _wrap(model, method, **opts)
    _perturb(pm)
    delta = delta_of(pm, base_state, method, model.name)
    assert delta.kind == "full"
    clf = model.classifier(C, seed=0)
    clf.backbone = copy.deepcopy(model.backbone)
    apply(clf, delta)
    assert torch.allclose(logits(clf, x), logits(pm, x), atol=1e-5)


def test_prompt_methods_pool_real_tokens_only(tiny_bert_dir):
    """Padding a sentence does not change its logits: virtual tokens and padding are not pooled."""
    model = text_model(tiny_bert_dir)
    for method in ("prefix", "prompt"):
        pm, _ = _wrap(model, method, num_virtual_tokens=3)
        _perturb(pm)
        texts = ["good movie", "the food was not very good at all the movie"]
        both = {k: v for k, v in model.preprocess(texts).items() if k != "token_type_ids"}
        alone = {k: v for k, v in model.preprocess(texts[:1]).items() if k != "token_type_ids"}
        assert both["input_ids"].shape[1] > alone["input_ids"].shape[1]
        assert torch.allclose(logits(pm, both)[:1], logits(pm, alone), atol=1e-5), method


def test_prefix_keeps_real_token_positions(tiny_bert_dir):
    """The real tokens get position embeddings 0..T-1 under prefix tuning (not shifted by the prefix)."""
    model = text_model(tiny_bert_dir)
    pm, _ = _wrap(model, "prefix", num_virtual_tokens=4)
    x = {k: v for k, v in text_batch(model).items() if k != "token_type_ids"}
    seen = []
    emb = pm.get_base_model().model.embeddings
    h = emb.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        logits(pm, x)
    finally:
        h.remove()
    with torch.no_grad():
        ref = emb(input_ids=x["input_ids"])
    assert torch.equal(seen[0], ref)


@pytest.mark.parametrize("method,opts", [
    ("lora", {"r": 4}), ("lora", {"r": 4, "use_dora": True}), ("ia3", {}),
    ("prefix", {"num_virtual_tokens": 4}), ("prompt", {"num_virtual_tokens": 4}),
])
def test_tune_saves_peft_folder_that_peft_loads(tiny_bert_dir, sentiment_csv, tmp_path, method, opts):
    from peft import PeftModel

    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    out = tmp_path / method
    res = tune(model, tr, te, method=method, config={"epochs": 1, "lr": 1e-2, **opts}, out_dir=out, progress=False)
    for f in ("delta/delta.json", "metrics.json", "history.json", "curve.png", "peft/adapter_config.json",
              "peft/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    assert 0 <= res.metrics["test_accuracy"] <= 1 and 0 < res.metrics["trainable_pct"] < 100
    x = {k: v for k, v in text_batch(model).items() if k != "token_type_ids"}
    trained = logits(res.module, x)
    base = peft_base(model, C, method, num_virtual_tokens=opts.get("num_virtual_tokens"))
    reloaded = PeftModel.from_pretrained(base, str(out / "peft"))
    assert torch.allclose(logits(reloaded, x), trained, atol=1e-6)
    assert torch.allclose(logits(load_peft(model, out / "peft"), x), trained, atol=1e-6)
    # the head was trained and saved (modules_to_save), not re-initialised on reload
    fresh = peft_base(model, C, method, num_virtual_tokens=opts.get("num_virtual_tokens"))
    assert not torch.allclose(trained, logits(fresh, x), atol=1e-4)
    # the caller's model is untouched
    assert not any("lora" in n or "ia3" in n for n, _ in model.backbone.named_modules())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_lora_and_ia3_on_a_plain_torch_cnn(tmp_path, method):
    from peft import PeftModel

    model = image_model()
    tr, te = image_data()
    pm, _ = _wrap(model, method, r=2) if method == "lora" else _wrap(model, method)
    targets = sorted(pm.peft_config["default"].target_modules)
    assert targets == ["backbone.0", "backbone.3", "backbone.7"]  # grouped conv left out by default
    x = model.preprocess(tr.X[:4])
    assert torch.equal(logits(pm, x), logits(model.classifier(C, seed=0), x))
    res = tune(model, tr, te, method=method, config={"epochs": 2, "lr": 1e-2, "batch_size": 8, **({"r": 2} if method == "lora" else {})},
               out_dir=tmp_path, progress=False)
    assert res.delta.kind == "full"  # conv factors are 4-d: stored merged
    reloaded = PeftModel.from_pretrained(peft_base(model, C, method), str(tmp_path / "peft"))
    assert torch.allclose(logits(reloaded, x), logits(res.module, x), atol=1e-6)
    clf = model.classifier(C, seed=0)
    clf.backbone = copy.deepcopy(model.backbone)
    apply(clf, res.delta)
    assert torch.allclose(logits(clf, x), logits(res.module, x), atol=1e-5)
