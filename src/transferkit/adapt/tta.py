"""Test-time adaptation on a stream of unlabelled target batches: BN re-estimation, Tent, CoTTA and a
periodic-reset baseline.

Every method predicts *online*, as the papers do: each batch of the stream is predicted when it arrives,
by the model as adapted so far (Tent and CoTTA: the forward pass that also gives the batch's loss, before
the update), and the predictions of the whole stream are what is scored. The stream is the held-out target
part, in a seeded random order (``shuffle``; the held-out items of a class-sorted dataset would otherwise
arrive one class at a time). The source model is the given model fine-tuned on the labelled source
(:class:`~._common.SourceOptions`; ``source_epochs=0`` keeps the model's own head). Deviation: dropout is
off during adaptation (the references put the whole model in train mode), so the online predictions are
deterministic. A stream whose last batch would hold one item is refused (batch statistics of one item are
degenerate).

- ``bn`` — BatchNorm statistics re-estimated on the target (Schneider et al., "Improving robustness against
  common corruptions by covariate shift adaptation", NeurIPS 2020; the "BN" baseline of Tent and CoTTA).
  Deviation: instead of each batch's own statistics, every BN layer normalises with the exact mean and
  (unbiased) variance of *all* target items seen so far, the current batch included; at the end of the
  stream they are the statistics of the whole stream (exactly so for the first BN layer; a deeper layer's
  inputs depended on the earlier layers' statistics when they were accumulated). No parameter changes.
- ``tent`` — Tent (Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy
  Minimization", ICLR 2021): one Adam step (lr 1e-3, β = (0.9, 0.999), no weight decay) per batch on the
  mean prediction entropy, only the BN affine parameters (γ, β) trainable, BN on batch statistics
  (running statistics dropped). Batch 200 (the reference's CIFAR-10-C configuration).
- ``cotta`` — CoTTA (Wang, Fink, Van Gool, Dai, "Continual Test-Time Domain Adaptation", CVPR 2022): the
  student (all parameters trainable, BN on batch statistics) learns from an EMA teacher (momentum 0.999)
  with the soft cross-entropy −Σ p_teacher log p_student; when the frozen source anchor's mean max-probability
  on the batch is below ``anchor_threshold`` (0.92) the teacher's target is the mean of its logits over 32
  augmented views, else its clean prediction; after each step every parameter element is restored to its
  source value with probability 0.01. Adam lr 1e-3, batch 200; predictions are the teacher's. Deviation:
  the augmentations are ours for small images (random affine ±15°, ±10 % translation, 0.9–1.1 scale,
  brightness/contrast ±20 %, Gaussian noise σ 0.05 on the normalised input; no flips: digits), applied to
  the preprocessed tensor, not CoTTA's CIFAR pipeline.
- ``reset`` — periodic reset (Press et al., "RDumb: A simple approach that questions our progress in
  continual test-time adaptation", NeurIPS 2023): Tent whose model *and optimiser* return to the source
  state every ``reset_every`` batches (RDumb's 1000); a stream shorter than that is plain Tent.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..engine import Objective, TrainConfig, forward, train
from ..errors import ConfigError, DataError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ._common import STAGE, Fitted, SourceOptions, predict_logits, source_model

__all__ = ["BNOptions", "TentOptions", "CoTTAOptions", "ResetOptions", "configure_bn", "bn_affine_names",
           "BNReestimate", "TentObjective", "CoTTAObjective", "augment", "entropy", "stream_order"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class BNOptions(SourceOptions):
    batch_size: int = option(200, low=2, help="items per stream batch")
    shuffle: bool = option(True, help="stream the held-out items in a seeded random order")


@dataclass
class TentOptions(BNOptions):
    lr: float = option(1e-3, low=0.0, low_open=True, help="Adam lr")


@dataclass
class ResetOptions(TentOptions):
    reset_every: int = option(1000, low=1, help="batches between resets to the source model and optimiser")


@dataclass
class CoTTAOptions(TentOptions):
    ema: float = option(0.999, low=0.0, high=1.0, help="teacher EMA momentum")
    anchor_threshold: float = option(0.92, low=0.0, high=1.0, help="augment when the anchor's mean confidence "
                                     "is below this")
    n_augment: int = option(32, low=1, help="augmented views averaged for the teacher's target")
    restore: float = option(0.01, low=0.0, high=1.0, help="probability of restoring each element to its source value")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def configure_bn(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm layer normalise with the statistics of the batch it sees, in train and eval mode
    (running statistics dropped, as Tent and CoTTA do); return the layers."""
    layers = [m for m in model.modules() if isinstance(m, _BN)]
    for m in layers:
        m.track_running_stats = False
        m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
    return layers


def bn_affine_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorm affine parameters (γ, β) of ``model``."""
    return [f"{name}.{p}" if name else p for name, m in model.named_modules() if isinstance(m, _BN) and m.affine
            for p in ("weight", "bias")]


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def stream_order(n: int, batch_size: int, shuffle: bool, seed: int) -> np.ndarray:
    """The order the ``n`` held-out items arrive in; refuses a last batch of one item."""
    if n == 0:
        raise DataError("the target stream is empty")
    if n % batch_size == 1:
        raise ConfigError(f"the stream of {n} items in batches of {batch_size} ends with a one-item batch, whose "
                          "BatchNorm statistics are degenerate; choose another batch_size")
    return np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)


class BNReestimate:
    """Online BN re-estimation: every BN layer normalises with the exact mean and unbiased variance of all
    inputs it has seen (sums kept in float64), updated before each batch is normalised."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, _BN)]
        if not self.layers:
            raise ConfigError("the model has no BatchNorm layer: BN re-estimation has nothing to re-estimate")
        self.sums: dict[int, list] = {}

    def __enter__(self) -> BNReestimate:
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
        n, s1, s2 = self.sums.get(id(module), (0, 0.0, 0.0))
        n, s1, s2 = n + x.shape[1], s1 + x.sum(1), s2 + (x * x).sum(1)
        self.sums[id(module)] = (n, s1, s2)
        mean = s1 / n
        var = (s2 - n * mean * mean) / max(n - 1, 1)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var.clamp(min=0))


class TentObjective(Objective):
    """Mean prediction entropy of the batch; per-sample output ``prediction`` (the argmax of this forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._dropouts = _dropouts(model)

    def forward(self, model: nn.Module, batch: dict[str, Any]):
        for m in self._dropouts:
            m.eval()
        logits = forward(model, batch["inputs"])
        ent = entropy(logits)
        return ent.mean(), {"entropy": ent.mean().detach()}, {"prediction": logits.argmax(-1)}


def augment(x: torch.Tensor) -> torch.Tensor:
    """CoTTA-style random views of a preprocessed image batch ``(B, C, H, W)`` (see the module docstring);
    draws from the global RNG, which the engine reseeds before every step."""
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(b, device=x.device)
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * 0.2  # ±10 % of the side (grid spans 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)  # pad with the image's background, not with 0
    out = F.grid_sample(x - lo, grid, align_corners=False, padding_mode="zeros") + lo
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, device=x.device)
    brightness = (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * 0.2
    return (out - mean) * contrast + mean + brightness + 0.05 * torch.randn_like(out)


class CoTTAObjective(Objective):
    """CoTTA's student loss against an EMA teacher gated by a frozen anchor; EMA update and stochastic restore
    in ``after_step``. Per-sample output ``prediction``: the teacher's."""

    frozen = ("teacher", "anchor")

    def __init__(self, model: nn.Module, options: CoTTAOptions):
        super().__init__()
        self.options = options
        self.teacher = copy.deepcopy(model)
        self.anchor = copy.deepcopy(model)
        self.source = {n: p.detach().clone() for n, p in model.named_parameters()}
        self._dropouts = _dropouts(model)

    def forward(self, model: nn.Module, batch: dict[str, Any]):
        for m in self._dropouts:
            m.eval()
        x = batch["inputs"]
        student = forward(model, x)
        with torch.no_grad():
            confidence = forward(self.anchor, x).float().softmax(-1).amax(-1).mean()
            target = forward(self.teacher, x).float()
            augmented = bool(confidence < self.options.anchor_threshold)
            if augmented:
                target = torch.stack([forward(self.teacher, augment(x)).float()
                                      for _ in range(self.options.n_augment)]).mean(0)
        loss = -(target.softmax(-1) * student.float().log_softmax(-1)).sum(-1).mean()
        return loss, {"anchor_confidence": confidence, "augmented": float(augmented)}, \
            {"prediction": target.argmax(-1)}

    @torch.no_grad()
    def after_step(self, step: int, total: int, model: nn.Module) -> None:
        a = self.options.ema
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)
        if self.options.restore > 0:
            for name, p in model.named_parameters():
                src = self.source[name] = self.source[name].to(p.device)  # moved once
                keep = torch.rand(p.shape, device=p.device) >= self.options.restore
                p.copy_(torch.where(keep, p, src))


def _engine_config(options: TentOptions, seed: int, progress: bool) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=options.batch_size, lr=options.lr, optimizer="adam",
                       scheduler="constant", max_grad_norm=None, shuffle=False, seed=seed, log_every=1,
                       progress=progress)


def _adapt_stream(model, clf: nn.Module, stream_X, method: str, options, seed: int, progress: bool):
    """``(predictions in stream order, history)`` of ``clf`` adapted online on ``stream_X``."""
    if method == "bn":
        preds = []
        with BNReestimate(clf):
            for i in range(0, len(stream_X), options.batch_size):
                preds.append(predict_logits(clf, stream_X[i: i + options.batch_size], model.preprocess,
                                            options.batch_size).argmax(-1))
        return torch.cat(preds).numpy(), []
    configure_bn(clf)
    if method == "cotta":
        objective, trainable = CoTTAObjective(clf, options), None
    else:
        names = bn_affine_names(clf)
        if not names:
            raise ConfigError(f"the model has no BatchNorm affine parameter: {method} has nothing to adapt")
        objective, trainable = TentObjective(clf), names
    unlabelled = np.full(len(stream_X), -1, dtype=np.int64)  # the stream carries no label
    result = train(clf, Pairs(stream_X, unlabelled), objective, _engine_config(options, seed, progress),
                   collate_fn=make_collate(model.preprocess), trainable=trainable)
    return result.outputs["prediction"].numpy(), result.history


def run(model, source, target_train, target_test_X, *, options, method: str, seed: int, progress: bool = False,
        **_) -> Fitted:
    """Source model from ``source``, then ``method`` online on the held-out target items ``target_test_X``."""
    order = stream_order(len(target_test_X), options.batch_size, options.shuffle, seed)  # before any work
    base = source_model(model, source, options, seed, progress)
    source_only = predict_logits(base, target_test_X, model.preprocess).argmax(-1).numpy()
    stream = np.asarray(target_test_X)[order] if not isinstance(target_test_X, list) \
        else [target_test_X[i] for i in order]
    segment = options.reset_every * options.batch_size if method == "reset" else len(stream)
    preds, history, clf = [], [], base
    for start in range(0, len(stream), segment):  # reset: each segment starts again from the source
        clf = copy.deepcopy(base)
        p, h = _adapt_stream(model, clf, stream[start: start + segment], "tent" if method == "reset" else method,
                             options, seed, progress)
        preds.append(p)
        history += h
    adapted = np.empty(len(order), dtype=np.int64)
    adapted[order] = np.concatenate(preds)
    return Fitted(clf.eval(), {"adapted": adapted, "source_only": source_only}, history)


registry.register(STAGE, "bn", fn=lambda *a, **k: run(*a, method="bn", **k), options=BNOptions, kind="test-time",
                  modality=["image"],
                  paper="Schneider et al. Improving robustness against common corruptions by covariate shift "
                        "adaptation, NeurIPS 2020",
                  summary="BatchNorm statistics re-estimated online on the target stream")
registry.register(STAGE, "tent", fn=lambda *a, **k: run(*a, method="tent", **k), options=TentOptions,
                  kind="test-time", modality=["image"],
                  paper="Wang et al. Tent: Fully Test-Time Adaptation by Entropy Minimization, ICLR 2021",
                  summary="entropy minimisation on the BatchNorm affine parameters, online")
registry.register(STAGE, "cotta", fn=lambda *a, **k: run(*a, method="cotta", **k), options=CoTTAOptions,
                  kind="test-time", modality=["image"],
                  paper="Wang et al. Continual Test-Time Domain Adaptation, CVPR 2022",
                  summary="EMA teacher, anchor-gated augmentation-averaged targets, stochastic restore")
registry.register(STAGE, "reset", fn=lambda *a, **k: run(*a, method="reset", **k), options=ResetOptions,
                  kind="test-time", modality=["image"],
                  paper="Press et al. RDumb: A simple approach that questions our progress in continual "
                        "test-time adaptation, NeurIPS 2023",
                  summary="Tent reset to the source model and optimiser every reset_every batches")
