"""Side networks (UniPT, SHERL, R²): no gradient through the backbone, documented parameter counts,
training above chance, zero-init identity (SHERL), cached = live features, save → load round trips."""

import json

import pytest
import torch
from test_tune_common import image_data, image_model, logits, text_batch, text_data, text_model
from typer.testing import CliRunner

from transferkit.delta import NEW, Delta
from transferkit.engine import CrossEntropy
from transferkit.errors import ConfigError
from transferkit.tune import tune
from transferkit.tune._common import count_trainable
from transferkit import registry
from transferkit.tune.side import cache_features, param_count, rebuild, side_classifier, side_spec

H, L = 32, 2  # the tiny BERT: hidden 32, 2 layers → hidden states h_0..h_2


def _opts(method, **kw):
    return {**registry.get("tune", method).defaults(), "r": 8, **({"heads": 2} if method == "r2" else {}), **kw}


def _graph_leaves(t):
    """Every tensor that would receive a gradient from ``t.backward()`` (AccumulateGrad leaves)."""
    seen, leaves, stack = set(), [], [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("method", ["unipt", "sherl", "r2"])
def test_side_step_has_no_gradient_through_the_backbone(tiny_bert_dir, method):
    model = text_model(tiny_bert_dir)
    clf = side_classifier(model, side_spec(model, method, _opts(method)), 2)
    clf.train()
    assert not clf.taps.backbone.training  # the frozen backbone stays in eval mode
    x = text_batch(model)
    feats, _ = clf.taps(x)
    assert all(not f.requires_grad and f.grad_fn is None for f in feats)  # built under no_grad
    loss, _ = CrossEntropy()(clf, {"inputs": x, "labels": torch.tensor([1, 0, 0])})
    backbone = {id(p) for p in clf.taps.parameters()}
    leaves = _graph_leaves(loss)
    assert leaves and not any(id(v) in backbone for v in leaves)  # the graph holds no backbone parameter
    loss.backward()
    assert all(p.grad is None for p in clf.taps.parameters())
    assert all(p.grad is not None for n, p in clf.named_parameters() if p.requires_grad and "theta" not in n
               and not (method == "sherl" and ".up." in f".{n}"))  # sherl: the 0 gate blocks Up at step 0
    if method == "sherl":
        assert clf.side.theta.grad is not None and clf.side.theta.grad.abs().item() > 0


def test_param_counts_as_documented(tiny_bert_dir):
    model = text_model(tiny_bert_dir)
    C, r = 2, 8
    for method, dims in (("unipt", [H] * (L + 1)), ("sherl", [H] * L), ("r2", [H] * (L + 1))):
        spec = side_spec(model, method, _opts(method))
        assert spec["dims"] == dims
        clf = side_classifier(model, spec, C)
        assert count_trainable(clf) == param_count(method, dims, r, H, C), method
    # explicit numbers for one case: UniPT, 3 layers of 32 → r = 8, head 32 → 2
    assert param_count("unipt", [32] * 3, 8, 32, 2) == 3 * (32 * 8 + 24) + 72 + 8 + (8 * 32 + 32) + 66
    # sherl with a trainable copy of the late layer adds exactly that layer's parameters
    spec = side_spec(model, "sherl", _opts("sherl", late_tune="full"))
    layer = sum(p.numel() for p in model.backbone.model.encoder.layer[-1].parameters())
    assert count_trainable(side_classifier(model, spec, C)) == param_count("sherl", [H] * L, r, H, C) + layer


def test_sherl_untrained_is_the_base_model(tiny_bert_dir):
    model = text_model(tiny_bert_dir)
    clf = side_classifier(model, side_spec(model, "sherl", _opts("sherl", late_layers=1)), 2).eval()
    base = model.classifier(2)
    base.head.load_state_dict(clf.head.state_dict())
    x = text_batch(model)
    assert torch.allclose(logits(clf, x), logits(base, x), atol=1e-6)  # tanh(0) = 0: late layer sees h_{L-1}


@pytest.mark.parametrize("method", ["unipt", "sherl", "r2"])
def test_side_trains_above_chance_and_round_trips(tiny_bert_dir, sentiment_csv, tmp_path, method):
    model = text_model(tiny_bert_dir)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tr, te = text_data(sentiment_csv)
    res = tune(model, tr, te, method=method, config={**_opts(method), "epochs": 6, "lr": 1e-2, "batch_size": 8},
               out_dir=tmp_path, progress=False)
    assert res.metrics["test_accuracy"] >= 0.75, res.metrics
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in res.module.taps.backbone.state_dict().items())  # frozen copy
    d = Delta.load(tmp_path / "delta")
    assert d.kind == "head" and all(k.startswith((NEW + "side.", NEW + "head.")) for k in d.tensors)
    assert res.metrics["trainable_params"] == d.n_params()
    again = rebuild(model, d)
    x = text_batch(model)
    assert torch.allclose(logits(again, x), logits(res.module, x), atol=1e-6)


def test_cached_features_match_live(tiny_bert_dir, sentiment_csv):
    model = text_model(tiny_bert_dir)
    tr, _ = text_data(sentiment_csv)
    clf = side_classifier(model, side_spec(model, "unipt", _opts("unipt")), 2).eval()
    from transferkit.tune.side import _collate_cached
    from transferkit.tune._common import make_collate

    items = [(tr.X[i], int(tr.y[i])) for i in range(6)]
    live = logits(clf, make_collate(model.preprocess)(items)["inputs"])
    cached = cache_features(clf, model, tr.subset(list(range(6))))
    batch = _collate_cached([cached[i] for i in range(6)])
    assert torch.allclose(logits(clf, batch["inputs"]), live, atol=1e-5)
    tr2, te2 = text_data(sentiment_csv)
    res = tune(model, tr2, te2, method="unipt", config={**_opts("unipt"), "cache": True, "epochs": 1}, progress=False)
    assert 0 <= res.metrics["test_accuracy"] <= 1


def test_side_on_a_cnn():
    model = image_model()
    tr, te = image_data()
    for method in ("unipt", "r2", "sherl"):
        opts = _opts(method, late_layers=0) if method == "sherl" else _opts(method)
        res = tune(model, tr, te, method=method, config={**opts, "epochs": 1, "batch_size": 8}, progress=False)
        spec = res.delta.meta["side"]
        assert spec["taps"] and len(spec["dims"]) >= 2
        out_dim = spec["dims"][-1]
        assert res.metrics["trainable_params"] == param_count(method, spec["dims"], 8, out_dim, 2), method
    with pytest.raises(ConfigError, match="late_layers"):
        tune(model, tr, te, method="sherl", config={"epochs": 1}, progress=False)


def test_side_bad_configs(tiny_bert_dir):
    model = text_model(tiny_bert_dir)
    with pytest.raises(ConfigError, match="positive integer"):
        side_spec(model, "unipt", {"r": 0})
    with pytest.raises(ConfigError, match="late_layers"):
        side_spec(model, "sherl", {"r": 8, "late_layers": 5})
    with pytest.raises(ConfigError, match="divisible"):
        side_classifier(model, side_spec(model, "r2", {"r": 10, "heads": 4}), 2)
    with pytest.raises(ConfigError, match="unknown option"):
        tune(model, None, method="unipt", config={"rank": 3})


def test_cli_side_method(tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch):
    from transferkit.cli import app

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("r: 8\n")
    res = CliRunner().invoke(app, ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--method",
                                   "unipt", "--epochs", "1", "--config", str(cfg), "--out", str(tmp_path / "o"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["method"] == "unipt" and 0 < m["trainable_pct"] < 100
    assert (tmp_path / "o" / "delta" / "delta.json").is_file() and (tmp_path / "o" / "history.json").is_file()
