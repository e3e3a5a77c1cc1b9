"""DistillNearest / DistillWeighted (Borup, Phoo & Hariharan, "Distilling from Similar Tasks for Transfer
Learning on a Budget", ICCV 2023).

A pool of source models (any label sets) and a target with few labels: each source becomes a teacher for
the target by a linear probe fitted on its frozen features of the labelled target items; the sources are
ranked for the target with a ``transferkit.rank`` metric on those features; the student (a small model with a
new head) is distilled on every training item, labelled or not (KD with the cross-entropy on the labelled
items only, :mod:`.kd`).

- ``nearest``: distil from the top-ranked source only.
- ``weighted``: distil from the mixture of every source's softened predictions with weights
  ``w = softmax(z / τ)``, ``z`` the pool's scores standardised over the pool (mean 0, standard deviation 1;
  all equal: uniform). The paper does not give its weighting formula; this is our design choice: the metrics'
  scales differ (LogME is a per-sample evidence, H-score a variance ratio), the z-score makes ``τ`` mean the
  same for each, and ``τ → 0`` recovers ``nearest``.

Defaults: metric LogME (features and labels; no source head needed), ``labelled`` = every label (set a
number per class for the paper's budget setting), probe = multinomial logistic regression (L2, C = 1) on the
raw penultimate features, KD with T = 4 and α = 0.1 as in :mod:`.kd`. Deviations: the paper's per-target
numbers and its similarity metric are not used (unverified); no FixMatch-style augmentation (the teachers'
logits are cached: frozen teachers, fixed data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .. import registry
from ..data import UNLABELLED
from ..errors import ConfigError, DataError
from ._common import STAGE, Net
from .kd import KDCore, run_kd


@dataclass
class NearestOptions(KDCore):
    metric: str = registry.option("logme", help="transferkit.rank metric that ranks the sources for the target "
                                  "(one that needs features only)")
    labelled: int | None = registry.option(None, low=1, help="labelled training items kept per class (the rest "
                                           "are used unlabelled); null: every label")


@dataclass
class WeightedOptions(NearestOptions):
    tau: float = registry.option(1.0, low=0.0, low_open=True, high=100.0,
                                 help="temperature of the softmax over the standardised scores")


def keep_labels(train, per_class: int | None, seed: int):
    """``train`` with at most ``per_class`` labels per class (chosen with ``seed``); the others become -1."""
    if per_class is None:
        return train
    rng = np.random.default_rng(seed)
    y = train.y.copy()
    for c in range(len(train.classes)):
        idx = np.flatnonzero(train.y == c)
        y[rng.permutation(idx)[per_class:]] = UNLABELLED
    return dataclasses.replace(train, y=y)


def fit_probe(X: np.ndarray, y: np.ndarray, n_classes: int) -> torch.nn.Linear:
    """Multinomial logistic regression (sklearn, L2, C = 1) as an ``nn.Linear`` over ``n_classes`` logits."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(X, y)
    W = np.zeros((n_classes, X.shape[1]), np.float32)
    b = np.zeros(n_classes, np.float32)
    if len(clf.classes_) == 2:  # sklearn keeps one row for two classes: logits (0, w·x + b)
        W[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        W[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    head = torch.nn.Linear(X.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W))
        head.bias.copy_(torch.from_numpy(b))
    return head


def similarity_weights(scores: list[float], tau: float) -> list[float]:
    """``softmax(z / τ)`` of the pool's standardised scores (uniform when every score is equal)."""
    s = np.asarray(scores, np.float64)
    sd = s.std()
    z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    e = np.exp((z - z.max()) / tau)
    return (e / e.sum()).tolist()


def probe_teachers(pool: list[Net], train, metric: str, seed: int) -> tuple[list[Net], list[float]]:
    """Each pool model as a teacher over the data's classes (backbone + probe) and its rank score."""
    from ..features import extract
    from ..rank import METRICS, score
    from ..zoo import Classifier

    if metric not in METRICS or METRICS[metric].needs != frozenset({"features"}):
        usable = [n for n, m in METRICS.items() if m.needs == frozenset({"features"})]
        raise ConfigError(f"distill metric {metric!r} is not a features-only rank metric"
                          f"{registry.did_you_mean(metric, usable)}; use one of {', '.join(usable)}")
    lab = train.subset(train.labelled)
    if len(set(lab.y.tolist())) < 2:
        raise DataError("nearest/weighted need labelled items of at least 2 classes")
    teachers, scores = [], []
    for net in pool:
        feats = extract(net.zoo, lab, progress=False)
        scores.append(score(feats, metric, seed=seed))
        clf = Classifier(net.zoo.backbone, net.zoo.feature_dim, len(train.classes))
        clf.head = fit_probe(feats.X, feats.y, len(train.classes))
        teachers.append(Net(net.name, net.zoo, clf.eval(), list(train.classes)))
    return teachers, scores


def _run(weighted: bool):
    def run(pool, student, train, test, *, options, cfg, classes):
        train = keep_labels(train, options.labelled, cfg.seed)
        teachers, scores = probe_teachers(pool, train, options.metric, cfg.seed)
        if weighted:
            chosen, w = teachers, similarity_weights(scores, options.tau)
        else:
            best = int(np.argmax(scores))
            chosen, w = [teachers[best]], [1.0]
        module, history, extra = run_kd(chosen, student, train, test, options=options, cfg=cfg, classes=classes,
                                        weights=w)
        extra.update({"scores": dict(zip([t.name for t in teachers], scores)), "metric": options.metric,
                      "distilled_from": [t.name for t in chosen], "n_labelled": int(train.labelled.sum())})
        if test is not None:
            from ._common import accuracy

            extra["teacher_test_accuracy"] = {t.name: accuracy(t.module, t, test) for t in teachers}
        return module, history, extra

    return run


_PAPER = "Borup, Phoo & Hariharan, Distilling from Similar Tasks for Transfer Learning on a Budget, ICCV 2023"
registry.register(STAGE, "nearest", paper=_PAPER, options=NearestOptions, fn=_run(False),
                  summary="DistillNearest: rank the source pool with a rank metric, distil the top source's probe",
                  train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
registry.register(STAGE, "weighted", paper=_PAPER, options=WeightedOptions, fn=_run(True),
                  summary="DistillWeighted: distil the softmax(z-scored similarity / τ)-weighted mixture of the pool",
                  train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
