"""Label-free scorers: pick an adapted model (method, hyperparameter, checkpoint) without target labels.

Each scorer is usable as an engine scorer (``train(..., metric=scorer)``): ``scorer(model, data) -> float``
with ``name`` and ``higher_is_better``. ``data`` is the unlabelled target: raw items (an array or list) or a
:class:`~transferkit.data.Dataset`, whose labels are never read. The model is run in eval mode on the whole
set at once (in batches of ``batch_size``; the value does not depend on it).

- ``entropy`` — mean prediction entropy (nats) over the target items, lower is better (Morerio et al.,
  "Minimal-entropy correlation alignment", ICLR 2018; skada's ``PredictionEntropyScorer``). skada's
  ``reduction="mean"`` averages −p log p over all N × C entries, i.e. this value / C.
- ``snd`` — soft neighbourhood density (Saito, Kim, Teterwak, Sclaroff, Darrell, Saenko, "Tune it the right
  way: unsupervised validation of domain adaptation via soft neighborhood density", ICCV 2021): rows of the
  softmax output L2-normalised, similarities / T (T = 0.05) with the self-similarity replaced by −1/T, row
  softmax, mean row entropy; higher is better. As skada's ``SoftNeighborhoodDensity``.
- ``transfer_score`` — Transfer Score (Yang, Qian, Xu, Wang, Xie, "Can we evaluate domain adaptation models
  without target-domain labels?", ICLR 2024): TS = Hopkins(Z_t) + MI/log C − U(W), higher is better, with
  Z_t the target's penultimate features, MI = H(mean prediction) − mean per-item entropy (the mutual
  information, −IM of the reference), and U(W) the mean squared deviation of the angles between the
  head's row-normalised class weights from the simplex-ETF angle arccos(−1/(C−1)). Hopkins statistic:
  m = max(1, round(0.05 N)) uniform points in the bounding box of Z_t and m sampled items, H = Σu / (Σu + Σw)
  (u: distance of a uniform point to its nearest item, w: of a sampled item to its nearest other item).
  Deviations from the reference, which are its listed defects: the Hopkins sample is seeded (``seed``), and
  MI is computed over the whole target set instead of averaged over batches (the reference's value depends
  on the batch size). The model must be a classifier with ``backbone`` and a linear ``head`` (the reference
  also reads the head's weights).
- ``iwv`` — importance-weighted validation (Sugiyama, Krauledat, Müller, "Covariate shift adaptation by
  importance weighted cross validation", JMLR 2007; skada's ``ImportanceWeightedScorer``): Gaussian kernel
  density estimates of the source and the target, w(x_s) ∝ p_t(x_s) / p_s(x_s) normalised to sum 1, score =
  the w-weighted accuracy on the labelled source items; higher is better. Deviation from skada (which fits the
  densities on the raw inputs): the densities are fitted on the model's penultimate features, standardised
  with the pooled mean and standard deviation (``bandwidth`` 1.0, skada's default).
- ``dev`` — deep embedded validation (You, Wang, Long, Jordan, "Towards accurate model selection in deep
  unsupervised domain adaptation", ICML 2019; skada's ``DeepEmbeddedValidation``): the source items split
  67/33 (seeded); a logistic regression tells the penultimate features of the first part from the target's;
  on the second part w = (N_train / N_t) · P(t|x) / P(s|x), ℓ = per-item cross-entropy, η = −Cov(wℓ, w) /
  Var(w), DEV = mean(wℓ) + η·mean(w) − η; lower is better.

``iwv`` and ``dev`` need labelled source items next to the target's: ``data`` is then one Dataset holding
labelled source items and unlabelled target items (:func:`~transferkit.data.combine_domains`, whose target
labels are -1). The target-only scorers read the unlabelled items of such a Dataset, or every item of any
other ``data``. Circular validation, MixVal and MaNo are in :mod:`.selection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .. import registry
from ..data.dataset import Dataset
from ..errors import ConfigError
from ..registry import option
from ._common import STAGE, predict_logits

__all__ = ["prediction_entropy", "soft_neighborhood_density", "hopkins", "mutual_information", "uniformity",
           "transfer_score", "importance_weights", "importance_weighted_accuracy", "dev_risk",
           "deep_embedded_validation", "Scorer", "make_scorer", "standardise", "target_items"]


def prediction_entropy(probs: torch.Tensor) -> float:
    """Mean over rows of −Σ p log p (nats); 0·log 0 = 0."""
    p = probs.double()
    return float(-(torch.special.xlogy(p, p)).sum(-1).mean())


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = 0.05) -> float:
    """SND (Saito et al.): mean entropy of the softmax over the other items' similarities."""
    p = torch.nn.functional.normalize(probs.double(), dim=-1)
    sim = p @ p.T / temperature
    sim.fill_diagonal_(-1.0 / temperature)
    return prediction_entropy(sim.softmax(-1))


def hopkins(Z: torch.Tensor, fraction: float = 0.05, seed: int = 0) -> float:
    """Hopkins statistic of the rows of ``Z``: ~0.5 for uniform data, → 1 for clustered data."""
    Z = Z.double()
    n = len(Z)
    if n < 2:
        raise ConfigError("the Hopkins statistic needs at least 2 items")
    m = max(1, round(fraction * n))
    gen = torch.Generator().manual_seed(seed)
    lo, hi = Z.min(0).values, Z.max(0).values
    uniform = lo + (hi - lo) * torch.rand(m, Z.shape[1], generator=gen, dtype=torch.float64)
    picked = torch.randperm(n, generator=gen)[:m]
    u = torch.cdist(uniform, Z).min(1).values
    d = torch.cdist(Z[picked], Z)
    d[torch.arange(m), picked] = math.inf  # the nearest *other* item
    w = d.min(1).values
    return float(u.sum() / (u.sum() + w.sum()))


def mutual_information(probs: torch.Tensor) -> float:
    """H(mean prediction) − mean per-item entropy (≥ 0)."""
    p = probs.double()
    return prediction_entropy(p.mean(0, keepdim=True)) - prediction_entropy(p)


def uniformity(weight: torch.Tensor) -> float:
    """Mean over i ≠ j of (angle(w_i, w_j) − arccos(−1/(C−1)))² for the class weight rows ``w``."""
    w = torch.nn.functional.normalize(weight.double(), dim=-1)
    c = len(w)
    angles = torch.arccos((w @ w.T).clamp(-1.0, 1.0))
    off = ~torch.eye(c, dtype=torch.bool)
    return float(((angles[off] - math.acos(-1.0 / (c - 1))) ** 2).mean())


def transfer_score(features: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, *, fraction: float = 0.05,
                   seed: int = 0) -> float:
    """Hopkins(features) + MI(probs) / log C − U(weight) (Yang et al.)."""
    c = probs.shape[1]
    return hopkins(features, fraction, seed) + mutual_information(probs) / math.log(c) - uniformity(weight)


def standardise(*arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays minus the pooled column mean, over the pooled column standard deviation (1 where it is 0)."""
    pooled = np.concatenate(arrays)
    mu, sd = pooled.mean(0), pooled.std(0)
    sd[sd == 0] = 1.0
    return [(a - mu) / sd for a in arrays]


def importance_weights(source: np.ndarray, target: np.ndarray, bandwidth: float = 1.0) -> np.ndarray:
    """w_i ∝ p_t(x_i) / p_s(x_i) for the source rows, Gaussian KDEs on standardised features, sum 1."""
    from sklearn.neighbors import KernelDensity

    xs, xt = standardise(np.asarray(source, np.float64), np.asarray(target, np.float64))
    log_ratio = (KernelDensity(bandwidth=bandwidth).fit(xt).score_samples(xs)
                 - KernelDensity(bandwidth=bandwidth).fit(xs).score_samples(xs))
    w = np.exp(log_ratio - log_ratio.max())
    return w / w.sum()


def importance_weighted_accuracy(source_feats, source_probs, source_labels, target_feats,
                                 bandwidth: float = 1.0) -> float:
    """IWV: the importance-weighted accuracy of the predictions on the labelled source items."""
    w = importance_weights(source_feats, target_feats, bandwidth)
    correct = np.asarray(source_probs).argmax(-1) == np.asarray(source_labels)
    return float((w * correct).sum())


def dev_risk(weights: np.ndarray, losses: np.ndarray) -> float:
    """DEV's control-variate risk: mean(wℓ) + η·mean(w) − η with η = −Cov(wℓ, w) / Var(w)."""
    w, wl = np.asarray(weights, np.float64), np.asarray(weights, np.float64) * np.asarray(losses, np.float64)
    var = w.var(ddof=1)
    eta = -np.cov(wl, w, ddof=1)[0, 1] / var if var > 0 else 0.0
    return float(wl.mean() + eta * w.mean() - eta)


def deep_embedded_validation(source_feats, source_probs, source_labels, target_feats, seed: int = 0) -> float:
    """DEV (You et al.) of the source predictions, with a seeded 67/33 split of the source items."""
    from sklearn.linear_model import LogisticRegression

    fs, ft = standardise(np.asarray(source_feats, np.float64), np.asarray(target_feats, np.float64))
    n = len(fs)
    order = np.random.default_rng(seed).permutation(n)
    fit, val = order[: round(0.67 * n)], order[round(0.67 * n):]
    if len(fit) == 0 or len(val) < 2:
        raise ConfigError(f"DEV needs at least 3 labelled source items, got {n}")
    clf = LogisticRegression(max_iter=1000).fit(np.concatenate([fs[fit], ft]),
                                                np.r_[np.zeros(len(fit)), np.ones(len(ft))])
    p_t = np.clip(clf.predict_proba(fs[val])[:, 1], 1e-12, 1 - 1e-12)
    w = len(fit) / len(ft) * p_t / (1 - p_t)
    probs = np.asarray(source_probs, np.float64)[val]
    losses = -np.log(np.clip(probs[np.arange(len(val)), np.asarray(source_labels)[val]], 1e-12, None))
    return dev_risk(w, losses)


@dataclass
class SNDOptions:
    temperature: float = option(0.05, low=0.0, low_open=True, help="softmax temperature T")


@dataclass
class TransferScoreOptions:
    fraction: float = option(0.05, low=0.0, high=1.0, low_open=True, help="share of items in the Hopkins sample")
    seed: int = option(0, low=0, help="seed of the Hopkins sample")


@dataclass
class IWVOptions:
    bandwidth: float = option(1.0, low=0.0, low_open=True, help="Gaussian kernel bandwidth (standardised features)")


@dataclass
class DEVOptions:
    seed: int = option(0, low=0, help="seed of the 67/33 source split")


class Scorer:
    """An engine scorer: ``scorer(model, data) -> float`` with ``name`` and ``higher_is_better``.

    ``needs``: ``"target"`` (``compute(probs)``), ``"logits"`` (``compute(logits)`` on the target), ``"head"``
    (``compute(probs, features, head_weight)`` on the target), ``"source"`` (``compute(source_feats,
    source_probs, source_labels, target_feats)``) or ``"domains"`` (the same and ``target_probs``).
    """

    def __init__(self, name: str, higher_is_better: bool, compute: Callable[..., float], preprocess,
                 needs: str = "target", batch_size: int = 256):
        self.name, self.higher_is_better = name, higher_is_better
        self.compute, self.preprocess, self.needs = compute, preprocess, needs
        self.batch_size = batch_size

    def __call__(self, model: Any, data: Any) -> float:
        if self.needs in ("source", "domains"):
            if not isinstance(data, Dataset) or data.labelled.all() or not data.labelled.any():
                raise ConfigError(f"scorer {self.name!r} needs a Dataset of labelled source and unlabelled target "
                                  "items (transferkit.data.combine_domains)")
            logits, feats = self._run(model, data.X)
            src = data.labelled
            args = (feats[src].numpy(), logits[src].softmax(-1).numpy(), data.y[src], feats[~src].numpy())
            extra = (logits[~src].softmax(-1).numpy(),) if self.needs == "domains" else ()
            return self.compute(*args, *extra)
        X = target_items(data)
        if self.needs == "head":
            logits, feats = self._run(model, X)
            return self.compute(logits.softmax(-1), feats, model.head.weight.detach().cpu())
        logits = predict_logits(model, X, self.preprocess, self.batch_size)
        return self.compute(logits if self.needs == "logits" else logits.softmax(-1))

    def _run(self, model: Any, X: Any):
        if not isinstance(getattr(model, "head", None), torch.nn.Linear) or not hasattr(model, "backbone"):
            raise ConfigError(f"scorer {self.name!r} needs a classifier with a backbone and a linear head")
        return predict_logits(model, X, self.preprocess, self.batch_size, features=True)


def target_items(data: Any) -> Any:
    """The unlabelled items of a Dataset that has some, else all its items (labels unread); raw items as given."""
    if not isinstance(data, Dataset):
        return data
    return data.X if data.labelled.all() else data.subset(~data.labelled).X


def make_scorer(name: str, preprocess, *, batch_size: int = 256, seed: int | None = None,
                **options: Any) -> Scorer:
    """The registered scorer ``name`` for inputs made by ``preprocess``; ``options`` are checked by the registry
    (``seed``, when given, seeds a scorer that draws random numbers)."""
    m = registry.get(STAGE, name)
    if m.info.get("kind") != "scorer":
        raise ConfigError(f"adapt method {name!r} is not a scorer")
    if seed is not None and m.options is not None and "seed" in {f for f in m.options.__dataclass_fields__}:
        options.setdefault("seed", seed)
    return m.fn(preprocess, m.parse(options), batch_size)


def _entropy(preprocess, _options, batch_size) -> Scorer:
    return Scorer("entropy", False, prediction_entropy, preprocess, batch_size=batch_size)


def _snd(preprocess, o: SNDOptions, batch_size) -> Scorer:
    return Scorer("snd", True, lambda p: soft_neighborhood_density(p, o.temperature), preprocess,
                  batch_size=batch_size)


def _transfer_score(preprocess, o: TransferScoreOptions, batch_size) -> Scorer:
    return Scorer("transfer_score", True,
                  lambda p, z, w: transfer_score(z, p, w, fraction=o.fraction, seed=o.seed), preprocess,
                  needs="head", batch_size=batch_size)


def _iwv(preprocess, o: IWVOptions, batch_size) -> Scorer:
    return Scorer("iwv", True, lambda fs, ps, ys, ft: importance_weighted_accuracy(fs, ps, ys, ft, o.bandwidth),
                  preprocess, needs="source", batch_size=batch_size)


def _dev(preprocess, o: DEVOptions, batch_size) -> Scorer:
    return Scorer("dev", False, lambda fs, ps, ys, ft: deep_embedded_validation(fs, ps, ys, ft, o.seed),
                  preprocess, needs="source", batch_size=batch_size)


registry.register(STAGE, "entropy", fn=_entropy, kind="scorer", higher_is_better=False,
                  paper="Morerio et al. Minimal-Entropy Correlation Alignment, ICLR 2018",
                  summary="label-free scorer: mean prediction entropy on the target (lower is better)")
registry.register(STAGE, "snd", fn=_snd, options=SNDOptions, kind="scorer", higher_is_better=True,
                  paper="Saito et al. Tune it the Right Way: Unsupervised Validation of Domain Adaptation via "
                        "Soft Neighborhood Density, ICCV 2021",
                  summary="label-free scorer: soft neighbourhood density of the target predictions")
registry.register(STAGE, "transfer_score", fn=_transfer_score, options=TransferScoreOptions, kind="scorer",
                  higher_is_better=True,
                  paper="Yang et al. Can We Evaluate Domain Adaptation Models Without Target-Domain Labels?, "
                        "ICLR 2024",
                  summary="label-free scorer: Hopkins clustering + mutual information − head-weight uniformity")
registry.register(STAGE, "iwv", fn=_iwv, options=IWVOptions, kind="scorer", higher_is_better=True,
                  paper="Sugiyama et al. Covariate Shift Adaptation by Importance Weighted Cross Validation, JMLR 2007",
                  summary="label-free scorer: source accuracy weighted by KDE density ratios p_t/p_s")
registry.register(STAGE, "dev", fn=_dev, options=DEVOptions, kind="scorer", higher_is_better=False,
                  paper="You et al. Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation, ICML 2019",
                  summary="label-free scorer: deep embedded validation, a control-variate importance-weighted risk")
