"""The training engine: one loop on Hugging Face Accelerate, driven by objectives.

>>> from transferkit.engine import train, evaluate, TrainConfig, CrossEntropy
>>> result = train(model, (X, y), CrossEntropy(), TrainConfig(epochs=3), val_data=(Xv, yv))  # doctest: +SKIP

See :mod:`transferkit.engine.loop` for determinism, resume and multi-process launching, and
:mod:`transferkit.engine.objectives` for the batch convention and how to write an objective.
"""

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import TrainConfig, TrainingDiverged, TrainResult
from .loop import evaluate, is_main_process, lr_factor, select_with, train, watch, world_size
from .objectives import (
    CrossEntropy,
    GradientReversal,
    KDObjective,
    MaskedLM,
    MultiTaskCE,
    Objective,
    forward,
    grad_reverse,
    kd_loss,
    logits_of,
)

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "TrainResult",
    "train",
    "watch",
    "select_with",
    "evaluate",
    "lr_factor",
    "is_main_process",
    "world_size",
    "Objective",
    "CrossEntropy",
    "KDObjective",
    "MaskedLM",
    "MultiTaskCE",
    "GradientReversal",
    "grad_reverse",
    "kd_loss",
    "forward",
    "logits_of",
    "latest_checkpoint",
    "list_checkpoints",
]
