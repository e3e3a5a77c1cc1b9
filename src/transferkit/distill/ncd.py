"""Class-relation KD for novel class discovery (Gu, Zhang, Xu & He, "Class-relation Knowledge Distillation for
Novel Class Discovery", ICCV 2023; reference code kleinzcy/Cr-KD-NCD).

Novel class discovery (NCD): the training items of the *known* classes carry labels, those of the *novel*
classes do not (their labels are hidden here before anything trains: they become -1), and the learner must
cluster the novel items into their classes. Two stages, as the paper:

1. **Known-class model** (the teacher): the teacher's *base* backbone (a catalogue model; for a ``tune`` run
   folder its base model — the tuned weights are not used, they may have seen the novel labels) with a cosine
   prototype head over the known classes, trained with ``CE(cos/τ, y)`` on the labelled known items only
   (``pretrain_epochs``). It is then frozen.
2. **Discovery** (the learner, a copy of the known-class model plus ``heads`` novel heads): the paper's
   baseline, UNO (Fini et al., ICCV'21): one softmax over ``[known logits ; novel logits]`` (cosine / τ) per
   head; targets are the one-hot label (known items) or a Sinkhorn–Knopp balanced assignment of the novel
   logits (unlabelled items, ε = 0.05, 3 iterations) of one view, predicted from the other view (swapped
   prediction over two augmented views). **Class-relation KD** adds, on the unlabelled items,
   ``α · mean_i w_i · T² · KL(p_t(x_i) ‖ p_s(x_i))``: ``p_t`` is the frozen known-class model's distribution
   over the known classes (the *class relation* of a novel item), ``p_s`` the learner's known head, both at
   ``softmax(cos / τ / T)``. The learnable per-sample weight ``w_i = Σ_{k known} softmax([known ; novel] /
   τ / T)_k`` is the learner's own probability that ``x_i`` resembles the known classes (semantic
   similarity), divided by its batch mean; it is part of the graph (it is learned with the network), as in the
   reference code. ``alpha = 0`` is the UNO baseline.

Prediction: ``argmax`` over ``[known ; novel clusters of the best head]``; the best head is the one with the
lowest swapped-prediction loss over training (label-free). Evaluation (held-out items only):
``novel_cluster_accuracy`` — clustering accuracy (Hungarian assignment, :func:`cluster_accuracy`) of the best
novel head on the held-out novel items (task-aware, the paper's headline metric on the test split);
``known_test_accuracy`` on the held-out known items; ``test_accuracy`` on all held-out items, task-agnostic
(argmax over known classes + novel clusters, clusters named by the Hungarian assignment among the novel
classes, the reference's ``split_cluster_acc_v3``).

Defaults (reference CIFAR config unless said): τ = 0.1, T = 4 (``kd_temperature``), α = 0.1, Sinkhorn ε = 0.05
with 3 iterations, 4 novel heads of MLP(D → hidden → proj) + cosine prototypes, batch 256 (reference 512),
known classes: the first half of the data's classes in their order. The number of novel clusters is the
number of novel classes (the NCD assumption).

Deviations: (a) scale — AdamW lr 1e-3 for 5 + 10 epochs on CPU-sized digit CNNs instead of SGD lr 0.4 with
500 discovery epochs (CIFAR config); hidden 512 / proj 128 (reference 2048 / 256, for 512-d ResNet features);
two views of random ±2-pixel translations (image inputs; identical views for text) instead of multi-crop
augmentation (2 large + 2 small crops). (b) The prototypes are normalised inside the forward pass (exact cosine
logits at every step) instead of in place before each step; the weight is divided by its mean per view and head
(the reference: over all views and heads together). (c) Fixes of the reference code (each has a regression test):
- the KD term is the KL divergence, not the cross-entropy ``Σ −p_t log p_s`` — with a weight that carries a
  gradient the cross-entropy's extra ``H(p_t)·w`` term pushes the weight by the teacher's entropy alone, and
  it is not zero when the relations agree; ``log_softmax`` instead of ``log(softmax)`` (no ``−inf`` for large
  logits);
- a batch with no unlabelled item gives a KD term of 0 (the reference divides by the mean of an empty weight:
  NaN);
- nothing selects a model, a head or a checkpoint with the novel labels (the reference saves its "best"
  checkpoint by clustering accuracy on the labelled novel training items); the novel labels never reach
  training;
- clustering accuracy counts every predicted cluster id, also when some clusters are empty (the reference's
  ``hungarian_evaluate`` builds a square matrix over ``range(number of distinct predictions)`` and drops larger
  ids).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..data.dataset import UNLABELLED
from ..engine import Objective, train
from ..errors import ConfigError
from ._common import STAGE, Items, _raw, make_collate


# ------------------------------------------------------------------------------------------ the metric
def cluster_assignment(y_true, y_pred) -> dict:
    """The one-to-one map {predicted cluster id → true label} that maximises the number of agreements
    (Hungarian assignment on the contingency table of the ids that occur; clusters left over map to nothing)."""
    from scipy.optimize import linear_sum_assignment

    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} items, y_pred {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("clustering accuracy of no item")
    t_ids, t = np.unique(y_true, return_inverse=True)
    p_ids, p = np.unique(y_pred, return_inverse=True)
    w = np.zeros((len(p_ids), len(t_ids)), np.int64)
    np.add.at(w, (p, t), 1)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return {p_ids[r].item(): t_ids[c].item() for r, c in zip(rows, cols)}


def cluster_accuracy(y_true, y_pred) -> float:
    """Clustering accuracy: the fraction of items right under the best one-to-one naming of the clusters."""
    mapping = cluster_assignment(y_true, y_pred)
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    named = np.array([mapping.get(p.item(), None) for p in y_pred], dtype=object)
    return float(np.mean(named == y_true))


# ------------------------------------------------------------------------------------------ the loss
def sinkhorn(logits: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment ``(B, K)`` of ``B`` items to ``K`` clusters: each row sums to 1, each column to
    about B/K (Sinkhorn–Knopp, ``iters`` rounds of alternating normalisation of ``exp(logits / ε)``)."""
    with torch.no_grad():
        # exp(l/ε) stabilised by the global max (a common factor: the normalisations remove it)
        q = torch.exp((logits - logits.max()) / epsilon).t().double()
        k, b = q.shape
        q /= q.sum()
        for _ in range(iters):
            q /= q.sum(1, keepdim=True)
            q /= k
            q /= q.sum(0, keepdim=True)
            q /= b
        return (q * b).t().to(logits.dtype)


def relation_weight(known: torch.Tensor, novel: torch.Tensor, T: float) -> torch.Tensor:
    """The paper's per-sample weight: the learner's probability mass on the known classes under one softmax over
    ``[known ; novel]`` logits at temperature ``T``, divided by its mean over the items (keeps the gradient)."""
    w = F.softmax(torch.cat([known, novel], -1) / T, -1)[..., : known.shape[-1]].sum(-1)
    return w / w.mean()


def relation_kd(teacher_known: torch.Tensor, known: torch.Tensor, novel: torch.Tensor, T: float,
                weighted: bool = True) -> torch.Tensor:
    """Weighted class-relation KD over unlabelled items: ``mean_i w_i · T² · KL(p_t ‖ p_s)`` with ``p = softmax(
    logits/T)`` over the known classes (logits already divided by τ). No item: 0 (kept in the graph)."""
    if known.shape[0] == 0:
        return known.sum() * 0.0
    log_t = F.log_softmax(teacher_known.detach() / T, -1)
    kl = (log_t.exp() * (log_t - F.log_softmax(known / T, -1))).sum(-1)
    w = relation_weight(known, novel, T) if weighted else torch.ones_like(kl)
    return (w * kl).mean() * T * T


def _shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image translated by up to ``pixels`` in each direction (edges replicated); other inputs unchanged."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or pixels <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, b)).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])


class NCDObjective(Objective):
    """UNO's swapped prediction over ``[known ; novel]`` (+ α · class-relation KD from the frozen ``teacher``)."""

    frozen = ("teacher",)

    def __init__(self, teacher: nn.Module, options: "NCDOptions", n_heads: int):
        super().__init__()
        self.teacher, self.o = teacher, options
        self.head_loss = torch.zeros(n_heads, dtype=torch.float64)  # summed over training: picks the best head

    def forward(self, model, batch):
        o, y = self.o, batch["labels"]
        lab = y != UNLABELLED
        views = [_shift(batch["inputs"], o.shift) for _ in range(2)]  # two augmented views of the batch
        outs = [model(v, all_heads=True) for v in views]  # [(known (B, Ck), novel (H, B, K))] per view
        n_known = outs[0][0].shape[-1]
        logits, targets = [], []
        for known, novel in outs:
            heads = novel.shape[0]
            both = torch.cat([known.unsqueeze(0).expand(heads, -1, -1), novel], -1) / o.temperature
            tgt = torch.zeros_like(both)
            tgt[:, lab, :n_known] = F.one_hot(y[lab], n_known).to(both.dtype)
            for h in range(heads):
                if (~lab).any():
                    tgt[h, ~lab, n_known:] = sinkhorn(novel[h, ~lab].detach(), o.sk_epsilon, o.sk_iters)
            logits.append(both)
            targets.append(tgt)
        # swapped prediction: each view predicts the other's targets; per head (H,)
        per_head = sum(-(t * F.log_softmax(z, -1)).sum(-1).mean(-1) for z, t in
                       ((logits[1], targets[0]), (logits[0], targets[1]))) / 2
        self.head_loss = self.head_loss.to(per_head.device) + per_head.detach().double()
        cluster = per_head.mean()
        kd = cluster.new_zeros(())
        if o.alpha > 0:
            with torch.no_grad():
                t_known = [self.teacher(v) for v in views]  # the class relation, on the same views
            terms = []
            for (known, novel), tk in zip(outs, t_known):
                for h in range(novel.shape[0]):
                    terms.append(relation_kd(tk[~lab] / o.temperature, known[~lab] / o.temperature,
                                             novel[h, ~lab] / o.temperature, o.kd_temperature, o.weighting))
            kd = torch.stack(terms).mean()
        loss = cluster + o.alpha * kd
        return loss, {"cluster": float(cluster.detach()), "relation_kd": float(kd.detach())}


# ------------------------------------------------------------------------------------------ the networks
class _Cosine(nn.Module):
    """Prototype head: cosine similarity of the L2-normalised input with each L2-normalised prototype."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(n, dim), dim=1))

    def forward(self, x):
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class KnownNet(nn.Module):
    """Backbone + cosine head over the known classes: the known-class model (returns cosine logits)."""

    def __init__(self, backbone: nn.Module, dim: int, n_known: int):
        super().__init__()
        self.backbone, self.head_known = backbone, _Cosine(dim, n_known)

    def forward(self, x):
        return self.head_known(self.backbone(x))


class NCDNet(nn.Module):
    """The learner: backbone, the known head and ``heads`` novel heads (MLP projector + cosine prototypes).

    ``forward(x)``: ``(B, C_known + K)`` logits ``[known ; best head's novel clusters]`` (cosine);
    ``forward(x, all_heads=True)``: ``(known (B, C_known), novel (H, B, K))``."""

    def __init__(self, known: KnownNet, dim: int, n_novel: int, heads: int, hidden: int, proj: int):
        super().__init__()
        self.backbone, self.head_known = known.backbone, known.head_known
        self.projectors = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden),
                                                      nn.ReLU(), nn.Linear(hidden, proj)) for _ in range(heads))
        self.heads_novel = nn.ModuleList(_Cosine(proj, n_novel) for _ in range(heads))
        self.register_buffer("best_head", torch.zeros((), dtype=torch.long))

    def forward(self, x, all_heads: bool = False):
        f = self.backbone(x)
        known = self.head_known(f)
        if all_heads:
            return known, torch.stack([h(p(f)) for p, h in zip(self.projectors, self.heads_novel)])
        b = int(self.best_head)
        return torch.cat([known, self.heads_novel[b](self.projectors[b](f))], -1)


# ------------------------------------------------------------------------------------------ options
@dataclass
class NCDOptions:
    known_classes: list[str] | None = registry.option(None, help="the labelled (known) classes, a strict subset of "
                                                      "the data's; the others are novel and their labels hidden "
                                                      "(default: the first half of the classes)")
    alpha: float = registry.option(0.1, low=0.0, high=100.0, help="weight α of the class-relation KD (0: the UNO "
                                   "baseline)")
    kd_temperature: float = registry.option(4.0, low=0.0, low_open=True, high=100.0,
                                            help="KD temperature T of both relations and of the weight")
    weighting: bool = registry.option(True, help="the learnable per-sample weight (false: every novel item 1)")
    temperature: float = registry.option(0.1, low=0.0, low_open=True, high=10.0,
                                         help="logit temperature τ of the cosine heads")
    heads: int = registry.option(4, low=1, high=32, help="novel heads (the best by training loss predicts)")
    hidden: int = registry.option(512, low=1, high=65536, help="hidden width of a novel head's projector")
    proj: int = registry.option(128, low=1, high=65536, help="projection width of a novel head")
    sk_epsilon: float = registry.option(0.05, low=0.0, low_open=True, high=10.0, help="Sinkhorn–Knopp ε")
    sk_iters: int = registry.option(3, low=1, high=100, help="Sinkhorn–Knopp iterations")
    pretrain_epochs: int = registry.option(5, low=1, high=1000, help="epochs of the known-class model "
                                           "(supervised on the known items)")
    shift: int = registry.option(2, low=0, high=16, help="random translation of each image view, in pixels")

    def __post_init__(self) -> None:
        k = self.known_classes
        if k is not None and len(set(map(str, k))) != len(k):
            raise ValueError(f"known_classes has duplicates: {registry.short(k)}")


def split_known(classes: list[str], known: list[str] | None) -> tuple[list[int], list[int]]:
    """``(known indices, novel indices)`` into ``classes``; a one-line ConfigError unless known is a strict subset
    with ≥ 2 known and ≥ 2 novel classes."""
    if known is None:
        known = classes[: len(classes) // 2]
    known = [str(c) for c in known]
    missing = [c for c in known if c not in classes]
    if missing:
        raise ConfigError(f"known_classes {registry.short(missing)} are not classes of the data "
                          f"{registry.short(classes)}{registry.did_you_mean(missing[0], classes)}")
    k_idx = [classes.index(c) for c in known]
    n_idx = [i for i in range(len(classes)) if i not in k_idx]
    if len(k_idx) < 2 or len(n_idx) < 2:
        raise ConfigError(f"known_classes must be a strict subset of the data's {len(classes)} classes leaving "
                          f"at least 2 known and 2 novel classes; got {len(k_idx)} known, {len(n_idx)} novel")
    return k_idx, n_idx


def hide_novel(ds, known_idx: list[int]):
    """The training set as NCD sees it: known labels renumbered ``0..C_known-1`` (in ``known_idx`` order), every
    other item (novel classes, already unlabelled) -1. Nothing else about the novel items survives."""
    remap = np.full(len(ds.classes) + 1, UNLABELLED, dtype=np.int64)
    remap[np.asarray(known_idx)] = np.arange(len(known_idx))
    y = np.asarray(ds.y, dtype=np.int64)
    return replace(ds, y=remap[np.where(y == UNLABELLED, len(ds.classes), y)], classes=[ds.classes[i] for i in
                                                                                       known_idx])


# ------------------------------------------------------------------------------------------ running
class _KnownCE:
    def __init__(self, temperature: float):
        self.t = temperature

    def __call__(self, model, batch):
        loss = F.cross_entropy(model(batch["inputs"]) / self.t, batch["labels"])
        return loss, {}


@torch.no_grad()
def _outputs(model: NCDNet, net, data, batch_size: int = 256):
    model.eval()
    known, novel = [], []
    for s in range(0, len(data), batch_size):
        k, n = model(net.preprocess(_raw(list(data.X[s: s + batch_size]))), all_heads=True)
        known.append(k.float().cpu())
        novel.append(n.float().cpu())
    return torch.cat(known), torch.cat(novel, 1)


def evaluate_ncd(model: NCDNet, net, test, known_idx: list[int], novel_idx: list[int]) -> dict:
    """NCD metrics on the held-out items (see the module docstring)."""
    y = np.asarray(test.y)
    keep = y != UNLABELLED
    test, y = test.subset(keep), y[keep]
    known, novel = _outputs(model, net, test)
    is_known = np.isin(y, known_idx)
    best = int(model.best_head)
    out: dict = {"best_head": best}
    if is_known.any():
        pred = np.asarray(known_idx)[known.argmax(1).numpy()]
        out["known_test_accuracy"] = float(np.mean(pred[is_known] == y[is_known]))
    if (~is_known).any():
        heads = [cluster_accuracy(y[~is_known], novel[h].argmax(1).numpy()[~is_known]) for h in range(len(novel))]
        out["novel_cluster_accuracy"] = heads[best]
        out["novel_cluster_accuracy_heads"] = heads
    # task-agnostic: argmax over known classes and the best head's clusters; clusters named among novel classes
    both = torch.cat([known, novel[best]], 1).argmax(1).numpy()
    ck = len(known_idx)
    on_novel = (both >= ck) & ~is_known
    mapping = cluster_assignment(y[on_novel], both[on_novel]) if on_novel.any() else {}
    named = np.array([known_idx[p] if p < ck else mapping.get(int(p), -2) for p in both])
    out["test_accuracy"] = float(np.mean(named == y))
    out["n_test_novel"] = int((~is_known).sum())
    return out


def run_ncd(teachers, student, train_data, test_data, *, options: NCDOptions, cfg, classes):
    if len(teachers) != 1:
        raise ConfigError(f"ncd takes one teacher (the base of the known-class model), got {len(teachers)}")
    teacher = teachers[0]
    if teacher.zoo.name != student.zoo.name:
        raise ConfigError(f"ncd trains the known-class model and the learner from one base model; teacher "
                          f"{teacher.zoo.name!r} and student {student.zoo.name!r} differ: pass the same model")
    known_idx, novel_idx = split_known(classes, options.known_classes)
    fit = hide_novel(train_data, known_idx)  # the only view of the training data below this line
    n_lab = int((fit.y != UNLABELLED).sum())
    if n_lab < 2 or int((fit.y == UNLABELLED).sum()) < 2:
        raise ConfigError(f"ncd needs labelled known items and unlabelled novel items; the training data has "
                          f"{n_lab} known and {int((fit.y == UNLABELLED).sum())} novel")
    dim = student.zoo.feature_dim
    known_net = KnownNet(copy.deepcopy(student.zoo.backbone), dim, len(known_idx)).requires_grad_(True)
    labelled = fit.subset(fit.y != UNLABELLED)
    pre_cfg = replace(cfg, epochs=options.pretrain_epochs, max_steps=None)
    pre = train(known_net, Items(labelled), _KnownCE(options.temperature), pre_cfg,
                collate_fn=make_collate(student, [], None), metric="loss")
    known_net.eval()
    learner = NCDNet(copy.deepcopy(known_net), dim, len(novel_idx), options.heads, options.hidden,
                     options.proj).requires_grad_(True)
    obj = NCDObjective(known_net.requires_grad_(False), options, options.heads)
    res = train(learner, Items(fit), obj, cfg, collate_fn=make_collate(student, [], None), metric="loss")
    learner.best_head.fill_(int(torch.argmin(obj.head_loss)))
    learner.eval()
    extra = {"known_classes": [classes[i] for i in known_idx], "novel_classes": [classes[i] for i in novel_idx],
             "outputs": [classes[i] for i in known_idx] + [f"novel-{j}" for j in range(len(novel_idx))],
             "head_loss": [round(float(v), 4) for v in obj.head_loss], "n_train_known": n_lab,
             "n_train_novel": int((fit.y == UNLABELLED).sum())}
    if test_data is not None:
        extra.update(evaluate_ncd(learner, student, test_data, known_idx, novel_idx))
        t = np.asarray(test_data.y)
        kmask = np.isin(t, known_idx)
        extra["teacher_test_accuracy"] = {}  # the known-class model, on the held-out known items
        if kmask.any():
            sub = test_data.subset(kmask)
            with torch.no_grad():
                kpred = torch.cat([known_net(student.preprocess(_raw(list(sub.X[s: s + 256])))).argmax(1)
                                   for s in range(0, len(sub), 256)]).numpy()
            extra["teacher_test_accuracy"] = {teacher.name: float(np.mean(np.asarray(known_idx)[kpred] == sub.y))}
    history = [{"stage": "known", **r} for r in pre.history] + [{"stage": "discover", **r} for r in res.history]
    return learner, history, extra


registry.register(STAGE, "ncd", paper="Gu, Zhang, Xu & He, Class-relation Knowledge Distillation for Novel Class "
                  "Discovery, ICCV 2023", summary="novel class discovery (UNO swapped prediction) + the known-class "
                  "model's class relation distilled with a learnable per-sample weight", options=NCDOptions,
                  fn=run_ncd, train={"epochs": 10, "lr": 1e-3, "batch_size": 256},
                  check_data=lambda options, classes: split_known(classes, options.known_classes))
