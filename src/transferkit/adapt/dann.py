"""DANN: domain-adversarial training (Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand,
Lempitsky, "Domain-Adversarial Training of Neural Networks", JMLR 17(59), 2016).

The classifier (backbone G_f + label head G_y) is trained on the labelled source with cross-entropy while a
domain discriminator G_d, reading the backbone's features through a gradient-reversal layer (the engine's
:class:`~transferkit.engine.GradientReversal`), learns to tell source from target. One backward pass trains
G_d to separate the domains and G_f to confuse it: loss = CE(source) + trade_off · ½[BCE(G_d(f_s), 1) +
BCE(G_d(f_t), 0)].

Schedules (p = training progress in [0, 1], p = step / (total − 1)):

- GRL coefficient, the paper's λ_p = 2 / (1 + exp(−γ p)) − 1 with γ = 10 (``schedule="paper"``), or
  tllib's warm-start ramp λ(i) = 2(hi − lo) / (1 + exp(−α i / N)) − (hi − lo) + lo with α = 1, lo = 0,
  hi = 1, N = 1000 iterations (``schedule="tllib"``: much slower, λ(N) = 0.462);
- learning rate, the paper's annealing μ_p = μ0 / (1 + α p)^β with α = 10, β = 0.75, through the engine's
  ``lr_factor`` hook; μ0 = ``lr`` = 0.01, SGD with momentum 0.9 (the paper's).

Defaults and deviations: the discriminator is tllib's (Linear(D, 1024) → BN → ReLU → Linear(1024, 1024) →
BN → ReLU → Linear(1024, 1)) returning a logit (BCE with logits, not sigmoid + BCE). Source and target
batches go through the backbone in one concatenated pass (tllib's recipe), so BatchNorm layers normalise
with mixed-domain statistics and their running estimates are those of the mixture. Weight decay 1e-3 on
matrices (tllib's), no gradient clipping. An epoch is one pass over the source; the target cycles. The
paper picks checkpoints with target labels; here ``select_by`` picks the best evaluation by a label-free
scorer (:mod:`.scorers`) on the unlabelled target training items, or the last step when unset.

Frozen backbone (:class:`~._common.BackboneOptions`): ``freeze_backbone`` keeps the pre-trained backbone fixed
and trains only ``bottleneck`` (Linear → BatchNorm1d → ReLU of that width; the discriminator reads its output,
as in tllib and the paper's bottleneck) and the head; it needs a bottleneck (a fixed backbone gives the
adversarial loss nothing to move). DANN augments nothing, so the backbone's features of every source and
target item are computed once at the start and the run trains on them (:func:`~._common.training_inputs`;
``run(..., cache_features=False)`` runs the frozen backbone on every step instead, same result to float
rounding when the two domains' inputs have the same shape). The returned module predicts raw items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..data.dataset import combine_domains
from ..engine import GradientReversal, Objective, TrainConfig, train
from ..errors import ConfigError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ._common import (STAGE, BackboneOptions, Fitted, adapted_classifier, feature_dim, predict_logits,
                      training_inputs)

__all__ = ["DannOptions", "paper_lambda", "tllib_lambda", "annealed_lr", "DomainDiscriminator", "DANNObjective",
           "check_frozen", "run"]

SCORERS = ("entropy", "snd", "transfer_score", "mixval", "mano")


@dataclass
class DannOptions(BackboneOptions):
    epochs: int = option(5, low=1, help="passes over the labelled source")
    batch_size: int = option(64, low=2, help="items per domain per step (source and target each)")
    lr: float = option(0.01, low=0.0, low_open=True, help="μ0 of the annealed lr (SGD)")
    momentum: float = option(0.9, low=0.0, high=1.0, high_open=True)
    weight_decay: float = option(1e-3, low=0.0)
    trade_off: float = option(1.0, low=0.0, help="weight of the domain loss")
    schedule: str = option("paper", choices=("paper", "tllib"), help="GRL λ ramp: the paper's or tllib's warm start")
    gamma: float = option(10.0, low=0.0, low_open=True, help="γ of the paper's λ_p")
    lr_alpha: float = option(10.0, low=0.0, help="α of μ_p = μ0/(1+αp)^β")
    lr_beta: float = option(0.75, low=0.0, help="β of μ_p")
    tllib_alpha: float = option(1.0, low=0.0, low_open=True, help="α of tllib's warm start")
    tllib_max_iters: int = option(1000, low=1, help="N of tllib's warm start")
    hidden: int = option(1024, low=1, help="width of the discriminator's hidden layers")
    select_by: str | None = option(None, choices=SCORERS, help="label-free scorer that picks the best epoch "
                                   "(on the unlabelled target); null: the last")


def paper_lambda(p: float, gamma: float = 10.0) -> float:
    """λ_p = 2 / (1 + exp(−γ p)) − 1 (Ganin et al.): 0 at p = 0, 0.987 at p = 0.5 for γ = 10."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def tllib_lambda(i: int, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0, max_iters: int = 1000) -> float:
    """tllib's ``WarmStartGradientReverseLayer`` coefficient after ``i`` iterations (0.462 at i = N, α = 1)."""
    return 2.0 * (hi - lo) / (1.0 + math.exp(-alpha * i / max_iters)) - (hi - lo) + lo


def annealed_lr(p: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """The factor 1 / (1 + α p)^β of the paper's μ_p = μ0 / (1 + α p)^β."""
    return 1.0 / (1.0 + alpha * p) ** beta


def progress(step: int, total: int) -> float:
    """p of update ``step`` (0-based) of ``total``: 0 at the first update, 1 at the last."""
    return step / max(total - 1, 1)


class DomainDiscriminator(nn.Sequential):
    """Features ``(B, D)`` → one domain logit per item (tllib's layout)."""

    def __init__(self, in_dim: int, hidden: int = 1024):
        super().__init__(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))


class DANNObjective(Objective):
    """Source CE + ``trade_off`` · domain BCE through a scheduled gradient reversal.

    Batches are ``{"source": {"inputs", "labels"}, "target": {"inputs"}}``; the model has ``backbone`` and
    ``head``. Logs ``ce``, ``domain``, ``lambda`` and ``domain_accuracy``.
    """

    def __init__(self, feature_dim: int, options: DannOptions):
        super().__init__()
        self.options = options
        self.discriminator = DomainDiscriminator(feature_dim, options.hidden)
        self.grl = GradientReversal(0.0)

    def coefficient(self, step: int, total: int) -> float:
        o = self.options
        if o.schedule == "tllib":
            return tllib_lambda(step, o.tllib_alpha, max_iters=o.tllib_max_iters)
        return paper_lambda(progress(step, total), o.gamma)

    def before_step(self, step: int, total: int) -> None:
        self.grl.lambda_ = self.coefficient(step, total)

    def lr_factor(self, step: int, total: int) -> float:
        return annealed_lr(progress(step, total), self.options.lr_alpha, self.options.lr_beta)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        xs, ys, xt = batch["source"]["inputs"], batch["source"]["labels"], batch["target"]["inputs"]
        ns = len(ys)
        if isinstance(xs, torch.Tensor) and isinstance(xt, torch.Tensor) and xs.shape[1:] == xt.shape[1:]:
            feats = model.backbone(torch.cat([xs, xt]))
        else:  # token batches of different lengths
            feats = torch.cat([model.backbone(xs), model.backbone(xt)])
        ce = F.cross_entropy(model.head(feats[:ns]), ys)
        d = self.discriminator(self.grl(feats)).squeeze(-1)
        ds, dt = d[:ns], d[ns:]
        domain = 0.5 * (F.binary_cross_entropy_with_logits(ds, torch.ones_like(ds))
                        + F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt)))
        with torch.no_grad():
            dom_acc = torch.cat([ds > 0, dt <= 0]).float().mean()
        return ce + self.options.trade_off * domain, {"ce": ce.detach(), "domain": domain.detach(),
                                                      "lambda": self.grl.lambda_, "domain_accuracy": dom_acc}


def check_frozen(options: DannOptions, method: str) -> None:
    """A frozen backbone without a bottleneck leaves the adversarial loss nothing to train: a ConfigError."""
    if options.freeze_backbone and options.bottleneck is None:
        raise ConfigError(f"freeze_backbone needs a bottleneck for {method}: the domain loss moves the features "
                          "only through trainable layers before the head (e.g. bottleneck: 256)")


def run(model, source, target_train, target_test_X, *, options: DannOptions, seed: int, progress: bool = False,
        cache_features: bool = True, **_) -> Fitted:
    """Train ``model`` (a ZooModel) with DANN on labelled ``source`` + unlabelled ``target_train``; with a frozen
    backbone, on its features computed once (``cache_features``) or on raw items."""
    from .scorers import make_scorer

    check_frozen(options, "dann")
    clf = adapted_classifier(model, source.classes, options, seed)
    both = combine_domains(source, target_train)
    src, tgt = both.subset(both.labelled), both.subset(~both.labelled)
    module, X, preprocess = training_inputs(clf, model.preprocess, {"source": src.X, "target": tgt.X},
                                            cache_features)
    cfg = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, optimizer="sgd",
                      momentum=options.momentum, weight_decay=options.weight_decay, max_grad_norm=None,
                      seed=seed, progress=progress, restore_best=options.select_by is not None)
    with torch.random.fork_rng(devices=[]):  # the discriminator's start depends on the seed only
        torch.manual_seed(seed)
        objective = DANNObjective(feature_dim(model, options), options)
    scorer = make_scorer(options.select_by, preprocess, seed=seed) if options.select_by else "accuracy"
    result = train(module, {"source": Pairs(X["source"], src.y), "target": Pairs(X["target"], tgt.y)}, objective,
                   cfg, collate_fn=make_collate(preprocess), metric=scorer,
                   val_data=X["target"] if options.select_by else None)
    clf.eval()
    pred = predict_logits(clf, target_test_X, model.preprocess).argmax(-1).numpy()
    extra = {"best_step": result.best_step, "steps": result.steps}
    if options.select_by:
        extra[f"selected_{options.select_by}"] = result.metrics.get(f"val_{options.select_by}")
    return Fitted(clf, {"adapted": pred}, result.history, extra)


registry.register(
    STAGE, "dann", fn=run, options=DannOptions, kind="training", modality=["image", "text"],
    paper="Ganin et al. Domain-Adversarial Training of Neural Networks, JMLR 2016",
    summary="domain-adversarial training through a gradient-reversal layer (λ_p and annealed lr of the paper)")
