"""What the loop optimises and how fast: the ``trainable`` selection, the objective's lr-scaled parameter
groups, the optimizer (weight decay on ≥ 2-D parameters only) and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["lr_factor"]


def _select_trainable(model: nn.Module, trainable: Any) -> dict[str, bool]:
    """Apply a ``trainable`` selection to requires_grad; return the flags to restore afterwards."""
    if trainable is None:
        return {}
    if isinstance(trainable, (str, nn.Parameter)):
        trainable = [trainable]
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    chosen: set[str] = set()
    if callable(trainable) and not isinstance(trainable, nn.Module):
        chosen = {n for n, p in named.items() if trainable(n, p)}
        if not chosen:
            raise ConfigError("the trainable predicate selects no parameter of the model")
        trainable = []
    for item in trainable:
        if isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ConfigError("a trainable parameter does not belong to the model")
            chosen.add(by_id[id(item)])
        elif isinstance(item, str):
            hits = [n for n in named if n == item or n.startswith(item.rstrip(".") + ".")]
            if not hits:
                raise ConfigError(f"trainable name {item!r} matches no parameter of the model")
            chosen.update(hits)
        else:
            raise ConfigError(f"trainable entries must be parameter names or parameters, got {type(item).__name__}")
    saved = {n: p.requires_grad for n, p in named.items()}
    for n, p in named.items():
        p.requires_grad_(n in chosen)
    return saved


def _lr_groups(objective: Any, model: nn.Module, params: list[nn.Parameter]) -> list[tuple[float, list]]:
    """``(lr_scale, params)`` groups: the objective's ``param_groups(model)``, the rest at scale 1 first."""
    spec = objective.param_groups(model) if hasattr(objective, "param_groups") else []
    trained = {id(p) for p in params}
    owned = {id(p) for m in (model, objective) if isinstance(m, nn.Module) for p in m.parameters()}
    placed: set[int] = set()
    groups = []
    for g in spec or []:
        if not isinstance(g, Mapping) or "params" not in g or set(g) - {"params", "lr_scale"}:
            raise ConfigError("param_groups must return dicts with 'params' and optionally 'lr_scale'")
        scale = g.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ConfigError(f"param group lr_scale must be a positive number, got {scale!r}")
        chosen = []
        for p in g["params"]:
            if id(p) not in owned:
                raise ConfigError("a parameter group holds a parameter of neither the model nor the objective "
                                  "(frozen parts are not trained)")
            if id(p) in placed:
                raise ConfigError("a parameter is in more than one parameter group")
            placed.add(id(p))
            if id(p) in trained:
                chosen.append(p)
        groups.append((float(scale), chosen))
    return [(1.0, [p for p in params if id(p) not in placed])] + groups


def _build_optimizer(config: TrainConfig, lr_groups: list[tuple[float, list]]) -> torch.optim.Optimizer:
    groups = []
    for scale, params in lr_groups:
        for ps, wd in (([p for p in params if p.ndim >= 2], config.weight_decay),
                       ([p for p in params if p.ndim < 2], 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": config.lr * scale, "lr_scale": scale})
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr for update ``step`` (0-based) of ``total`` with ``warmup`` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * frac))
