"""The engine's options and results: :class:`TrainConfig` (validated at construction), :class:`TrainResult`
and :class:`TrainingDiverged`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "DIVERGED", "MAXIMA"]

_OPTIMIZERS = ("adamw", "adam", "sgd")
_SCHEDULERS = ("linear", "cosine", "constant")
_PRECISIONS = ("no", "fp16", "bf16")
# a training loss this many times its first value (at least 1) means the run diverged
DIVERGED = 1e6
# sane maxima: a value past one of these is a typo (``--epochs 1000000000000`` would run for millions of
# hours), refused before anything starts
MAXIMA = {"epochs": 100_000, "max_steps": 100_000_000, "batch_size": 2**20, "eval_batch_size": 2**20,
          "grad_accum": 2**16, "num_workers": 1024, "keep_checkpoints": 10_000}


class TrainingDiverged(ConfigError):
    """The training loss became NaN, infinite or :data:`DIVERGED` times its first value (at least 1).

    The run stops before the optimizer step that would use that loss.

    A bad-input error (CLI exit 2) like every ConfigError: almost always the learning rate is too high.
    """


# --------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Options of :func:`train`. Invalid values raise a one-line :class:`ConfigError`.

    Parameters
    ----------
    epochs : passes over the (first) training stream; ignored when ``max_steps`` is set.
    max_steps : total optimizer steps; overrides ``epochs``.
    batch_size : samples per micro-batch *per process*.
    eval_batch_size : batch size of evaluation.
    lr, weight_decay : learning rate; decoupled weight decay (adamw) or L2 (adam, sgd), applied to
        parameters with 2 or more dimensions only (not to biases and norm scales).
    optimizer : ``adamw`` | ``adam`` | ``sgd``; ``momentum`` is used by sgd.
    scheduler : ``linear`` | ``cosine`` | ``constant``, after ``warmup_ratio * total_steps`` steps of
        linear warm-up. The lr of update ``s`` (0-based) is ``lr * (s+1)/(W+1)`` for ``s < W``, then
        ``lr * (T-s)/(T-W)`` (linear) or ``lr * (1 + cos(pi (s-W)/(T-W)))/2`` (cosine).
    grad_accum : micro-batches per optimizer step; micro-batch losses are weighted by their size so
        that ``grad_accum=k`` with ``batch_size=b`` gives the update of one batch of ``k*b``.
    max_grad_norm : clip the global gradient norm (None: no clipping).
    mixed_precision : ``no`` | ``fp16`` | ``bf16`` (Accelerate autocast; fp16 uses a grad scaler).
    eval_every : evaluate every N steps (None: at the end of each epoch); always also at the end.
    early_stopping_patience : stop after this many evaluations without improvement of the metric and
        restore the best weights.
    restore_best : restore the best weights at the end even without early stopping.
    checkpoint_every : write a checkpoint every N steps (and at the end) when ``out_dir`` is given.
    keep_checkpoints : how many complete checkpoints to keep.
    log_every : steps between training-loss records in the history.
    seed : seeds data order and the per-step RNG.
    shuffle : shuffle the training data each epoch.
    num_workers : DataLoader worker processes.
    cpu : force the CPU even when a GPU is present.
    progress : progress bar on stderr (main process only).

    Maxima (:data:`MAXIMA`): ``epochs`` ≤ 100 000, ``max_steps`` ≤ 10⁸, ``batch_size`` and
    ``eval_batch_size`` ≤ 2²⁰, ``grad_accum`` ≤ 2¹⁶, ``num_workers`` ≤ 1024, ``keep_checkpoints`` ≤ 10 000.
    """

    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.0
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    eval_every: int | None = None
    early_stopping_patience: int | None = None
    restore_best: bool = False
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    cpu: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f.name, str(f.type), getattr(self, f.name)))
        _at_least(self, 1, "epochs", "batch_size", "eval_batch_size", "grad_accum", "keep_checkpoints",
                  "log_every", "max_steps", "eval_every", "early_stopping_patience", "checkpoint_every")
        _at_least(self, 0, "num_workers", "seed")
        for name, high in MAXIMA.items():
            value = getattr(self, name)
            if value is not None and value > high:
                raise ConfigError(f"train option {name} must be at most {high:_}, got {value:_}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"train option lr must be a positive number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"train option weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train option momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train option warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"train option max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        for name, allowed in (("optimizer", _OPTIMIZERS), ("scheduler", _SCHEDULERS),
                              ("mixed_precision", _PRECISIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"train option {name} must be one of {', '.join(allowed)}, got {value!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TrainConfig:
        """Build from a mapping (a YAML section); unknown keys raise ConfigError."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"train options must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown train option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, annotation: str, value: Any) -> Any:
    optional = "None" in annotation
    kind = annotation.split("|")[0].strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"train option {name} must not be null")
    bad = ConfigError(f"train option {name} must be {'a' if kind != 'int' else 'an'} {kind}"
                      f"{' or null' if optional else ''}, got {value!r}")
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad
        return bool(value)
    if isinstance(value, (bool, np.bool_)):
        raise bad
    if kind == "int":
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, (int, float, np.integer, np.floating)):
            return float(value)
        raise bad
    if kind == "str":
        if isinstance(value, str):
            return value
        raise bad
    return value


def _at_least(cfg: TrainConfig, low: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"train option {name} must be >= {low}, got {value}")


@dataclass
class TrainResult:
    """What :func:`train` returns (the model itself is trained in place).

    metrics : final metrics: ``val_<name>`` of the returned weights (best ones when restored),
        ``train_loss`` (last record), ``steps``, ``best_step``, ``stopped_early``, ``world_size``.
    history : one record per log/eval point: ``step``, ``epoch``, ``lr``, ``train_*``, ``val_*``.
    best_step : step of the best evaluation (the last step without validation data).
    steps : optimizer steps done.
    out_dir : where ``history.json``, ``metrics.json`` and ``checkpoints/`` were written.
    stopped_early : early stopping or an objective's ``after_step`` ended the run before ``total``.
    outputs : the objective's per-sample outputs, ``(N, ...)`` tensors in the order of the first
        stream's dataset (see :mod:`.objectives`); empty when the objective returns none.
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_step: int
    steps: int
    out_dir: Path | None = None
    stopped_early: bool = False
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
