"""``freeze_backbone`` and ``bottleneck`` of the training adapt methods (DANN, ParetoDA, UDA): the frozen backbone
ends bit-identical, the trained part moves, DANN/ParetoDA train on features computed once per item and that
equals running the frozen backbone on every step, the module handed back predicts raw items; real text end to
end (Python and CLI)."""

import json

import numpy as np
import pytest
import torch
import yaml
from _cli import bad, ok
from test_adapt_tta import CLASSES, toy_data, toy_model
from torch import nn

from transferkit.adapt import adapt, dann, paretoda
from transferkit.adapt._common import (FrozenBackbone, adapted_classifier, classifier, predict_logits,
                                       unlabelled)
from transferkit.errors import ConfigError

SMALL = {"dann": {"hidden": 16}, "paretoda": {"hidden": 16, "cd_hidden": 16}, "uda": {"unsup_ratio": 2}}


def _data():
    return toy_data(60), toy_data(40, seed=1, shift=40), toy_data(20, seed=2, shift=40)


@pytest.mark.parametrize("method", ["dann", "paretoda", "uda"])
def test_frozen_backbone_ends_bit_identical_while_bottleneck_and_head_train(method):
    model = toy_model()
    src, tgt, test = _data()
    options = {"freeze_backbone": True, "bottleneck": 6, "epochs": 1, "batch_size": 16, **SMALL[method]}
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # BN running stats included
    res = adapt(model, src, tgt, test, method=method, options=options, seed=2)
    frozen, bottleneck = res.module.backbone
    assert isinstance(frozen, FrozenBackbone)
    after = frozen.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    start = adapted_classifier(model, CLASSES, adapt_options(method, options), 2)
    for name, p in start.named_parameters():
        if not name.startswith("backbone.0."):
            assert not torch.equal(p, res.module.get_parameter(name)), name
    assert not torch.equal(start.backbone[1][1].running_mean, bottleneck[1].running_mean)
    # the returned module predicts raw items: its predictions are the recorded ones
    pred = predict_logits(res.module, test.X, model.preprocess).argmax(-1).numpy()
    assert np.array_equal(pred, res.predictions["adapted"])


def adapt_options(method, values):
    from transferkit import registry

    return registry.get("adapt", method).parse(values)


@pytest.mark.parametrize("mod, extra", [(dann, {}), (paretoda, {"cd_hidden": 16})], ids=["dann", "paretoda"])
def test_cached_features_train_like_the_frozen_backbone_on_raw_items(mod, extra):
    """Same seed, same module: training on features computed once equals running the frozen backbone on every
    step (to float rounding); the cached run sends each item through the backbone once."""
    src, tgt, test = _data()
    opts = adapt_options(mod.__name__.rsplit(".", 1)[-1], {"freeze_backbone": True, "bottleneck": 5, "epochs": 2,
                                                           "batch_size": 16, "hidden": 16, **extra})
    runs, seen = [], []
    for cache in (True, False):
        model = toy_model()
        count = [0]
        model.backbone.register_forward_hook(lambda m, i, o: count.__setitem__(0, count[0] + len(o)))
        runs.append(mod.run(model, src, unlabelled(tgt), test.X, options=opts, seed=3, cache_features=cache))
        seen.append(count[0])
    a, b = (r.module.state_dict() for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-4), k
    assert np.array_equal(runs[0].predictions["adapted"], runs[1].predictions["adapted"])
    assert seen[0] == len(src) + len(tgt) + len(test)  # once per item, then the held-out prediction
    assert seen[1] > 2 * seen[0]


def test_bottleneck_shapes_and_defaults_unchanged():
    model = toy_model()
    plain = adapted_classifier(model, CLASSES, adapt_options("dann", {}), 0)
    ref = classifier(model, CLASSES, 0)
    assert plain.state_dict().keys() == ref.state_dict().keys()  # no option: the classifier of before
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in plain.state_dict().items())
    clf = adapted_classifier(model, CLASSES, adapt_options("uda", {"bottleneck": 5}), 0)
    lin, bn, relu = clf.backbone[1]
    assert (lin.in_features, lin.out_features, bn.num_features) == (8, 5, 5) and isinstance(relu, nn.ReLU)
    assert (clf.head.in_features, clf.head.out_features) == (5, 3)
    assert all(p.requires_grad for p in clf.parameters())  # not frozen: the backbone trains too
    logits, feats = predict_logits(clf, toy_data(7).X, model.preprocess, features=True)
    assert logits.shape == (7, 3) and feats.shape == (7, 5) and (feats >= 0).all()
    frozen = adapted_classifier(model, CLASSES, adapt_options("uda", {"freeze_backbone": True}), 0)
    assert len(frozen.backbone) == 1 and not any(p.requires_grad for p in frozen.backbone.parameters())
    frozen.train()
    assert not frozen.backbone[0].module.training and frozen.head.training


@pytest.mark.parametrize("method, options, match", [
    ("dann", {"bottleneck": 0}, "bottleneck of adapt method 'dann' must be >= 1"),
    ("uda", {"bottleneck": 2.5}, "bottleneck of adapt method 'uda'"),
    ("paretoda", {"freeze_backbone": "yes"}, "freeze_backbone of adapt method 'paretoda'"),
    ("dann", {"freeze_backbone": True}, "freeze_backbone needs a bottleneck for dann"),
    ("paretoda", {"freeze_backbone": True}, "freeze_backbone needs a bottleneck for paretoda"),
])
def test_bad_values_are_one_line_config_errors(method, options, match):
    src, tgt, test = _data()
    with pytest.raises(ConfigError, match=match) as err:
        adapt(toy_model(), src, tgt, test, method=method, options=options)
    assert "\n" not in str(err.value)


def test_cli_bad_bottleneck_writes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"bottleneck": 0, "freeze_backbone": True}))
    bad(["adapt", "--method", "dann", "--config", cfg, "--source", "vader:tweets", "--target", "vader:nyt",
         "--model", "paraphrase-minilm-l3-v2", "--out", tmp_path / "o"], "bottleneck of adapt method 'dann'")
    assert not (tmp_path / "o").exists()


TEXT = {"freeze_backbone": True, "bottleneck": 32, "epochs": 2, "batch_size": 32, "hidden": 32}


@pytest.mark.assets
def test_real_text_frozen_encoder_end_to_end(tmp_path):
    """VADER tweets → nyt with the frozen MiniLM encoder: Python API and CLI, the encoder unchanged, the saved
    classifier loads back and reproduces the predictions on raw strings."""
    from safetensors.torch import load_file

    from transferkit.data import load_dataset
    from transferkit.data.split import make_split
    from transferkit.zoo import load_model

    model = load_model("paraphrase-minilm-l3-v2")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    src = load_dataset("vader:tweets", limit=120, seed=0)
    train, test, split = make_split("vader:nyt", limit=120, sample_seed=0, seed=0, test_size=0.3)
    res = adapt(model, src, train, test, method="dann", options=TEXT, seed=0, out_dir=tmp_path / "py", split=split)
    m = res.metrics
    assert m["n_test"] == m["n_scored"] == 36 and 0.0 <= m["accuracy"] <= 1.0
    enc = res.module.backbone[0].module.state_dict()
    assert all(torch.equal(enc[k], before[k]) for k in before)
    saved = load_file(str(tmp_path / "py" / "model.safetensors"))
    assert saved.keys() == res.module.state_dict().keys() and "backbone.1.0.weight" in saved
    clf = adapted_classifier(model, src.classes, adapt_options("dann", TEXT), 1)
    clf.load_state_dict(saved)
    pred = predict_logits(clf, test.X, model.preprocess).argmax(-1).numpy()
    assert np.array_equal(pred, res.predictions["adapted"])

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TEXT))
    out = tmp_path / "cli"
    cli = json.loads(ok(["adapt", "--source", "vader:tweets", "--target", "vader:nyt", "--model",
                         "paraphrase-minilm-l3-v2", "--method", "dann", "--config", cfg, "--limit", "120",
                         "--out", out, "--json"]).stdout)
    assert cli["options"]["freeze_backbone"] is True and cli["options"]["bottleneck"] == 32
    assert cli["n_scored"] == len(json.loads((out / "predictions.json").read_text())["adapted"])
    assert (out / "model.safetensors").is_file()
