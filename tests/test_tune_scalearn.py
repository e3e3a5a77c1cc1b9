"""Adapter composition (ScaLearn, AdapterFusion) and VL-Adapter-style shared adapters on a tiny BERT."""

import json

import numpy as np
import pytest
import torch
from test_tune_common import logits, text_batch, text_data, text_model

from transferkit.delta import NEW, Delta
from transferkit.errors import ConfigError
from transferkit.tune import tune
from transferkit.tune.adapters import adapted_classifier, adapter_spec
from transferkit.tune.scalearn import (
    VARIANTS,
    composed_classifier,
    expected_params,
    rebuild,
    train_shared,
)
from transferkit.zoo.base import Classifier

H, L, C = 32, 2, 2


def make_source(model, seed, method="adapter", position="ffn", bottleneck=8):
    """A source adapter Delta with random (non-zero) weights, in the layout `tune --method adapter` writes."""
    spec = adapter_spec(method, {"bottleneck": bottleneck, "dropout": 0.0, "init": "zero", "position": position,
                                 "scale": 4.0 if method == "scaled-parallel-adapter" else 1.0})
    clf, names = adapted_classifier(model, C, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in clf.named_parameters():
            if n in names or n.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = clf.state_dict()
    tensors = {NEW + n: state[n].clone() for n in names}
    tensors.update({NEW + "head." + k: v.clone() for k, v in clf.head.state_dict().items()})
    return Delta(model.name, "head", tensors, {"adapters": spec}), clf.eval()


def set_omega(clf, value):
    with torch.no_grad():
        clf.backbone.model.composer.omega.fill_(value)


def copy_head(dst, src):
    dst.head.load_state_dict(src.head.state_dict())


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return text_model(tiny_bert_dir)


@pytest.mark.parametrize("variant", ["scalearn", "scalearn-uniform", "scalearn++", "scalearn-uniform++"])
@pytest.mark.parametrize("method,position", [("adapter", "ffn"), ("parallel-adapter", "both")])
def test_one_source_scale_one_is_the_adapter_and_zero_is_the_base(model, variant, method, position):
    delta, adapter_model = make_source(model, 1, method, position)
    clf, _, _ = composed_classifier(model, C, [delta], variant)
    copy_head(clf, adapter_model)
    x = text_batch(model)
    set_omega(clf, 1.0)
    assert torch.equal(logits(clf, x), logits(adapter_model, x))  # bitwise: h + 1·a(h) = h + a(h)
    set_omega(clf, 0.0)
    base = Classifier(model.backbone, model.feature_dim, C)
    copy_head(base, adapter_model)
    assert torch.equal(logits(clf, x), logits(base, x))


def test_two_sources_select_and_add(model):
    (d1, m1), (d2, _) = make_source(model, 1), make_source(model, 2)
    clf, _, _ = composed_classifier(model, C, [d1, d2], "scalearn")
    copy_head(clf, m1)
    x = text_batch(model)
    with torch.no_grad():
        clf.backbone.model.composer.omega.zero_()
        clf.backbone.model.composer.omega[:, 0] = 1.0  # ω = e_1: only source 1
    assert torch.equal(logits(clf, x), logits(m1, x))
    # per-dimension scaling: the composer's output is h + Σ ω_i ⊙ a_i, no softmax and no normalisation
    comp = clf.backbone.model.composer
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        comp.omega.copy_(torch.randn(comp.omega.shape, generator=g) * 3)
    comp.eval()
    h, a = torch.randn(2, 3, H, generator=g), [torch.randn(2, 3, H, generator=g) for _ in range(2)]
    ref = h + comp.omega[1, 0] * a[0] + comp.omega[1, 1] * a[1]
    assert torch.allclose(comp.mix(1, h, a), ref, atol=1e-6)
    # dropout on ω only in training mode
    comp.train()
    assert not torch.allclose(comp.mix(1, h, a), ref, atol=1e-6)


def test_parameter_counts_match_closed_forms(model):
    sources = [make_source(model, s)[0] for s in (1, 2, 3)]
    N, S = 3, L  # Pfeiffer adapters after the FFN: one site per layer
    head = H * C + C
    closed = {"scalearn": S * N * H, "scalearn-uniform": S * N, "scalearn++": N * H, "scalearn-uniform++": N,
              "adapterfusion": S * 3 * (H * H + H)}
    for variant in VARIANTS:
        clf, names, _ = composed_classifier(model, C, sources, variant)
        trainable = sum(p.numel() for p in clf.parameters() if p.requires_grad)
        assert trainable == closed[variant] + head == expected_params(variant, S, N, H, C), variant
        assert all(n.startswith("backbone.model.composer.") for n in names)
    # the paper's numbers: N = 8 sources, d = 768, 12 layers
    assert expected_params("scalearn", 12, 8, 768) == 73_728
    assert expected_params("scalearn-uniform", 12, 8, 768) == 96
    assert expected_params("scalearn++", 12, 8, 768) == 6_144
    assert expected_params("scalearn-uniform++", 12, 8, 768) == 8
    assert expected_params("adapterfusion", 12, 8, 768) == 12 * 3 * (768 * 768 + 768)  # ≈ 21.3M
    # both positions → two sites per layer
    both = [make_source(model, s, "parallel-adapter", "both")[0] for s in (1, 2)]
    clf, _, _ = composed_classifier(model, C, both, "scalearn")
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) == 2 * L * 2 * H + head


def test_scalearn_init_follows_the_paper(model):
    sources = [make_source(model, s)[0] for s in (1, 2, 3, 4)]
    clf, _, _ = composed_classifier(model, C, sources, "scalearn")
    w = clf.backbone.model.composer.omega.detach()
    assert abs(float(w.mean()) - 2.0 / 4) < 1e-3 and float(w.std()) < 5e-3


def test_adapterfusion_weights_sum_to_one_and_single_source_is_the_adapter(model):
    d1, m1 = make_source(model, 1)
    d2, _ = make_source(model, 2)
    clf, _, _ = composed_classifier(model, C, [d1, d2], "adapterfusion", anneal_steps=4)
    comp = clf.backbone.model.composer
    x = text_batch(model)
    logits(clf, x)
    assert len(comp.last_probs) == L
    for probs in comp.last_probs.values():
        assert probs.shape[0] == 2 and torch.allclose(probs.sum(0), torch.ones_like(probs[0]), atol=1e-6)
        assert (probs >= 0).all()
    # temperature anneals linearly 50 → 1 over training forward passes, then stays at 1
    assert comp.temperature == 50.0
    clf.train()
    with torch.no_grad():
        for _ in range(2):
            clf(x)
    assert comp.temperature == pytest.approx(50 - 49 * 0.5)
    with torch.no_grad():
        for _ in range(3):
            clf(x)
    assert comp.temperature == 1.0
    # one source, exact identity value map: the output is that adapter's model
    one, _, _ = composed_classifier(model, C, [d1], "adapterfusion")
    with torch.no_grad():
        for v in one.backbone.model.composer.value:
            v.weight.copy_(torch.eye(H))
    copy_head(one, m1)
    assert torch.allclose(logits(one, x), logits(m1, x), atol=1e-6)


def test_scalearn_trains_above_chance_and_rebuilds(model, tiny_bert_dir, sentiment_csv, tmp_path):
    train, test = text_data(sentiment_csv)
    srcs = []
    for i, seed in enumerate((0, 1)):
        out = tmp_path / f"src{i}"
        tune(model, train, test, method="adapter", config={"bottleneck": 4, "epochs": 1, "seed": seed},
             out_dir=out, progress=False)
        srcs.append(str(out))
    res = tune(model, train, test, method="scalearn", config={"sources": srcs, "epochs": 4, "lr": 5e-2},
               out_dir=tmp_path / "sl", progress=False)
    m = res.metrics
    assert m["test_accuracy"] > 0.6, m
    assert m["trainable_params"] == expected_params("scalearn", L, 2, H, C)
    assert m["n_sources"] == 2 and m["n_sites"] == L
    # only ω and the head moved; the frozen source adapters were kept as they were
    loaded = Delta.load(tmp_path / "sl" / "delta")
    src0 = Delta.load(tmp_path / "src0" / "delta")
    key = "new.backbone.model.encoder.layer.0.output.adapter.up.weight"
    ckey = "new.backbone.model.encoder.layer.0.output.composition.adapters.0.up.weight"
    assert torch.equal(loaded.tensors[ckey], src0.tensors[key])
    x = text_batch(model)
    assert torch.allclose(logits(rebuild(model, loaded), x), logits(res.module, x), atol=1e-6)
    json.loads((tmp_path / "sl" / "delta" / "delta.json").read_text())


def test_bad_composition_configs(model, tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="sources"):
        composed_classifier(model, C, [], "scalearn")
    with pytest.raises(ConfigError, match="no delta.json"):
        composed_classifier(model, C, [str(tmp_path)], "scalearn")
    d, _ = make_source(model, 1)
    other = Delta("other-base", d.kind, d.tensors, d.meta)
    with pytest.raises(ConfigError, match="base"):
        composed_classifier(model, C, [other], "scalearn")
    d_ffn, _ = make_source(model, 1, "parallel-adapter", "ffn")
    d_attn, _ = make_source(model, 2, "parallel-adapter", "attn")
    with pytest.raises(ConfigError, match="same sites"):
        composed_classifier(model, C, [d_ffn, d_attn], "scalearn")
    mam = Delta(model.name, "head", dict(d.tensors), {"adapters": {**d.meta["adapters"], "prefix_length": 3}})
    with pytest.raises(ConfigError, match="prefix"):
        composed_classifier(model, C, [mam], "scalearn")
    with pytest.raises(ConfigError, match="omega_dropout"):
        composed_classifier(model, C, [d], "scalearn", omega_dropout=1.5)


def _topic_data(n=48):
    from transferkit.data import make_dataset, train_test_split

    rng = np.random.default_rng(1)
    texts, labels = [], []
    for i in range(n):
        topic = ["movie", "food"][i % 2]
        words = [topic, topic] + rng.choice(["good", "bad", "the", "was", "very"], 3).tolist()
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(topic)
    return train_test_split(make_dataset("topic", texts, labels), seed=0)


def test_shared_adapter_multitask(model, sentiment_csv):
    sent, topic = text_data(sentiment_csv), _topic_data()
    tasks = {"sentiment": sent, "topic": topic}
    cfg = {"epochs": 3, "lr": 3e-3, "batch_size": 16, "progress": False}
    shared = train_shared(model, tasks, share="all", bottleneck=4, config=cfg)
    per_task = train_shared(model, tasks, share="none", bottleneck=4, config={**cfg, "epochs": 1})
    heads = 2 * (H * 2 + 2)
    one_adapter = L * (H * 4 + 4 + 4 * H + H)
    assert shared.metrics["trainable_params"] == one_adapter + heads
    assert per_task.metrics["trainable_params"] == 2 * one_adapter + heads
    acc = shared.metrics["task_accuracy"]
    assert set(acc) == {"sentiment", "topic"} and min(acc.values()) > 0.6, acc
    # per-row routing: with share="none", task 1's adapter does not touch task 0's rows
    x = text_batch(model)
    mtc = per_task.module
    with torch.no_grad():
        f0 = mtc.features(x, torch.zeros(3, dtype=torch.long))
        mixed = mtc.features(x, torch.tensor([0, 1, 0]))
    assert torch.allclose(f0[[0, 2]], mixed[[0, 2]], atol=1e-6) and not torch.allclose(f0[1], mixed[1])


def test_cli_scalearn_and_shared_adapter(tiny_bert_dir, sentiment_csv, tmp_path):
    from typer.testing import CliRunner

    from transferkit.cli import app

    runner = CliRunner()
    src = tmp_path / "src"
    base = ["tune", "--data", str(sentiment_csv), "--model", str(tiny_bert_dir), "--epochs", "1"]
    cfg = tmp_path / "a.yaml"
    cfg.write_text("bottleneck: 4\n")
    assert runner.invoke(app, base + ["--method", "adapter", "--config", str(cfg), "--out", str(src)]).exit_code == 0
    cfg.write_text(f"sources: [{src}]\n")
    for method in ("scalearn-uniform++", "adapterfusion"):
        res = runner.invoke(app, base + ["--method", method, "--config", str(cfg), "--out", str(tmp_path / method),
                                         "--json"])
        assert res.exit_code == 0, res.output + str(res.exception)
        m = json.loads(res.stdout)
        assert m["trainable_params"] == expected_params(method, L, 1, H, C)
    cfg.write_text(f"tasks: [{sentiment_csv}]\nbottleneck: 4\n")
    res = runner.invoke(app, base + ["--method", "shared-adapter", "--config", str(cfg), "--out",
                                     str(tmp_path / "sh"), "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    assert json.loads(res.stdout)["n_tasks"] == 2
    res = runner.invoke(app, base + ["--method", "scalearn", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "sources" in res.stderr.strip().splitlines()[-1]
