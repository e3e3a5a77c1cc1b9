"""Pieces shared by the adapt methods: the model being adapted, batches of raw items, prediction.

The training methods (DANN, ParetoDA, UDA) share :class:`BackboneOptions`: ``freeze_backbone`` keeps the
pre-trained backbone fixed (eval mode, no gradient; its parameters and BatchNorm buffers end as they began) and
``bottleneck`` puts a trainable Linear → BatchNorm1d → ReLU of that width between the backbone and the head
(tllib's and DANN's bottleneck: what a domain discriminator reads). :func:`adapted_classifier` builds the module
they adapt; :func:`training_inputs` lets a method train the bottleneck + head on the frozen backbone's
features, computed once per item for the run, instead of running the backbone on every step (UDA uses it for
its source and clean target items and runs the backbone only on its augmented copies). The module handed back always predicts raw items (backbone → bottleneck → head).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import UNLABELLED, Dataset
from ..engine import CrossEntropy, TrainConfig, train
from ..errors import ConfigError, DataError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ..zoo.base import Classifier, head_seed, new_head

STAGE = "adapt"

__all__ = ["STAGE", "Fitted", "SourceOptions", "BackboneOptions", "FrozenBackbone", "FeatureClassifier", "classifier",
           "adapted_classifier", "training_inputs", "source_model", "predict_logits", "unlabelled", "match_images"]


@dataclass
class Fitted:
    """What a method hands back to :func:`transferkit.adapt.adapt`.

    module : the adapted classifier. predictions : ``{name: (N_test,) int64}`` predicted classes of the
    held-out target items (``adapted``; TTA methods also ``source_only``). history : the engine's records.
    """

    module: nn.Module
    predictions: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceOptions:
    """How the source model of a test-time method is made (the source-only baseline)."""

    source_epochs: int = option(3, low=0, help="epochs of full fine-tuning on the labelled source; 0 keeps the "
                                "model's own head (its classes must be the source's)")
    source_lr: float = option(1e-3, low=0.0, low_open=True, help="AdamW lr of the source fine-tune")
    source_batch_size: int = option(64, low=1, help="batch size of the source fine-tune")


def classifier(model, classes: list[str], seed: int) -> Classifier:
    """A copy of ``model``'s backbone with its source head when the head's classes are ``classes``, else a
    new head seeded by :func:`~transferkit.zoo.head_seed` ``(seed, classes)``. The ZooModel is not modified."""
    clf = Classifier(copy.deepcopy(model.backbone), model.feature_dim, len(classes), head_seed(seed, classes))
    if has_source_head(model, classes):
        clf.head = copy.deepcopy(model.head)
    for p in clf.parameters():
        p.requires_grad_(True)
    return clf


@dataclass
class BackboneOptions:
    """What a training method trains: the whole model (default), or a bottleneck + head on a frozen backbone."""

    freeze_backbone: bool = option(False, help="keep the backbone fixed (eval mode, no gradient): only the "
                                   "bottleneck and the head train; the backbone's features of items that are "
                                   "not augmented are computed once per item")
    bottleneck: int | None = option(None, low=1, help="width of a trainable Linear → BatchNorm1d → ReLU between "
                                    "the backbone and the head (null: none)")


class FrozenBackbone(nn.Module):
    """``backbone`` kept in eval mode, whatever ``train()`` is asked, and run without gradients."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.module = backbone.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.module(inputs)


class FeatureClassifier(nn.Module):
    """``backbone`` (here: the bottleneck, or nothing) and ``head`` on feature tensors."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(inputs))


def adapted_classifier(model, classes: list[str], options: BackboneOptions, seed: int) -> Classifier:
    """The module a training method adapts: :func:`classifier`, then with ``freeze_backbone`` its backbone
    wrapped in :class:`FrozenBackbone`, and with ``bottleneck`` = w its ``backbone`` becomes
    ``Sequential(backbone, Sequential(Linear(D, w), BatchNorm1d(w), ReLU()))`` (start seeded by ``seed``) and its
    head a new Linear(w, classes) seeded by :func:`~transferkit.zoo.head_seed`. A frozen backbone is always the
    first element of a ``Sequential`` backbone. With both options off this is :func:`classifier` unchanged."""
    clf = classifier(model, classes, seed)
    parts = [FrozenBackbone(clf.backbone)] if options.freeze_backbone else [clf.backbone]
    if options.bottleneck is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts.append(nn.Sequential(nn.Linear(model.feature_dim, options.bottleneck),
                                       nn.BatchNorm1d(options.bottleneck), nn.ReLU()))
        clf.head = new_head(options.bottleneck, len(classes), head_seed(seed, classes))
    if len(parts) > 1 or options.freeze_backbone:
        clf.backbone = nn.Sequential(*parts)
    return clf


def feature_dim(model, options: BackboneOptions) -> int:
    """The width of what the head (and a domain discriminator) reads."""
    return options.bottleneck if options.bottleneck is not None else model.feature_dim


def training_inputs(clf: Classifier, preprocess, parts: dict[str, Any], cache: bool = True
                    ) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(module, {name: X}, preprocess)`` to train on, for raw item collections ``parts``.

    When ``clf``'s backbone is frozen (:func:`adapted_classifier`) and ``cache``: the frozen backbone's features
    of every item, computed here once (eval mode, batches of 256, float32, kept in memory for the run), a
    :class:`FeatureClassifier` sharing ``clf``'s bottleneck and head, and ``torch.as_tensor``; training it
    trains ``clf``. Otherwise ``(clf, parts, preprocess)``: the raw items, the backbone run on every step."""
    frozen = isinstance(clf.backbone, nn.Sequential) and isinstance(clf.backbone[0], FrozenBackbone)
    if not (frozen and cache):
        return clf, dict(parts), preprocess
    tail = FeatureClassifier(nn.Sequential(*list(clf.backbone)[1:]), clf.head)
    probe = FeatureClassifier(clf.backbone[0], nn.Identity())
    feats = {name: predict_logits(probe, X, preprocess, features=True)[1].numpy() for name, X in parts.items()}
    return tail, feats, torch.as_tensor


def has_source_head(model, classes: list[str]) -> bool:
    return isinstance(model.head, nn.Linear) and list(model.source_classes or []) == list(classes)


def source_model(model, source: Dataset, options: SourceOptions, seed: int, progress: bool = False) -> Classifier:
    """The source-only model: ``model`` fully fine-tuned on the labelled ``source`` (CE, AdamW, linear decay)
    for ``source_epochs``; with 0 epochs the model's own head, which must predict the source's classes."""
    if options.source_epochs == 0 and not has_source_head(model, source.classes):
        raise ConfigError(f"source_epochs 0 keeps {model.name!r}'s own head, but its classes "
                          f"({model.source_classes}) are not the source's ({source.classes})")
    clf = classifier(model, source.classes, seed)
    if options.source_epochs > 0:
        cfg = TrainConfig(epochs=options.source_epochs, lr=options.source_lr, batch_size=options.source_batch_size,
                          seed=seed, progress=progress)
        train(clf, Pairs(source.X, source.y), CrossEntropy(), cfg, collate_fn=make_collate(model.preprocess))
    return clf.eval()


@torch.no_grad()
def predict_logits(module: nn.Module, X: Any, preprocess, batch_size: int = 256, features: bool = False):
    """Logits ``(N, C)`` of ``module`` (eval mode) on raw items ``X``; with ``features`` also the backbone's
    penultimate features ``(N, D)`` (``module`` must then have ``backbone`` and ``head``)."""
    was = module.training
    module.eval()
    device = next(module.parameters()).device
    out, feats = [], []
    try:
        for i in range(0, len(X), batch_size):
            x = preprocess(X[i: i + batch_size])
            x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
            if features:
                f = module.backbone(x)
                feats.append(f.float().cpu())
                out.append(module.head(f).float().cpu())
            else:
                out.append(module(x).float().cpu())
    finally:
        module.train(was)
    logits = torch.cat(out)
    return (logits, torch.cat(feats)) if features else logits


def unlabelled(ds: Dataset) -> Dataset:
    """``ds`` with every label dropped (-1): what a method is given of a target."""
    return replace(ds, y=np.full(len(ds), UNLABELLED, dtype=np.int64))


def match_images(model, *datasets: Dataset) -> list[Dataset]:
    """Image datasets of different item sizes resized to the model's input size (bilinear, antialiased, as
    the model's own preprocessing does), so that they can be combined; others are returned as they are."""
    shapes = {np.shape(ds.X)[1:] for ds in datasets}
    if len(shapes) == 1 or datasets[0].modality != "image":
        return list(datasets)
    if len({len(s) for s in shapes}) > 1:
        raise DataError("cannot adapt between grey and colour images: "
                        + ", ".join(f"{ds.name} {np.shape(ds.X)[1:]}" for ds in datasets))
    size = getattr(model.preprocess, "size", None)
    if size is None:
        raise DataError(f"the images have different sizes ({sorted(shapes)}) and {model.name!r} has no input size "
                        "to resize them to")
    return [ds if np.shape(ds.X)[1:3] == (size, size) else replace(ds, X=_resize(ds.X, size)) for ds in datasets]


def _resize(X: np.ndarray, size: int) -> np.ndarray:
    x = torch.as_tensor(np.asarray(X))
    grey = x.dim() == 3
    x = (x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2)).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return (x[:, 0] if grey else x.permute(0, 2, 3, 1)).numpy()
