"""Baselines every transfer method is measured against: linear probe and full fine-tuning.

- ``linear``: the backbone is frozen; features are extracted once (cached) and only a new linear
  head is trained on them with the engine (cross-entropy, AdamW). Delta kind ``head``.
- ``full``: backbone and new head are trained end to end on the raw data through the model's
  preprocessing. Delta kind ``full`` (task vector of the backbone + the new head).

Both write a run folder: ``delta/`` (safetensors + JSON), ``metrics.json``, ``history.json``
(the training curve) and ``curve.png``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..delta import NEW, Delta, from_states
from ..engine import CrossEntropy, TrainConfig, evaluate, train
from ..errors import ConfigError

METHODS = {
    "linear": "Linear probe: frozen backbone, new linear head trained on cached features.",
    "full": "Full fine-tuning: every backbone parameter and a new linear head.",
}
DEFAULTS = {
    "linear": {"epochs": 30, "lr": 1e-2, "batch_size": 64, "weight_decay": 1e-4, "scheduler": "cosine"},
    "full": {"epochs": 3, "lr": 5e-5, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.1},
}


@dataclass
class TuneResult:
    method: str
    model: str
    delta: Delta
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    out_dir: Path | None = None


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, X: Any, y: np.ndarray):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.X[i], int(self.y[i])


def _collate(preprocess):
    def collate(items):
        xs = [x for x, _ in items]
        raw = xs if isinstance(xs[0], str) else np.stack(xs)
        return {"inputs": preprocess(raw), "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
    return collate


def _split_val(ds, fraction: float, seed: int):
    from ..data import train_test_split

    return train_test_split(ds, test_size=fraction, seed=seed)


def tune(model, train_data, test_data=None, *, method: str = "linear", config: dict | None = None,
         out_dir: str | Path | None = None, resume: bool = False, val_fraction: float = 0.1,
         progress: bool = True) -> TuneResult:
    """Adapt ``model`` (a ZooModel) to ``train_data`` with ``method``; evaluate on ``test_data``.

    A validation split (``val_fraction`` of the training data, stratified) drives early stopping
    and best-checkpoint selection; the test split is only used for the final metrics.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown tune method {method!r}; available here: {', '.join(METHODS)}")
    cfg = TrainConfig.from_dict({**DEFAULTS[method], **(config or {}), "progress": progress})
    n_classes = len(train_data.classes)
    fit, val = _split_val(train_data, val_fraction, cfg.seed) if val_fraction > 0 else (train_data, None)
    out_dir = Path(out_dir) if out_dir else None
    t0 = time.perf_counter()
    if method == "linear":
        from ..features import extract

        clf = model.classifier(n_classes, seed=cfg.seed)
        head = clf.head
        feats = {name: extract(model, d, progress=progress) for name, d in (("fit", fit), ("val", val), ("test", test_data)) if d is not None}
        collate = lambda items: {"inputs": torch.from_numpy(np.stack([x for x, _ in items])),  # noqa: E731
                                 "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
        pairs = {k: _Pairs(f.X, f.y) for k, f in feats.items()}
        result = train(head, pairs["fit"], CrossEntropy(), cfg, val_data=pairs.get("val"), collate_fn=collate,
                       out_dir=out_dir, resume=resume)
        test_metrics = evaluate(head, pairs["test"], collate_fn=collate) if "test" in pairs else {}
        delta = Delta(model.name, "head", {NEW + "head." + k: v.detach().clone() for k, v in head.state_dict().items()})
    else:
        clf = model.classifier(n_classes, seed=cfg.seed)
        base_state = {k: v.detach().clone() for k, v in clf.backbone.state_dict().items()}
        for p in clf.parameters():
            p.requires_grad_(True)
        collate = _collate(model.preprocess)
        result = train(clf, _Pairs(fit.X, fit.y), CrossEntropy(), cfg,
                       val_data=_Pairs(val.X, val.y) if val is not None else None, collate_fn=collate,
                       out_dir=out_dir, resume=resume)
        test_metrics = evaluate(clf, _Pairs(test_data.X, test_data.y), collate_fn=collate) if test_data is not None else {}
        tuned = {"backbone." + k: v for k, v in clf.backbone.state_dict().items()}
        tuned.update({"head." + k: v for k, v in clf.head.state_dict().items()})
        delta = from_states({"backbone." + k: v for k, v in base_state.items()}, tuned, base_name=model.name)
        clf.backbone.load_state_dict(base_state)  # the caller's ZooModel stays the pretrained source
        clf.eval()
    seconds = time.perf_counter() - t0
    trainable = delta.n_params()
    metrics = {
        "method": method, "model": model.name, "seconds": round(seconds, 2),
        "trainable_params": trainable, "total_params": model.n_params() + trainable * (method == "linear"),
        **{f"val_{k}": v for k, v in result.metrics.items()},
        **{f"test_{k}": v for k, v in test_metrics.items() if isinstance(v, (int, float))},
    }
    delta.meta.update({"method": method, "classes": list(train_data.classes), "config": cfg.__dict__ | {}})
    if out_dir:
        from ..io import write_json

        delta.save(out_dir / "delta")
        write_json(out_dir / "metrics.json", metrics)
        _plot_curve(result.history, out_dir / "curve.png")
    return TuneResult(method, model.name, delta, metrics, result.history, out_dir)


def _plot_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    steps = [h["step"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss")
    val = [(h["step"], h["val_accuracy"]) for h in history if "val_accuracy" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:orange", label="val accuracy")
        ax2.set_ylabel("val accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
