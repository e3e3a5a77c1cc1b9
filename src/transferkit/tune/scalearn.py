"""Adapter composition: ScaLearn (+ Uniform, ++ variants), AdapterFusion, and VL-Adapter-style sharing.

Two-stage multi-task transfer (Frohmann et al., "ScaLearn: Simple and Highly Parameter-Efficient Task
Transfer by Learning to Scale", Findings of ACL 2024, arXiv:2310.01217):

1. train one bottleneck adapter per *source* task on the frozen backbone (transferkit's ``adapter``,
   ``parallel-adapter`` or ``scaled-parallel-adapter`` methods — any run folder or Delta of them);
2. for a *target* task freeze the backbone and every source adapter and learn only how to combine the
   adapters' outputs ``a_i = s_i·f_i(z_i)`` (``z_i`` = the sublayer output h for sequential adapters, its
   input x for parallel ones) at every adapter site, plus a new linear head.

==========================  =========================================================  =====================
variant (``method=``)       output of a site (h = frozen sublayer output)              trainable (+ head)
==========================  =========================================================  =====================
``scalearn``                ``h + Σ_i ω_i ⊙ a_i``,  ω ∈ R^{S×N×d}                       S·N·d
``scalearn-uniform``        ``h + Σ_i ω_i a_i``,    ω ∈ R^{S×N×1}                       S·N
``scalearn++``              one ω ∈ R^{N×d} shared by every site                        N·d
``scalearn-uniform++``      one ω ∈ R^{N} shared by every site                          N
``adapterfusion``           ``h + Σ_i softmax_i(q·k_i / T) v_i``, q = W_q h,            S·3·(d² + d)
                            k_i = W_k a_i, v_i = W_v a_i
==========================  =========================================================  =====================

S = number of adapter sites = L layers × sites per layer (1 for Pfeiffer adapters after the FFN, the
paper's setting, so ScaLearn has L·N·d parameters: 73,728 for N = 8, d = 768, L = 12), N = number of
sources, d = hidden size. The head adds d·C + C.

ScaLearn details (paper / reference config ``scalearn_2_avg_d03``): no softmax and no sum-to-one
constraint on ω; ω ~ N(omega_init / N, omega_std²) with omega_init = 2, omega_std = 0.001; dropout
0.3 applied to ω itself during training (``omega_dropout``).

AdapterFusion (Pfeiffer et al., EACL 2021): W_q, W_k N(0, 0.02²) with zero biases, W_v = identity
(+1e-6 off the diagonal); the softmax temperature T is annealed linearly from ``temperature`` (50) to
1 over ``anneal_steps`` training forward passes (default: the run's optimizer steps); evaluation uses
the current T. Values are the adapters' outputs *without* the residual; the residual h is added
once (so one source with W_v = I is exactly that adapter).

Exactness (tests): one source with ω = 1 is that adapter's model exactly; ω = 0 is the base model;
AdapterFusion's attention weights sum to 1 over the sources.

Composition sites are child modules ``<sublayer-owner>.composition`` (the frozen source adapters,
``composition.adapters.<i>``) wired by hooks like :mod:`.adapters`; the mixing parameters live in one
module ``<encoder>.composer``. The Delta is kind ``head``: the composer, the frozen source adapters
and the new head as new tensors, the source adapter specs in ``meta["composition"]``;
:func:`rebuild` turns (ZooModel, Delta) back into the composed model.

CLI: ``transferkit tune --method scalearn --config cfg.yaml`` with ``sources: [runs/src1, runs/src2]``
(run folders of ``--method adapter`` on the same base model, or their ``delta/`` folders).

VL-Adapter-style sharing (Sung, Cho, Bansal, CVPR 2022): :func:`train_shared` trains one bottleneck
adapter shared by several text tasks (``share="all"``; ``"down"``/``"up"`` share one projection,
``"none"`` = one adapter per task) with one head per task and a task prompt (``"<task>: "``) prepended
to every input, in one multi-task run. ``method="shared-adapter"`` runs it from :func:`tune` with the
``--data`` task as the first task and ``tasks: [dataset, ...]`` as extra tasks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..delta import NEW, Delta, apply
from ..engine.objectives import MultiTaskCE
from ..errors import ConfigError
from ..zoo.base import Classifier
from ._common import Fitted, count_trainable, fit_and_evaluate, require_text_hf
from .adapters import Bottleneck, BottleneckAdapter, Placed, encoder_layers
from .registry import PEFT_TRAIN, STAGE
from .. import registry
from ..registry import option

__all__ = [
    "VARIANTS",
    "Composer",
    "CompositionSite",
    "MultiTaskCE",
    "MultiTaskClassifier",
    "SharedResult",
    "SharedSite",
    "compose",
    "composed_classifier",
    "expected_params",
    "load_sources",
    "rebuild",
    "run",
    "run_shared",
    "train_shared",
]

# variant -> (kind, uniform, shared across sites)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "scalearn": ("scale", False, False),
    "scalearn-uniform": ("scale", True, False),
    "scalearn++": ("scale", False, True),
    "scalearn-uniform++": ("scale", True, True),
    "adapterfusion": ("fusion", False, False),
}
_PREFIX = "new.backbone.model."
_ADAPTER_KEYS = ("down.weight", "down.bias", "up.weight", "up.bias", "scale")


# ------------------------------------------------------------------------------------- sources
def _as_delta(src: Any) -> Delta:
    if isinstance(src, Delta):
        return src
    path = Path(src)
    for cand in (path, path / "delta"):
        if (cand / "delta.json").is_file():
            return Delta.load(cand)
    raise ConfigError(f"source adapter {str(src)!r}: no delta.json there or in its delta/ folder "
                      "(pass run folders of `transferkit tune --method adapter`)")


def load_sources(sources: Any, base_name: str | None = None) -> list[dict[str, Any]]:
    """Read source adapters: ``[{"spec": add_adapters kwargs, "sites": {owner: state}, "name": str}]``.

    ``sources`` are Deltas, delta folders or run folders of an adapter method. Each source must be a
    bottleneck-adapter Delta without a prefix; with ``base_name`` its base must match.
    """
    if isinstance(sources, (str, Path, Delta)):
        sources = [sources]
    if not sources:
        raise ConfigError("adapter composition needs source adapters: set option 'sources' to a list of "
                          "run folders of `transferkit tune --method adapter`")
    out = []
    for i, src in enumerate(sources):
        delta = _as_delta(src)
        spec = delta.meta.get("adapters")
        if spec is None:
            raise ConfigError(f"source {i} ({src}) is not an adapter Delta (no meta['adapters'])")
        if spec.get("prefix_length"):
            raise ConfigError(f"source {i} ({src}) has a prefix (MAM); composition needs bottleneck adapters only")
        if base_name is not None and delta.base != base_name:
            raise ConfigError(f"source {i} ({src}) was trained on base {delta.base!r}, not {base_name!r}")
        sites: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in delta.tensors.items():
            if not name.startswith(_PREFIX) or ".adapter." not in name:
                continue
            owner, key = name[len(_PREFIX):].rsplit(".adapter.", 1)
            sites.setdefault(owner, {})[key] = t
        if not sites:
            raise ConfigError(f"source {i} ({src}) holds no adapter tensors")
        out.append({"spec": dict(spec), "sites": sites, "name": str(src) if not isinstance(src, Delta) else f"delta{i}"})
    return out


def _site_table(hf: nn.Module) -> list[tuple[str, str, nn.Module, nn.Module]]:
    """``[(owner name, "attn"|"ffn", x-module, owner)]`` of every candidate site in ``hf``, in order."""
    names = {id(m): n for n, m in hf.named_modules()}
    rows = []
    for _, sites in encoder_layers(hf):
        for where in ("attn", "ffn"):
            x_module, owner = sites[where]
            rows.append((names[id(owner)], where, x_module, owner))
    return rows


def _source_adapter(src: dict[str, Any], where: str, dim: int, state: dict[str, torch.Tensor]) -> BottleneckAdapter:
    spec = src["spec"]
    mode = spec.get(where)
    if mode is None:
        raise ConfigError(f"source {src['name']} has adapter tensors at an {where} site but no {where} mode")
    bottleneck = int(state["down.weight"].shape[0])
    ad = BottleneckAdapter(dim, bottleneck, mode, float(spec.get("scale", 1.0)),
                           "scale" in state, float(spec.get("dropout", 0.0)), "zero")
    missing = ad.load_state_dict(state, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise ConfigError(f"source {src['name']}: adapter tensors do not fit ({missing})")
    for p in ad.parameters():
        p.requires_grad_(False)
    return ad


# ------------------------------------------------------------------------------------- modules
class Composer(nn.Module):
    """The trainable mixing parameters of every composition site (see the module docstring).

    Parameters
    ----------
    variant : a key of :data:`VARIANTS`.
    n_sites, n_sources, dim : S, N, d.
    omega_init, omega_std, omega_dropout : ScaLearn's ω initialisation N(omega_init/N, omega_std²)
        and the dropout on ω during training.
    temperature, anneal_steps : AdapterFusion's initial softmax temperature, annealed linearly to 1
        over ``anneal_steps`` training forward passes.
    seed : seeds the initialisation.
    """

    def __init__(self, variant: str, n_sites: int, n_sources: int, dim: int, *, omega_init: float = 2.0,
                 omega_std: float = 1e-3, omega_dropout: float = 0.3, temperature: float = 50.0,
                 anneal_steps: int = 1000, seed: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"unknown composition variant {variant!r}; known: {', '.join(VARIANTS)}")
        if n_sources < 1 or n_sites < 1:
            raise ConfigError("composition needs at least one source adapter and one site")
        if not 0 <= float(omega_dropout) < 1:
            raise ConfigError(f"omega_dropout must be in [0, 1), got {omega_dropout}")
        self.variant = variant
        self.kind, uniform, shared = VARIANTS[variant]
        self.n_sites, self.n_sources, self.dim = int(n_sites), int(n_sources), int(dim)
        self.shared = shared
        g = torch.Generator().manual_seed(int(seed))
        if self.kind == "scale":
            shape = (1 if shared else self.n_sites, self.n_sources, 1 if uniform else self.dim)
            self.omega = nn.Parameter(torch.randn(shape, generator=g) * float(omega_std)
                                      + float(omega_init) / self.n_sources)
            self.omega_dropout = float(omega_dropout)
        else:
            if float(temperature) < 1:
                raise ConfigError(f"adapterfusion temperature must be >= 1, got {temperature}")

            def lin(identity: bool) -> nn.Linear:
                m = nn.Linear(self.dim, self.dim)
                with torch.no_grad():
                    if identity:
                        m.weight.copy_(torch.eye(self.dim) + 1e-6 * (1 - torch.eye(self.dim)))
                    else:
                        m.weight.normal_(0.0, 0.02, generator=g)
                    m.bias.zero_()
                return m

            self.query = nn.ModuleList(lin(False) for _ in range(self.n_sites))
            self.key = nn.ModuleList(lin(False) for _ in range(self.n_sites))
            self.value = nn.ModuleList(lin(True) for _ in range(self.n_sites))
            self.t_start = float(temperature)
            self.anneal_steps = max(int(anneal_steps), 1)
            self.register_buffer("fusion_steps", torch.zeros((), dtype=torch.long))
            self.last_probs: dict[int, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"variant={self.variant}, sites={self.n_sites}, sources={self.n_sources}, dim={self.dim}"

    @property
    def temperature(self) -> float:
        if self.kind != "fusion":
            raise AttributeError("only adapterfusion has a temperature")
        frac = min(int(self.fusion_steps) / self.anneal_steps, 1.0)
        return self.t_start - (self.t_start - 1.0) * frac

    def _tick(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Encoder forward pre-hook: one training forward pass = one annealing step."""
        if self.kind == "fusion" and self.training:
            self.fusion_steps += 1

    def mix(self, site: int, h: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        """The site's output: ``h`` plus the combination of the source outputs ``outs`` (each like h)."""
        a = torch.stack(outs, 0)  # (N, ..., d)
        if self.kind == "scale":
            w = self.omega[0 if self.shared else site]  # (N, d or 1)
            w = F.dropout(w, self.omega_dropout, self.training)
            w = w.view(w.shape[0], *([1] * (a.dim() - 2)), w.shape[-1]).to(a.dtype)
            return h + (w * a).sum(0)
        q = self.query[site](h)  # (..., d)
        k = self.key[site](a)  # (N, ..., d)
        v = self.value[site](a)
        scores = (k * q.unsqueeze(0)).sum(-1) / self.temperature  # (N, ...)
        probs = torch.softmax(scores, 0)
        self.last_probs[site] = probs.detach()
        return h + (probs.unsqueeze(-1) * v).sum(0)


class CompositionSite(nn.Module):
    """The frozen source adapters of one sublayer; hooks route h (and x) through them and the composer."""

    def __init__(self, adapters: list[BottleneckAdapter], index: int):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.index = int(index)
        self._composer: list[Composer] = []  # a list, so that it is not registered as a child twice
        self._x: torch.Tensor | None = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._x = args[0] if args else kwargs["hidden_states"]

    def _inject(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        outs = []
        for ad in self.adapters:
            if ad.mode == "parallel":
                if x is None:
                    raise RuntimeError("composition: the sublayer input was not captured")
                outs.append(ad(x))
            else:
                outs.append(ad(output))
        return self._composer[0].mix(self.index, output, outs)


def compose(hf: nn.Module, sources: list[dict[str, Any]], variant: str = "scalearn", **composer_kw: Any) -> list[str]:
    """Insert the frozen ``sources`` (from :func:`load_sources`) and a :class:`Composer` into ``hf`` in place.

    Every source must have adapters at the same sites. Returns the names (in ``hf``) of the
    composer's parameters (the only new trainable ones).
    """
    dim = int(hf.config.hidden_size)
    table = _site_table(hf)
    used = [(owner, where, xm, om) for owner, where, xm, om in table if any(owner in s["sites"] for s in sources)]
    known = {owner for owner, *_ in table}
    for s in sources:
        extra = set(s["sites"]) - known
        if extra:
            raise ConfigError(f"source {s['name']} has adapters at {min(extra)!r}, which is not a site of "
                              f"this model (was it trained on another base?)")
        missing = [owner for owner, *_ in used if owner not in s["sites"]]
        if missing:
            raise ConfigError(f"source {s['name']} has no adapter at {missing[0]!r}; all sources must have "
                              "adapters at the same sites (same position option)")
    if hasattr(hf, "composer"):
        raise ConfigError("the encoder already has an adapter composition")
    composer = Composer(variant, len(used), len(sources), dim, **composer_kw)
    hf.add_module("composer", composer)
    hf.register_forward_pre_hook(composer._tick, with_kwargs=True)
    for i, (owner_name, where, x_module, owner) in enumerate(used):
        if hasattr(owner, "composition") or hasattr(owner, "adapter"):
            raise ConfigError(f"{owner_name} already has an adapter")
        site = CompositionSite([_source_adapter(s, where, dim, s["sites"][owner_name]) for s in sources], i)
        site._composer.append(composer)
        owner.add_module("composition", site)
        if any(ad.mode == "parallel" for ad in site.adapters):
            x_module.register_forward_pre_hook(site._capture, with_kwargs=True)
        owner.dropout.register_forward_hook(site._inject)
    return ["composer." + n for n, _ in composer.named_parameters()]


def expected_params(variant: str, n_sites: int, n_sources: int, dim: int, n_classes: int = 0) -> int:
    """The closed-form trainable parameter count of a composition (+ head when ``n_classes``)."""
    kind, uniform, shared = VARIANTS[variant]
    head = dim * n_classes + n_classes if n_classes else 0
    if kind == "fusion":
        return n_sites * 3 * (dim * dim + dim) + head
    return (1 if shared else n_sites) * n_sources * (1 if uniform else dim) + head


def composed_classifier(model, n_classes: int, sources: Any, variant: str = "scalearn", seed: int = 0,
                        **composer_kw: Any) -> tuple[Classifier, list[str], list[dict[str, Any]]]:
    """A copy of ``model`` + frozen source adapters + composer + new head; only composer and head train.

    Returns ``(classifier, composer parameter names, loaded sources)``.
    """
    require_text_hf(model, variant)
    srcs = sources if (isinstance(sources, list) and sources and isinstance(sources[0], dict)
                       and "sites" in sources[0]) else load_sources(sources, model.name)
    clf = Classifier(copy.deepcopy(model.backbone), model.feature_dim, n_classes, seed)
    for p in clf.backbone.parameters():
        p.requires_grad_(False)
    names = compose(clf.backbone.model, srcs, variant, seed=seed, **composer_kw)
    return clf, ["backbone.model." + n for n in names], srcs


def _composer_kw(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("omega_init", "omega_std", "omega_dropout", "temperature", "anneal_steps")
    return {k: options[k] for k in keys if options.get(k) is not None}


def rebuild(model, delta: Delta) -> Classifier:
    """The composed model of a composition Delta: copy of ``model`` + adapters + composer + head, eval mode."""
    info = delta.meta.get("composition")
    if info is None:
        raise ConfigError("this delta has no meta['composition']; it was not made by an adapter composition")
    head_w = delta.tensors.get(NEW + "head.weight")
    if head_w is None:
        raise ConfigError("composition delta has no new.head.weight")
    # placeholder sources with the right shapes; apply() sets the real tensors
    srcs = []
    for i, spec in enumerate(info["sources"]):
        sites: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in delta.tensors.items():
            marker = f".composition.adapters.{i}."
            if name.startswith(_PREFIX) and marker in name:
                owner, key = name[len(_PREFIX):].split(marker)
                sites.setdefault(owner, {})[key] = torch.zeros_like(t)
        srcs.append({"spec": spec, "sites": sites, "name": f"source{i}"})
    kw = dict(info.get("composer", {}))
    clf, _, _ = composed_classifier(model, int(head_w.shape[0]), srcs, info["variant"], **kw)
    return apply(clf, delta).eval()


def run(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    kw = _composer_kw(options)
    if VARIANTS[method][0] == "fusion" and kw.get("anneal_steps") is None:
        n = len(fit.y)
        kw["anneal_steps"] = cfg.max_steps or cfg.epochs * max(1, math.ceil(n / (cfg.batch_size * cfg.grad_accum)))
    clf, _, srcs = composed_classifier(model, n_classes, options.get("sources"), method, seed=init_seed, **kw)
    trainable = count_trainable(clf)
    result, test_metrics = fit_and_evaluate(clf, model, fit, val, test, cfg, out_dir, resume)
    state = clf.state_dict()
    hf_prefix = "backbone.model."
    tensors = {NEW + k: v.detach().clone() for k, v in state.items()
               if k.startswith(hf_prefix + "composer.") or ".composition.adapters." in k}
    tensors.update({NEW + "head." + k: v.detach().clone() for k, v in clf.head.state_dict().items()})
    composer: Composer = clf.backbone.model.composer
    meta = {"composition": {"variant": method, "sources": [s["spec"] for s in srcs],
                            "source_paths": [s["name"] for s in srcs], "composer": kw},
            "requires": "transferkit.tune.scalearn.rebuild"}
    delta = Delta(model.name, "head", tensors, meta)
    head = sum(p.numel() for p in clf.head.parameters())
    frozen_adapters = sum(p.numel() for n, p in clf.named_parameters() if ".composition.adapters." in n)
    extra = {"added_params": trainable + frozen_adapters, "head_params": head, "n_sources": len(srcs),
             "n_sites": composer.n_sites, "composer_params": trainable - head,
             "source_adapter_params": frozen_adapters}
    if composer.kind == "scale":
        w = composer.omega.detach()
        extra["omega_mean_per_source"] = [round(float(x), 4) for x in w.mean(dim=(0, 2))]
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, clf, extra)


# ------------------------------------------------------------------------------------- VL-Adapter sharing
class SharedSite(nn.Module):
    """Bottleneck adapter(s) at one sublayer, routed per row by task id.

    ``share``: ``"all"`` (one adapter for every task), ``"down"`` / ``"up"`` (that projection shared,
    the other per task), ``"none"`` (one adapter per task). Sequential insertion (``h ← h + s·f(h)``)
    or parallel (``h ← h + s·f(x)``); zero-initialised up-projections (starts as the base model).
    """

    def __init__(self, dim: int, bottleneck: int, n_tasks: int, share: str = "all", mode: str = "sequential",
                 scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if share not in ("all", "down", "up", "none"):
            raise ConfigError(f"shared-adapter option share must be all, down, up or none, got {share!r}")
        if int(bottleneck) < 1:
            raise ConfigError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.mode, self.scale, self.n_tasks = mode, float(scale), int(n_tasks)
        nd = 1 if share in ("all", "down") else n_tasks
        nu = 1 if share in ("all", "up") else n_tasks
        proto = BottleneckAdapter(dim, bottleneck, mode, scale, False, dropout, "zero")
        self.down = nn.ModuleList(copy.deepcopy(proto.down) for _ in range(nd))
        self.up = nn.ModuleList(copy.deepcopy(proto.up) for _ in range(nu))
        for m in self.down:  # distinct random down-projections
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
        self.drop = nn.Dropout(float(dropout))
        self.task_ids: torch.Tensor | None = None
        self._x: torch.Tensor | None = None

    def delta(self, z: torch.Tensor) -> torch.Tensor:
        tids = self.task_ids
        if tids is None or (len(self.down) == 1 and len(self.up) == 1):
            return self.up[0](self.drop(F.relu(self.down[0](z)))) * self.scale
        out = torch.zeros_like(z)
        for t in torch.unique(tids).tolist():
            rows = tids == t
            d = self.down[t if len(self.down) > 1 else 0]
            u = self.up[t if len(self.up) > 1 else 0]
            out[rows] = u(self.drop(F.relu(d(z[rows])))) * self.scale
        return out

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._x = args[0] if args else kwargs["hidden_states"]

    def _inject(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.mode == "sequential":
            return output + self.delta(output)
        x, self._x = self._x, None
        return output + self.delta(x)


class MultiTaskClassifier(nn.Module):
    """A frozen encoder with :class:`SharedSite` adapters and one linear head per task.

    ``forward(inputs)`` runs the task ``active_task`` (an int) for every row; :meth:`features` takes
    per-row ``task_ids``.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: list[int], sites: list[SharedSite], seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(Classifier(nn.Identity(), feature_dim, c, seed + i).head
                                   for i, c in enumerate(n_classes))
        self._sites = sites
        self.active_task = 0

    def features(self, inputs: Any, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        ref = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        if task_ids is None:
            task_ids = torch.full((ref.shape[0],), self.active_task, dtype=torch.long, device=ref.device)
        for s in self._sites:
            s.task_ids = task_ids
        try:
            return self.backbone(inputs)
        finally:
            for s in self._sites:
                s.task_ids = None

    def forward(self, inputs: Any = None, **named: torch.Tensor) -> torch.Tensor:
        return self.heads[self.active_task](self.features(named if inputs is None else inputs))


@dataclass
class SharedResult:
    module: MultiTaskClassifier
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    delta: Delta | None = None


def _prompt(task: str, texts: Any, use: bool) -> list[str]:
    return [f"{task}: {t}" if use else str(t) for t in texts]


def train_shared(model, tasks: dict[str, tuple[Any, Any]], *, share: str = "all", bottleneck: int = 64,
                 position: str = "ffn", mode: str = "sequential", scale: float = 1.0, dropout: float = 0.0,
                 task_prompts: bool = True, config: Any = None, val: Any = None, out_dir: Any = None,
                 resume: bool = False) -> SharedResult:
    """Multi-task training of shared adapters (VL-Adapter style) over text ``tasks``.

    Parameters
    ----------
    model : a text ZooModel (Hugging Face encoder).
    tasks : ``{name: (train Dataset, test Dataset or None)}``; the first is the main task.
    share : ``"all"`` (one adapter for all tasks), ``"down"``, ``"up"``, ``"none"`` (per-task adapters).
    bottleneck, position (``ffn``/``attn``/``both``), mode (``sequential``/``parallel``), scale, dropout:
        the adapters.
    task_prompts : prepend ``"<name>: "`` to every input (VL-Adapter's task prompts).
    config : TrainConfig or mapping; ``val`` : optional validation Dataset of the main task.

    Returns
    -------
    SharedResult with ``metrics["test_accuracy"]`` (main task), ``metrics["task_accuracy"]``
    (per task), ``trainable_params`` and ``head_params``.
    """
    from ..engine import TrainConfig, evaluate, train

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    hf = require_text_hf(model, "shared-adapter")
    if not tasks:
        raise ConfigError("train_shared needs at least one task")
    if position not in ("ffn", "attn", "both"):
        raise ConfigError(f"shared-adapter option position must be ffn, attn or both, got {position!r}")
    names = list(tasks)
    backbone = copy.deepcopy(model.backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    hf = backbone.model
    dim = int(hf.config.hidden_size)
    sites = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for _, layer_sites in encoder_layers(hf):
            for where in ("attn", "ffn"):
                if position not in (where, "both"):
                    continue
                x_module, owner = layer_sites[where]
                site = SharedSite(dim, bottleneck, len(names), share, mode, scale, dropout)
                owner.add_module("shared_adapter", site)
                if mode == "parallel":
                    x_module.register_forward_pre_hook(site._capture, with_kwargs=True)
                owner.dropout.register_forward_hook(site._inject)
                sites.append(site)
    mtc = MultiTaskClassifier(backbone, model.feature_dim, [len(tasks[n][0].classes) for n in names], sites, cfg.seed)
    items = [(text, int(y), t) for t, n in enumerate(names)
             for text, y in zip(_prompt(n, tasks[n][0].X, task_prompts), tasks[n][0].y)]

    class _Items(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    def collate(batch):
        return {"inputs": model.preprocess([b[0] for b in batch]),
                "labels": torch.tensor([b[1] for b in batch], dtype=torch.long),
                "task_ids": torch.tensor([b[2] for b in batch], dtype=torch.long)}

    val_items = None
    if val is not None:
        val_items = _Items([(x, int(y), 0) for x, y in zip(_prompt(names[0], val.X, task_prompts), val.y)])
    trainable = count_trainable(mtc)
    mtc.active_task = 0
    result = train(mtc, _Items(items), MultiTaskCE(), cfg, val_data=val_items, collate_fn=collate,
                   out_dir=out_dir, resume=resume)
    mtc.eval()
    acc = {}
    test_metrics: dict[str, Any] = {}
    for t, n in enumerate(names):
        test = tasks[n][1]
        if test is None:
            continue
        mtc.active_task = t
        m = evaluate(mtc, _Items([(x, int(y), t) for x, y in zip(_prompt(n, test.X, task_prompts), test.y)]),
                     collate_fn=collate)
        acc[n] = m.get("accuracy")
        if t == 0:
            test_metrics = m
    mtc.active_task = 0
    heads = sum(p.numel() for p in mtc.heads.parameters())
    state = mtc.state_dict()
    tensors = {NEW + k: v.detach().clone() for k, v in state.items() if ".shared_adapter." in k or k.startswith("heads.")}
    delta = Delta(model.name, "head", tensors, {"shared_adapter": {
        "tasks": names, "share": share, "bottleneck": int(bottleneck), "position": position, "mode": mode,
        "scale": float(scale), "dropout": float(dropout), "task_prompts": bool(task_prompts),
        "n_classes": [len(tasks[n][0].classes) for n in names]}})
    metrics = {"trainable_params": trainable, "head_params": heads, "adapter_params": trainable - heads,
               "task_accuracy": acc, "test_accuracy": acc.get(names[0]), "n_tasks": len(names),
               "test_metrics": test_metrics, "train_metrics": result.metrics}
    return SharedResult(mtc, metrics, result.history, delta)


def run_shared(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, **_) -> Fitted:
    """``tune(method="shared-adapter")``: the ``--data`` task plus ``options["tasks"]`` in one run."""
    from ..data.split import make_split

    specs = options.get("tasks") or []
    if isinstance(specs, str):
        specs = [specs]
    tasks: dict[str, tuple[Any, Any]] = {str(options.get("task_name") or "task0"): (fit, test)}
    for spec in specs:
        tr, te, _ = make_split(spec, per_class=options.get("task_per_class"), sample_seed=cfg.seed, seed=cfg.seed)
        name = str(spec).rsplit("/", 1)[-1].split(".")[0]
        while name in tasks:
            name += "_"
        tasks[name] = (tr, te)
    res = train_shared(model, tasks, share=options["share"], bottleneck=int(options["bottleneck"]),
                       position=options["position"], mode=options["mode"], scale=float(options["scale"]),
                       dropout=float(options["dropout"]), task_prompts=bool(options["task_prompts"]),
                       config=cfg, val=val, out_dir=out_dir, resume=resume)
    m = res.metrics
    extra = {"added_params": m["trainable_params"], "head_params": m["head_params"],
             "adapter_params": m["adapter_params"], "task_accuracy": m["task_accuracy"], "n_tasks": m["n_tasks"]}
    return Fitted(res.delta, m["train_metrics"], res.history, m["test_metrics"], m["trainable_params"],
                  res.module, extra)


# ------------------------------------------------------------------------------------------ registry
@dataclass
class Sources:
    sources: list[str] | None = option(None, help="the frozen source adapters: run folders (or their delta/ "
                                       "folders) of `transferkit tune --method adapter` on the same base")


@dataclass
class ScaLearnOptions(Sources):
    omega_init: float = option(2.0, help="ω starts at N(omega_init / N, omega_std²)")
    omega_std: float = option(0.001, low=0.0, help="spread of ω's initialisation")
    omega_dropout: float = option(0.3, low=0.0, high=1.0, high_open=True, help="dropout on ω during training")


@dataclass
class AdapterFusionOptions(Sources):
    temperature: float = option(50.0, low=1.0, help="initial softmax temperature, annealed linearly to 1")
    anneal_steps: int | None = option(None, low=1, help="training steps of the annealing (null: the whole run)")


@dataclass
class SharedAdapterOptions(Placed, Bottleneck):
    tasks: list[str] | None = option(None, help="the extra tasks (datasets) trained with the --data task")
    task_per_class: int | None = option(None, low=1, help="at most this many items per class of each extra task")
    task_name: str = option("task0", help="name (and task prompt) of the --data task")
    share: str = option("all", choices=("all", "down", "up", "none"), help="what the tasks share: the whole "
                        "adapter, one projection, or nothing (one adapter per task)")
    mode: str = option("sequential", choices=("sequential", "parallel"), help="adapter on the sublayer output "
                       "(sequential) or next to it (parallel)")
    scale: float = option(1.0, help="s, the scale of the adapter's output")
    task_prompts: bool = option(True, help="prepend '<task>: ' to every input")


_PAPER = ("Frohmann et al. ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale, "
          "Findings of ACL 2024 (arXiv:2310.01217)")
_INFO = {"family": "native", "modality": ["text"]}
for _name, _summary in (
        ("scalearn", "ScaLearn: h + Σ_i ω_i ⊙ a_i(h) over frozen source adapters (option sources: adapter run "
                     "folders), ω ∈ R^{N×d} per site; L·N·d parameters (+ head)."),
        ("scalearn-uniform", "ScaLearnUniform: one scalar ω_i per source per site; L·N parameters (+ head)."),
        ("scalearn++", "ScaLearn++: one ω ∈ R^{N×d} shared by all layers; N·d parameters (+ head)."),
        ("scalearn-uniform++", "ScaLearnUniform++: one scalar per source shared by all layers; N parameters (+ head).")):
    registry.register(STAGE, _name, fn=run, options=ScaLearnOptions, paper=_PAPER, summary=_summary, **_INFO,
                      train={**PEFT_TRAIN, "lr": 5e-3, "weight_decay": 0.0})
registry.register(
    STAGE, "adapterfusion", fn=run, options=AdapterFusionOptions, **_INFO,
    train={**PEFT_TRAIN, "lr": 5e-4, "weight_decay": 0.0},
    summary="AdapterFusion: per-site attention (query h, keys/values W·a_i) over frozen source adapters, "
            "temperature annealed 50 → 1; 3(d²+d) per site (+ head).",
    paper="Pfeiffer et al. AdapterFusion: Non-Destructive Task Composition for Transfer Learning, EACL 2021 "
          "(arXiv:2005.00247)")
registry.register(
    STAGE, "shared-adapter", fn=run_shared, options=SharedAdapterOptions, **_INFO, train={**PEFT_TRAIN, "lr": 1e-3},
    summary="VL-Adapter-style sharing: one bottleneck adapter shared by the --data task and the option tasks "
            "(datasets), task prompts, one head per task, multi-task training.",
    paper="Sung, Cho, Bansal. VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language Tasks, "
          "CVPR 2022 (arXiv:2112.06825)")
