"""A transferkit PEFT folder loads with plain transformers + PEFT (issue 14): the adapter applies to
``AutoModel.from_pretrained(base)`` and the head comes from ``head.safetensors``.

Defect: the adapter was saved under transferkit's wrapper names (``backbone.model.…``); PEFT loaded it onto
``AutoModel`` without an error and applied nothing (every ``lora_B`` stayed zero, no head)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from test_tune_common import text_data, text_model

from transferkit.tune import load_peft, tune

TEXTS = ["good movie was great", "the food was not very good at all", "bad", "awful poor movie"]

# imports transformers, peft, safetensors and torch only: the README's snippet, run as written
CLEAN = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    base, folder, out = sys.argv[1:4]
    texts = json.loads(sys.argv[4])
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder).eval()
    head = load_file(folder + "/head.safetensors")
    batch = AutoTokenizer.from_pretrained(base)(texts, padding=True, truncation=True, max_length=128,
                                                return_tensors="pt")
    with torch.no_grad():
        h = encoder(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        logits = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)) @ head["weight"].T + head["bias"]
    lora_b = [p.abs().max().item() for n, p in encoder.named_parameters() if "lora_B" in n]
    assert not any(k.startswith("transferkit") for k in sys.modules), "the clean process imported transferkit"
    json.dump({"logits": logits.tolist(), "hidden": h.tolist(), "lora_b_max": lora_b}, open(out, "w"))
""")


def _clean_load(base, folder, tmp_path):
    script = tmp_path / "clean.py"
    script.write_text(CLEAN)
    out = tmp_path / "clean.json"
    res = subprocess.run([sys.executable, str(script), str(base), str(folder), str(out), json.dumps(TEXTS)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method,opts", [("lora", {"r": 4}), ("ia3", {}), ("lora", {"r": 4, "use_dora": True})])
def test_standard_transformers_and_peft_load_the_tuned_model(tiny_bert_dir, sentiment_csv, tmp_path, method, opts):
    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    out = tmp_path / "run"
    res = tune(model, tr, te, method=method, config={"epochs": 2, "lr": 1e-2, **opts}, out_dir=out, progress=False)
    folder = out / "peft"
    assert (folder / "head.safetensors").is_file() and "PeftModel.from_pretrained" in (folder / "README.md").read_text()
    clean = _clean_load(tiny_bert_dir, folder, tmp_path)
    x = model.preprocess(TEXTS)
    res.module.eval()
    with torch.no_grad():
        ours = res.module(**x)
        hidden = res.module.get_base_model().encoder_model(**x).last_hidden_state
    assert torch.allclose(torch.tensor(clean["hidden"]), hidden, atol=1e-5)  # the adapter applied
    assert torch.allclose(torch.tensor(clean["logits"]), ours, atol=1e-5)
    if method == "lora":
        assert min(clean["lora_b_max"]) > 0 and len(clean["lora_b_max"]) == 4  # q, v of 2 layers, loaded
    # the plain base gives other hidden states: the comparison above is not vacuous
    base_hidden = model.backbone.model(**x).last_hidden_state
    assert not torch.allclose(base_hidden, hidden, atol=1e-4)
    # transferkit's own reload path still gives the same model
    with torch.no_grad():
        assert torch.allclose(load_peft(model, folder)(**x), ours, atol=1e-6)


def test_adapter_names_are_the_encoders_own(tiny_bert_dir, sentiment_csv, tmp_path):
    from safetensors import safe_open

    model = text_model(tiny_bert_dir)
    tr, te = text_data(sentiment_csv)
    tune(model, tr, te, method="lora", config={"epochs": 1, "r": 2}, out_dir=tmp_path, progress=False)
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    lora = [k for k in keys if "lora_" in k]
    encoder = {n for n, _ in model.backbone.model.named_modules()}
    assert lora and all(k.startswith("base_model.model.encoder.layer.") for k in lora)
    assert all(k[len("base_model.model."):].rsplit(".lora_", 1)[0] in encoder for k in lora)


def test_load_peft_reads_a_folder_of_the_old_layout(tiny_bert_dir, tmp_path):
    """Folders saved before the fix (adapter names backbone.model.…) still load through load_peft."""
    import dataclasses

    from transferkit.tune.peft_methods import save
    from transferkit.tune.registry import split_config
    from transferkit.zoo.base import Classifier

    import peft

    model = text_model(tiny_bert_dir)
    options, _ = split_config("lora", {"r": 2})
    cfg = peft.LoraConfig(r=2, lora_alpha=16.0, target_modules=["query", "value"], modules_to_save=["head"])
    old = peft.get_peft_model(Classifier(copy.deepcopy(model.backbone), model.feature_dim, 2), cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in old.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save(old, tmp_path, model=model, n_classes=2, method="lora")
    assert not (tmp_path / "head.safetensors").exists() and dataclasses.asdict(options)["r"] == 2
    x = model.preprocess(TEXTS)
    old.eval()
    with torch.no_grad():
        assert torch.allclose(load_peft(model, tmp_path)(**x), old(**x), atol=1e-6)
