"""BitFit: only biases (+ head) train; everything else is bitwise unchanged; the Delta holds biases only."""

import pytest
import torch
from test_tune_common import image_data, image_model, logits, text_batch, text_data, text_model

from transferkit.delta import NEW, apply
from transferkit.errors import ConfigError
from transferkit.tune import tune
from transferkit.tune.bitfit import bias_names


def test_bitfit_trains_biases_only(tiny_bert_dir, sentiment_csv):
    model = text_model(tiny_bert_dir)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tr, te = text_data(sentiment_csv)
    res = tune(model, tr, te, method="bitfit", config={"epochs": 2, "lr": 1e-2}, progress=False)
    H, L, FF, C = 32, 2, 64, 2
    n_bias = L * (7 * H + FF) + H  # q,k,v,o, 2 LayerNorms, FFN in/out per layer + embedding LayerNorm
    assert res.metrics["trainable_params"] == n_bias + H * C + C
    assert res.metrics["bias_params"] == n_bias
    tuned = res.module.backbone.state_dict()
    changed = [k for k in tuned if not torch.equal(tuned[k], before[k])]
    assert changed and all(k.endswith("bias") for k in changed)
    for k, v in tuned.items():
        if not k.endswith("bias"):
            assert torch.equal(v, before[k]), k  # bitwise unchanged
    # the caller's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    # the Delta: bias differences + the new head, and applying it reproduces the tuned model
    assert res.delta.kind == "full"
    assert all(k.endswith(".bias") or k.startswith(NEW + "head.") for k in res.delta.tensors)
    assert any(k.endswith(".bias") and not k.startswith(NEW) for k in res.delta.tensors)
    clf = model.classifier(C)
    import copy

    clf.backbone = copy.deepcopy(model.backbone)
    apply(clf, res.delta)
    x = text_batch(model)
    assert torch.allclose(logits(clf, x), logits(res.module, x), atol=1e-6)


def test_bitfit_subset_and_errors(tiny_bert_dir):
    model = text_model(tiny_bert_dir)
    names = bias_names(model.backbone, ["query", "intermediate"])
    assert names and all(".query." in n or ".intermediate." in n for n in names)
    assert len(names) == 2 * 2  # one query and one intermediate bias per layer
    with pytest.raises(ConfigError, match="match no bias"):
        bias_names(model.backbone, ["nothing"])


def test_bitfit_on_a_cnn(tmp_path):
    model = image_model()
    tr, te = image_data()
    res = tune(model, tr, te, method="bitfit", config={"epochs": 1, "batch_size": 8}, out_dir=tmp_path, progress=False)
    assert res.metrics["bias_params"] == 4 + 4 + 8 + 6
    assert (tmp_path / "delta" / "delta.safetensors").is_file()
