"""More label-free model-selection scorers: circular validation, MixVal and MaNo.

Engine scorers like those of :mod:`.scorers` (``scorer(model, data) -> float``, ``name``, ``higher_is_better``;
:func:`~transferkit.adapt.scorers.make_scorer` builds them by name; the registry's ``kind="scorer"``).

- ``circular`` — circular validation (Bruzzone & Marconcini, "Domain adaptation problems: a DASVM
  classification technique and a circular validation strategy", TPAMI 2010; skada's ``CircularValidation``):
  the candidate pseudo-labels the target (argmax); a backward classifier is trained on the target items with
  those labels and predicts the source items; score = balanced accuracy against the true source labels
  (skada's default ``source_scorer``), higher is better. When the pseudo-labels are one class the backward
  classifier predicts that class everywhere (as skada). *The backward model*: a multinomial logistic
  regression (scikit-learn's ``LogisticRegression``, L2, ``C`` = 1.0, lbfgs, ``max_iter`` 1000) on the
  candidate's penultimate features, standardised with the pooled source + target mean and standard deviation.
  Deliberate deviation from the paper, which re-runs the whole DA method from the target back to the source:
  re-running a deep DA method per candidate costs as much as the candidate; the head on frozen features
  checks whether the candidate's target labelling is consistent with its feature space and the source
  labels. Needs ``data`` = labelled source + unlabelled target items (:func:`~transferkit.data.combine_domains`)
  and a classifier with ``backbone`` and a linear ``head``.
- ``mixval`` — MixVal (Hu, Liang, Liew, Xue, Bai, Wang, "Mixed samples as probes for unsupervised model
  selection in domain adaptation", NeurIPS 2023; skada's ``MixValScorer``): target items paired by one
  seeded permutation π (``numpy.random.RandomState(seed).permutation``, as skada's ``random_state``), mixed
  on the model's inputs (after preprocessing) as x = λ·x_i + (1 − λ)·x_π(i) with λ = 0.55; each mix is labelled
  with the hard pseudo-label of its dominant item (i if λ ≥ 0.5, else π(i)); ICE_intra = accuracy of the model
  on the mixes whose two items share a pseudo-label, ICE_inter = on the others; ``ice="both"`` (default) =
  mean of the two (the one that exists when the other has no pairs); higher is better. Deviations from the
  reference scripts (LHXXHB/MixVal ``val_mixval_intra.py`` / ``val_mixval_inter.py``), shared with skada: the
  reference computes the two scores in separate runs, each pairing every batch with its own reverse — intra on
  the target sorted by pseudo-label (so most pairs share a label), inter on a pre-shuffled list — and leaves
  their combination out of the code; here one permutation serves both, so the value is one per-model number
  usable as an engine scorer. Needs float tensor inputs (images, arrays): tokenised text cannot be mixed.
- ``mano`` — MaNo (Xie, Odonnat, Feofanov, Deng, Zhang, An, "MaNo: exploiting matrix norm for unsupervised
  accuracy estimation under distribution shifts", NeurIPS 2024; reference Renchunzi-Xie/MaNo, skada's
  ``MaNoScorer`` for deep models): from the target logits z (N × K), the criterion Φ = mean over the N × K
  entries of −log softmax(z) (the cross-entropy to the uniform distribution); if Φ > ``threshold`` (5.0) the
  rows are normalised by softmax, else by the order-2 Taylor softmax t = 1 + z + z²/2 minus its row minimum,
  divided by its row sum (a row of equal logits gives zeros, as the reference's ``F.normalize``); score =
  (mean over entries of P^p)^{1/p}, p = 4; higher is better. Deviations from the reference, which are its
  defects: the score is computed on the whole set (the reference, given a batch size, divides each shuffled
  batch's norm by the full N·K and averages over batches, so its value depends on the batch size and order),
  and the Taylor order is fixed at 2 (the reference's check of ``taylor_order`` is inverted and refuses its
  own default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import registry
from ..errors import ConfigError
from ..registry import option
from ._common import STAGE, predict_logits
from .scorers import Scorer, standardise, target_items

__all__ = ["circular_validation", "mixval", "interpolation_consistency", "mano", "MixValScorer"]


def circular_validation(source_feats, source_labels, target_feats, target_pred, C: float = 1.0) -> float:
    """Balanced accuracy on the source of a logistic regression fitted to the target's pseudo-labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    ys, pred_t = np.asarray(source_labels), np.asarray(target_pred)
    if len(np.unique(pred_t)) == 1:
        return float(balanced_accuracy_score(ys, np.full_like(ys, pred_t[0])))
    fs, ft = standardise(np.asarray(source_feats, np.float64), np.asarray(target_feats, np.float64))
    back = LogisticRegression(C=C, max_iter=1000).fit(ft, pred_t)
    return float(balanced_accuracy_score(ys, back.predict(fs)))


def interpolation_consistency(pred: np.ndarray, mix_pred: np.ndarray, perm: np.ndarray, lam: float,
                              ice: str = "both") -> float:
    """MixVal's ICE from the pseudo-labels ``pred``, the predictions ``mix_pred`` on the mixes of i and
    ``perm[i]`` and the mixing weight ``lam``; NaN when the chosen kind of pair does not occur."""
    pred, mix_pred = np.asarray(pred), np.asarray(mix_pred)
    other = pred[perm]
    label = pred if lam >= 0.5 else other
    same = pred == other
    ok = mix_pred == label
    intra = ok[same].mean() if same.any() else np.nan
    inter = ok[~same].mean() if (~same).any() else np.nan
    if ice == "intra":
        return float(intra)
    if ice == "inter":
        return float(inter)
    return float(np.nanmean([intra, inter]))


def mixval(model: torch.nn.Module, X: Any, preprocess, *, lam: float = 0.55, ice: str = "both", seed: int = 0,
           batch_size: int = 256) -> float:
    """MixVal of ``model`` on the raw target items ``X`` (see the module docstring)."""
    n = len(X)
    if n < 2:
        raise ConfigError("MixVal needs at least 2 target items")
    take = (lambda idx: X[idx]) if isinstance(X, np.ndarray) else (lambda idx: [X[j] for j in idx])
    probe = preprocess(take(np.arange(1)))
    if not isinstance(probe, torch.Tensor) or not probe.is_floating_point():
        raise ConfigError("MixVal mixes the model's inputs: it needs float tensor inputs (images, arrays), "
                          "not tokenised text")
    perm = np.random.RandomState(seed).permutation(n)
    pred = predict_logits(model, X, preprocess, batch_size).argmax(-1).numpy()

    def mixed(idx):
        idx = np.asarray(idx)
        return lam * preprocess(take(idx)) + (1 - lam) * preprocess(take(perm[idx]))

    mix_pred = predict_logits(model, np.arange(n), mixed, batch_size).argmax(-1).numpy()
    return interpolation_consistency(pred, mix_pred, perm, lam, ice)


def mano(logits: torch.Tensor, p: float = 4.0, threshold: float = 5.0) -> float:
    """MaNo: (mean P^p)^{1/p} of the softmax (Φ > threshold) or Taylor-softmax rows of ``logits``."""
    z = torch.as_tensor(logits).double()
    criterion = float(-torch.log_softmax(z, -1).mean())
    if criterion > threshold:
        P = z.softmax(-1)
    else:
        t = 1 + z + z * z / 2
        t = t - t.min(-1, keepdim=True).values
        P = torch.nn.functional.normalize(t, p=1, dim=-1)
    return float(P.pow(p).mean().pow(1 / p))


class MixValScorer(Scorer):
    """MixVal as an engine scorer: it runs the model on mixed inputs, not only on the target's own items."""

    def __init__(self, preprocess, lam: float, ice: str, seed: int, batch_size: int = 256):
        super().__init__("mixval", True, None, preprocess, batch_size=batch_size)
        self.lam, self.ice, self.seed = lam, ice, seed

    def __call__(self, model: Any, data: Any) -> float:
        return mixval(model, target_items(data), self.preprocess, lam=self.lam, ice=self.ice, seed=self.seed,
                      batch_size=self.batch_size)


@dataclass
class CircularOptions:
    C: float = option(1.0, low=0.0, low_open=True, help="inverse L2 strength of the backward logistic regression")


@dataclass
class MixValOptions:
    lam: float = option(0.55, low=0.0, high=1.0, low_open=True, high_open=True,
                        help="mixing weight λ of the first item of each pair")
    ice: str = option("both", choices=("both", "intra", "inter"),
                      help="pairs scored: same pseudo-label (intra), different (inter) or the mean of both")
    seed: int = option(0, low=0, help="seed of the pairing permutation")


@dataclass
class MaNoOptions:
    p: float = option(4.0, low=0.0, low_open=True, help="order of the entry-wise matrix norm")
    threshold: float = option(5.0, low=0.0, help="criterion above which softmax (else Taylor softmax) normalises")


def _circular(preprocess, o: CircularOptions, batch_size) -> Scorer:
    return Scorer("circular", True,
                  lambda fs, _ps, ys, ft, pt: circular_validation(fs, ys, ft, pt.argmax(-1), o.C),
                  preprocess, needs="domains", batch_size=batch_size)


def _mixval(preprocess, o: MixValOptions, batch_size) -> Scorer:
    return MixValScorer(preprocess, o.lam, o.ice, o.seed, batch_size)


def _mano(preprocess, o: MaNoOptions, batch_size) -> Scorer:
    return Scorer("mano", True, lambda z: mano(z, o.p, o.threshold), preprocess, needs="logits",
                  batch_size=batch_size)


registry.register(STAGE, "circular", fn=_circular, options=CircularOptions, kind="scorer", higher_is_better=True,
                  paper="Bruzzone & Marconcini. Domain Adaptation Problems: A DASVM Classification Technique and a "
                        "Circular Validation Strategy, TPAMI 2010",
                  summary="label-free scorer: source balanced accuracy of a head fitted to the target pseudo-labels")
registry.register(STAGE, "mixval", fn=_mixval, options=MixValOptions, kind="scorer", higher_is_better=True,
                  paper="Hu et al. Mixed Samples as Probes for Unsupervised Model Selection in Domain Adaptation, "
                        "NeurIPS 2023",
                  summary="label-free scorer: consistency of the predictions on mixed target pairs (λ = 0.55)")
registry.register(STAGE, "mano", fn=_mano, options=MaNoOptions, kind="scorer", higher_is_better=True,
                  paper="Xie et al. MaNo: Exploiting Matrix Norm for Unsupervised Accuracy Estimation Under "
                        "Distribution Shifts, NeurIPS 2024",
                  summary="label-free scorer: p-norm of the (Taylor-)softmax target prediction matrix")
