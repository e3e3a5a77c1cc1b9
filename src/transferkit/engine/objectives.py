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

An objective that needs more subclasses :class:`Objective` (an ``nn.Module``; ``forward(model, batch)``
does the maths). Its own trainable parameters (a DANN discriminator) are optimised with the model's,
saved in checkpoints and synchronised by DDP. The rest of the contract, all optional:

- ``frozen``: names of sub-module attributes (``("teacher",)``) that are constant for the run. The
  engine keeps them in eval mode (BatchNorm statistics do not move) with ``requires_grad`` off, moves
  them to the device itself and keeps them out of the optimizer, the checkpoints and the DDP wrapper
  (so a teacher used under ``no_grad`` cannot stall DDP's gradient reduction). They must not share
  parameters with the model. A part that changes during the run (an EMA teacher updated in
  ``after_step``) is not saved in checkpoints when frozen; a resumed run starts from its value at
  the start of the resumed call.
- ``param_groups(model)``: a list of ``{"params": [...], "lr_scale": s}`` dicts; each group's learning
  rate is ``s × TrainConfig.lr`` and follows the same schedule (warm-up, decay). Parameters named in no
  group train at ``lr_scale`` 1; a parameter may be in one group only; parameters that are not trained
  (frozen, or outside ``trainable``) are dropped from the groups. Weight decay still applies only to
  parameters with 2 or more dimensions, in every group. Example: a new head at 10× the body's lr,
  ``[{"params": list(model.head.parameters()), "lr_scale": 10.0}]``.
- ``before_step(step, total)`` and ``after_step(step, total, model)``: called around every optimizer
  step — ``before_step``, then the step's forward/backward passes, the optimizer step, then
  ``after_step`` — with ``step`` the 0-based index of that update (the same number for both) and
  ``total`` the planned number of updates. ``before_step`` sets scheduled coefficients (a
  gradient-reversal λ, see :class:`GradientReversal`); ``after_step`` receives the model (unwrapped,
  on the training device) for EMA teachers or stochastic restore, and may return ``True`` to end the
  run after this step (every process must return the same). Plain callables may carry these methods
  too.
- ``lr_factor(step, total) -> float``: when an objective defines it, the learning rate of update
  ``step`` is ``lr_factor(step, total) × lr`` (× each group's ``lr_scale``), replacing
  ``TrainConfig.scheduler`` and its warm-up (DANN's annealed ``μ0/(1 + αp)^β``).
- Per-sample outputs: ``forward`` may return ``(loss, logs, outputs)`` where ``outputs`` maps names to
  tensors whose first dimension is the batch (the first stream's batch for named streams), e.g. the
  predictions test-time adaptation makes while it adapts. The engine detaches them, gathers them
  from every process and returns them in :attr:`TrainResult.outputs` as ``(N, ...)`` tensors in the
  order of the first stream's dataset: a sample seen more than once (several epochs, or the
  wrap-around padding of a multi-process shard) holds the value of its latest step; a sample never
  seen holds NaN (-1 for integer outputs; booleans come back as int64). Outputs cover the steps of
  this call (not those before a resume).

Model selection
---------------
``train(..., metric=...)`` takes ``"accuracy"``, ``"loss"`` or a *scorer*: a callable
``scorer(model, val_data) -> float`` with a ``name`` (str; the history key is ``val_<name>``) and
``higher_is_better`` (bool). It receives ``val_data`` exactly as passed to ``train`` — label-free scorers
work on unlabelled data (inputs only) — and the model in eval mode under ``torch.no_grad()``; with
several processes each computes it on the whole data and rank 0's value is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

__all__ = ["Objective", "CrossEntropy", "KDObjective", "MaskedLM", "MultiTaskCE", "GradientReversal",
           "grad_reverse", "kd_loss", "mix_teachers", "forward", "logits_of"]


class Objective(nn.Module):
    """Base class of engine objectives: ``forward(model, batch) -> (mean loss, logs[, outputs])``.

    See the module docstring for ``frozen``, :meth:`param_groups`, the step hooks and per-sample
    outputs. The defaults declare nothing: no frozen parts, one parameter group, no-op hooks.
    """

    frozen: tuple[str, ...] = ()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups with their own lr: ``[{"params": [...], "lr_scale": s}, ...]``."""
        return []

    def before_step(self, step: int, total: int) -> None:
        """Called before the forward/backward passes of update ``step`` (0-based) of ``total``."""

    def after_step(self, step: int, total: int, model: nn.Module) -> bool | None:
        """Called after update ``step``; return True to end the run there."""
        return None

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self


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


class CrossEntropy(Objective):
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


# ------------------------------------------------------------------------------- gradient reversal
class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambda_ * grad, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by ``-lambda_`` (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, float(lambda_))


class GradientReversal(nn.Module):
    """:func:`grad_reverse` as a layer; set ``lambda_`` from an objective's ``before_step`` to schedule it."""

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)


# ------------------------------------------------------------------------------- distillation
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton KD: ``T² · mean_b KL(softmax(t_b/T) ‖ softmax(s_b/T))``; gradient ``(T/B)(p_s − p_t)``."""
    T = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits.to(student_logits.dtype) / T, -1),
                    reduction="batchmean", log_target=True) * T * T


def mix_teachers(teacher_logits: torch.Tensor, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Several teachers as one: ``T · log Σ_k w_k softmax(z_k / T)`` for ``(B, K, C)`` logits.

    Logits whose softmax at temperature ``T`` is the ``w``-weighted mixture of the teachers' softened
    distributions (``w`` uniform when None); :func:`kd_loss` on them distils from that mixture.
    """
    T = float(temperature)
    K = teacher_logits.shape[1]
    w = torch.full((K,), 1.0 / K) if weights is None else weights
    log_w = torch.log(w.to(device=teacher_logits.device, dtype=teacher_logits.dtype))
    return T * torch.logsumexp(F.log_softmax(teacher_logits / T, -1) + log_w[None, :, None], dim=1)


class KDObjective(Objective):
    """Distillation objective: ``soft_weight·kd_loss(student, teacher logits, T) + hard_weight·CE``.

    The teacher logits are ``batch["teacher_logits"]`` (computed beforehand, as Trans-LoRA does), or,
    when a ``teacher`` module is given, ``forward(teacher, batch["inputs"])`` under ``no_grad``
    (``batch["teacher_inputs"]`` instead of ``batch["inputs"]`` when present: a teacher with its own
    preprocessing). ``teacher`` may be a list of modules (several teachers, one frozen
    ``nn.ModuleList``; ``batch["teacher_inputs"]`` is then a list, one entry per teacher), and
    ``batch["teacher_logits"]`` may be ``(B, K, C)``: several teachers are distilled as the
    ``teacher_weights`` mixture of their softened distributions (:func:`mix_teachers`, uniform by default).
    The teacher is declared ``frozen``: eval mode, no gradient, outside the optimizer, the checkpoints and
    DDP. The cross-entropy term uses ``batch["labels"]`` where they are ≥ 0 (true labels of the seeds;
    synthetic rows carry -1). Logs ``kd``, ``ce`` and ``agreement`` (argmax student = argmax teacher).
    Hinton's ``α·CE + (1 − α)·T²·KL`` is ``hard_weight=α, soft_weight=1 − α``.
    """

    def __init__(self, temperature: float = 2.0, hard_weight: float = 0.0, teacher: nn.Module | list | None = None,
                 soft_weight: float = 1.0, teacher_weights: list[float] | None = None):
        super().__init__()
        if not float(temperature) > 0:
            raise ConfigError(f"KD temperature must be > 0, got {temperature}")
        if float(hard_weight) < 0:
            raise ConfigError(f"KD hard_weight must be >= 0, got {hard_weight}")
        if float(soft_weight) < 0:
            raise ConfigError(f"KD soft_weight must be >= 0, got {soft_weight}")
        self.temperature, self.hard_weight = float(temperature), float(hard_weight)
        self.soft_weight = float(soft_weight)
        self.several = isinstance(teacher, (list, tuple))
        self.teacher = nn.ModuleList(teacher) if self.several else teacher
        if teacher_weights is not None:
            w = torch.as_tensor(teacher_weights, dtype=torch.float32)
            if w.ndim != 1 or not bool((w >= 0).all()) or not float(w.sum()) > 0:
                raise ConfigError(f"KD teacher_weights must be non-negative with a positive sum, got {teacher_weights}")
            if self.several and len(w) != len(teacher):
                raise ConfigError(f"{len(w)} teacher_weights for {len(teacher)} teachers")
            self.teacher_weights = w / w.sum()
        else:
            self.teacher_weights = None
        self.frozen = ("teacher",) if teacher is not None else ()

    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The (mixed) teacher logits of ``batch``: (B, C)."""
        if self.teacher is None:
            z = batch["teacher_logits"]
        else:
            inputs = batch.get("teacher_inputs", batch["inputs"])
            with torch.no_grad():
                if self.several:
                    if "teacher_inputs" not in batch:
                        inputs = [inputs] * len(self.teacher)
                    z = torch.stack([forward(t, x) for t, x in zip(self.teacher, inputs)], 1)
                else:
                    z = forward(self.teacher, inputs)
        return mix_teachers(z, self.temperature, self.teacher_weights) if z.dim() == 3 else z

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = forward(model, batch["inputs"])
        teacher = self.teacher_logits(batch)
        kd = kd_loss(logits, teacher, self.temperature)
        loss, logs = self.soft_weight * kd, {"kd": kd.detach()}
        labels = batch.get("labels")
        if self.hard_weight > 0 and labels is not None:
            has = labels >= 0
            ce = F.cross_entropy(logits[has], labels[has]) if bool(has.any()) else logits.new_zeros(())
            loss = loss + self.hard_weight * ce * has.float().mean()
            logs["ce"] = ce.detach()
        with torch.no_grad():
            logs["agreement"] = (logits.argmax(-1) == teacher.argmax(-1)).float().mean()
        return loss, logs


# ------------------------------------------------------------------------------- masked LM
class MaskedLM(Objective):
    """Masked-language-model objective for BERT-style encoders.

    ``batch["inputs"]`` is tokenizer output (``input_ids``, ``attention_mask``, …); the model is a
    Hugging Face ``*ForMaskedLM``. Each real, non-special token is selected with ``probability``; of
    the selected, 80 % become ``mask_token_id``, 10 % a random token, 10 % stay (Devlin et al.); the
    loss is the cross-entropy on the selected tokens (at least one per batch). Logs ``mlm_accuracy``.
    Randomness comes from the global torch RNG, which the engine reseeds per step (reproducible).
    """

    def __init__(self, mask_token_id: int, vocab_size: int, special_ids: list[int] | tuple[int, ...] = (),
                 probability: float = 0.15):
        super().__init__()
        if not 0 < probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {probability}")
        self.mask_token_id, self.vocab_size = int(mask_token_id), int(vocab_size)
        self.special_ids = sorted({int(i) for i in special_ids})
        self.probability = float(probability)

    def mask_tokens(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maskable = attention.bool()
        for s in self.special_ids:
            maskable &= ids != s
        chosen = (torch.rand(ids.shape, device=ids.device) < self.probability) & maskable
        if not chosen.any() and maskable.any():  # at least one target per batch
            flat = torch.nonzero(maskable.reshape(-1)).reshape(-1)
            pick = flat[torch.randint(flat.numel(), (1,), device=ids.device)]
            chosen.view(-1)[pick] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        u = torch.rand(ids.shape, device=ids.device)
        masked = ids.clone()
        masked[chosen & (u < 0.8)] = self.mask_token_id
        rand = chosen & (u >= 0.8) & (u < 0.9)
        masked[rand] = torch.randint(self.vocab_size, (int(rand.sum()),), device=ids.device)
        return masked, labels

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = dict(batch["inputs"])
        ids, labels = self.mask_tokens(inputs["input_ids"], inputs["attention_mask"])
        inputs["input_ids"] = ids
        out = model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        with torch.no_grad():
            sel = labels != -100
            acc = (logits.argmax(-1)[sel] == labels[sel]).float().mean()
        return loss, {"mlm_accuracy": acc}


# ------------------------------------------------------------------------------- multi-task
class MultiTaskCE(Objective):
    """Mean cross-entropy over rows, each scored by its own task's head (batch key ``task_ids``).

    The model has ``features(inputs, task_ids)`` and ``heads`` indexed by task id (the
    ``MultiTaskClassifier`` of :mod:`transferkit.tune.scalearn`). Logs ``accuracy``.
    """

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        tids, labels = batch["task_ids"], batch["labels"]
        feats = model.features(batch["inputs"], tids)
        loss = feats.new_zeros(())
        correct = feats.new_zeros(())
        for t in torch.unique(tids).tolist():
            rows = tids == t
            logits = model.heads[t](feats[rows])
            loss = loss + F.cross_entropy(logits, labels[rows], reduction="sum")
            correct = correct + (logits.argmax(-1) == labels[rows]).float().sum()
        n = max(int(labels.shape[0]), 1)
        return loss / n, {"accuracy": correct / n}
