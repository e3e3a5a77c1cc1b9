"""Multi-aspect knowledge distillation (Lee, Bang, Kwon & Kim, "Multi-aspect Knowledge Distillation with Large
Language Model", arXiv 2501.13341, CVPR Workshops 2025).

The paper: an LLM writes N yes/no *aspect* questions about the dataset ("does the bird have a red crown?"), a
frozen multimodal LLM answers each question for each training image, and its probability of "yes" becomes a
soft target. The student's output layer grows from C to C + N units; the loss is
``CE(z[:, :C], y) + λ · BCE(z[:, C:], a)`` with ``a`` the (N,) aspect probabilities of the item (the mean of
the N binary cross-entropies with logits); at inference only the C class logits are used.

**No LLM or MLLM is available offline.** Here the questions and their answers come from a frozen model of the
zoo, the *answerer* (the run's one teacher, ``--teacher``; a ``tune`` run folder answers with its frozen base
model), computed once per item before training (the answerer is frozen and the items carry no augmentation; its
features come from the features cache, so later runs on the same data do not run it again):

- **images** — the answerer is an image model with a source head (``mobilenet-v2``: ImageNet-1k). The N
  "questions" are "is this an instance of source class k?" for the N source classes with the highest mean
  probability over the training items (chosen once per dataset, as the paper's questions are); the raw answer
  ``s_ik`` is the log-probability of class k. The catalogue does not carry the ImageNet class names, so the
  classes cannot be grouped into named attributes; the top-N classes stand in for the aspects.
- **text** — the answerer is a sentence encoder (``all-minilm-l6-v2``). The questions are aspect statements
  (``aspects``; the default is a fixed list of ten generic statements written for transferkit, about tone,
  topic and style); the raw answer is the cosine similarity between the item's and the statement's mean-pooled
  embeddings.

Calibration (raw answer → probability of "yes"): ``a_ik = sigmoid((s_ik − mean_k) / sd_k)`` with the mean and
standard deviation of aspect k over the training items — each aspect is answered "yes" for about half of the
items, most confidently for the items that express it most, as a yes/no answer would. A constant aspect
(sd 0) answers 0.5 for every item.

Defaults: λ (``aspect_weight``) = 1 (the paper's unweighted sum), N (``n_aspects``, images) = 10; student = the
whole student model (backbone + one new (C + N)-unit linear layer, seeded by the run seed and the class +
aspect names), AdamW lr 1e-3, 5 epochs, 10 % of the training items held out for model selection. The saved
student is a plain classifier over the C classes (the first C rows of the output layer), so its run folder
loads like a ``tune`` run.

Deviations: the answerer (a zoo model instead of GPT-4o + an MLLM, see above) and the calibration; the paper's
optional combination with logit KD is not implemented (use ``kd`` for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import registry
from ..engine import Objective
from ..errors import ConfigError
from ..zoo import Classifier, head_seed
from ._common import STAGE, Items, ValAccuracy, fit_val, make_collate

DEFAULT_ASPECTS = (
    "This text expresses a positive opinion.",
    "This text expresses a negative opinion.",
    "This text is angry or aggressive.",
    "This text is funny or sarcastic.",
    "This text describes a person.",
    "This text is about food or drink.",
    "This text is about a film, a book or music.",
    "This text is about politics or the news.",
    "This text is a question.",
    "This text is written informally, as in a chat message.",
)


@dataclass
class AspectOptions:
    aspect_weight: float = registry.option(1.0, low=0.0, high=100.0, help="weight λ of the aspect BCE term")
    n_aspects: int = registry.option(10, low=1, high=1000, help="images: the number of the answerer's source "
                                     "classes used as aspects (its top-N by mean probability)")
    aspects: list[str] | None = registry.option(None, help="text: the aspect statements (default: ten generic "
                                                "ones about tone, topic and style)")

    def __post_init__(self) -> None:
        if self.aspects is not None and (not self.aspects or any(not str(a).strip() for a in self.aspects)):
            raise ValueError("aspects must be a non-empty list of non-empty statements")


# ------------------------------------------------------------------------------------------ the answers
def calibrate(scores: torch.Tensor) -> torch.Tensor:
    """Raw answers ``(N_items, N_aspects)`` → probabilities: a per-aspect z-score through a sigmoid."""
    scores = scores.double()
    sd = scores.std(0, unbiased=False)
    z = (scores - scores.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return torch.sigmoid(z).float()


def _embed(zoo, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([zoo.backbone(zoo.preprocess(texts[s: s + batch_size])).float()
                          for s in range(0, len(texts), batch_size)])


def raw_answers(zoo, data, options: AspectOptions, cache: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``(scores (N_items, N), aspect names)``: the answerer's raw answers for every item of ``data``."""
    from ..features import extract

    feats = torch.as_tensor(extract(zoo, data, cache=cache, progress=False).X)
    if data.modality == "text":
        prompts = list(options.aspects or DEFAULT_ASPECTS)
        return F.normalize(feats, dim=-1) @ F.normalize(_embed(zoo, prompts), dim=-1).T, prompts
    with torch.no_grad():
        logp = F.log_softmax(zoo.head(feats).float(), -1)
    top = torch.argsort(logp.exp().mean(0), descending=True, stable=True)[: options.n_aspects]
    names = list(zoo.source_classes or range(logp.shape[1]))
    return logp[:, top], [f"{zoo.name}:{names[int(k)]}" for k in top]


def aspect_targets(zoo, data, options: AspectOptions, cache: bool = True) -> tuple[torch.Tensor, list[str]]:
    """``(a (N_items, N) in (0, 1), aspect names)``: the calibrated answers (the soft targets)."""
    scores, names = raw_answers(zoo, data, options, cache)
    return calibrate(scores), names


def check_answerer(zoo, modality: str, options: AspectOptions) -> None:
    if modality == "text":
        return
    if options.aspects is not None:
        raise ConfigError("aspects (statements) are for text data; for images the aspects are the answerer's "
                          "source classes (n_aspects)")
    if zoo.head is None:
        raise ConfigError(f"the answerer {zoo.name!r} has no source head; image aspects are its source classes "
                          "(use an ImageNet model such as mobilenet-v2)")
    n = zoo.head.out_features
    if options.n_aspects > n:
        raise ConfigError(f"n_aspects = {options.n_aspects} but the answerer {zoo.name!r} has {n} source classes")


# ------------------------------------------------------------------------------------------ the student
class AspectClassifier(Classifier):
    """A classifier with C + N output units; ``forward`` gives the C class logits, :meth:`full` all of them."""

    def __init__(self, backbone, feature_dim: int, n_classes: int, n_aspects: int, seed: int = 0):
        super().__init__(backbone, feature_dim, n_classes + n_aspects, seed)
        self.n_classes = n_classes

    def full(self, inputs) -> torch.Tensor:
        return self.head(self.backbone(inputs))

    def forward(self, inputs=None, **named) -> torch.Tensor:
        return self.full(named if inputs is None else inputs)[:, : self.n_classes]

    def classifier(self) -> Classifier:
        """The plain classifier over the C classes (the first C rows of the output layer)."""
        clf = Classifier(self.backbone, self.head.in_features, self.n_classes)
        with torch.no_grad():
            clf.head.weight.copy_(self.head.weight[: self.n_classes])
            clf.head.bias.copy_(self.head.bias[: self.n_classes])
        return clf


def aspect_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, n_classes: int,
                weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(CE + λ·BCE, CE, BCE)`` for ``(B, C + N)`` logits, labels and ``(B, N)`` aspect probabilities."""
    ce = F.cross_entropy(logits[:, :n_classes], labels)
    bce = F.binary_cross_entropy_with_logits(logits[:, n_classes:], targets.to(logits.dtype))
    return ce + weight * bce, ce, bce


class AspectObjective(Objective):
    def __init__(self, n_classes: int, weight: float):
        super().__init__()
        self.n_classes, self.weight = n_classes, weight

    def forward(self, model, batch):
        loss, ce, bce = aspect_loss(model.full(batch["inputs"]), batch["labels"], batch["aspects"],
                                    self.n_classes, self.weight)
        return loss, {"ce": ce.detach(), "bce": bce.detach()}


def _collate(student, targets: torch.Tensor):
    base = make_collate(student, [], None)

    def collate(items):
        batch = base(items)
        batch["aspects"] = targets[torch.tensor([i for _, _, i in items])]
        return batch

    return collate


def run_aspects(teachers, student, train, test, *, options: AspectOptions, cfg, classes, val_fraction=0.1):
    import copy
    import time

    from ..engine import train as fit

    if len(teachers) != 1:
        raise ConfigError(f"aspects takes one answerer (the teacher), got {len(teachers)}")
    answerer = teachers[0].zoo
    check_answerer(answerer, train.modality, options)
    fit_data, val = fit_val(train, val_fraction, cfg.seed)
    t0 = time.perf_counter()
    targets, names = aspect_targets(answerer, fit_data, options)
    t_answers = time.perf_counter() - t0
    module = AspectClassifier(copy.deepcopy(student.zoo.backbone), student.zoo.feature_dim, len(classes),
                              len(names), seed=head_seed(cfg.seed, [*classes, *names])).requires_grad_(True)
    t1 = time.perf_counter()
    result = fit(module, Items(fit_data), AspectObjective(len(classes), options.aspect_weight), cfg, val_data=val,
                 collate_fn=_collate(student, targets), metric=ValAccuracy(student) if val is not None else "loss")
    extra = {"answers_s": round(t_answers, 3), "train_s": round(time.perf_counter() - t1, 3),
             "answerer": answerer.name, "aspects": names,
             "aspect_positive_rate": round(float((targets > 0.5).float().mean()), 4)}
    return module.classifier().eval(), result.history, extra


def _aspects(teachers, student, train, test, *, options, cfg, classes):
    return run_aspects(teachers, student, train, test, options=options, cfg=cfg, classes=classes)


registry.register(STAGE, "aspects", paper="Lee, Bang, Kwon & Kim, Multi-aspect Knowledge Distillation with Large "
                  "Language Model, CVPRW 2025 (arXiv 2501.13341)",
                  summary="CE on C class logits + λ·BCE on N extra aspect logits against a frozen answerer's "
                  "calibrated answers (offline: zoo model, not an MLLM)",
                  options=AspectOptions, fn=_aspects, train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
