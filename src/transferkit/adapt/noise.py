"""Noise as source — Yao, Chen, Liu, Wang, Zhang, Tsang: "Noise as source: semi-supervised heterogeneous
domain adaptation" (arXiv 2502.13573; reference code yyyaoyuan/SHDA, ``Baselines/Baselines_KTF/KTF``,
``Noise_Generation/``).

Semi-supervised heterogeneous DA: a labelled source in one feature space, a target in another with a few
labelled items per class (``labelled_per_class``, drawn by :func:`~.run.few_labels` from the target's
*training* part only) and the rest of that part unlabelled. The paper's Knowledge Transfer Framework (KTF)
keeps the source features fixed (L2-normalised rows ``p_s``) as the common space; the target features go
through a projector ``p_t = l2norm(leaky_relu(W₁ x_t + b₁))`` into it, and one linear classifier ``f`` serves
both. The loss, minimised full-batch with Adam, is

    CE(f(p_l), y_l) + β · CE(f(p_s), y_s) + μ · MMD + τ/2 (‖W₁‖² + ‖W₂‖²),
    MMD = (‖mean p_s − mean p_t‖² + Σ_k ‖mean p_s,k − m_t,k‖²) / (C + 1),

where ``m_t,k`` averages the labelled target items of class k and every unlabelled one weighted by its
predicted probability of k (soft pseudo-labels; the gradient flows through them, as in the reference). The
finding: labelled *noise* works as a source. The noise (``source="noise"``) is the reference's basic
generator: class k's items are ``N(μ_k, I_dim)`` with ``μ_k ~ N(0, I_dim)``, ``noise_per_class`` per class,
seeded by the run's seed.

Here the target's features are the model's frozen backbone features of the target items (L2-normalised, as
the reference's ``preprocessing.normalize``). ``source`` chooses the source: ``noise``; ``pixels`` — the
labelled source items' raw pixels in [0, 1], flattened (a feature space unrelated to the target's CNN
features: a real heterogeneous source); ``none`` — the target-only baseline (the same network on the few
target labels, no source term, no MMD; the reference's supervised "NN" baseline). With ``noise`` the source
dataset only names the classes.

Defaults (reference ``main_TS5.py``): τ 0.05 (as Adam's L2 weight decay on the weight matrices, whose gradient
is that of τ/2 ‖W‖², TensorFlow's ``l2_regularizer``), β 0.1, μ 0.1, Adam lr 1e-3, 600 full-batch steps,
weights and biases from a normal truncated at 2σ with σ 0.01; noise in 256 dimensions (the reference's
``d``), 500 per class (its noise-dimensionality study); 3 labelled target items per class.

Deliberate deviations: the reference is transductive (its unlabelled target *is* the evaluation set); here
the unlabelled target is the training part and the held-out part is only predicted. The common space of the
``none`` baseline has ``noise_dim`` dimensions (there is no source to fix it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..engine import Objective, TrainConfig, train
from ..errors import ConfigError, DataError
from ..registry import option
from ._common import STAGE, Fitted, classifier, predict_logits

__all__ = ["NoiseOptions", "gaussian_source", "KTF", "KTFObjective", "fit_ktf", "mmd"]


@dataclass
class NoiseOptions:
    source: str = option("noise", choices=("noise", "pixels", "none"), help="the source: class-conditional "
                         "Gaussian noise, the source items' pixels, or none (target-only baseline)")
    labelled_per_class: int = option(3, low=1, help="labelled target items per class, from the target's "
                                     "training part")
    noise_dim: int = option(256, low=1, help="dimensions of the noise (the common space)")
    noise_per_class: int = option(500, low=1, help="noise items per class")
    steps: int = option(600, low=1, help="full-batch Adam steps")
    lr: float = option(1e-3, low=0.0, low_open=True, help="Adam lr")
    beta: float = option(0.1, low=0.0, help="weight of the source cross-entropy")
    mu: float = option(0.1, low=0.0, help="weight of the marginal + class-conditional mean discrepancy")
    tau: float = option(0.05, low=0.0, help="L2 weight decay of the projector and classifier weights")


def gaussian_source(n_classes: int, dim: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """``(X (C·n, dim) float32, y (C·n,) int64, means (C, dim))``: class k's items are ``N(μ_k, I)`` with
    ``μ_k ~ N(0, I)`` (seeded)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    X = means[y] + rng.standard_normal((len(y), dim))
    return X.astype(np.float32), y.astype(np.int64), means


class KTF(nn.Module):
    """The target projector (linear, leaky ReLU, L2 normalisation) and the classifier shared with the source.
    ``forward(x)`` classifies target features; ``classify(p)`` classifies common-space (source) rows."""

    def __init__(self, in_dim: int, dim: int, n_classes: int):
        super().__init__()
        self.project = nn.Linear(in_dim, dim)
        self.classifier = nn.Linear(dim, n_classes)
        for p in self.parameters():
            nn.init.trunc_normal_(p, std=0.01, a=-0.02, b=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.leaky_relu(self.project(x), 0.2), dim=1)

    def classify(self, p: torch.Tensor) -> torch.Tensor:
        return self.classifier(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


def mmd(ps: torch.Tensor, ys: torch.Tensor, pl: torch.Tensor, yl: torch.Tensor, pu: torch.Tensor,
        soft_u: torch.Tensor) -> torch.Tensor:
    """The KTF discrepancy: marginal plus per-class mean distances, divided by C + 1 (C = ``soft_u``'s
    columns); the target's class means weight each unlabelled row by its probability of the class."""
    n_classes = soft_u.shape[1]
    pt = torch.cat([pl, pu])
    total = (ps.mean(0) - pt.mean(0)).pow(2).sum()
    for k in range(n_classes):
        w = soft_u[:, k]
        mean_t = (pl[yl == k].sum(0) + (w[:, None] * pu).sum(0)) / ((yl == k).sum() + w.sum())
        total = total + (ps[ys == k].mean(0) - mean_t).pow(2).sum()
    return total / (n_classes + 1)


class KTFObjective(Objective):
    """The KTF loss over one full batch: the target stream (labelled and unlabelled items, label -1) and the
    fixed source rows held here (none for the target-only baseline)."""

    def __init__(self, ps: torch.Tensor | None, ys: torch.Tensor | None, beta: float, mu: float):
        super().__init__()
        self.beta, self.mu = beta, mu
        self.register_buffer("ps", ps)
        self.register_buffer("ys", ys)

    def forward(self, model: KTF, batch: dict):
        x, y = batch["inputs"], batch["labels"]
        p = model.embed(x)
        lab = y >= 0
        ce_l = F.cross_entropy(model.classify(p[lab]), y[lab])
        if self.ps is None:
            return ce_l, {"ce_target": ce_l.detach()}
        ce_s = F.cross_entropy(model.classify(self.ps), self.ys)
        pu = p[~lab]
        d = mmd(self.ps, self.ys, p[lab], y[lab], pu, model.classify(pu).softmax(-1))
        return ce_l + self.beta * ce_s + self.mu * d, {"ce_target": ce_l.detach(), "ce_source": ce_s.detach(),
                                                       "mmd": d.detach()}


def fit_ktf(xt: np.ndarray, yt: np.ndarray, ps: np.ndarray | None, ys: np.ndarray | None, n_classes: int, *,
            options: NoiseOptions, seed: int, progress: bool = False) -> tuple[KTF, list[dict]]:
    """Train the KTF on target feature rows ``xt`` (labels ``yt``, -1 = unlabelled) and the source rows
    ``ps`` (labels ``ys``; None: target only); rows are L2-normalised here. Returns the model and history."""
    xt = F.normalize(torch.as_tensor(xt, dtype=torch.float32), dim=1)
    yt = torch.as_tensor(yt, dtype=torch.int64)
    if ps is not None:
        ps = F.normalize(torch.as_tensor(ps, dtype=torch.float32), dim=1)
        ys = torch.as_tensor(ys, dtype=torch.int64)
    torch.manual_seed(seed)
    model = KTF(xt.shape[1], options.noise_dim if ps is None else ps.shape[1], n_classes)
    cfg = TrainConfig(epochs=options.steps, batch_size=len(xt), lr=options.lr, optimizer="adam",
                      weight_decay=options.tau, scheduler="constant", max_grad_norm=None, shuffle=False, seed=seed,
                      log_every=max(1, options.steps // 20), progress=progress)
    result = train(model, (xt, yt), KTFObjective(ps, ys, options.beta, options.mu), cfg)
    return model.eval(), result.history


def run(model, source, target_train, target_test_X, *, options: NoiseOptions, seed: int, progress: bool = False,
        **_) -> Fitted:
    """KTF from ``options.source`` to the target features of ``model``'s backbone; ``target_train`` carries
    the few target labels (the rest -1); ``target_test_X`` is only predicted."""
    n_classes = len(source.classes)
    if options.source == "noise":
        ps, ys, _ = gaussian_source(n_classes, options.noise_dim, options.noise_per_class, seed)
    elif options.source == "pixels":
        if source.modality != "image":
            raise ConfigError(f"source 'pixels' needs an image source; {source.name!r} is {source.modality} data")
        missing = sorted(set(range(n_classes)) - set(source.y.tolist()))
        if missing:
            raise DataError(f"the source {source.name!r} has no item of class(es) "
                            f"{[source.classes[c] for c in missing]}: the KTF needs every class's source mean")
        ps, ys = np.asarray(source.X, dtype=np.float32).reshape(len(source), -1) / 255.0, source.y
    else:
        ps = ys = None
    backbone = classifier(model, source.classes, seed)

    def features(X):
        return predict_logits(backbone, X, model.preprocess, features=True)[1].numpy()

    ktf, history = fit_ktf(features(target_train.X), target_train.y, ps, ys, n_classes, options=options,
                           seed=seed, progress=progress)
    with torch.no_grad():
        pred = ktf(F.normalize(torch.as_tensor(features(target_test_X)), dim=1)).argmax(-1).numpy()
    return Fitted(ktf, {"adapted": pred}, history,
                  {"n_source_rows": 0 if ps is None else len(ps), "common_dim": ktf.classifier.in_features})


registry.register(STAGE, "noise", fn=run, options=NoiseOptions, kind="semi-supervised", modality=["image"],
                  paper="Yao et al. Noise as source: semi-supervised heterogeneous domain adaptation, "
                        "arXiv 2502.13573",
                  summary="knowledge-transfer framework (target projector, shared classifier, mean discrepancy) "
                          "with class-conditional Gaussian noise, pixels or no source; k target labels per class")
