"""Training engine: convergence, accumulation, freezing, early stopping, schedule, evaluate, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferkit.engine import (
    CrossEntropy,
    TrainConfig,
    evaluate,
    latest_checkpoint,
    list_checkpoints,
    train,
)
from transferkit.engine.checkpoint import load_checkpoint
from transferkit.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("_engine_script.py")


def toy(n, d=8, c=3, seed=0):
    centers = torch.randn(c, d, generator=torch.Generator().manual_seed(42)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    return centers[y] + torch.randn(n, d, generator=g), y


def mlp(d=8, c=3, hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c))


def quiet(**kw):
    kw.setdefault("progress", False)
    return TrainConfig(**kw)


def test_converges_on_separable_task(tmp_path):
    x, y = toy(300)
    xv, yv = toy(90, seed=1)
    model = mlp()
    res = train(model, (x, y), CrossEntropy(), quiet(epochs=5, batch_size=16, lr=1e-2, log_every=2),
                val_data=(xv, yv), out_dir=tmp_path)
    losses = [r["train_loss"] for r in res.history if "train_loss" in r]
    assert losses[-1] < losses[0] * 0.5
    assert res.metrics["val_accuracy"] >= 0.9
    assert res.steps == 5 * math.ceil(300 / 16)
    assert json.loads((tmp_path / "metrics.json").read_text())["val_accuracy"] == res.metrics["val_accuracy"]
    assert json.loads((tmp_path / "history.json").read_text()) == res.history
    # one record per epoch end has validation metrics
    assert sum("val_accuracy" in r for r in res.history) == 5


@pytest.mark.parametrize("n", [32, 40])  # 40: the last accumulation group is a single smaller batch
def test_grad_accumulation_matches_big_batch(n):
    x, y = toy(n)
    common = dict(epochs=3, optimizer="sgd", lr=0.1, scheduler="constant", max_grad_norm=None, seed=3)
    a, b = mlp(), mlp()
    train(a, (x, y), CrossEntropy(), quiet(batch_size=8, grad_accum=4, **common))
    train(b, (x, y), CrossEntropy(), quiet(batch_size=32, grad_accum=1, **common))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert not torch.equal(a[0].weight, mlp()[0].weight)  # it did train


def test_frozen_params_unchanged_and_flags_restored():
    x, y = toy(64)
    model = mlp()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, (x, y), CrossEntropy(), quiet(epochs=2, batch_size=16, weight_decay=0.1))
    assert torch.equal(model[0].weight, before["0.weight"])
    assert not torch.equal(model[0].bias, before["0.bias"])

    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, (x, y), CrossEntropy(), quiet(epochs=2, batch_size=16, weight_decay=0.1), trainable=["2"])
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[0].bias, before["0.bias"])
    assert not torch.equal(model[2].weight, before["2.weight"])
    assert all(p.requires_grad for p in model.parameters())  # selection undone afterwards


def test_early_stopping_stops_and_restores_best():
    # validation labels are a permutation of the training labels: fitting train hurts val
    x, y = toy(120)
    xv, yv = x[:60], (y[:60] + 1) % 3
    model = mlp()
    cfg = quiet(epochs=50, batch_size=16, lr=1e-2, eval_every=2, early_stopping_patience=3)
    res = train(model, (x, y), CrossEntropy(), cfg, val_data=(xv, yv), metric="loss")
    assert res.stopped_early and res.metrics["stopped_early"]
    assert res.steps < 50 * 8
    evals = [r for r in res.history if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert res.best_step == best["step"]
    assert evals[-1]["step"] == res.steps and len([r for r in evals if r["step"] > best["step"]]) == 3
    assert res.metrics["val_loss"] == best["val_loss"]
    assert evaluate(model, (xv, yv))["loss"] == pytest.approx(best["val_loss"], abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_scheduler_lr_curve(kind):
    x, y = toy(64)
    total, lr = 20, 0.5
    res = train(mlp(), (x, y), CrossEntropy(), quiet(max_steps=total, batch_size=8, lr=lr, scheduler=kind,
                                                     warmup_ratio=0.2, log_every=1, optimizer="sgd"))
    got = [r["lr"] for r in res.history]
    assert [r["step"] for r in res.history] == list(range(1, total + 1))
    warm = 4
    for s, value in enumerate(got):
        if s < warm:
            want = lr * (s + 1) / (warm + 1)
        elif kind == "linear":
            want = lr * (total - s) / (total - warm)
        elif kind == "cosine":
            want = lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        else:
            want = lr
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), s
    assert max(got) == pytest.approx(lr)


def test_evaluate_matches_manual_computation():
    x, y = toy(53)
    model = mlp(seed=7)
    with torch.no_grad():
        logits = model(x)
    out = evaluate(model, (x, y), batch_size=7, predictions=True)
    assert out["n"] == 53
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    np.testing.assert_array_equal(out["predictions"], logits.argmax(1).numpy())
    # a Dataset of (x, y) tuples, numpy arrays and dict inputs give the same numbers
    ds = torch.utils.data.TensorDataset(x, y)
    assert evaluate(model, ds, batch_size=10)["loss"] == pytest.approx(out["loss"], rel=1e-6)
    assert evaluate(model, (x.numpy(), y.numpy()))["accuracy"] == out["accuracy"]

    class KwModel(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features, scale):
            return {"logits": self.inner(features * scale)}

    kw = evaluate(KwModel(model), {"inputs": {"features": x, "scale": torch.ones(53, 1)}, "labels": y})
    assert kw["accuracy"] == out["accuracy"]
    unlabeled = evaluate(model, (x,), predictions=True)
    assert set(unlabeled) == {"n", "predictions"}
    with pytest.raises(DataError):
        evaluate(model, (x,))
    assert model.training  # mode restored


def test_objective_module_params_are_trained_and_streams_reach_it():
    class Head(nn.Module):
        """A learnable classifier on top of a feature model, fed two named streams: cross-entropy on the
        labelled source plus ``weight`` × the prediction entropy on the unlabelled target."""

        def __init__(self, weight):
            super().__init__()
            torch.manual_seed(1)
            self.head = nn.Linear(16, 3)
            self.weight = weight
            self.seen = []

        def forward(self, model, batch):
            self.seen.append(tuple(sorted(batch)))
            logits = self.head(model(batch["source"]["inputs"]))
            probs = F.softmax(self.head(model(batch["target"]["inputs"])), -1)
            entropy = -(probs * probs.clamp_min(1e-8).log()).sum(-1).mean()
            return F.cross_entropy(logits, batch["source"]["labels"]) + self.weight * entropy, {"ent": entropy}

    def features():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def target_entropy(feat, obj):
        with torch.no_grad():
            p = F.softmax(obj.head(feat(xt)), -1)
        return float(-(p * p.clamp_min(1e-8).log()).sum(-1).mean())

    x, y = toy(64)
    xt = toy(40, seed=2)[0] + 1.0  # a shifted, unlabelled target domain
    runs = {}
    for weight in (0.0, 1.0):
        feat, obj = features(), Head(weight)
        before = obj.head.weight.clone()
        res = train(feat, {"source": (x, y), "target": (xt,)}, obj, quiet(epochs=2, batch_size=16, lr=1e-2))
        assert not torch.equal(obj.head.weight, before)
        assert set(obj.seen) == {("source", "target")}
        assert "train_ent" in res.history[-1]
        assert res.steps == 8
        runs[weight] = (feat, obj)
    # the target term matters: other weights, and the target predictions became more confident
    (f0, o0), (f1, o1) = runs[0.0], runs[1.0]
    assert not torch.allclose(o0.head.weight, o1.head.weight, atol=1e-4)
    assert not torch.allclose(f0[0].weight, f1[0].weight, atol=1e-4)
    assert target_entropy(f1, o1) < target_entropy(f0, o0) - 0.05


def test_config_validation_errors():
    cases = [
        ({"lrr": 0.1}, "unknown train option 'lrr'"),
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"lr": -1}, "lr must be a positive"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"lr": "fast"}, "lr must be a float"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"epochs": None}, "epochs must not be null"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
    ]
    for d, text in cases:
        with pytest.raises(ConfigError, match=text) as info:
            TrainConfig.from_dict(d)
        assert "\n" not in str(info.value)
    assert TrainConfig.from_dict({"lr": 1, "epochs": 2.0}).lr == 1.0
    with pytest.raises(ConfigError):
        TrainConfig.from_dict([("lr", 1)])
    x, y = toy(30)
    with pytest.raises(ConfigError, match="needs val_data"):
        train(mlp(), (x, y), config=quiet(early_stopping_patience=2))
    with pytest.raises(ConfigError, match="out_dir"):
        train(mlp(), (x, y), config=quiet(), resume=True)
    with pytest.raises(ConfigError, match="metric"):
        train(mlp(), (x, y), config=quiet(), metric="f1")
    with pytest.raises(ConfigError, match="matches no parameter"):
        train(mlp(), (x, y), config=quiet(), trainable=["nope"])


def test_bad_data_errors():
    x, y = toy(30)
    with pytest.raises(DataError, match="empty"):
        train(mlp(), (x[:0], y[:0]), config=quiet())
    with pytest.raises(DataError, match="empty"):
        train(mlp(), torch.utils.data.TensorDataset(x[:0], y[:0]), config=quiet())
    with pytest.raises(DataError, match="different lengths"):
        train(mlp(), (x, y[:10]), config=quiet())
    with pytest.raises(DataError):
        train(mlp(), 42, config=quiet())


def test_resume_rejects_changed_config(tmp_path):
    x, y = toy(64)
    train(mlp(), (x, y), config=quiet(epochs=1, batch_size=16, checkpoint_every=2), out_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]  # keeps the last 2
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))  # weights_only load
    assert state["step"] == 4
    with pytest.raises(ConfigError, match="option lr"):
        train(mlp(), (x, y), config=quiet(epochs=1, batch_size=16, checkpoint_every=2, lr=0.5),
              out_dir=tmp_path, resume=True)


def _run_script(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(SCRIPT), "resume", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _run_script(full)
    assert ref.returncode == 0, ref.stderr

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "resume", str(killed), "--slow", "0.03"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(s >= 10 for s, _ in list_checkpoints(killed / "checkpoints")):
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "metrics.json").exists()
    last = max(s for s, _ in list_checkpoints(killed / "checkpoints"))
    # a half-written checkpoint (no COMPLETE marker) with a later step must be ignored
    half = killed / "checkpoints" / "step-9999"
    half.mkdir()
    (half / "state.pt").write_bytes(b"garbage")

    res = _run_script(killed, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"step {last} of" in res.stderr  # really resumed, from the newest complete checkpoint

    a, b = load_file(str(full / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((full / "metrics.json").read_text()) == json.loads((killed / "metrics.json").read_text())
    assert json.loads((full / "history.json").read_text()) == json.loads((killed / "history.json").read_text())
