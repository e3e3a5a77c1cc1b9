"""TAS: network pruning via transformable architecture search (Dong & Yang, NeurIPS 2019).

The unpruned network (the one teacher) becomes a search network with a learnable distribution over each
layer's width (channel count) and over each conv stage's depth (how many of its convs are kept). Every
search step samples two widths per layer by Gumbel-softmax (``select2withP`` of the reference,
D-X-Y/AutoDL-Projects ``lib/models/shape_searchs``): the layer's full output is cut to the two widths, each
goes through its own batch norm, both are brought to the larger width by channel-wise interpolation (CWI,
adaptive average pooling over channels) and summed with the two re-normalised probabilities; the next layer
reads the map zero-padded to its full input width. A stage's output is the same CWI mixture of its outputs
after 1, 2, … convs under the depth distribution. Network weights step on one half of the training items
(cross-entropy), the distributions on the other half with ``CE + λ·L_flop``, where ``L_flop = log E[FLOPs]``
when the argmax architecture's FLOPs exceed the target, ``−log E[FLOPs]`` when they fall below
``target − tolerance``, and 0 in between (E[FLOPs] from the softmax width/depth probabilities; a layer at
depth position t counts with P(depth ≥ t), and the layer after a stage reads the expected width at the
expected depth — the reference takes the last conv's width there). The pruned network takes the argmax width
and depth of each distribution, inherits the first slices of the unpruned network's weights where they fit (see
:mod:`.arch`) and is trained with KD from the unpruned network (the engine's KD objective, as ``kd``).

Defaults (the reference's): candidate widths ``int(r·C)`` for r = 0.3, 0.4, …, 1.0; depth choices 1..n for
a stage of n ≤ 3 convs (1, 3, 5, …, n above); logits initialised N(0, 0.01); Gumbel τ from 10 to 0.1 under
the reference's cosine schedule (``set_tau``), per step here; λ = 2, tolerance 5 % of the unpruned FLOPs
(its scripts' ``FLOP_weight`` / ``FLOP_tolerant``); target ``flop_ratio`` = 0.5 (ours). KD as ``kd`` (T = 4,
α = 0.1), 5 epochs, AdamW lr 1e-3.

Deviations, for a short CPU search: the search network starts from the unpruned network's trained weights
(each candidate batch norm from the first slice of the teacher's) instead of from scratch; it runs
``search_steps`` (default 300) weight/architecture steps instead of hundreds of epochs, with Adam on the
distributions at ``arch_lr`` = 0.05 and AdamW lr 1e-3 on the weights; the pruned network starts from the
teacher's weight slices instead of from scratch. Networks: the conv → linear chains of :mod:`.arch` (the
zoo's digit CNNs); linear hidden layers have width distributions too (no batch norm there). A
``flop_ratio`` below the smallest network of the search space is a one-line ConfigError.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import ConfigError
from . import arch as A
from ._common import STAGE, fit_val, train_student
from .kd import KDCore, kd_objective

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class TASOptions(KDCore):
    flop_ratio: float = registry.option(0.5, low=0.0, low_open=True, high=1.0,
                                        help="target FLOPs of the pruned network, as a fraction of the unpruned")
    flop_weight: float = registry.option(2.0, low=0.0, help="weight λ of the FLOP loss")
    flop_tolerance: float = registry.option(0.05, low=0.0, high=1.0, help="no FLOP loss within target − "
                                            "tolerance … target (fractions of the unpruned FLOPs)")
    search_steps: int = registry.option(300, low=1, help="weight + architecture steps of the search")
    search_batch_size: int = registry.option(64, low=1, help="batch size of the search")
    arch_lr: float = registry.option(0.05, low=0.0, low_open=True, help="Adam lr of the width/depth logits")
    search_lr: float = registry.option(1e-3, low=0.0, low_open=True, help="AdamW lr of the weights during search")
    tau_max: float = registry.option(10.0, low=0.0, low_open=True, help="Gumbel temperature at the start")
    tau_min: float = registry.option(0.1, low=0.0, low_open=True, help="Gumbel temperature at the end")


def width_choices(out: int) -> list[int]:
    return sorted({max(1, int(out * r)) for r in WIDTH_RATIOS})


def depth_choices(n: int) -> list[int]:
    return list(range(1, n + 1)) if n <= 3 else sorted({*range(1, n + 1, 2), n})


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, finite: an exponential draw of 0 would give −log 0 = inf and NaN probabilities
    (the reference redraws until none is inf; we clamp the draw)."""
    return -torch.empty_like(like).exponential_().clamp_min(1e-20).log()


def select2(logits: torch.Tensor, tau: float) -> tuple[list[int], torch.Tensor]:
    """Two distinct indices drawn from the Gumbel-softmax probabilities at temperature ``tau`` and their
    probabilities re-normalised by a softmax over the two perturbed logits (the reference's select2withP)."""
    if len(logits) == 1:
        return [0, 0], logits.new_tensor([1.0, 0.0])
    perturbed = (logits.log_softmax(0) + gumbel_noise(logits)) / tau
    with torch.no_grad():
        index = torch.multinomial(perturbed.softmax(0) + 1e-7, 2, replacement=False)
    return index.tolist(), perturbed[index].softmax(0)


@functools.lru_cache(maxsize=256)
def _pool_matrix(c_in: int, c_out: int) -> torch.Tensor:
    """``(c_out, c_in)``: row o averages input channels ⌊o·c_in/c_out⌋ … ⌈(o+1)·c_in/c_out⌉ − 1."""
    m = torch.zeros(c_out, c_in)
    for o in range(c_out):
        lo, hi = (o * c_in) // c_out, -((-(o + 1) * c_in) // c_out)
        m[o, lo:hi] = 1.0 / (hi - lo)
    return m


def cwi(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Channel-wise interpolation of ``x`` (B, C, …) to ``channels`` channels: adaptive average pooling over
    the channels (the reference's ``adaptive_avg_pool3d``, as one matrix product, many times faster on CPU)."""
    if x.shape[1] == channels:
        return x
    m = _pool_matrix(x.shape[1], channels).to(x)
    return torch.einsum("oc,bc...->bo...", m, x)


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x if x.shape[1] == channels else torch.cat([x, x.new_zeros(x.shape[0], channels - x.shape[1],
                                                                         *x.shape[2:])], 1)


class SearchNet(nn.Module):
    """The unpruned chain with width and depth distributions; ``forward(x, tau) -> (logits, E[FLOPs])``."""

    def __init__(self, arch: A.Arch, mods: list):
        super().__init__()
        self.arch, self.compute = arch, arch.compute
        last = len(arch.layers) - 1
        self.choices = [width_choices(layer.out) if i < last else [layer.out] for i, layer in enumerate(arch.layers)]
        self.layers, self.bns = nn.ModuleList(), nn.ModuleList()
        for i, layer in enumerate(arch.layers):
            if layer.kind == "conv":
                conv, bn = mods[i]
                self.layers.append(_copy(conv))
                bns = nn.ModuleList()
                for c in self.choices[i] if layer.bn else []:
                    b = nn.BatchNorm2d(c)
                    with torch.no_grad():
                        for name in ("weight", "bias", "running_mean", "running_var"):
                            getattr(b, name).copy_(getattr(bn, name)[:c])
                    bns.append(b)
                self.bns.append(bns)
            else:
                self.layers.append(_copy(mods[i]))
                self.bns.append(nn.ModuleList())
        self.width_logits = nn.ParameterList([nn.Parameter(torch.randn(len(c)) * 0.01) for c in self.choices])
        self.stages = conv_stages(arch)
        self.depths = [depth_choices(len(s)) for s in self.stages]
        self.depth_logits = nn.ParameterList([nn.Parameter(torch.randn(len(d)) * 0.01) for d in self.depths])
        self.sizes = A.spatial_sizes(arch)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [*self.width_logits, *self.depth_logits]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [*self.layers.parameters(), *self.bns.parameters()]

    def width_forward(self, i: int, x: torch.Tensor, index: list[int], probs: torch.Tensor) -> torch.Tensor:
        """Layer i (before its ReLU) on ``x`` at the two sampled widths, mixed by CWI with ``probs``."""
        layer, module = self.arch.layers[i], self.layers[i]
        if layer.kind == "conv":
            out = module(pad_channels(x, module.in_channels))
        else:
            out = module(pad_channels(x, module.in_features))
        widths = [self.choices[i][k] for k in index]
        outs = [self.bns[i][k](out[:, :c]) if len(self.bns[i]) else out[:, :c] for k, c in zip(index, widths)]
        top = max(widths)
        return sum(p * cwi(o, top) for p, o in zip(probs, outs))

    def forward(self, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        last = len(self.arch.layers) - 1
        stage_of = {i: s for s, run in enumerate(self.stages) for i in run}
        depth_p = [F.softmax(d, 0) for d in self.depth_logits]
        survive = [torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0]) for p in depth_p]  # P(depth ≥ choice k)
        flops = x.new_zeros(())
        e_in = torch.tensor(float(self.arch.in_channels))
        kept: list[torch.Tensor] = []
        e_stage: list[torch.Tensor] = []
        for i, layer in enumerate(self.arch.layers):
            if layer.kind == "fc" and x.dim() > 2:
                c = self.layers[i].in_features // (self.sizes[i] ** 2)
                x = pad_channels(x, c).flatten(1)
                e_in = e_in * self.sizes[i] ** 2
            probs = F.softmax(self.width_logits[i], 0)
            e_out = (probs * torch.tensor(self.choices[i], dtype=probs.dtype)).sum()
            per_unit = layer.kernel ** 2 * self.sizes[i] ** 2 if layer.kind == "conv" else 1
            layer_flops = per_unit * e_in * e_out
            if i in stage_of:  # a conv at depth position t counts with P(depth ≥ t)
                s = stage_of[i]
                t = self.stages[s].index(i) + 1
                k = next(k for k, d in enumerate(self.depths[s]) if d >= t)
                layer_flops = layer_flops * survive[s][k]
            flops = flops + layer_flops
            e_in = e_out
            if i in stage_of:  # after a stage, the next layer reads the output of the expected depth
                s = stage_of[i]
                e_stage.append(e_out)
                if i == self.stages[s][-1]:
                    e_in = sum(p * e_stage[d - 1] for p, d in zip(depth_p[s], self.depths[s]))
                    e_stage = []
            if i == last:
                x = self.layers[i](pad_channels(x, self.layers[i].in_features))
                break
            index, p = select2(self.width_logits[i], tau)
            x = F.relu(self.width_forward(i, x, index, p))
            if i in stage_of:
                s = stage_of[i]
                kept.append(x)
                if i == self.stages[s][-1]:
                    if len(self.depths[s]) > 1:  # every depth choice, mixed by Gumbel-softmax probabilities
                        feats = [kept[d - 1] for d in self.depths[s]]
                        top = max(f.shape[1] for f in feats)
                        x = sum(w * cwi(f, top) for w, f in zip(_gumbel_probs(self.depth_logits[s], tau), feats))
                    kept = []
            if layer.pool:
                x = F.max_pool2d(x, 2)
        return x, flops

    def derive(self) -> tuple[list[bool], list[int]]:
        """``(keep, widths)`` of the argmax architecture."""
        widths = [c[int(torch.argmax(w))] for c, w in zip(self.choices, self.width_logits)]
        keep = [True] * len(self.arch.layers)
        for run, d, logits in zip(self.stages, self.depths, self.depth_logits):
            for i in run[d[int(torch.argmax(logits))]:]:
                keep[i] = False
        return keep, widths


def _gumbel_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    return ((logits.log_softmax(0) + gumbel_noise(logits)) / tau).softmax(0)


def _copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).requires_grad_(True)


def flop_loss(expected: torch.Tensor, current: float, target: float, tolerance: float) -> torch.Tensor:
    """The reference's FLOP loss: ``log E`` above the target, ``−log E`` below ``target − tolerance``, else 0."""
    if current > target:
        return torch.log(expected)
    if current < target - tolerance:
        return -torch.log(expected)
    return expected * 0


def conv_stages(arch: A.Arch) -> list[list[int]]:
    """Runs of conv layers, each ending at a max pool or at the linear layers (their depth is searched)."""
    stages, run = [], []
    for i, layer in enumerate(arch.layers):
        if layer.kind == "conv":
            run.append(i)
        if run and (layer.kind != "conv" or layer.pool):
            stages.append(run)
            run = []
    return stages


def min_flops(arch: A.Arch) -> int:
    """FLOPs of the smallest network of the search space (least widths and depths)."""
    last = len(arch.layers) - 1
    widths = [width_choices(layer.out)[0] if i < last else layer.out for i, layer in enumerate(arch.layers)]
    keep = [True] * len(arch.layers)
    for run in conv_stages(arch):
        for i in run[depth_choices(len(run))[0]:]:
            keep[i] = False
    return A.count(A.derive(arch, keep, widths)[0])[1]


def search(teacher: nn.Module, preprocess, fit, options: TASOptions, seed: int) -> tuple[list[bool], list[int], dict]:
    """Run the search on ``fit`` (two halves: weights / architecture); ``(keep, widths, log)``."""
    arch, mods = A.describe(teacher)
    total = A.count(arch)[1]
    if options.flop_ratio * total < min_flops(arch):
        raise ConfigError(f"flop_ratio {options.flop_ratio} is out of reach: the smallest network tas can derive "
                          f"has {min_flops(arch) / total:.3f} of the FLOPs of this one")
    target, tolerance = options.flop_ratio * total, options.flop_tolerance * total
    torch.manual_seed(seed)
    net = SearchNet(arch, mods).train()
    w_opt = torch.optim.AdamW(net.weight_parameters(), lr=options.search_lr, weight_decay=0.0)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=options.arch_lr, betas=(0.5, 0.999))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(fit))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    bs = min(options.search_batch_size, max(1, len(halves[0])))

    def batch(half):
        idx = rng.choice(half, size=min(bs, len(half)), replace=False)
        raw = np.stack([fit.X[i] for i in idx])
        return preprocess(raw), torch.as_tensor(fit.y[idx], dtype=torch.long)

    t0, log = time.perf_counter(), []
    for step in range(options.search_steps):
        cosine = (1 + math.cos(math.pi * step / options.search_steps)) / 2
        tau = options.tau_min + (options.tau_max - options.tau_min) * cosine
        x, y = batch(halves[0])
        w_opt.zero_grad()
        F.cross_entropy(net(x, tau)[0], y).backward()
        w_opt.step()
        x, y = batch(halves[1])
        a_opt.zero_grad()
        logits, expected = net(x, tau)
        keep, widths = net.derive()
        current = A.count(A.derive(arch, keep, widths)[0])[1]
        ce = F.cross_entropy(logits, y)
        loss = ce + options.flop_weight * flop_loss(expected, current, target, tolerance)
        loss.backward()
        a_opt.step()
        if step % 50 == 0 or step == options.search_steps - 1:
            log.append({"step": step, "tau": round(tau, 4), "arch_ce": round(ce.item(), 4),
                        "flops_ratio": round(current / total, 4)})
    keep, widths = net.derive()
    return keep, widths, {"search_s": round(time.perf_counter() - t0, 2), "search_log": log}


def _tas(teachers, student, train, test, *, options: TASOptions, cfg, classes):
    teacher, module = A.teacher_module(teachers, student, classes, "tas")
    t_arch, _ = A.describe(module)
    fit, val = fit_val(train, 0.1, cfg.seed)
    keep, widths, log = search(module, student.preprocess, fit, options, cfg.seed)
    net = A.from_teacher(module, keep, widths, seed=cfg.seed)
    result, timing = train_student(net, student, teachers, kd_objective(options), fit, val, cfg, cache=options.cache)
    (tp, tf), (sp, sf) = A.count(t_arch), A.count(net.arch)
    return net, result.history, {**timing, **log, "architecture": A.architecture(net), "teacher_params": tp,
                                 "teacher_flops": tf, "params_ratio": sp / tp, "flops_ratio": sf / tf}


registry.register(STAGE, "tas", paper="Dong & Yang, Network Pruning via Transformable Architecture Search, "
                  "NeurIPS 2019",
                  summary="searches width and depth distributions (Gumbel CWI mixtures, FLOP-target loss) of the "
                  "teacher; the argmax pruned net learns by KD from it",
                  options=TASOptions, fn=_tas, train={"epochs": 5, "lr": 1e-3, "batch_size": 32})
