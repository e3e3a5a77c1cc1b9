"""Knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015).

Loss per batch: ``α·CE(z_s, y) + (1 − α)·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (the engine's
:class:`~transferkit.engine.KDObjective` with ``hard_weight=α, soft_weight=1−α``; the T² keeps the soft
term's gradient comparable across temperatures). Several teachers are distilled as the weighted mixture of
their softened distributions (``teacher_weights``, uniform by default). Teachers are frozen (eval mode, no
gradient, outside the optimizer and checkpoints).

Defaults: T = 4, α = 0.1 (the paper: a "considerably lower weight" on the hard term works best; it fixes no
single T — 20 on MNIST, lower for smaller students); the student is the whole student model (backbone +
a new head), AdamW lr 1e-3, 5 epochs.

Cached teacher logits (``cache``, default on): the teachers are frozen and the data carries no augmentation,
so their logits are computed once over the training data instead of once per batch and epoch; the training is
the same (tested against the live teacher) and the teachers' forward passes are paid once instead of once
per epoch. ``cache: false`` runs the teachers live on every batch.

Label maps (``label_map``, CLI ``--label-map FILE``): a teacher over other classes (a catalogue model's
source head, or a run tuned on another label set) is distilled through a mapping *teacher class → data class*.
The rule (:class:`~transferkit.distill._common.LabelMapped`): the mapped logit of data class ``j`` is
``T·log Σ_{i→j} exp(z_i/T)``, so the teacher's softened distribution at the distillation temperature has the
probabilities of the teacher classes mapped to one data class summed; teacher classes mapped to nothing are
dropped and the rest renormalised. Every data class must receive at least one teacher class, and every key
must be a class of some teacher (one-line errors otherwise). The teacher's test accuracy is then that of the
mapped classifier. Without a map, a teacher whose classes differ from the data's is a one-line error that
names both label sets.

``freeze_bn`` (default off): keep the student's BatchNorm layers in eval mode while it trains (the pretrained
running statistics are used and not re-estimated from the small distillation batches; affine weights still
train), for a backbone whose statistics should stay those it was pretrained or probed with.

Deviation: none in the loss. A teacher must predict the data's classes (a catalogue model with these classes
or a ``transferkit tune`` run folder) or be mapped onto them; ``nearest``/``weighted`` fit a probe on other
models instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import registry
from ..engine import KDObjective
from ._common import STAGE, Net, fit_val, fresh_student, require_classifier, train_student

TEACHER_HINT = ("fine-tune it first (`transferkit tune`) and pass the run folder, or use --method nearest / weighted, "
                "which fit a probe on the labelled items")
KD_HINT = TEACHER_HINT + ", or map its classes onto the data's with label_map (--label-map)"


@dataclass
class KDCore:
    """The options every KD-based method shares."""

    temperature: float = registry.option(4.0, low=0.0, low_open=True, high=100.0,
                                         help="softmax temperature T of teacher and student (> 0)")
    alpha: float = registry.option(0.1, low=0.0, high=1.0, help="weight α of the hard-label cross-entropy; "
                                   "the soft term gets 1 − α")
    cache: bool = registry.option(True, help="compute the frozen teachers' logits once (no augmentation, so "
                                  "the same training); false: run them on every batch")


@dataclass
class KDOptions(KDCore):
    teacher_weights: list[float] | None = registry.option(None, help="mixture weights of several teachers "
                                                          "(default uniform)")
    label_map: dict[str, str] | None = registry.option(None, help="teacher class → data class, for teachers "
                                                       "over other classes (probabilities of classes mapped "
                                                       "together are summed; unmapped classes dropped)")
    freeze_bn: bool = registry.option(False, help="keep the student's BatchNorm layers in eval mode (running "
                                      "statistics not re-estimated; affine weights train)")

    def __post_init__(self) -> None:
        w = self.teacher_weights
        if w is not None and (any(x < 0 for x in w) or not sum(w) > 0):
            raise ValueError(f"teacher_weights must be non-negative with a positive sum, got {w}")
        if self.label_map is not None:
            items = self.label_map.items()
            if not items or any(isinstance(x, bool) or not isinstance(x, (str, int)) for kv in items for x in kv):
                raise ValueError(f"label_map must map class names to class names, got {registry.short(self.label_map)}")
            self.label_map = {str(k): str(v) for k, v in items}


def kd_objective(options: KDCore, weights=None):
    """The objective factory: ``teachers`` (modules for live mode, None for cached logits) → KDObjective."""
    return lambda teachers: KDObjective(options.temperature, hard_weight=options.alpha, teacher=teachers,
                                        soft_weight=1.0 - options.alpha, teacher_weights=weights)


def run_kd(teachers, student, train, test, *, options: KDCore, cfg, classes, weights=None, val_fraction=0.1):
    """Distil the frozen ``teachers`` into a fresh-headed copy of ``student``; returns (module, history, extra)."""
    from ..errors import ConfigError

    for t in teachers:
        if t.module is not None and t.classes is not None and list(map(str, t.classes)) != list(map(str, classes)):
            t = Net(t.name, t.zoo, None, t.classes)  # a loaded Net over other classes: the same one-line error
        require_classifier(t, "teacher", classes, KD_HINT)
    w = weights if weights is not None else getattr(options, "teacher_weights", None)
    if w is not None and len(w) != len(teachers):
        raise ConfigError(f"{len(w)} teacher_weights for {len(teachers)} teachers")
    module = fresh_student(student, classes, cfg.seed)
    fit, val = fit_val(train, val_fraction, cfg.seed)
    result, timing = train_student(module, student, teachers, kd_objective(options, w), fit, val, cfg,
                                   cache=options.cache, freeze_bn=getattr(options, "freeze_bn", False))
    return module, result.history, {**timing, "teacher_weights": list(w) if w is not None else None}


def _kd(teachers, student, train, test, *, options, cfg, classes):
    return run_kd(teachers, student, train, test, options=options, cfg=cfg, classes=classes)


registry.register(STAGE, "kd", paper="Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural Network, 2015",
                  summary="α·CE + (1−α)·T²·KL from one or several frozen teachers (cached logits by default)",
                  options=KDOptions, fn=_kd, train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
