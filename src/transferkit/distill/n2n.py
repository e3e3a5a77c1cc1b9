"""N2N learning: network-to-network compression by policy gradients (Ashok, Rhinehart, Beainy & Kitani,
ICLR 2018).

Two policies, each trained with REINFORCE, turn the teacher (the unpruned network) into a smaller student:

1. *layer removal* — a bidirectional LSTM reads the teacher's layer descriptions (kind, kernel, padding,
   pool, batch norm, log-width) and gives each layer keep/remove probabilities; a removed conv layer leaves
   its max pool (:mod:`.arch`). The first layer and the classifier head are always kept.
2. *layer shrinkage* — an LSTM reads the layers the best removal kept, one by one with its previous action
   (autoregressive), and picks each layer's width scale in {0.1, 0.2, …, 1.0} (the head keeps its width).

Each sampled student inherits the teacher's weight slices where they fit, is trained briefly with KD from
the teacher (the engine's KD objective on cached teacher logits, as ``kd``; ``candidate_steps`` steps) and
scored on the validation items: ``R = R_c · R_a`` with ``C = 1 − params_s / params_t``,
``R_c = C(2 − C)`` and ``R_a = acc_s / acc_t``; a student larger than the teacher gets −1. With a size
constraint ``params_ratio`` a student above it gets the reference's annealed constrained reward
``(ε − 1) + ε·R`` with ``ε = max(0, 1 − e/15)⁴`` at episode ``e``. A policy's loss per episode is
``−(1/N) Σ_i (R_i − b) log π(a_i)`` over its ``rollouts`` students, with the baseline ``b`` the mean of the
previous episodes' mean rewards (0 at the first). The best-rewarded student of both stages (within the
constraint when one is set) is then trained with KD for the run's epochs.

Defaults (the reference, anubhavashok/N2N): LSTMs of 2 layers × 30 hidden units, Adam lr 0.003 (removal) and
0.01 (shrinkage), the C(2 − C) × accuracy-ratio reward, −1 for an invalid student, rewards cached per
architecture. Kept small for CPU: ``remove_episodes`` = ``shrink_episodes`` = 5 episodes of ``rollouts`` = 3
students each (the reference: 30–50 episodes of 5 / 3), ``candidate_steps`` = 60 KD steps per student
(the reference: 5 epochs). Final KD as ``kd`` (T = 4, α = 0.1), 5 epochs, AdamW lr 1e-3.

Deviations: each rollout is reinforced with its own advantage ``R_i − b`` (the paper's estimator; the
reference reinforces every rollout of an episode with the episode's mean reward ``R̄ − b``, which cannot
tell a good rollout from a bad one of the same episode); students inherit the teacher's weight slices
(the reference re-initialises them) so that a short CPU training is informative; the reference also pins the
first linear layer, which we leave removable; layer widths only (kernel sizes are not shrunk).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import ConfigError
from . import arch as A
from ._common import STAGE, Items, accuracy, fit_val, frozen_logits, make_collate, train_student
from .kd import KDCore, kd_objective

SCALES = tuple(round(0.1 * k, 1) for k in range(1, 11))
HIDDEN, LSTM_LAYERS, REMOVE_LR, SHRINK_LR, EPS_EPISODES = 30, 2, 0.003, 0.01, 15


@dataclass
class N2NOptions(KDCore):
    remove_episodes: int = registry.option(5, low=0, help="policy-gradient episodes of the layer-removal policy")
    shrink_episodes: int = registry.option(5, low=0, help="policy-gradient episodes of the layer-shrinkage policy")
    rollouts: int = registry.option(3, low=1, help="students sampled per episode")
    candidate_steps: int = registry.option(60, low=1, help="KD steps that train each sampled student")
    params_ratio: float | None = registry.option(None, low=0.0, low_open=True, high=1.0,
                                                 help="size constraint: students above this fraction of the "
                                                 "teacher's parameters get the constrained reward")


# ------------------------------------------------------------------------------------------------ reward
def reward(acc: float, params: int, teacher_acc: float, teacher_params: int) -> float:
    """``R_c · R_a``: ``C(2 − C)`` with ``C = 1 − params / teacher_params``, times ``acc / teacher_acc``;
    −1 for a student larger than the teacher."""
    if params > teacher_params:
        return -1.0
    c = 1.0 - params / teacher_params
    return c * (2.0 - c) * acc / max(teacher_acc, 1e-12)


def constrained(r: float, episode: int) -> float:
    """The reference's reward for a student above the size constraint at ``episode``."""
    eps = max(0.0, 1.0 - episode / EPS_EPISODES) ** 4
    return (eps - 1.0) + eps * r


def reinforce_loss(log_probs: list[torch.Tensor], rewards: list[float], baseline: float) -> torch.Tensor:
    """``−(1/N) Σ_i (R_i − b) log π(a_i)``."""
    return -sum((r - baseline) * lp for r, lp in zip(rewards, log_probs)) / len(rewards)


# ------------------------------------------------------------------------------------------------ policies
def descriptions(layers: list[A.Layer]) -> torch.Tensor:
    """``(L, 1, 6)`` layer descriptions: conv?, kernel/7, padding/3, pool?, bn?, log2(width)/10."""
    rows = [[float(l.kind == "conv"), l.kernel / 7, l.padding / 3, float(l.pool), float(l.bn),
             math.log2(max(l.out, 1)) / 10] for l in layers]
    return torch.tensor(rows).unsqueeze(1)


class RemovalPolicy(nn.Module):
    """Bidirectional LSTM over the layer descriptions → keep / remove logits per layer."""

    def __init__(self, n_in: int = 6):
        super().__init__()
        self.lstm = nn.LSTM(n_in, HIDDEN, LSTM_LAYERS, bidirectional=True)
        self.out = nn.Linear(2 * HIDDEN, 2)

    def sample(self, desc: torch.Tensor, pinned: list[bool]) -> tuple[list[bool], torch.Tensor]:
        """``(keep, log π(keep))``; pinned layers are kept and not part of the action."""
        dist = torch.distributions.Categorical(logits=self.out(self.lstm(desc)[0].squeeze(1)))
        action = dist.sample()
        free = ~torch.tensor(pinned)
        keep = [bool(a) or p for a, p in zip(action.tolist(), pinned)]
        return keep, dist.log_prob(action)[free].sum()


class ShrinkPolicy(nn.Module):
    """Autoregressive LSTM: a layer's description and the previous action → logits over :data:`SCALES`."""

    def __init__(self, n_in: int = 6):
        super().__init__()
        self.cell = nn.LSTM(n_in + len(SCALES), HIDDEN, LSTM_LAYERS)
        self.out = nn.Linear(HIDDEN, len(SCALES))

    def sample(self, desc: torch.Tensor, pinned: list[bool]) -> tuple[list[float], torch.Tensor]:
        """``(scales, log π(scales))``; pinned layers keep scale 1."""
        prev, state, scales, log_prob = torch.zeros(1, 1, len(SCALES)), None, [], torch.zeros(())
        for t in range(len(desc)):
            h, state = self.cell(torch.cat([desc[t: t + 1], prev], -1), state)
            dist = torch.distributions.Categorical(logits=self.out(h[0, 0]))
            a = dist.sample()
            if pinned[t]:
                scales.append(1.0)
                continue
            log_prob = log_prob + dist.log_prob(a)
            scales.append(SCALES[int(a)])
            prev = F.one_hot(a, len(SCALES)).float().view(1, 1, -1)
        return scales, log_prob


# ------------------------------------------------------------------------------------------------ search
class Candidates:
    """Builds, briefly trains (KD on cached teacher logits) and scores students, caching per architecture."""

    def __init__(self, module, teacher, student, fit, val, options: N2NOptions, cfg):
        from ..engine import TrainConfig

        self.module, self.student, self.fit, self.val, self.options = module, student, fit, val, options
        self.arch = A.describe(module)[0]
        self.params, self.flops = A.count(self.arch)
        self.teacher_acc = accuracy(module, student, val)
        self.collate = make_collate(student, [teacher], frozen_logits([teacher], fit))
        self.cfg = TrainConfig.from_dict({"epochs": 1, "max_steps": options.candidate_steps, "lr": cfg.lr,
                                          "batch_size": cfg.batch_size, "seed": cfg.seed, "progress": False,
                                          "cpu": cfg.cpu})
        self.seen: dict[tuple, dict] = {}

    def score(self, keep: list[bool], widths: list[int], episode: int) -> float:
        from ..engine import train

        key = (tuple(keep), tuple(widths))
        if key not in self.seen:
            net = A.from_teacher(self.module, keep, widths, seed=self.cfg.seed)
            params = A.count(net.arch)[0]
            acc = None
            if params <= self.params:
                train(net, Items(self.fit), kd_objective(self.options)(None), self.cfg, collate_fn=self.collate,
                      metric="loss")
                acc = accuracy(net.eval(), self.student, self.val)
            self.seen[key] = {"keep": keep, "widths": widths, "params": params, "accuracy": acc,
                              "reward": reward(acc or 0.0, params, self.teacher_acc, self.params)}
        c = self.seen[key]
        limit = self.options.params_ratio
        over = limit is not None and c["params"] > limit * self.params
        return constrained(c["reward"], episode) if over else c["reward"]

    def best(self) -> dict:
        limit = self.options.params_ratio
        ok = [c for c in self.seen.values() if c["accuracy"] is not None]
        within = [c for c in ok if limit is None or c["params"] <= limit * self.params]
        return max(within or ok, key=lambda c: c["reward"])


def run_policy(policy, lr: float, episodes: int, rollouts: int, sample, score, log: list, stage: str) -> None:
    """REINFORCE: per episode ``rollouts`` samples, their rewards, one Adam step on :func:`reinforce_loss`."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    means: list[float] = []
    for e in range(episodes):
        baseline = sum(means) / len(means) if means else 0.0
        log_probs, rewards = [], []
        for _ in range(rollouts):
            action, lp = sample()
            log_probs.append(lp)
            rewards.append(score(action, e))
        opt.zero_grad()
        reinforce_loss(log_probs, rewards, baseline).backward()
        opt.step()
        means.append(sum(rewards) / len(rewards))
        log.append({"stage": stage, "episode": e, "mean_reward": round(means[-1], 4), "baseline": round(baseline, 4),
                    "max_reward": round(max(rewards), 4)})


def min_params(arch: A.Arch) -> int:
    """Parameters of the smallest student N2N can derive (every removable layer removed, the rest at 0.1 width)."""
    last = len(arch.layers) - 1
    keep = [i in (0, last) for i in range(len(arch.layers))]
    widths = [l.out if i == last else max(1, round(l.out * SCALES[0])) for i, l in enumerate(arch.layers)]
    return A.count(A.derive(arch, keep, widths)[0])[0]


def search(module, teacher, student, fit, val, options: N2NOptions, cfg) -> tuple[dict, dict]:
    """Both stages; ``(best candidate, log)``."""
    arch = A.describe(module)[0]
    total, smallest = A.count(arch)[0], min_params(arch)
    if options.params_ratio is not None and options.params_ratio * total < smallest:
        raise ConfigError(f"params_ratio {options.params_ratio} is out of reach: the smallest student n2n can "
                          f"derive has {smallest / total:.3f} of the teacher's parameters")
    cands = Candidates(module, teacher, student, fit, val, options, cfg)
    last = len(arch.layers) - 1
    log: list[dict] = []
    full = [l.out for l in arch.layers]
    pinned = [i in (0, last) for i in range(len(arch.layers))]
    remover = RemovalPolicy()
    desc = descriptions(list(arch.layers))
    run_policy(remover, REMOVE_LR, options.remove_episodes, options.rollouts, lambda: remover.sample(desc, pinned),
               lambda keep, e: cands.score(keep, full, e), log, "remove")
    keep = cands.best()["keep"] if cands.seen else [True] * len(arch.layers)
    kept = [i for i, k in enumerate(keep) if k]
    shrinker = ShrinkPolicy()
    desc = descriptions([arch.layers[i] for i in kept])

    def widths_of(scales):
        widths = list(full)
        for i, s in zip(kept, scales):
            widths[i] = full[i] if i == last else max(1, round(full[i] * s))
        return widths

    run_policy(shrinker, SHRINK_LR, options.shrink_episodes, options.rollouts,
               lambda: shrinker.sample(desc, [i == last for i in kept]),
               lambda scales, e: cands.score(keep, widths_of(scales), e), log, "shrink")
    if not cands.seen:
        cands.score(keep, full, 0)
    return cands.best(), {"teacher_val_accuracy": cands.teacher_acc, "candidates": len(cands.seen),
                          "episodes": log}


def _n2n(teachers, student, train, test, *, options: N2NOptions, cfg, classes):
    teacher, module = A.teacher_module(teachers, student, classes, "n2n")
    t_arch, _ = A.describe(module)
    fit, val = fit_val(train, 0.1, cfg.seed)
    if val is None:
        raise ConfigError("n2n scores its students on validation items: give it at least 20 labelled items")
    t0 = time.perf_counter()
    best, log = search(module, teacher, student, fit, val, options, cfg)
    search_s = round(time.perf_counter() - t0, 2)
    net = A.from_teacher(module, best["keep"], best["widths"], seed=cfg.seed)
    result, timing = train_student(net, student, teachers, kd_objective(options), fit, val, cfg, cache=options.cache)
    (tp, tf), (sp, sf) = A.count(t_arch), A.count(net.arch)
    return net, result.history, {**timing, **log, "search_s": search_s, "architecture": A.architecture(net),
                                 "search_val_accuracy": best["accuracy"], "search_reward": best["reward"],
                                 "teacher_params": tp, "teacher_flops": tf, "params_ratio": sp / tp,
                                 "flops_ratio": sf / tf}


registry.register(STAGE, "n2n", paper="Ashok, Rhinehart, Beainy & Kitani, N2N Learning: Network to Network "
                  "Compression via Policy Gradient Reinforcement Learning, ICLR 2018",
                  summary="REINFORCE policies remove then shrink the teacher's layers (reward C(2−C)·acc ratio of "
                  "briefly KD-trained students); the best student learns by KD",
                  options=N2NOptions, fn=_n2n, train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
