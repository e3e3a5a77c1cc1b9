"""UDA: unsupervised data augmentation for consistency training (Xie, Dai, Hovy, Luong, Le, "Unsupervised Data
Augmentation for Consistency Training", NeurIPS 2020), here between a labelled source and an unlabelled target.

J = E_source[CE masked by TSA] + λ · E_{x ∈ target}[ 1[max softmax z(x) > β] · KL(softmax(sg(z(x)) / τ) ‖
softmax(z(x̂))) ] (+ ``ent_min_coeff`` · the entropy of softmax(z(x̂)), 0 by default), x̂ an augmented copy of x:

- confidence mask β = ``threshold`` = 0.8 (the paper's CIFAR-10 / SVHN value; 0.5 for ImageNet), read from the
  *unsharpened* clean prediction; the masked KL is averaged over the **whole** unlabelled batch, not over the
  kept items (:func:`consistency_loss`);
- sharpening τ = ``temperature`` = 0.4; the clean prediction is a constant (stop-gradient);
- training-signal annealing (:func:`tsa_threshold`): η_t = α_t (1 − 1/K) + 1/K with α_t = t/T (``linear``),
  1 − exp(−5 t/T) (``log``), exp(5 (t/T − 1)) (``exp``), t the update, T the planned updates; labelled items
  whose probability of their label exceeds η_t are dropped and the supervised loss is averaged over the kept
  items (denominator max(kept, 1): :func:`tsa_cross_entropy`). Endpoints: linear η_0 = 1/K, η_T = 1; log
  η_0 = 1/K but η_T = 1 − e^−5 (1 − 1/K); exp η_T = 1 but η_0 = 1/K + e^−5 (1 − 1/K). The paper uses log when
  labels are plentiful and exp when they are few; the labelled source of domain adaptation is plentiful, so
  the default is ``log`` (``none`` turns TSA off);
- λ = ``unsup_coeff`` = 1; unlabelled : labelled batch ratio ``unsup_ratio`` = 7 for images, 3 for text (the
  paper's), with ``batch_size`` = 64 labelled items per step.

Augmentations, all offline and seeded (the engine reseeds the global RNG before every update; each batch's
augmentation draws its own seed from it, so a run and its resume see the same x̂):

- images: RandAugment as UDA uses it (:func:`rand_augment`): ``n_ops`` = 2 operations per image drawn uniformly
  from 14 (identity, autocontrast, equalize, rotate ±30°, solarize, colour, posterize 4–8 bits, contrast,
  brightness, sharpness, shear x / y ±0.3, translate x / y ±30 %), each at a magnitude drawn uniformly from
  (0, ``magnitude``] of its range (UDA's random magnitude), then Cutout of a square of side ``cutout`` = 0.5 of
  the image filled with grey 128. Torch ops on uint8 tensors (bilinear, zero fill for the geometric ops), not PIL;
- text: word-level operations (:func:`word_augment`): synonym swap from a small lexicon packaged with
  transferkit (``adapt/synonyms.yaml``, written for it; each word found is replaced with probability
  ``synonym_p``), random swaps of two words (``swap_p`` × length swaps, at least one) and deletion (each word
  with probability ``delete_p``, one word always kept). **Back-translation, the paper's text augmentation, is
  not available offline** (it needs translation models), so these ops are a weaker substitute.

Deviations: SGD (momentum 0.9, weight decay 5e-4, lr 0.01) with the engine's cosine decay as in the paper's
image setting, but starting from the pre-trained model rather than from scratch; source, clean and augmented
target batches go through the model in one concatenated pass when their shapes match (BatchNorm sees the
mixed batch, as in the reference's single forward); the unlabelled ratio is made by grouping the target items
``unsup_ratio`` at a time (a seeded partition; the engine shuffles the groups every pass), since the engine
draws the same number of items from every stream. ``select_by`` picks the best epoch with a label-free scorer on
the unlabelled target training items (the paper selects nothing on target labels either).

UDA was written for semi-supervised learning on one distribution. Across a domain shift its consistency term
also reinforces the source model's confident *wrong* target predictions: on the digit benchmark
(``benchmarks/results/adapt_digits.md``) it helps MNIST → sklearn-digits but falls far below source-only on
sklearn-digits → MNIST, where the source model is right on about half of the target.

Frozen backbone (:class:`~._common.BackboneOptions`): ``freeze_backbone`` keeps the pre-trained backbone fixed
(eval mode, no gradient) and trains the head and, when set, the ``bottleneck`` (Linear → BatchNorm1d → ReLU).
Source items and clean target items never change, so their backbone features are computed once per item at the
start (:func:`~._common.training_inputs`); only the augmented copies are new on every step, and the objective
runs the frozen backbone on them (eval mode, no gradient; an objective ``frozen`` part, kept out of the optimizer
and the checkpoints). Source, clean and augmented features then go through the bottleneck + head in one
concatenated pass, on text too. Per step the backbone sees the ``unsup_ratio`` × ``batch_size`` augmented items
instead of all (1 + 2 ``unsup_ratio``) × ``batch_size``. ``run(..., cache_features=False)`` runs the frozen
backbone on every item of every step instead: the same run to float rounding on images; on text the uncached
path sends token batches of different lengths through the bottleneck separately (its BatchNorm then normalises
each part on its own), so the two runs differ there. The returned module predicts raw items.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..data.dataset import combine_domains
from ..engine import Objective, TrainConfig, forward, train
from ..errors import ConfigError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ._common import STAGE, BackboneOptions, Fitted, adapted_classifier, predict_logits, training_inputs

__all__ = ["UdaOptions", "tsa_threshold", "tsa_cross_entropy", "consistency_loss", "rand_augment", "IMAGE_OPS",
           "word_augment", "synonym_swap", "random_deletion", "random_swap", "lexicon", "UDAObjective", "run"]

SCORERS = ("entropy", "snd", "transfer_score", "mixval", "mano")
TSA = ("none", "linear", "log", "exp")
LEXICON = Path(__file__).with_name("synonyms.yaml")


@dataclass
class UdaOptions(BackboneOptions):
    epochs: int = option(3, low=1, help="passes over the labelled source")
    batch_size: int = option(64, low=1, help="labelled source items per step")
    unsup_ratio: int | None = option(None, low=1, help="unlabelled items per labelled item (null: 7 for images, "
                                     "3 for text, the paper's)")
    lr: float = option(0.01, low=0.0, low_open=True, help="SGD lr (cosine decay)")
    momentum: float = option(0.9, low=0.0, high=1.0, high_open=True)
    weight_decay: float = option(5e-4, low=0.0)
    unsup_coeff: float = option(1.0, low=0.0, help="λ, the weight of the consistency loss")
    threshold: float = option(0.8, low=0.0, high=1.0, help="β: confidence mask on the clean prediction")
    temperature: float = option(0.4, low=0.0, low_open=True, help="τ: sharpening of the clean prediction")
    tsa: str = option("log", choices=TSA, help="training-signal annealing schedule")
    ent_min_coeff: float = option(0.0, low=0.0, help="weight of the augmented predictions' entropy")
    n_ops: int = option(2, low=0, high=10, help="RandAugment operations per image")
    magnitude: float = option(1.0, low=0.0, high=1.0, help="largest magnitude, as a share of each op's range")
    cutout: float = option(0.5, low=0.0, high=1.0, help="Cutout square side as a share of the image (0: none)")
    synonym_p: float = option(0.1, low=0.0, high=1.0, help="text: probability of swapping a known word")
    swap_p: float = option(0.1, low=0.0, high=1.0, help="text: word swaps per word (at least one)")
    delete_p: float = option(0.1, low=0.0, high=1.0, high_open=True, help="text: probability of deleting a word")
    select_by: str | None = option(None, choices=SCORERS, help="label-free scorer that picks the best epoch "
                                   "(on the unlabelled target); null: the last")


# ------------------------------------------------------------------------------------------- losses
def tsa_threshold(schedule: str, step: int, total: int, classes: int) -> float:
    """η_t of training-signal annealing at update ``step`` of ``total`` with ``classes`` classes (1 for none)."""
    if schedule == "none":
        return 1.0
    r = step / max(total, 1)
    if schedule == "linear":
        a = r
    elif schedule == "log":
        a = 1.0 - math.exp(-5.0 * r)
    elif schedule == "exp":
        a = math.exp(5.0 * (r - 1.0))
    else:
        raise ConfigError(f"tsa must be one of {', '.join(TSA)}, got {schedule!r}")
    return a * (1.0 - 1.0 / classes) + 1.0 / classes


def tsa_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CE over the labelled items whose probability of their label is ≤ η (the rest are dropped), averaged over
    the kept ones (0 when none is kept); returns ``(loss, kept mask)``."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        p = F.softmax(logits.float(), -1).gather(1, labels[:, None]).squeeze(1)
        keep = (p <= eta).to(ce.dtype)
    return (ce * keep).sum() / keep.sum().clamp_min(1.0), keep.bool()


def consistency_loss(clean: torch.Tensor, augmented: torch.Tensor, threshold: float, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """mean over the whole batch of 1[max softmax(clean) > β] · KL(softmax(sg(clean)/τ) ‖ softmax(augmented));
    returns ``(loss, mask)``."""
    clean = clean.detach()
    mask = (F.softmax(clean, -1).max(-1).values > threshold).to(augmented.dtype)
    target_log = F.log_softmax(clean / temperature, -1)
    kl = (target_log.exp() * (target_log - F.log_softmax(augmented, -1))).sum(-1)
    return (kl * mask).mean(), mask.bool()


# ------------------------------------------------------------------------------------- image ops
def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (img - degenerate)).clamp(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _eye(n: int, dtype) -> torch.Tensor:
    return torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=dtype).repeat(n, 1, 1)


def _identity(x, m):
    return x


def _autocontrast(x, m):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    out = (x - lo) * 255.0 / span.clamp_min(1e-6)
    return torch.where(span > 0, out, x)


def _equalize(x, m):
    out = x.clone()
    q = x.round().clamp(0, 255).long()
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            hist = torch.bincount(q[b, c].flatten(), minlength=256)
            nz = hist[hist > 0]
            step = (int(hist.sum()) - int(nz[-1])) // 255 if len(nz) else 0
            if step == 0:
                continue
            lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp(0, 255)
            out[b, c] = lut[q[b, c]].to(x.dtype)
    return out


def _rotate(x, m):
    a = m * math.radians(30.0)
    theta = _eye(len(x), x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, theta)


def _solarize(x, m):
    t = (256.0 * (1.0 - m.abs())).view(-1, 1, 1, 1)
    return torch.where(x >= t, 255.0 - x, x)


def _color(x, m):
    return _blend(_grey(x).expand_as(x), x, 1.0 + 0.9 * m)


def _posterize(x, m):
    bits = (8 - (4 * m.abs()).round()).long()
    shift = (8 - bits).view(-1, 1, 1, 1)
    q = x.round().clamp(0, 255).long()
    return ((q >> shift) << shift).to(x.dtype)


def _contrast(x, m):
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(mean, x, 1.0 + 0.9 * m)


def _brightness(x, m):
    return _blend(torch.zeros_like(x), x, 1.0 + 0.9 * m)


def _sharpness(x, m):
    c = x.shape[1]
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype) / 13.0
    smooth = F.conv2d(x, k.view(1, 1, 3, 3).repeat(c, 1, 1, 1), padding=1, groups=c)
    smooth[..., 0, :], smooth[..., -1, :] = x[..., 0, :], x[..., -1, :]  # borders kept, as PIL does
    smooth[..., :, 0], smooth[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return _blend(smooth, x, 1.0 + 0.9 * m)


def _shear(axis):
    def op(x, m):
        theta = _eye(len(x), x.dtype)
        theta[:, axis, 1 - axis] = 0.3 * m
        return _affine(x, theta)
    return op


def _translate(axis):
    def op(x, m):
        theta = _eye(len(x), x.dtype)
        theta[:, axis, 2] = 2 * 0.3 * m  # normalised coordinates span 2: a shift of 30 % of the side at m = 1
        return _affine(x, theta)
    return op


IMAGE_OPS = {"identity": _identity, "autocontrast": _autocontrast, "equalize": _equalize, "rotate": _rotate,
             "solarize": _solarize, "color": _color, "posterize": _posterize, "contrast": _contrast,
             "brightness": _brightness, "sharpness": _sharpness, "shear_x": _shear(0), "shear_y": _shear(1),
             "translate_x": _translate(0), "translate_y": _translate(1)}


def rand_augment(images: Any, seed: int, n_ops: int = 2, magnitude: float = 1.0, cutout: float = 0.5,
                 ops: tuple[str, ...] | None = None) -> np.ndarray:
    """RandAugment (UDA's variant, random magnitudes) + Cutout of uint8 images ``(N, H, W)`` or ``(N, H, W, C)``;
    the same ``seed`` gives the same images. Returns uint8 of the input's shape. Signed ops (rotate, shear,
    translate, the enhancements) pick their direction at random; magnitudes are uniform in (0, magnitude]."""
    x = torch.as_tensor(np.asarray(images))
    grey = x.dim() == 3
    x = (x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2)).float()
    g = torch.Generator().manual_seed(int(seed))
    names = list(ops or IMAGE_OPS)
    n = len(x)
    choice = torch.randint(len(names), (n, n_ops), generator=g)
    mags = (1.0 - torch.rand((n, n_ops), generator=g)) * magnitude  # (0, magnitude]
    signs = torch.randint(0, 2, (n, n_ops), generator=g).float() * 2 - 1
    for s in range(n_ops):
        for k, name in enumerate(names):
            idx = (choice[:, s] == k).nonzero().flatten()
            if len(idx):
                x[idx] = IMAGE_OPS[name](x[idx], mags[idx, s] * signs[idx, s]).clamp(0, 255)
    if cutout > 0 and n:
        h, w = x.shape[2:]
        side_h, side_w = max(1, round(cutout * h)), max(1, round(cutout * w))
        cy = torch.randint(h, (n,), generator=g)
        cx = torch.randint(w, (n,), generator=g)
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        y0, x0 = (cy - side_h // 2).view(n, 1, 1), (cx - side_w // 2).view(n, 1, 1)
        box = (rows >= y0) & (rows < y0 + side_h) & (cols >= x0) & (cols < x0 + side_w)
        x = torch.where(box[:, None], torch.full_like(x, 128.0), x)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return (x[:, 0] if grey else x.permute(0, 2, 3, 1)).numpy()


# ------------------------------------------------------------------------------------------ text ops
@functools.lru_cache(maxsize=4)
def lexicon(path: str | Path = LEXICON) -> dict[str, tuple[str, ...]]:
    """``{word: its synonyms}`` from a YAML file of synonym groups (each word maps to the rest of its group)."""
    import yaml

    groups = yaml.safe_load(Path(path).read_text())["groups"]
    table: dict[str, tuple[str, ...]] = {}
    for group in groups:
        words = [str(w).lower() for w in group]
        for w in words:
            table[w] = tuple(x for x in words if x != w)
    return table


_WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def synonym_swap(words: list[str], rng: random.Random, p: float, table: dict[str, tuple[str, ...]]) -> list[str]:
    """Each word whose core (punctuation stripped, lower-cased) is in ``table`` becomes a random synonym with
    probability ``p``, keeping its punctuation and a leading capital."""
    out = []
    for word in words:
        pre, core, post = _WORD.match(word).groups()
        syns = table.get(core.lower())
        if syns and rng.random() < p:
            new = rng.choice(syns)
            if core[:1].isupper():
                new = new[:1].upper() + new[1:]
            word = pre + new + post
        out.append(word)
    return out


def random_swap(words: list[str], rng: random.Random, p: float) -> list[str]:
    """max(1, round(p · n)) swaps of two random positions (nothing for fewer than two words)."""
    words = list(words)
    if len(words) < 2 or p <= 0:
        return words
    for _ in range(max(1, round(p * len(words)))):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], rng: random.Random, p: float) -> list[str]:
    """Each word deleted with probability ``p``; one random word is kept when all would go."""
    if not words or p <= 0:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [words[rng.randrange(len(words))]]


def word_augment(text: str, rng: random.Random, synonym_p: float = 0.1, swap_p: float = 0.1, delete_p: float = 0.1,
                 table: dict[str, tuple[str, ...]] | None = None) -> str:
    """Synonym swap, then word swaps, then deletion, on whitespace-separated words."""
    words = text.split()
    words = synonym_swap(words, rng, synonym_p, lexicon() if table is None else table)
    words = random_swap(words, rng, swap_p)
    return " ".join(random_deletion(words, rng, delete_p))


# --------------------------------------------------------------------------------------- training
class _Groups(torch.utils.data.Dataset):
    """The unlabelled items grouped ``ratio`` at a time by a seeded permutation (the last group may be short);
    with ``features`` (one row per item) each group also carries its items' rows."""

    def __init__(self, X: Any, ratio: int, seed: int, features: np.ndarray | None = None):
        self.X, self.features = X, features
        perm = np.random.default_rng([seed, 0x0DA]).permutation(len(X))
        self.groups = [perm[i: i + ratio] for i in range(0, len(perm), ratio)]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> _Group:
        idx = self.groups[i]
        return _Group([self.X[j] for j in idx], None if self.features is None else self.features[idx])


class _Group(list):
    """A group of unlabelled items (tells the collate function which stream an item comes from), with their
    cached features or None."""

    def __init__(self, items: list, features: np.ndarray | None = None):
        super().__init__(items)
        self.features = features


def make_uda_collate(preprocess, modality: str, options: UdaOptions, cached: bool = False):
    """Source items → ``{"inputs", "labels"}``; target groups → ``{"inputs", "augmented"}`` (clean and
    augmented copies of the same items, the augmentation seeded from the step-seeded global RNG). With
    ``cached`` the source items and the groups' ``features`` are feature rows: ``inputs`` are those rows as
    tensors and only ``augmented`` is preprocessed raw items."""
    labelled = make_collate(torch.as_tensor if cached else preprocess)

    def collate(items):
        if not isinstance(items[0], _Group):
            return labelled(items)
        xs = [x for group in items for x in group]
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        if modality == "text":
            rng = random.Random(seed)
            raw, aug = [str(x) for x in xs], [word_augment(str(x), rng, options.synonym_p, options.swap_p,
                                                           options.delete_p) for x in xs]
        else:
            raw = np.stack(xs)
            aug = rand_augment(raw, seed, options.n_ops, options.magnitude, options.cutout)
        clean = torch.as_tensor(np.concatenate([g.features for g in items])) if cached else preprocess(raw)
        return {"inputs": clean, "augmented": preprocess(aug)}
    return collate


class UDAObjective(Objective):
    """TSA-masked source CE + λ · confidence-masked sharpened KL(clean ‖ augmented) on the target.

    Batches are ``{"source": {"inputs", "labels"}, "target": {"inputs", "augmented"}}``. With ``encoder`` (the
    frozen backbone; the model is then the bottleneck + head on features) the source and clean target inputs
    are features and ``augmented`` raw inputs, which ``encoder`` turns into features first. Logs ``ce``,
    ``unsup``, ``tsa_threshold``, ``tsa_kept`` (share of labelled items kept) and ``mask`` (share of confident
    target items).
    """

    def __init__(self, classes: int, options: UdaOptions, encoder: nn.Module | None = None):
        super().__init__()
        self.classes, self.options = classes, options
        self.eta = tsa_threshold(options.tsa, 0, 1, classes)
        self.encoder = encoder
        if encoder is not None:
            self.frozen = ("encoder",)  # the engine keeps it in eval mode, out of the optimizer and checkpoints

    def before_step(self, step: int, total: int) -> None:
        self.eta = tsa_threshold(self.options.tsa, step, total, self.classes)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        o = self.options
        xs, ys = batch["source"]["inputs"], batch["source"]["labels"]
        xu, xa = batch["target"]["inputs"], batch["target"]["augmented"]
        ns, nu = len(ys), _rows(xu)
        if self.encoder is not None:
            xa = self.encoder(xa).to(xu.dtype)
        if all(isinstance(x, torch.Tensor) for x in (xs, xu, xa)) and xs.shape[1:] == xu.shape[1:] == xa.shape[1:]:
            logits = forward(model, torch.cat([xs, xu, xa]))
            ls, lu, la = logits[:ns], logits[ns: ns + nu], logits[ns + nu:]
        else:  # token batches of different lengths
            ls, lu, la = forward(model, xs), forward(model, xu), forward(model, xa)
        sup, kept = tsa_cross_entropy(ls, ys, self.eta)
        unsup, mask = consistency_loss(lu, la, o.threshold, o.temperature)
        loss = sup + o.unsup_coeff * unsup
        logs = {"ce": sup.detach(), "unsup": unsup.detach(), "tsa_threshold": self.eta,
                "tsa_kept": kept.float().mean(), "mask": mask.float().mean()}
        if o.ent_min_coeff > 0:
            p = F.softmax(la, -1)
            ent = -(p * F.log_softmax(la, -1)).sum(-1).mean()
            loss = loss + o.ent_min_coeff * ent
            logs["entropy"] = ent.detach()
        return loss, logs


def _rows(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def run(model, source, target_train, target_test_X, *, options: UdaOptions, seed: int, progress: bool = False,
        cache_features: bool = True, **_) -> Fitted:
    """Train ``model`` (a ZooModel) with UDA consistency on labelled ``source`` + unlabelled ``target_train``; with
    a frozen backbone, on its features of the source and clean target items computed once (``cache_features``)
    or on raw items."""
    from .scorers import make_scorer

    clf = adapted_classifier(model, source.classes, options, seed)
    both = combine_domains(source, target_train)
    src, tgt = both.subset(both.labelled), both.subset(~both.labelled)
    ratio = options.unsup_ratio or (3 if model.modality == "text" else 7)
    module, X, preprocess = training_inputs(clf, model.preprocess, {"source": src.X, "target": tgt.X},
                                            cache_features)
    cached = module is not clf
    cfg = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, optimizer="sgd",
                      momentum=options.momentum, weight_decay=options.weight_decay, scheduler="cosine",
                      max_grad_norm=None, seed=seed, progress=progress, restore_best=options.select_by is not None)
    objective = UDAObjective(len(source.classes), options, clf.backbone[0] if cached else None)
    scorer = make_scorer(options.select_by, preprocess, seed=seed) if options.select_by else "accuracy"
    groups = _Groups(tgt.X, ratio, seed, X["target"] if cached else None)
    result = train(module, {"source": Pairs(X["source"], src.y), "target": groups}, objective, cfg,
                   collate_fn=make_uda_collate(model.preprocess, model.modality, options, cached), metric=scorer,
                   val_data=X["target"] if options.select_by else None)
    clf.eval()
    pred = predict_logits(clf, target_test_X, model.preprocess).argmax(-1).numpy()
    extra = {"best_step": result.best_step, "steps": result.steps, "unsup_ratio": ratio}
    if options.select_by:
        extra[f"selected_{options.select_by}"] = result.metrics.get(f"val_{options.select_by}")
    return Fitted(clf, {"adapted": pred}, result.history, extra)


registry.register(
    STAGE, "uda", fn=run, options=UdaOptions, kind="training", modality=["image", "text"],
    paper="Xie et al. Unsupervised Data Augmentation for Consistency Training, NeurIPS 2020",
    summary="TSA-masked source CE + confidence-masked, sharpened KL between clean and augmented target "
            "predictions (RandAugment; word-level ops for text, no back-translation offline)")
