"""ViDA — Liu, Yang, Ma, Zhang, Zhang, Cheng, Wang, Cui, Zhang: "ViDA: Homeostatic Visual Domain Adapter for
Continual Test Time Adaptation", ICLR 2024 (reference code: Yangsenqiao/vida, ``cifar/vida.py``,
``imagenet/inject_vida.py``, ``cifar/cfgs/cifar10/vida.yaml``).

Each adapted layer computes ``W x + λ_low · B_l A_l x + λ_high · B_h A_h x``: a low-rank (rank ``rank_low``,
default 1) and a high-rank (rank ``rank_high``, default 128) visual domain adapter in parallel with the
frozen layer, ``A ~ N(0, std 1/r²)`` (the reference's ``std=1/r**2``), ``B = 0``, so the adapted model is
the source model until a step moves ``B``. Homeostatic knowledge allotment: before each batch the teacher
predicts ``n_augment`` (10) augmented views; the uncertainty is ``u = 0.1 × mean over items and classes of
the views' (unbiased) logit variance``; if ``u ≥ threshold`` then ``λ_high = 1 + u, λ_low = 1 − u``, else
``λ_low = 1 + u, λ_high = 1 − u`` (no clamp, as in the reference), set on the student and the teacher. On the
digit CNNs, whose logits vary more under augmentation than the reference's ViT's, ``u`` is 1.3–2.4 on the four
digit shifts of ``benchmarks/adapt_digits.py`` with ``digits-usps``: always above the threshold, so the high-rank
adapter is always scaled up and ``λ_low`` goes negative; kept as the reference computes it. The
student learns from an EMA teacher (CoTTA's mean teacher) with ``−Σ p_teacher(x) log p_student(x)`` on the
clean batch; after each Adam step the teacher's parameters move by EMA (``ema``, 0.999) and every trainable
element returns to its initial value with probability ``restore`` (0.1). Predictions are *online*: the
teacher's clean prediction of each batch, made before that batch's update (the stream, the source model,
batch statistics, the one-item-batch refusal and dropout off are those of :mod:`.tta`).

Defaults (reference CIFAR-10-C configuration): ranks 1 / 128, 10 augmented views, threshold 0.05 (the
reference's command-line default ``--unc_thr``; its class default 0.2 is always overridden), EMA 0.999
(``MT`` = ``MT_ViDA``), restore 0.1, Adam β (0.9, 0.999), no weight decay, stream batches of 200 (CoTTA's;
the reference uses 40). Adapter lr ``lr`` 1e-4 (the reference's 1e-5 trains adapters already warmed up on
the source; ours start at identity, so 10× larger; not tuned).

Deliberate deviations:

- **Where the adapters go.** The reference replaces every ``nn.Linear`` inside the ViT attention modules
  (``Attention``/``CrossAttention``: qkv and the output projection; not the MLPs, not the head). The
  project's models are CNNs, so here every ``nn.Conv2d`` and ``nn.Linear`` of the *backbone* (never the
  classification head) gets both adapters. On a ``Conv2d(c_in, c_out, k, stride, padding, dilation)`` the
  down projection ``A`` is a ``Conv2d(c_in, r, k)`` with the layer's stride, padding and dilation (one group,
  no bias) and ``B`` a 1×1 ``Conv2d(r, c_out)``, so the adapter is a rank-``r`` convolution over the same
  receptive field; on a ``Linear`` they are ``Linear(in, r)`` and ``Linear(r, out)`` as in the reference. A
  high rank of 128 exceeds the input width of small CNN layers (e.g. 1 × 3 × 3 = 9 for a first conv on grey
  images): the adapter is then over-complete, its rank bounded by ``min(r, fan_in, c_out)``. The adapters
  are attached by forward hooks, so the layers' own parameter names are unchanged.
- **What trains.** The reference optimises *all* parameters (model lr 1e-4, adapters 1e-5) from a checkpoint
  whose adapters were warmed up on the source. Here the source model is frozen and only the adapters train
  (the parameter-efficient reading of the method), unless ``model_lr > 0`` trains every other
  parameter too at that lr (the reference's behaviour; then the EMA and the restore cover them as well). No
  source warm-up of the adapters: they start at identity on the source model of :mod:`.tta`.
- **Upstream defect fixed.** The reference's ``set_scale`` updates ``scale1`` and tests ``scale2`` only in an
  ``elif``; every adapted layer has both, so the high-rank scale stays 1.0 forever. Both are set here.
- Augmentations are :func:`.tta.augment` (CoTTA's, ours for small images; the reference uses CIFAR's colour
  jitter, affine, blur, flip and noise at 384 px). BatchNorm layers normalise with batch statistics (the
  reference's ViT has none). The teacher's uncertainty uses the scales of the previous batch, as in the code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import registry
from ..engine import Objective, forward, train
from ..errors import ConfigError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ._common import STAGE, Fitted, predict_logits, source_model
from .tta import TentOptions, _dropouts, _engine_config, augment, configure_bn, stream_order

__all__ = ["ViDAOptions", "ViDAAdapter", "inject", "adapter_names", "uncertainty", "allot", "set_scales",
           "ViDAObjective"]

UNCERTAINTY_SCALE = 0.1  # the reference's factor on the mean logit variance


@dataclass
class ViDAOptions(TentOptions):
    lr: float = option(1e-4, low=0.0, low_open=True, help="Adam lr of the adapters")
    model_lr: float = option(0.0, low=0.0, help="Adam lr of the source model's own parameters; 0 freezes them "
                             "(the reference trains them at 1e-4)")
    rank_low: int = option(1, low=1, help="rank of the low-rank adapter")
    rank_high: int = option(128, low=1, help="rank of the high-rank adapter")
    n_augment: int = option(10, low=2, help="augmented views whose logit variance gives the uncertainty")
    threshold: float = option(0.05, low=0.0, help="uncertainty at or above which the high-rank adapter is "
                              "scaled up")
    ema: float = option(0.999, low=0.0, high=1.0, help="teacher EMA momentum")
    restore: float = option(0.1, low=0.0, high=1.0, help="probability of restoring each trainable element to "
                            "its initial value")


class ViDAAdapter(nn.Module):
    """The low- and high-rank adapters of one ``Conv2d`` or ``Linear`` layer; ``forward(x)`` is the sum of
    their scaled outputs (added to the layer's own output by a forward hook)."""

    def __init__(self, layer: nn.Module, rank_low: int, rank_high: int):
        super().__init__()
        self.scale_low, self.scale_high = 1.0, 1.0
        self.low_down, self.low_up = self._pair(layer, rank_low)
        self.high_down, self.high_up = self._pair(layer, rank_high)

    @staticmethod
    def _pair(layer: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
        if isinstance(layer, nn.Linear):
            down, up = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=False)
        else:
            down = nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                             bias=False, padding_mode=layer.padding_mode)
            up = nn.Conv2d(r, layer.out_channels, 1, bias=False)
        w = layer.weight
        down.to(device=w.device, dtype=w.dtype)
        up.to(device=w.device, dtype=w.dtype)
        nn.init.normal_(down.weight, std=1 / r ** 2)
        nn.init.zeros_(up.weight)
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_up(self.low_down(x)) * self.scale_low + self.high_up(self.high_down(x)) * self.scale_high


def _add_adapter(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + layer.vida(inputs[0])


def inject(backbone: nn.Module, rank_low: int, rank_high: int) -> list[ViDAAdapter]:
    """Attach both adapters to every ``Conv2d`` and ``Linear`` of ``backbone`` (as the sub-module ``vida`` of
    each layer, applied by a forward hook); return the adapters. Refuses a backbone with no such layer."""
    layers = [m for m in backbone.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if not layers:
        raise ConfigError("the model's backbone has no Conv2d or Linear layer: ViDA has nowhere to put adapters")
    for layer in layers:
        layer.vida = ViDAAdapter(layer, rank_low, rank_high)
        layer.register_forward_hook(_add_adapter)
    return [layer.vida for layer in layers]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters of ``model``."""
    return [n for n, _ in model.named_parameters() if ".vida." in f".{n}"]


def uncertainty(view_logits: torch.Tensor) -> torch.Tensor:
    """``0.1 × mean`` of the unbiased variance over views of ``(views, N, C)`` logits."""
    return view_logits.float().var(0).mean() * UNCERTAINTY_SCALE


def allot(u: float, threshold: float) -> tuple[float, float]:
    """Homeostatic knowledge allotment: ``(λ_low, λ_high)`` for uncertainty ``u``."""
    return (1 - u, 1 + u) if u >= threshold else (1 + u, 1 - u)


def set_scales(model: nn.Module, low: float, high: float) -> None:
    """Set both scales of every adapter of ``model`` (the reference sets only the low-rank one)."""
    for m in model.modules():
        if isinstance(m, ViDAAdapter):
            m.scale_low, m.scale_high = low, high


class ViDAObjective(Objective):
    """Teacher–student cross-entropy with homeostatic scales; EMA teacher update and stochastic restore in
    ``after_step``. Per-sample output ``prediction``: the teacher's, before the update."""

    frozen = ("teacher",)

    def __init__(self, model: nn.Module, options: ViDAOptions):
        super().__init__()
        self.options = options
        self.teacher = copy.deepcopy(model)
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        self._dropouts = _dropouts(model)

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.options.model_lr == 0:
            return []
        own = [p for n, p in model.named_parameters() if n not in set(adapter_names(model))]
        return [{"params": own, "lr_scale": self.options.model_lr / self.options.lr}]

    def forward(self, model: nn.Module, batch: dict[str, Any]):
        for m in self._dropouts:
            m.eval()
        x = batch["inputs"]
        with torch.no_grad():
            u = float(uncertainty(torch.stack([forward(self.teacher, augment(x)) for _ in
                                               range(self.options.n_augment)])))
            low, high = allot(u, self.options.threshold)
            set_scales(model, low, high)
            set_scales(self.teacher, low, high)
            target = forward(self.teacher, x).float()
        student = forward(model, x)
        loss = -(target.softmax(-1) * student.float().log_softmax(-1)).sum(-1).mean()
        return loss, {"uncertainty": u, "lambda_low": low, "lambda_high": high}, {"prediction": target.argmax(-1)}

    @torch.no_grad()
    def after_step(self, step: int, total: int, model: nn.Module) -> None:
        a = self.options.ema
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            if s.requires_grad:  # a frozen parameter equals the teacher's: its average is itself
                t.mul_(a).add_(s.detach(), alpha=1 - a)
        if self.options.restore > 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    init = self.initial[name] = self.initial[name].to(p.device)  # moved once
                    keep = torch.rand(p.shape, device=p.device) >= self.options.restore
                    p.copy_(torch.where(keep, p, init))


def run(model, source, target_train, target_test_X, *, options: ViDAOptions, seed: int, progress: bool = False,
        **_) -> Fitted:
    """Source model from ``source`` (as :mod:`.tta`), adapters injected, ViDA online on ``target_test_X``."""
    order = stream_order(len(target_test_X), options.batch_size, options.shuffle, seed)  # before any work
    base = source_model(model, source, options, seed, progress)
    source_only = predict_logits(base, target_test_X, model.preprocess).argmax(-1).numpy()
    stream = np.asarray(target_test_X)[order] if not isinstance(target_test_X, list) \
        else [target_test_X[i] for i in order]
    clf = copy.deepcopy(base)
    torch.manual_seed(seed)  # the adapters' A
    inject(clf.backbone, options.rank_low, options.rank_high)
    configure_bn(clf)
    objective = ViDAObjective(clf, options)
    trainable = None if options.model_lr > 0 else adapter_names(clf)
    unlabelled = np.full(len(stream), -1, dtype=np.int64)  # the stream carries no label
    result = train(clf, Pairs(stream, unlabelled), objective, _engine_config(options, seed, progress),
                   collate_fn=make_collate(model.preprocess), trainable=trainable)
    adapted = np.empty(len(order), dtype=np.int64)
    adapted[order] = result.outputs["prediction"].numpy()
    return Fitted(objective.teacher.eval(), {"adapted": adapted, "source_only": source_only}, result.history)


registry.register(STAGE, "vida", fn=run, options=ViDAOptions, kind="test-time", modality=["image"],
                  paper="Liu et al. ViDA: Homeostatic Visual Domain Adapter for Continual Test Time Adaptation, "
                        "ICLR 2024",
                  summary="low- and high-rank adapters on a frozen source model, scaled by augmentation "
                          "uncertainty, EMA teacher, stochastic restore, online")
