"""Pieces shared by every tune method: the result type, datasets/collation, training + evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..delta import Delta
from ..engine import CrossEntropy, TrainConfig, evaluate, train
from ..errors import ConfigError


@dataclass
class TuneResult:
    method: str
    model: str
    delta: Delta
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    out_dir: Path | None = None
    module: nn.Module | None = None  # the trained model (backbone copy + method modules + head), eval mode


@dataclass
class Fitted:
    """What a method runner hands back to :func:`transferkit.tune.tune`."""

    delta: Delta
    train_metrics: dict[str, Any]
    history: list[dict]
    test_metrics: dict[str, Any]
    trainable_params: int
    module: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, X: Any, y: np.ndarray):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.X[i], int(self.y[i])


def make_collate(preprocess: Callable[[Any], Any], drop: tuple[str, ...] = ()) -> Callable:
    """Raw ``(x, y)`` items → ``{"inputs": preprocess(xs), "labels": y}``; ``drop`` removes input keys."""

    def collate(items):
        xs = [x for x, _ in items]
        raw = xs if isinstance(xs[0], str) else np.stack(xs)
        inputs = preprocess(raw)
        if drop and isinstance(inputs, dict):
            inputs = {k: v for k, v in inputs.items() if k not in drop}
        return {"inputs": inputs, "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
    return collate


def count_trainable(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def fit_and_evaluate(module: nn.Module, model, fit, val, test, cfg: TrainConfig, out_dir: Path | None,
                     resume: bool, drop: tuple[str, ...] = ()):
    """Train ``module`` on raw ``fit`` data through ``model.preprocess``; evaluate on ``test``.

    Returns ``(TrainResult, test_metrics)``; ``module`` is left in eval mode.
    """
    if count_trainable(module) == 0:
        raise ConfigError("the method left no trainable parameter (check target_modules / bias_terms)")
    collate = make_collate(model.preprocess, drop)
    result = train(module, Pairs(fit.X, fit.y), CrossEntropy(), cfg,
                   val_data=Pairs(val.X, val.y) if val is not None else None, collate_fn=collate,
                   out_dir=out_dir, resume=resume)
    module.eval()
    test_metrics = evaluate(module, Pairs(test.X, test.y), collate_fn=collate) if test is not None else {}
    return result, test_metrics


def require_text_hf(model, method: str):
    """The Hugging Face encoder inside a text ZooModel (``MeanPooledEncoder.model``), or a ConfigError."""
    from ..zoo.base import MeanPooledEncoder

    hf = getattr(model.backbone, "model", None)
    if model.modality != "text" or not isinstance(model.backbone, MeanPooledEncoder) or \
            getattr(hf, "config", None) is None:
        raise ConfigError(f"tune method {method!r} needs a Hugging Face text encoder (a text ZooModel with a "
                          f"MeanPooledEncoder backbone); {model.name!r} is a {model.modality} model of type "
                          f"{type(model.backbone).__name__}")
    return hf


def plot_curve(history: list[dict], path: Path):
    """Write ``curve.png``: the engine's ``train_loss`` and ``val_accuracy`` against the step; return the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    loss = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in loss], [v for _, v in loss], label="train loss")
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
    return fig
