"""Objectives: small objects that turn a batch into ``(loss, logs)``.

The engine owns the loop (devices, accumulation, clipping, checkpoints); an objective owns the maths.
Methods compose objectives instead of writing loops.

Batch convention
----------------
A batch is a dict. For a single labelled dataset it is ``{"inputs": X, "labels": y}`` where ``X`` is a
tensor or a dict of tensors. When ``train`` is given several named streams (for example
``{"source": labelled, "target": unlabelled}`` for domain adaptation) the batch is
``{"source": {...}, "target": {...}}``.

Models are called through :func:`forward`: a tensor input is passed positionally, ``model(X)``; a dict
input is passed as keyword arguments, ``model(**X)`` (the Hugging Face convention, so tokenizer output
works as is). The output may be a logits tensor, a dict with ``"logits"`` or an object with a
``.logits`` attribute (Hugging Face ``ModelOutput``).

Writing an objective
--------------------
Any callable ``objective(model, batch) -> (loss, logs)`` works. ``loss`` is a scalar tensor, the *mean*
over the batch (the engine weights micro-batches by their size, so accumulation matches a big batch).
``logs`` maps names to floats or 0-dim tensors (tensors avoid a device sync per step); they are averaged
into the training history as ``train_<name>``.

An objective that is an ``nn.Module`` may hold its own modules: its trainable parameters are optimised
with the model's and saved in checkpoints, frozen ones (a KD teacher) are moved to the device and left
alone. The engine calls ``objective.train(mode)`` with the model's mode; override ``train`` to keep a
teacher in eval mode. An optional ``objective.on_step(step, total_steps)`` is called before every
optimizer step (for schedules such as the DANN gradient-reversal weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError

__all__ = ["Objective", "CrossEntropy", "forward", "logits_of"]


@runtime_checkable
class Objective(Protocol):
    """Turns ``(model, batch)`` into ``(mean loss, logs)``."""

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]: ...


def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on ``inputs`` (``model(**inputs)`` for a dict, else ``model(inputs)``); return logits."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return logits_of(out)


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a model output (tensor, ``{"logits": ...}`` or ``.logits``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"cannot find logits in model output of type {type(out).__name__}")


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    if "labels" not in batch:
        raise DataError(f"batch has no 'labels' (keys: {sorted(batch)})")
    return batch["labels"]


class CrossEntropy(nn.Module):
    """Mean cross-entropy of ``forward(model, batch["inputs"])`` against ``batch["labels"]``.

    Parameters
    ----------
    label_smoothing : float
        Passed to :func:`torch.nn.functional.cross_entropy`.
    class_weight : sequence of float, optional
        Per-class weights (length C).

    Logs ``accuracy`` of the batch.

    Examples
    --------
    >>> loss, logs = CrossEntropy()(model, {"inputs": x, "labels": y})  # doctest: +SKIP
    """

    def __init__(self, label_smoothing: float = 0.0, class_weight=None):
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        if class_weight is not None:
            self.register_buffer("class_weight", torch.as_tensor(class_weight, dtype=torch.float32))
        else:
            self.class_weight = None

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = forward(model, batch["inputs"])
        labels = _labels(batch)
        weight = self.class_weight.to(logits.dtype) if self.class_weight is not None else None
        loss = F.cross_entropy(logits.float() if logits.dtype == torch.float16 else logits, labels,
                               weight=weight, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"accuracy": acc}
