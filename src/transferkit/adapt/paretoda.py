"""ParetoDA: Pareto domain adaptation (Lv, Chen, Tian, Li, Zhao, Lu, Yang, Wang, "Pareto Domain Adaptation",
NeurIPS 2021).

Three objectives share the backbone G_f: L_S, cross-entropy on the labelled source; L_D, DANN's domain loss
through the gradient reversal (:mod:`.dann`: same discriminator, λ and lr schedules); L_T = −TCM(ρ_t), the
target-classification-mimicking loss, TCM(p) = H(mean_batch p) − mean_batch H(p) (information maximisation)
on the *refined* target predictions ρ_t. Instead of a fixed trade-off, every step finds a preference α on the
simplex and moves the backbone along d = Σ_k α_k ∇L_k, a direction that descends the objectives and, as far as
they allow, a held-out target loss:

1. per-objective gradients on the backbone's parameters, G ∈ R^{3×P} (one ``autograd.grad`` each);
2. the gradient g_val of the same label-free surrogate on a batch of the *held-out* unlabelled target split
   (``val_fraction`` = 10 % of the target training items; no loss is trained on them, though their train-mode
   forward pass moves the BatchNorm running statistics, as in the reference), L_val = −TCM(ρ_val)
   (``val_loss="tcm"``, the paper's) or the mean prediction entropy (``"entropy"``);
3. the EPO-style LP (:func:`preference`, scipy's ``linprog`` / HiGHS instead of the reference's cvxpy + GLPK),
   with C = G Gᵀ and c_a = G g_val:
   *guided* ("balance") mode while the held-out loss is above ``eps``: maximise αᵀc_a over the simplex subject
   to (Cα)_j ≥ c_a,j for every objective j that conflicts with g_val (c_a,j ≤ 0) and (Cα)_j* ≥ 0 for the
   best-aligned one (all (Cα)_j ≥ 0 when none is aligned); otherwise *dominance* mode: maximise 1ᵀCα subject
   to Cα ≥ 0 and (``dominance="restricted"``, the reference's default) αᵀc_a ≥ min(max c_a, 0);
4. when the LP fails (infeasible, solver error, non-finite gradients) the fixed preference
   (``pref_source``, ``pref_domain``, ``pref_target``; default uniform) is used, a warning is logged and the
   step's ``lp_fallback`` log is 1;
5. the backbone's gradient is exactly ∇(3 Σ_k α_k L_k) (the reference's factor 3 = the number of objectives,
   so the uniform preference weighs each loss 1); the label head gets ∇L_S only, the domain discriminator
   ∇L_D, the per-class discriminators ∇L_cd (as in the reference, L_T moves the backbone only).

Bayesian target refinement: one domain discriminator per class (Linear(D, h) → BN → ReLU → Linear(h, h) → BN →
ReLU → Linear(h, 2), h = ``cd_hidden`` = 1024; label 1 = source, 0 = target, as in the reference) reads the
*detached* features; by Bayes p(y | x, target) ∝ p(y | x) · P(target | x, y), so ρ_t = softmax(z_t) ⊙
P(d = target | x, y), renormalised (``refine="probs"``). The discriminators train on
L_cd = ½ [ (1/K) Σ_i mean_j 1[y_j = i] CE(cd_i(f_j), source) + (1/K) Σ_i mean_j ρ_t,ji CE(cd_i(f_j), target) ]
(ρ detached).

Implementation: one backbone pass for source + target; each objective reads the features through a
gradient-scaling identity whose factor is 1 while the per-objective gradients are taken and 3·α_k for the
engine's backward, so the engine's loop, optimiser and checkpoints are used unchanged (cost ≈ 4 backbone
backward passes + one LP per step, as in the paper). The held-out batch is a third named stream of the engine
(it cycles like the target).

Defaults and deviations from the reference (BIT-DA/ParetoDA ``examples/DANN+ParetoDA.py``):

- reference defect, fixed: in ``binary_CE`` the per-sample class mask ``symbol`` is overwritten inside the loop
  over samples, so only the batch's *last* label decides whether class i's source term is the whole batch's
  loss or 0; here each sample counts for its own class (:func:`class_domain_loss`);
- the reference multiplies the target *logits* by the discriminator's probability (``rho_pred``) and applies
  TCM's softmax to that product; ``refine="logits"`` keeps that behaviour, the default follows Bayes' rule on
  probabilities (the notes in ``shared/methods/adapt.md`` say P(d = source | …); the reference reads column 0,
  the *target* label, which is what Bayes' rule needs);
- the reference switches to the guided LP when ``loss_val > eps`` with loss_val = −TCM ≤ 0 (TCM is a mutual
  information), so its guided mode never runs; here the switch reads the non-negative log K − TCM(ρ_val)
  (same gradient) or the entropy, so the held-out guidance is used until that loss is ~0;
- the reference does not zero the backbone's gradient between its two backward passes, so the backbone also
  receives the plain ∇(L_S + L_D); here it receives ∇(3 Σ α_k L_k) only, as the paper writes;
- SGD (momentum 0.9, weight decay 1e-3, lr 0.01) with DANN's annealed lr and λ_p schedules (:mod:`.dann`); the
  reference uses tllib's warm-start GRL (``schedule="tllib"``) and Nesterov momentum;
- ``select_by`` picks the best epoch with a label-free scorer on the held-out target split (the reference picks
  it on the target *test* labels).

Frozen backbone: as for DANN (:mod:`.dann`), ``freeze_backbone`` (which needs ``bottleneck``) trains only the
bottleneck and the head on the backbone's features of every item, computed once (``run(...,
cache_features=False)``: on raw items); the "shared" parameters of the per-objective gradients and the LP are
then the bottleneck's.

Tested on one process (the per-objective ``autograd.grad`` calls bypass DDP's gradient hooks).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..data.dataset import combine_domains
from ..engine import TrainConfig, train
from ..errors import ConfigError, DataError
from ..registry import option
from ..tune._common import Pairs, make_collate
from ._common import STAGE, Fitted, adapted_classifier, feature_dim, predict_logits, training_inputs
from .dann import DANNObjective, DannOptions, check_frozen

__all__ = ["ParetoDAOptions", "LPFailed", "preference", "tcm", "refine", "class_domain_loss",
           "ClassDomainDiscriminators", "ParetoDAObjective", "run"]

log = logging.getLogger("transferkit.adapt.paretoda")
N_OBJECTIVES = 3  # L_S, L_D, L_T


@dataclass
class ParetoDAOptions(DannOptions):
    val_fraction: float = option(0.1, low=0.0, high=1.0, low_open=True, high_open=True,
                                 help="share of the unlabelled target training items held out for the guidance")
    val_loss: str = option("tcm", choices=("tcm", "entropy"),
                           help="label-free held-out loss: −TCM of the refined predictions (paper) or entropy")
    eps: float = option(1e-3, low=0.0, help="guided LP while the held-out loss exceeds eps, else dominance LP")
    dominance: str = option("restricted", choices=("restricted", "relaxed"),
                            help="dominance LP with the reference's constraint on αᵀG g_val, or without")
    pref_source: float = option(1 / 3, low=0.0, help="fixed preference of L_S when the LP fails")
    pref_domain: float = option(1 / 3, low=0.0, help="fixed preference of L_D when the LP fails")
    pref_target: float = option(1 / 3, low=0.0, help="fixed preference of L_T when the LP fails")
    cd_hidden: int = option(1024, low=1, help="hidden width of each per-class domain discriminator")
    refine: str = option("probs", choices=("probs", "logits"),
                         help="ρ_t from probabilities (Bayes) or from logits (the reference's rho_pred)")


class LPFailed(RuntimeError):
    """The preference LP has no solution (infeasible, unbounded, solver error or non-finite input)."""


def preference(G: np.ndarray, g_val: np.ndarray, val_loss: float, eps: float = 1e-3,
               relaxed: bool = False) -> tuple[np.ndarray, str]:
    """The preference α (on the simplex) of the EPO-style LP, and the mode (``"guided"`` or ``"dominance"``).

    G : (m, P) per-objective gradients; g_val : (P,) the held-out loss's gradient; val_loss : its value (the
    guided LP runs while it exceeds ``eps``). Raises :class:`LPFailed` when no α is found.
    """
    from scipy.optimize import linprog

    G = np.asarray(G, dtype=np.float64)
    g_val = np.asarray(g_val, dtype=np.float64).reshape(-1)
    if G.ndim != 2 or G.shape[1] != g_val.shape[0]:
        raise LPFailed(f"gradient shapes do not match: G {G.shape}, g_val {g_val.shape}")
    if not (np.isfinite(G).all() and np.isfinite(g_val).all() and math.isfinite(float(val_loss))):
        raise LPFailed("non-finite gradients or held-out loss")
    m = G.shape[0]
    C, ca = G @ G.T, G @ g_val
    scale = max(float(np.abs(C).max()), float(np.abs(ca).max()))
    if scale <= 0:
        raise LPFailed("every gradient is zero")
    C, ca = C / scale, ca / scale  # the LP's solution does not change; the solver's tolerances fit
    A_eq, b_eq = np.ones((1, m)), np.ones(1)
    if val_loss > eps:
        mode = "guided"
        aligned = ca > 0
        if aligned.any():
            rows = list(np.flatnonzero(~aligned))
            rhs = {j: ca[j] for j in rows}
            best = int(np.argmax(ca))
            rows.append(best)
            rhs[best] = 0.0
        else:
            rows, rhs = list(range(m)), {j: 0.0 for j in range(m)}
        A_ub = -C[rows] if rows else None
        b_ub = -np.array([rhs[j] for j in rows]) if rows else None
        cost = -ca
    else:
        mode = "dominance"
        A_ub, b_ub = -C, np.zeros(m)
        if not relaxed:
            A_ub = np.vstack([A_ub, -ca[None]])
            b_ub = np.append(b_ub, -min(float(ca.max()), 0.0))
        cost = -C.sum(axis=0)
    try:
        res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(0, None)] * m, method="highs")
    except Exception as exc:  # noqa: BLE001 - any solver error means: use the fixed preference
        raise LPFailed(f"{type(exc).__name__}: {exc}") from None
    if res.status != 0 or res.x is None:
        raise LPFailed(f"{mode} LP: {res.message}")
    alpha = np.clip(res.x, 0.0, None)
    return alpha / alpha.sum(), mode


def tcm(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """TCM(p) = H(mean_batch p) − mean_batch H(p) for probability rows ``p`` (B, K): between 0 (every row
    the same) and log K (confident rows spread evenly over the classes)."""
    mean = p.mean(0)
    h_mean = -(mean * torch.log(mean + eps)).sum()
    h_each = -(p * torch.log(p + eps)).sum(1).mean()
    return h_mean - h_each


def refine(logits: torch.Tensor, cd: torch.Tensor, how: str = "probs") -> torch.Tensor:
    """ρ: the target predictions refined by the per-class discriminators' P(d = target | x, y) (column 0),
    detached. ``probs``: softmax(logits) ⊙ P renormalised (a distribution); ``logits``: logits ⊙ P, the
    reference's ``rho_pred`` (TCM then applies a softmax to it)."""
    p_target = F.softmax(cd.detach(), dim=-1)[..., 0]
    if how == "logits":
        return logits * p_target
    rho = F.softmax(logits, dim=-1) * p_target
    return rho / rho.sum(-1, keepdim=True).clamp_min(1e-12)


def _as_probs(rho: torch.Tensor, how: str) -> torch.Tensor:
    return F.softmax(rho, dim=-1) if how == "logits" else rho


def class_domain_loss(cd_s: torch.Tensor, cd_t: torch.Tensor, rho_t: torch.Tensor, labels_s: torch.Tensor
                      ) -> torch.Tensor:
    """L_cd of the per-class discriminators. ``cd_s`` (B_s, K, 2), ``cd_t`` (B_t, K, 2) logits (label 1 =
    source, 0 = target); ``rho_t`` (B_t, K) target class weights (detached here); ``labels_s`` (B_s,).

    Source term: class i's discriminator is trained on the source items *of class i* (a per-sample mask; the
    reference's mask was the last sample's label only). Both terms are batch means averaged over classes.
    """
    K = cd_s.shape[1]
    ce_s = F.cross_entropy(cd_s.reshape(-1, 2), torch.ones(cd_s.shape[0] * K, dtype=torch.long,
                                                           device=cd_s.device), reduction="none").view(-1, K)
    ce_t = F.cross_entropy(cd_t.reshape(-1, 2), torch.zeros(cd_t.shape[0] * K, dtype=torch.long,
                                                            device=cd_t.device), reduction="none").view(-1, K)
    mask = F.one_hot(labels_s, K).to(ce_s.dtype)
    source = (mask * ce_s).mean(0).sum() / K
    target = (rho_t.detach() * ce_t).mean(0).sum() / K
    return 0.5 * (source + target)


class ClassDomainDiscriminators(nn.Module):
    """One 3-layer MLP domain discriminator per class; ``(B, D)`` features → ``(B, K, 2)`` logits."""

    def __init__(self, in_dim: int, classes: int, hidden: int = 1024):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))
            for _ in range(classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(f) for net in self.nets], dim=1)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies by ``holder.scales[k]``, read when the backward runs."""

    @staticmethod
    def forward(ctx, x, holder, k):  # noqa: D401
        ctx.holder, ctx.k = holder, k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.holder.scales[ctx.k], None, None


class ParetoDAObjective(DANNObjective):
    """ParetoDA on top of DANN's discriminator and schedules.

    Batches are ``{"source": {"inputs", "labels"}, "target": {"inputs"}, "val": {"inputs"}}`` (``val``: the
    held-out unlabelled target split); the model has ``backbone`` and ``head``. Logs ``ce``, ``domain``, ``tcm``,
    ``cd``, ``val_loss``, ``alpha_source``/``alpha_domain``/``alpha_target``, ``guided`` (1 when the guided LP
    ran) and ``lp_fallback`` (1 when the fixed preference was used).
    """

    def __init__(self, feature_dim: int, classes: int, options: ParetoDAOptions):
        super().__init__(feature_dim, options)
        self.class_discriminators = ClassDomainDiscriminators(feature_dim, classes, options.cd_hidden)
        self.scales = [1.0] * N_OBJECTIVES
        self.fallbacks = 0
        pref = np.array([options.pref_source, options.pref_domain, options.pref_target], dtype=np.float64)
        if pref.sum() <= 0:
            raise ConfigError("the fixed preference (pref_source, pref_domain, pref_target) must not be all 0")
        self.fixed = pref / pref.sum()

    def _features(self, model, xs, xt):
        if isinstance(xs, torch.Tensor) and isinstance(xt, torch.Tensor) and xs.shape[1:] == xt.shape[1:]:
            return model.backbone(torch.cat([xs, xt]))
        return torch.cat([model.backbone(xs), model.backbone(xt)])

    def _target_loss(self, model, f: torch.Tensor, cd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(−TCM(ρ), ρ) with the head's parameters detached: L_T moves the backbone only."""
        params = {n: p.detach() for n, p in model.head.named_parameters()}
        logits = torch.func.functional_call(model.head, params, (f,))
        rho = refine(logits, cd, self.options.refine)
        return -tcm(_as_probs(rho, self.options.refine)), rho

    def _val_loss(self, model, xv) -> tuple[torch.Tensor, float]:
        """The held-out loss (for its gradient) and the non-negative value the LP's mode switch reads."""
        f = model.backbone(xv)
        logits = model.head(f)
        if self.options.val_loss == "entropy":
            p = F.softmax(logits, -1)
            loss = -(p * F.log_softmax(logits, -1)).sum(1).mean()
            return loss, float(loss.detach())
        with torch.no_grad():
            cd = self.class_discriminators(f.detach())
        rho = refine(logits, cd, self.options.refine)
        loss = -tcm(_as_probs(rho, self.options.refine))
        return loss, math.log(logits.shape[-1]) + float(loss.detach())  # log K − TCM ≥ 0

    def choose(self, G: np.ndarray, g_val: np.ndarray, val_value: float) -> tuple[np.ndarray, str]:
        """α by the LP, or the fixed preference (mode ``"fallback"``, logged) when it fails."""
        try:
            return preference(G, g_val, val_value, self.options.eps, self.options.dominance == "relaxed")
        except LPFailed as exc:
            self.fallbacks += 1
            log.warning("ParetoDA: the preference LP failed (%s); using the fixed preference %s", exc,
                        np.round(self.fixed, 4).tolist())
            return self.fixed.copy(), "fallback"

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        xs, ys = batch["source"]["inputs"], batch["source"]["labels"]
        xt, xv = batch["target"]["inputs"], batch["val"]["inputs"]
        ns = len(ys)
        self.scales = [1.0] * N_OBJECTIVES
        feats = self._features(model, xs, xt)
        f = [_ScaleGrad.apply(feats, self, k) for k in range(N_OBJECTIVES)]
        ce = F.cross_entropy(model.head(f[0][:ns]), ys)
        d = self.discriminator(self.grl(f[1])).squeeze(-1)
        ds, dt = d[:ns], d[ns:]
        domain = 0.5 * (F.binary_cross_entropy_with_logits(ds, torch.ones_like(ds))
                        + F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt)))
        cd = self.class_discriminators(feats.detach())
        target, rho = self._target_loss(model, f[2][ns:], cd[ns:])
        cd_loss = class_domain_loss(cd[:ns], cd[ns:], _as_probs(rho, self.options.refine), ys)

        shared = [p for p in model.backbone.parameters() if p.requires_grad]
        G = np.stack([_flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
                      for loss in (ce, self.options.trade_off * domain, target)])
        val, val_value = self._val_loss(model, xv)
        g_val = _flat(torch.autograd.grad(val, shared, allow_unused=True), shared)
        alpha, mode = self.choose(G, g_val, val_value)
        self.scales = [float(N_OBJECTIVES * a) for a in alpha]  # read by the engine's backward
        with torch.no_grad():
            dom_acc = torch.cat([ds > 0, dt <= 0]).float().mean()
        logs = {"ce": ce.detach(), "domain": domain.detach(), "tcm": -target.detach(), "cd": cd_loss.detach(),
                "val_loss": float(val.detach()), "lambda": self.grl.lambda_, "domain_accuracy": dom_acc,
                "alpha_source": float(alpha[0]), "alpha_domain": float(alpha[1]), "alpha_target": float(alpha[2]),
                "guided": float(mode == "guided"), "lp_fallback": float(mode == "fallback")}
        return ce + self.options.trade_off * domain + target + cd_loss, logs


def _flat(grads, params) -> np.ndarray:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)]).cpu().numpy()


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of the unlabelled target: a seeded ``fraction`` (≥ 1 item, ≤ n − 1) held out."""
    if n < 2:
        raise DataError(f"ParetoDA holds out part of the unlabelled target and needs ≥ 2 items, got {n}")
    k = min(max(1, int(round(fraction * n))), n - 1)
    perm = np.random.default_rng([seed, 0x9A7E70]).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def run(model, source, target_train, target_test_X, *, options: ParetoDAOptions, seed: int, progress: bool = False,
        cache_features: bool = True, **_) -> Fitted:
    """Train ``model`` (a ZooModel) with ParetoDA on labelled ``source`` + unlabelled ``target_train``; with a
    frozen backbone, on its features computed once (``cache_features``) or on raw items."""
    from .scorers import make_scorer

    check_frozen(options, "paretoda")
    clf = adapted_classifier(model, source.classes, options, seed)
    both = combine_domains(source, target_train)
    src, tgt = both.subset(both.labelled), both.subset(~both.labelled)
    fit_idx, val_idx = held_out_split(len(tgt), options.val_fraction, seed)
    tgt_fit, tgt_val = tgt.subset(fit_idx), tgt.subset(val_idx)
    module, X, preprocess = training_inputs(clf, model.preprocess, {"source": src.X, "target": tgt_fit.X,
                                                                    "val": tgt_val.X}, cache_features)
    cfg = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, optimizer="sgd",
                      momentum=options.momentum, weight_decay=options.weight_decay, max_grad_norm=None,
                      seed=seed, progress=progress, restore_best=options.select_by is not None)
    with torch.random.fork_rng(devices=[]):  # the discriminators' start depends on the seed only
        torch.manual_seed(seed)
        objective = ParetoDAObjective(feature_dim(model, options), len(source.classes), options)
    scorer = make_scorer(options.select_by, preprocess, seed=seed) if options.select_by else "accuracy"
    streams = {"source": Pairs(X["source"], src.y), "target": Pairs(X["target"], tgt_fit.y),
               "val": Pairs(X["val"], tgt_val.y)}
    result = train(module, streams, objective, cfg, collate_fn=make_collate(preprocess), metric=scorer,
                   val_data=X["val"] if options.select_by else None)
    clf.eval()
    pred = predict_logits(clf, target_test_X, model.preprocess).argmax(-1).numpy()
    extra = {"best_step": result.best_step, "steps": result.steps, "lp_fallbacks": objective.fallbacks,
             "n_target_val": len(tgt_val)}
    last = next((h for h in reversed(result.history) if "train_alpha_source" in h), None)
    if last is not None:
        extra["alpha"] = [last["train_alpha_source"], last["train_alpha_domain"], last["train_alpha_target"]]
        extra["guided_share"] = last["train_guided"]
    if options.select_by:
        extra[f"selected_{options.select_by}"] = result.metrics.get(f"val_{options.select_by}")
    return Fitted(clf, {"adapted": pred}, result.history, extra)


registry.register(
    STAGE, "paretoda", fn=run, options=ParetoDAOptions, kind="training", modality=["image", "text"],
    paper="Lv et al. Pareto Domain Adaptation, NeurIPS 2021",
    summary="DANN's three objectives weighted per step by an EPO-style LP guided by a held-out unlabelled "
            "target split (per-class discriminators refine the target predictions)")
