"""Helpers shared by the tune tests (tiny models and data built in the tests) + registry tests."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from transferkit.errors import ConfigError


def text_data(csv):
    from transferkit.data import load_dataset, train_test_split

    return train_test_split(load_dataset(str(csv)), seed=0)


def text_model(tiny_bert_dir):
    from transferkit.zoo import load_model

    return load_model(str(tiny_bert_dir))


def text_batch(model, texts=("good movie was great", "the food was not very good at all", "bad")):
    return model.preprocess(list(texts))


def image_model():
    """A tiny CNN ZooModel (two Conv2d, one grouped conv, a Linear) on 8×8 grey images."""
    from transferkit.zoo import from_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                        nn.Conv2d(4, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    return from_module(net, modality="image", preprocess={"size": 8, "mean": [0.5], "std": [0.5], "channels": 1},
                       feature_dim=6, name="tiny-cnn")


def image_data(n=48):
    from transferkit.data import make_dataset, train_test_split

    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    X = rng.integers(0, 60, size=(n, 8, 8)).astype(np.uint8)
    X[y == 1, 2:6, 2:6] += 150
    return train_test_split(make_dataset("blobs", X, y), seed=0)


def logits(module, inputs):
    module.eval()
    with torch.no_grad():
        out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------------------- registry
def test_registry_entries_are_complete_and_json_able():
    from transferkit import registry

    methods = registry.methods("tune")
    expected = {"linear", "full", "lora", "ia3", "prefix", "prompt", "bitfit", "adapter", "parallel-adapter",
                "scaled-parallel-adapter", "mam"}
    assert expected <= set(methods)
    doc = json.loads(json.dumps({name: registry.describe(m) for name, m in methods.items()}))
    for name, info in doc.items():
        assert {"summary", "paper", "family", "modality", "options", "train"} <= set(info), name
        assert info["paper"] and info["train"]["lr"] > 0
    # the human listing is one line per method: summary + paper
    line = f"{'lora':8s} {methods['lora']}"
    assert "LoRA" in line and "Hu et al." in line and "\n" not in line


def test_split_config_separates_method_and_train_options():
    from transferkit.engine import TrainConfig
    from transferkit.tune import split_config
    from transferkit.tune.adapters import MamOptions
    from transferkit.tune.peft_methods import LoraOptions

    opts, train = split_config("lora", {"r": 4, "epochs": 1.0, "lr": 1e-3})
    assert isinstance(opts, LoraOptions) and opts.r == 4 and opts.alpha == 16
    assert train == {"epochs": 1, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.1,
                     "lr": 1e-3}  # the method's training defaults under the given values
    assert isinstance(train["epochs"], int) and TrainConfig.from_dict(train).epochs == 1  # checked by TrainConfig
    opts, _ = split_config("mam", {"options": {"prefix_length": 5}})
    assert isinstance(opts, MamOptions) and opts.prefix_length == 5 and opts.bottleneck == 512
    assert split_config("linear", {"epochs": 2})[0] is None  # a method without options
    with pytest.raises(ConfigError, match="rank"):
        split_config("lora", {"rank": 4})
    with pytest.raises(ConfigError, match="unknown tune method"):
        split_config("nope", {})


def test_unknown_method_and_wrong_modality(tiny_bert_dir, sentiment_csv):
    from transferkit.tune import tune

    tr, te = image_data()
    with pytest.raises(ConfigError, match="text"):
        tune(image_model(), tr, te, method="prefix", config={"epochs": 1}, progress=False)
    with pytest.raises(ConfigError, match="unknown tune method"):
        tune(image_model(), tr, te, method="nope", progress=False)


# --------------------------------------------------------------------------------------- head seeds
def test_head_seed_is_stable_and_depends_on_the_label_set():
    from transferkit.zoo import head_seed

    assert head_seed(0, ["neg", "pos"]) == head_seed(0, ("neg", "pos"))  # sha256, not Python's salted hash
    assert head_seed(0, ["neg", "pos"]) == 3504715798736400598  # pinned: changing it changes every tuned number
    distinct = {head_seed(0, ["neg", "pos"]), head_seed(1, ["neg", "pos"]), head_seed(0, ["pos", "neg"]),
                head_seed(0, ["great", "other"]), head_seed(0, ["neg", "pos", "x"])}
    assert len(distinct) == 5 and all(0 <= s < 2**63 for s in distinct)


@pytest.mark.parametrize("method", ["full", "bitfit", "sparse", "lora"])
def test_tasks_with_other_labels_get_their_own_head_start(method):
    """Two label sets, one seed: independent heads (merging per-task heads needs that); same labels: same head."""
    from transferkit.data import make_dataset
    from transferkit.tune import tune
    from transferkit.zoo import head_seed
    from transferkit.zoo.base import new_head

    model, (train, _) = image_model(), image_data()

    def head_after(classes):
        ds = make_dataset("blobs", train.X, train.y, classes=classes)
        res = tune(model, ds, None, method=method, config={"epochs": 1, "lr": 1e-12, "seed": 3}, progress=False)
        return res.module.head.weight.detach()

    a, a2, b = head_after(["dark", "bright"]), head_after(["dark", "bright"]), head_after(["ham", "spam"])
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert (a - b).abs().max() > 0.05  # U(±1/√6) draws, not one matrix
    for w, classes in ((a, ["dark", "bright"]), (b, ["ham", "spam"])):  # lr 1e-12: the head is still its start
        torch.testing.assert_close(w, new_head(6, 2, head_seed(3, classes)).weight, rtol=0, atol=1e-6)
