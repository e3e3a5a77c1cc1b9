"""aTLAS: learned anisotropic scaling of task vectors.

Zhang, Lin, Fang, Tian, Gould, Zhang, "Knowledge Composition using Task Vectors with Learned
Anisotropic Scaling", NeurIPS 2024 (reference code: fredzzhang/atlas, ``src/composition.py``
``WeightedImageEncoder``, ``src/learn_task_addition.py``, ``src/learn_few_shots.py``).

With base weights θ0 and task vectors τ_t (``full`` :class:`~transferkit.delta.Delta` objects of one
base), the composed model is

    θ_b = θ0_b + Σ_t λ_{t,b} · τ_{t,b}

for every parameter **block** b (one tensor of the state dict, as in the paper), with one learned
coefficient per task per block; only the T × #blocks coefficients are trained, by gradient descent
on a small labelled set, and the base stays frozen. Variants:

- ``blockwise=False``: one scalar per task (learned, isotropic task arithmetic);
- ``partition=K`` ("aTLAS × K"): every block is split into K random groups of elements (a seeded
  assignment, fixed), each with its own coefficient: T × #blocks × K parameters.

Implementation. :class:`AnisotropicScaling` wraps the base model; its forward builds the composed
parameters and runs the base through :func:`torch.func.functional_call`, so the base is never
modified and the deltas are never materialised as parameters (they are buffers; the only
``nn.Parameter`` is ``coef`` of shape (T, B, K)). Autograd then gives ∂L/∂λ_{t,b} =
⟨∂L/∂θ_b, τ_{t,b}⟩ (restricted to the group for K > 1). Coefficients start at ``init`` (0, as the
reference: the model starts as the base).

Training (:func:`fit_atlas`). Defaults from the reference: AdamW, lr 1e-3, weight decay 0.1, cosine
schedule; the reference trains 20 epochs on validation splits (task addition) or on k shots per
class (few-shot, :func:`few_shot`). Optional L1 penalty ``l1·Σ|λ|``. It runs on
:func:`transferkit.engine.train` (the composed module is an ordinary ``nn.Module`` whose only
trainable parameter is ``coef``).

Which tensors. Blocks are the base model's **parameters** that some Delta changes (Delta tensors
that are buffers — BatchNorm statistics — are left at the base and listed in ``skipped``; heads
``new.`` are not composed: attach the task's frozen head to the base model before wrapping, as the
paper does with frozen zero-shot heads). ``lora``/``sparse`` Deltas are densified.

Task negation (:func:`fit_negation`, the reference's ``src/learn_task_negation.py``): coefficients on
the target's task vector, from 0, trained by gradient *ascent* on the target's cross-entropy and
descent on a control set's (loss = −L_target + L_control, one target batch and one control batch per
step), AdamW (weight decay 0.1) with gradient-norm clipping at 1, constant lr (default 5e-3: the
reference uses 1e-3 times a per-dataset multiplier of 2–10, for 2–20 epochs); after every epoch the
model is evaluated and the coefficients with the lowest target accuracy whose every control keeps
≥ ``keep`` (0.95) of its accuracy at λ = 0 are kept; training stops at the first epoch where a
control falls below that. It runs on :func:`transferkit.engine.train` with the two streams
``{"target": ..., "control": ...}`` (an epoch is a pass over the target data; the control data cycles
in its own seeded order) and the per-epoch evaluation in the objective's ``after_step`` hook. The
reference trains and selects on the validation splits; so does the benchmark
(``benchmarks/merge_negation_pretrained.py``), which reports test on disjoint data.

Not implemented: the linearised (tangent / JVP) variant, LP++/Tip-adapter combinations and the
unsupervised test-time objective (``learn_ufm.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..delta import Delta
from ..engine import CrossEntropy, Objective, TrainConfig, train
from ..errors import ConfigError
from ._common import body, check_deltas


class AnisotropicScaling(nn.Module):
    """Base model + task vectors with learned per-task, per-block (per-partition) coefficients.

    Parameters
    ----------
    model : the base model θ0 (left unchanged; its parameters are frozen while wrapped).
    deltas : task vectors of that base (``full``/``lora``/``sparse`` Deltas).
    blockwise : one coefficient per block (True) or one per task (False).
    partition : K ≥ 1 random element groups per block, each with its own coefficient.
    init : initial value of every coefficient (0: the composed model equals the base).
    seed : seeds the random partition.
    """

    def __init__(self, model: nn.Module, deltas: Sequence[Delta], *, blockwise: bool = True, partition: int = 1,
                 init: float = 0.0, seed: int = 0):
        super().__init__()
        deltas = check_deltas(deltas, "aTLAS")
        if not isinstance(partition, int) or partition < 1:
            raise ConfigError(f"aTLAS: partition must be an integer >= 1, got {partition!r}")
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        bodies = [body(d)[0] for d in deltas]
        names = [n for n in params if any(n in b for b in bodies)]
        if not names:
            raise ConfigError("aTLAS: no Delta tensor matches a parameter of the model")
        self.skipped = sorted({k for b in bodies for k in b if k not in params})
        self.block_names = names
        self.n_tasks = len(deltas)
        self.blockwise = bool(blockwise)
        self.partition = partition
        self.base_name = deltas[0].base
        n_blocks = len(names) if blockwise else 1
        self.coef = nn.Parameter(torch.full((self.n_tasks, n_blocks, partition), float(init)))
        g = torch.Generator().manual_seed(int(seed))
        for i, name in enumerate(names):
            p = params[name]
            taus = []
            for b in bodies:
                t = b.get(name)
                if t is not None and t.shape != p.shape:
                    raise ConfigError(f"aTLAS: delta tensor {name!r} has shape {tuple(t.shape)}, "
                                      f"model has {tuple(p.shape)}")
                taus.append(torch.zeros_like(p) if t is None else t.to(dtype=p.dtype, device=p.device))
            self.register_buffer(f"tau_{i}", torch.stack(taus), persistent=False)
            if partition > 1:
                groups = torch.randint(partition, p.shape, generator=g).to(p.device)
                self.register_buffer(f"groups_{i}", groups, persistent=False)

    # ------------------------------------------------------------------ composition
    def _block(self, i: int) -> int:
        return i if self.blockwise else 0

    def delta_tensor(self, i: int) -> torch.Tensor:
        """Σ_t λ_{t,b} τ_{t,b} for block i (differentiable in ``coef``)."""
        tau = getattr(self, f"tau_{i}")
        c = self.coef[:, self._block(i)].to(tau.dtype)       # (T, K)
        if self.partition == 1:
            return torch.tensordot(c[:, 0], tau, dims=1)
        groups = getattr(self, f"groups_{i}")
        return (c[:, groups] * tau).sum(dim=0)               # per-element coefficient of its group

    def composed_parameters(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n] + self.delta_tensor(i) for i, n in enumerate(self.block_names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.composed_parameters(), args, kwargs, strict=False)

    # ------------------------------------------------------------------ results
    @property
    def n_trainable(self) -> int:
        """T × #blocks × K (T × K with ``blockwise=False``)."""
        return self.coef.numel()

    def coefficients(self) -> dict[str, Any]:
        """``{"task_i": {block: λ or [λ_1..λ_K]}}`` (one entry ``"*"`` when not blockwise)."""
        c = self.coef.detach().cpu()
        names = self.block_names if self.blockwise else ["*"]
        return {f"task_{t}": {n: (float(c[t, b, 0]) if self.partition == 1 else c[t, b].tolist())
                              for b, n in enumerate(names)} for t in range(self.n_tasks)}

    @torch.no_grad()
    def merged_delta(self) -> Delta:
        """The learned composition Σ_t Σ_b λ_{t,b} τ_{t,b} as a ``full`` Delta of the base."""
        tensors = {n: self.delta_tensor(i).detach().clone().cpu() for i, n in enumerate(self.block_names)}
        meta = {"method": "atlas", "blockwise": self.blockwise, "partition": self.partition,
                "n_tasks": self.n_tasks, "n_trainable": self.n_trainable, "skipped": self.skipped,
                "coefficients": self.coefficients()}
        return Delta(self.base_name, "full", tensors, meta)

    @torch.no_grad()
    def merged_model(self) -> nn.Module:
        """A deep copy of the base with the learned composition added (an ordinary model)."""
        import copy

        m = copy.deepcopy(self.model)
        params = dict(m.named_parameters())
        for i, n in enumerate(self.block_names):
            params[n].add_(self.delta_tensor(i).to(params[n].dtype))
        return m


# ---------------------------------------------------------------------- data and training
def few_shot(X: Any, y: Any, shots: int, seed: int = 0) -> tuple[Any, Any]:
    """``shots`` examples per class of ``(X, y)`` (seeded, classes in sorted order; all of a rarer class)."""
    y_t = torch.as_tensor(y)
    if shots < 1:
        raise ConfigError(f"few_shot: shots must be >= 1, got {shots}")
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in torch.unique(y_t).tolist():
        idx = torch.nonzero(y_t == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    sel = torch.sort(torch.cat(picked)).values
    if isinstance(X, dict):
        return {k: v[sel] for k, v in X.items()}, y_t[sel]
    return torch.as_tensor(X)[sel] if not isinstance(X, torch.Tensor) else X[sel], y_t[sel]


@dataclass
class AtlasResult:
    """What :func:`fit_atlas` learned."""

    delta: Delta
    coefficients: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


class _PenalisedObjective(nn.Module):
    def __init__(self, objective: Callable, composer: AnisotropicScaling, l1: float):
        super().__init__()
        self.objective = objective
        self.l1 = l1
        self._composer = [composer]  # not a submodule (its coef must be optimised once)

    def forward(self, model, batch):
        loss, logs = self.objective(model, batch)
        if self.l1:
            loss = loss + self.l1 * self._composer[0].coef.abs().sum()
        return loss, logs


def fit_atlas(composer: AnisotropicScaling, train_data: Any, objective: Callable | None = None, *,
              epochs: int = 20, lr: float = 1e-3, weight_decay: float = 0.1, batch_size: int = 32,
              l1: float = 0.0, seed: int = 0, val_data: Any = None, progress: bool = False) -> AtlasResult:
    """Learn the coefficients of ``composer`` on ``train_data`` (``(X, y)`` or any engine dataset).

    ``objective(model, batch) -> (loss, logs)`` defaults to cross-entropy. Trains with
    :func:`transferkit.engine.train` (AdamW, cosine schedule, no clipping, on the CPU). Returns the
    learned Delta and coefficients.
    """
    if not isinstance(composer, AnisotropicScaling):
        raise ConfigError("fit_atlas takes an AnisotropicScaling module")
    objective = CrossEntropy() if objective is None else objective
    penalised = _PenalisedObjective(objective, composer, float(l1))
    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      scheduler="cosine", max_grad_norm=None, progress=progress, cpu=True)
    res = train(composer, train_data, penalised, cfg, val_data=val_data, trainable=["coef"])
    composer.eval()
    return AtlasResult(composer.merged_delta(), composer.coefficients(), res.history)


@dataclass
class NegationResult:
    """What :func:`fit_negation` kept: the learned Σ_b λ_b τ_b (zero if no epoch qualified)."""

    delta: Delta
    coefficients: dict[str, Any]
    epoch: int  # the kept epoch; 0 = none qualified (the base model)
    history: list[dict[str, Any]] = field(default_factory=list)


def fit_negation(composer: AnisotropicScaling, target_data: tuple[Any, Any], control_data: tuple[Any, Any],
                 objective: Callable, evaluate: Callable, *, epochs: int = 10, lr: float = 5e-3,
                 weight_decay: float = 0.1, batch_size: int = 16, keep: float = 0.95, max_grad_norm: float = 1.0,
                 seed: int = 0) -> NegationResult:
    """aTLAS task negation: learn coefficients that forget the target task while keeping the controls.

    ``composer`` wraps the base with the target's task vector(s). ``target_data`` and ``control_data``
    are ``(X, y)`` (X a tensor or a dict of tensors indexed by example). ``objective(model, batch) ->
    (loss, logs)`` is the cross-entropy used for both (it may read per-example task ids from X to
    pick heads). ``evaluate(composer) -> (target_acc, {control: acc})`` scores the current
    composition; it is called at λ = 0 and after every epoch.
    """
    if not isinstance(composer, AnisotropicScaling):
        raise ConfigError("fit_negation takes an AnisotropicScaling module")
    if not 0 < keep <= 1:
        raise ConfigError(f"fit_negation: keep must be in (0, 1], got {keep}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"fit_negation: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    (Xt, yt), (Xc, yc) = target_data, control_data
    yt, yc = torch.as_tensor(yt), torch.as_tensor(yc)
    if len(yt) == 0 or len(yc) == 0:
        raise ConfigError("fit_negation: the target and the control data must both hold examples")

    composer.eval()
    t0, c0 = evaluate(composer)
    steps_per_epoch = math.ceil(len(yt) / batch_size)
    negation = _Negation(objective, evaluate, steps_per_epoch, dict(c0), keep,
                         best=(float(t0), 0, composer.coef.detach().clone()))
    negation.history.append({"epoch": 0, "target_acc": float(t0), "control_acc": dict(c0)})
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, scheduler="constant",
                      max_grad_norm=max_grad_norm, seed=seed, log_every=steps_per_epoch,
                      cpu=composer.coef.device.type == "cpu", progress=False)
    res = train(composer, {"target": (Xt, yt), "control": (Xc, yc)}, negation, cfg, trainable=["coef"])
    for rec in res.history:  # the epoch means of the two losses, as the engine logged them
        if "train_target" in rec and rec["step"] % steps_per_epoch == 0:
            negation.history[rec["step"] // steps_per_epoch].update(
                target_loss=rec["train_target"], control_loss=rec["train_control"])
    _, epoch, coef = negation.best
    with torch.no_grad():
        composer.coef.copy_(coef)
    composer.eval()
    return NegationResult(composer.merged_delta(), composer.coefficients(), epoch, negation.history)


class _Negation(Objective):
    """``−L_target + L_control`` on a ``{"target", "control"}`` batch; evaluates after every epoch.

    Keeps the coefficients of the epoch with the lowest target accuracy whose controls are kept, and
    ends the run (``after_step`` returns True) at the first epoch where a control falls. A loss
    function that is an ``nn.Module`` is declared frozen: only the coefficients are trained.
    """

    def __init__(self, loss_fn: Callable, evaluate: Callable, steps_per_epoch: int, c0: dict, keep: float,
                 best: tuple):
        super().__init__()
        self.loss_fn, self.evaluate = loss_fn, evaluate
        self.frozen = ("loss_fn",) if isinstance(loss_fn, nn.Module) else ()
        self.steps_per_epoch, self.c0, self.keep, self.best = steps_per_epoch, c0, keep, best
        self.history: list[dict[str, Any]] = []

    def forward(self, model, batch):
        lt, _ = self.loss_fn(model, batch["target"])
        lc, _ = self.loss_fn(model, batch["control"])
        return -lt + lc, {"target": lt.detach(), "control": lc.detach()}

    def after_step(self, step, total, model):
        if (step + 1) % self.steps_per_epoch:
            return None
        epoch = (step + 1) // self.steps_per_epoch
        model.eval()
        t_acc, c_acc = self.evaluate(model)
        model.train()
        kept = all(c_acc[k] >= self.keep * self.c0[k] - 1e-12 for k in self.c0)
        self.history.append({"epoch": epoch, "target_acc": float(t_acc), "control_acc": dict(c_acc),
                             "controls_kept": kept})
        if kept and t_acc < self.best[0]:
            self.best = (float(t_acc), epoch, model.coef.detach().clone())
        return not kept


__all__ = ["AnisotropicScaling", "fit_atlas", "few_shot", "AtlasResult", "fit_negation", "NegationResult"]
