"""Efficiently robustify a large pre-trained model through a small robust teacher (Jain, Behl, Rawat & Vineet,
"Efficiently Robustify Pre-trained Models", ICCV 2023, arXiv 2309.07499).

The paper: (1) robustify a **small** model with strong augmentation (cheap, it is small); (2) distil it into a
**few tunable layers** of the large model, whose other layers stay frozen; the large model gets **three heads**;
(3) at inference one head answers each input, chosen from the heads' prediction uncertainty and the KL divergence
between their distributions ("uncertainty-aware knowledge distillation"). Images only.

Here, for a student over the data's classes (``--student``, a catalogue model: its backbone) and a small teacher
(``--teacher``, e.g. a digit CNN or a ``tune`` run folder):

1. **Teacher** — fine-tuned on the training items for ``teacher_epochs`` with cross-entropy on each batch's clean
   and augmented copies (a new head unless it already predicts the data's classes; ``teacher_epochs: 0`` uses a
   teacher that does as it is). Augmentation (``augment``): ``augmix`` (default) — AugMix's mixing of ``width`` =
   3 chains of 1–3 operations (depth drawn per chain and batch) from AugMix's operation set (autocontrast,
   equalize, posterize, rotate, solarize, shear x/y, translate x/y: the ops that do not overlap the test
   corruptions), chain weights ~ Dirichlet(1), clean/mix weight ~ Beta(1, 1), per image; or ``randaugment``
   (2 ops of the full 14, Cutout 0.5). The operations are :func:`transferkit.adapt.uda.rand_augment`'s, on the
   uint8 images; the augmentation is seeded from the step-seeded global RNG (a run and its resume agree).
2. **Student** — a copy of the student's backbone whose last ``tune_layers`` = 2 blocks are tuned (the blocks:
   the children of its longest ``nn.Sequential``/``nn.ModuleList``, e.g. MobileNetV2's ``features``: blocks 17
   and 18) and everything before them frozen (no gradient, eval mode throughout: BatchNorm statistics cannot
   drift), plus three linear heads over the shared features, trained together on each batch's clean ``x`` and
   augmented ``x̂`` copies, with ``kd(s, t) = α·CE(s, y) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``:

   - **clean** head: ``CE(h_c(x), y)`` — clean accuracy;
   - **robust** head: ``kd(h_r(x̂), teacher(x̂))`` — the robust teacher on shifted inputs;
   - **mixed** head: ``½ [kd(h_m(x), teacher(x)) + kd(h_m(x̂), teacher(x̂))]``.

   The teacher runs live on every batch (the augmentation changes every step, so its logits cannot be cached).
3. **Head choice** (:func:`choose_heads`) per input: ``d = KL(p_robust ‖ p_clean)``. ``d ≤ τ`` (the heads agree:
   an in-distribution input) → the clean head; otherwise (the input looks shifted) → whichever of the robust and
   mixed heads has the lower predictive entropy. ``τ`` is the ``kl_quantile`` = 0.95 quantile of ``d`` over the
   clean held-out validation items (10 % of the training items), so about 95 % of clean inputs keep the clean
   head. τ is set after training: the validation accuracy in the training history is the clean head's.

Defaults: T = 4, α = 0.1 (as ``kd``), teacher and student AdamW lr 1e-3, 5 epochs each, batch 32.

Deviations / readings: the note and the paper's summary fix three heads and a choice from uncertainty and
inter-head KL; which loss trains which head and the exact rule above are our reading of it, written here. The
paper's teachers are robustified with AugMix + DeepAugment (DeepAugment needs image-to-image networks: not
available offline) and AugMix's Jensen–Shannon consistency term is not used (cross-entropy on clean + AugMix
copies). The student in the paper is pre-trained on the task's classes; here it is a backbone pre-trained on
another task (ImageNet), so the clean head is trained with labels rather than kept. The saved run folder holds
the tuned blocks and the three heads (a Delta of the student's base model); like ``ncd``'s it does not load as a
teacher.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..engine import Objective, kd_loss
from ..errors import ConfigError, DataError
from ._common import STAGE, Items, ValAccuracy, _raw, fit_val, fresh_student

HEADS = ("clean", "robust", "mixed")
AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
              "translate_y")


@dataclass
class RobustifyOptions:
    augment: str = registry.option("augmix", choices=("augmix", "randaugment"),
                                   help="the strong augmentation of the teacher and of x̂")
    magnitude: float = registry.option(1.0, low=0.0, low_open=True, high=1.0, help="augmentation strength")
    width: int = registry.option(3, low=1, high=8, help="augmix: the number of mixed chains")
    teacher_epochs: int = registry.option(5, low=0, high=1000, help="epochs robustifying the teacher (0: use it "
                                          "as given; it must predict the data's classes)")
    tune_layers: int = registry.option(2, low=1, high=1000, help="the student's last blocks that are tuned")
    temperature: float = registry.option(4.0, low=0.0, low_open=True, high=100.0, help="KD temperature T")
    alpha: float = registry.option(0.1, low=0.0, high=1.0, help="weight α of the hard-label CE in the KD terms")
    kl_quantile: float = registry.option(0.95, low=0.0, high=1.0, help="τ = this quantile of KL(robust ‖ clean) "
                                         "on clean validation items")


# ------------------------------------------------------------------------------------------ augmentation
def augmix(images, seed: int, width: int = 3, magnitude: float = 1.0) -> np.ndarray:
    """AugMix of uint8 images ``(N, H, W[, C])``: ``m·x + (1 − m)·Σ_j w_j chain_j(x)``, ``w ~ Dir(1)``,
    ``m ~ Beta(1, 1)`` per image, each chain 1–3 AugMix operations. Same seed, same images."""
    from ..adapt.uda import rand_augment

    x = np.asarray(images)
    rng = np.random.default_rng([int(seed), 0xA6])
    w = rng.dirichlet(np.ones(width), size=len(x)).astype(np.float32)
    m = rng.beta(1.0, 1.0, size=len(x)).astype(np.float32)
    shape = (len(x),) + (1,) * (x.ndim - 1)
    mix = np.zeros(x.shape, np.float32)
    for j in range(width):
        chain = rand_augment(x, int(rng.integers(2 ** 62)), n_ops=int(rng.integers(1, 4)), magnitude=magnitude,
                             cutout=0.0, ops=AUGMIX_OPS)
        mix += w[:, j].reshape(shape) * chain.astype(np.float32)
    out = m.reshape(shape) * x.astype(np.float32) + (1 - m.reshape(shape)) * mix
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def augment_images(raw, options: RobustifyOptions, seed: int) -> np.ndarray:
    from ..adapt.uda import rand_augment

    if options.augment == "augmix":
        return augmix(raw, seed, options.width, options.magnitude)
    return rand_augment(raw, seed, 2, options.magnitude, 0.5)


def make_collate(student_pre, teacher_pre, options: RobustifyOptions):
    """Items → clean and augmented inputs for the student (and, with ``teacher_pre``, for the teacher)."""

    def collate(items):
        raw = _raw([x for x, _, _ in items])
        aug = augment_images(raw, options, int(torch.randint(0, 2 ** 62, (1,))))
        batch = {"inputs": student_pre(raw), "augmented": student_pre(aug),
                 "labels": torch.tensor([y for _, y, _ in items], dtype=torch.long)}
        if teacher_pre is not None:
            batch["teacher_inputs"], batch["teacher_augmented"] = teacher_pre(raw), teacher_pre(aug)
        return batch

    return collate


# ------------------------------------------------------------------------------------------ the student
def block_list(backbone: nn.Module) -> tuple[str, list[nn.Module]]:
    """``(name, children)`` of the backbone's longest ``nn.Sequential``/``nn.ModuleList`` (its blocks)."""
    best = max(((n, m) for n, m in backbone.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))),
               key=lambda nm: len(nm[1]), default=None)
    if best is None or len(best[1]) < 2:
        raise ConfigError(f"the student's backbone ({type(backbone).__name__}) has no block list to tune a part of")
    return best[0], list(best[1])


def choose_heads(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The head index per input for ``(3, B, C)`` logits (clean, robust, mixed): clean where
    ``KL(p_robust ‖ p_clean) ≤ threshold``, else the lower-entropy one of robust and mixed."""
    logp = F.log_softmax(logits.float(), -1)
    d = kl_heads(logits)
    ent = -(logp.exp() * logp).sum(-1)
    shifted = torch.where(ent[1] <= ent[2], 1, 2)
    return torch.where(d <= threshold, torch.zeros_like(shifted), shifted)


def kl_heads(logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_robust ‖ p_clean)`` per input for ``(3, B, C)`` logits."""
    logp = F.log_softmax(logits.float(), -1)
    return (logp[1].exp() * (logp[1] - logp[0])).sum(-1)


class RobustStudent(nn.Module):
    """A backbone whose blocks ``tuned`` train and the rest stay frozen (eval mode), with three heads;
    ``forward`` gives the chosen head's logits (:func:`choose_heads`), :meth:`all_heads` the ``(3, B, C)``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int, tune_layers: int, seed: int):
        from ..zoo.base import new_head

        super().__init__()
        self.backbone = backbone
        name, blocks = block_list(backbone)
        if tune_layers > len(blocks):
            raise ConfigError(f"tune_layers = {tune_layers} but the student has {len(blocks)} blocks ({name})")
        first = len(blocks) - tune_layers
        self.tuned = [f"{name}.{i}" if name else str(i) for i in range(first, len(blocks))]
        self._tuned_modules = blocks[first:]
        self.heads = nn.ModuleList(new_head(feature_dim, n_classes, seed + k) for k in range(len(HEADS)))
        self.register_buffer("kl_threshold", torch.tensor(float("inf")))
        for n, p in self.backbone.named_parameters():
            p.requires_grad_(self.is_tuned(n))
        self.heads.requires_grad_(True)

    def is_tuned(self, backbone_name: str) -> bool:
        return any(backbone_name == t or backbone_name.startswith(t + ".") for t in self.tuned)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        for m in self._tuned_modules:
            m.train(mode)
        return self

    def all_heads(self, inputs) -> torch.Tensor:
        feats = self.backbone(inputs)
        return torch.stack([h(feats) for h in self.heads])

    def forward(self, inputs=None, **named) -> torch.Tensor:
        logits = self.all_heads(named if inputs is None else inputs)
        idx = choose_heads(logits, float(self.kl_threshold))
        return logits.gather(0, idx.view(1, -1, 1).expand(1, *logits.shape[1:]))[0]


# ------------------------------------------------------------------------------------------ the loss
def kd_term(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float, alpha: float):
    return alpha * F.cross_entropy(student, labels) + (1 - alpha) * kd_loss(student, teacher, T)


def robustify_loss(clean: torch.Tensor, augmented: torch.Tensor, t_clean: torch.Tensor, t_aug: torch.Tensor,
                   labels: torch.Tensor, T: float, alpha: float) -> tuple[torch.Tensor, dict]:
    """The three heads' loss: ``clean``/``augmented`` are ``(3, B, C)`` student logits, ``t_*`` the teacher's."""
    parts = {"clean": F.cross_entropy(clean[0], labels),
             "robust": kd_term(augmented[1], t_aug, labels, T, alpha),
             "mixed": 0.5 * (kd_term(clean[2], t_clean, labels, T, alpha)
                             + kd_term(augmented[2], t_aug, labels, T, alpha))}
    return sum(parts.values()), {k: v.detach() for k, v in parts.items()}


class RobustifyObjective(Objective):
    frozen = ("teacher",)

    def __init__(self, teacher: nn.Module, options: RobustifyOptions):
        super().__init__()
        self.teacher, self.T, self.alpha = teacher, options.temperature, options.alpha

    def forward(self, model, batch):
        from ..engine.objectives import forward

        with torch.no_grad():
            t_clean = forward(self.teacher, batch["teacher_inputs"])
            t_aug = forward(self.teacher, batch["teacher_augmented"])
        return robustify_loss(model.all_heads(batch["inputs"]), model.all_heads(batch["augmented"]), t_clean,
                              t_aug, batch["labels"], self.T, self.alpha)


class AugmentedCE(Objective):
    """Cross-entropy over each batch's clean and augmented copies (robustifying the teacher)."""

    def forward(self, model, batch):
        from ..engine.objectives import forward

        logits = forward(model, torch.cat([batch["inputs"], batch["augmented"]]))
        return F.cross_entropy(logits, batch["labels"].repeat(2)), {}


# ------------------------------------------------------------------------------------------ the run
def robustify_teacher(teacher, train, val, options: RobustifyOptions, cfg, classes) -> nn.Module:
    """The teacher's classifier over ``classes``, fine-tuned with augmentation for ``teacher_epochs``."""
    from dataclasses import replace

    from ..engine import train as fit
    from .kd import TEACHER_HINT
    from ._common import require_classifier

    if options.teacher_epochs == 0:
        return require_classifier(teacher, "teacher", classes, "or set teacher_epochs > 0 to fine-tune it with "
                                  f"augmentation ({TEACHER_HINT})")
    module = (copy.deepcopy(teacher.module).requires_grad_(True) if teacher.module is not None
              else fresh_student(teacher, classes, cfg.seed))
    fit(module, Items(train), AugmentedCE(), replace(cfg, epochs=options.teacher_epochs),
        val_data=val, collate_fn=make_collate(teacher.preprocess, None, options),
        metric=ValAccuracy(teacher) if val is not None else "loss")
    return module.eval()


@torch.no_grad()
def calibrate_threshold(module: RobustStudent, student, data, quantile: float, batch_size: int = 256) -> float:
    """``τ``: the ``quantile`` of ``KL(p_robust ‖ p_clean)`` over ``data`` (clean items)."""
    module.eval()
    d = torch.cat([kl_heads(module.all_heads(student.preprocess(_raw(list(data.X[s: s + batch_size])))))
                   for s in range(0, len(data), batch_size)])
    return float(torch.quantile(d.double(), quantile))


@torch.no_grad()
def head_report(module: RobustStudent, student, data, batch_size: int = 256) -> dict:
    """Each head's accuracy on ``data`` and how often each head is chosen."""
    module.eval()
    logits, idx = [], []
    for s in range(0, len(data), batch_size):
        z = module.all_heads(student.preprocess(_raw(list(data.X[s: s + batch_size]))))
        logits.append(z)
        idx.append(choose_heads(z, float(module.kl_threshold)))
    z, idx, y = torch.cat(logits, 1), torch.cat(idx), torch.as_tensor(data.y)
    return {"head_accuracy": {h: round(float((z[k].argmax(-1) == y).float().mean()), 4) for k, h in enumerate(HEADS)},
            "head_chosen": {h: int((idx == k).sum()) for k, h in enumerate(HEADS)}}


def run_robustify(teachers, student, train, test, *, options: RobustifyOptions, cfg, classes, val_fraction=0.1):
    from ..engine import train as fit
    from ..zoo import head_seed
    from ._common import accuracy

    if train.modality != "image":
        raise DataError(f"robustify augments images; {train.name!r} is {train.modality} data")
    if len(teachers) != 1:
        raise ConfigError(f"robustify takes one small teacher, got {len(teachers)}")
    teacher = teachers[0]
    module = RobustStudent(copy.deepcopy(student.zoo.backbone), student.zoo.feature_dim, len(classes),
                           options.tune_layers, head_seed(cfg.seed, classes))
    fit_data, val = fit_val(train, val_fraction, cfg.seed)
    t0 = time.perf_counter()
    teacher_module = robustify_teacher(teacher, fit_data, val, options, cfg, classes)
    t_teacher = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = fit(module, Items(fit_data), RobustifyObjective(teacher_module, options), cfg, val_data=val,
                 collate_fn=make_collate(student.preprocess, teacher.preprocess, options),
                 metric=ValAccuracy(student) if val is not None else "loss",
                 trainable=lambda n, p: n.startswith("heads.") or module.is_tuned(n[len("backbone."):]))
    t_student = time.perf_counter() - t1
    module.kl_threshold.fill_(calibrate_threshold(module, student, val if val is not None else fit_data,
                                                  options.kl_quantile))
    extra = {"teacher_s": round(t_teacher, 3), "train_s": round(t_student, 3), "tuned_blocks": module.tuned,
             "tuned_params": sum(p.numel() for n, p in module.named_parameters()
                                 if n.startswith("heads.") or module.is_tuned(n[len("backbone."):])),
             "kl_threshold": float(module.kl_threshold)}
    if test is not None:
        extra["robust_teacher_test_accuracy"] = accuracy(teacher_module, teacher, test)
        extra.update(head_report(module, student, test))
    return module.eval(), result.history, extra


def _robustify(teachers, student, train, test, *, options, cfg, classes):
    return run_robustify(teachers, student, train, test, options=options, cfg=cfg, classes=classes)


registry.register(STAGE, "robustify", paper="Jain, Behl, Rawat & Vineet, Efficiently Robustify Pre-trained Models, "
                  "ICCV 2023", summary="a small teacher robustified with AugMix, distilled into the last blocks of a "
                  "frozen large student with clean / robust / mixed heads, head chosen per input by KL + entropy",
                  options=RobustifyOptions, fn=_robustify, train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
