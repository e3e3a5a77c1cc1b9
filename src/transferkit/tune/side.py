"""Memory-efficient side networks: the backbone runs frozen under ``torch.no_grad()``; a light network
trained on its multi-layer intermediate features makes the prediction.

Because no autograd graph is built over the backbone, its activations are freed layer by layer and
backward never visits it: training memory is the frozen forward's working set plus the side network
(LoRA and adapters still backpropagate through every layer). ``no_grad`` rather than
``inference_mode``: inference tensors cannot be saved for the side network's backward.

Three side networks (``method=``), all on the same layer features ``h_0..h_L`` (text: the Hugging
Face encoder's hidden states, ``h_0`` = embeddings, token-level, with the attention mask; images:
the outputs of tap modules, each average-pooled to a ``grid × grid`` token map):

``unipt`` — UniPT (Diao et al., "UniPT: Universal Parallel Tuning for Transfer Learning with Efficient
Parameter and Memory", CVPR 2024). Per layer ``f_i = LN_i(h_i W_i)`` (d_i → r); anchor ``F = f_L``;
for ``i < L``: ``A_i = l1norm(ReLU(F f_iᵀ)) + I`` (padded keys masked), ``m_i = A_i f_i``;
confidence ``c_i = w_gᵀ(mean(F) ⊙ mean(f_i))``, ``α = softmax_i(c)``;
output ``Up(ReLU(F + Proj(Σ_i α_i m_i)))`` (r → D), mean-pooled over tokens, → new linear head.
Parameters: ``Σ_i (d_i·r + 3r) + (r² + r) + r + (r·D + D) + (D·C + C)``.

``sherl`` — SHERL (Diao et al., "SHERL: Synthesizing High Accuracy and Efficient Memory for
Resource-Limited Transfer Learning", ECCV 2024). Early route, anti-redundancy multi-tiered
aggregation over ``h_0..h_{L−m}`` (``m = late_layers``): ``f_i = LN_i(h_i W_i)``, ``g = f_{L−m}``;
per token ``ρ_i = Σ_j ReLU(cos(f_i, f_j))`` (redundancy, ≥ 1), ``a = l1norm_i(ReLU(wᵀ(f_i ⊙ g)) / ρ_i)``,
``agg = Σ_i a_i f_i + g``; ``x = h_{L−m} + tanh(θ/0.1)·Up(agg)`` with ``θ = 0`` at start. Late route:
``x`` goes through the last ``m`` pre-trained layers (with the same attention mask), is mean-pooled
and fed to the head. What we keep: the paper fine-tunes (or PETL-adapts) the late layers; here
``late_tune="frozen"`` (default, as in the reference VSE code: gradients flow *through* the frozen
copy) or ``"full"`` (a trainable copy of the late layers, whose weights join the Delta). The gate
multiplies the side branch (not ``h``), so the untrained model is exactly the base model
(``tanh(0) = 0``); the paper's formula as written gates ``h`` — gating the side branch gives the
zero-init identity and a stable start. ``late_layers=0`` drops the late route (then
``x = h_L + gate·Up(agg)``) and works on any model. Memory grows with ``late_layers``: those layers'
activations are kept for backward. Parameters: ``Σ_i (d_i·r + 3r) + r + (r·d + d) + 1 + (d·C + C)``
(+ the late layers' parameters with ``late_tune="full"``).

``r2`` — the reversed recurrent block of R²-Tuning (Liu et al., "R²-Tuning: Efficient Image-to-Video
Transfer Learning for Video Temporal Grounding", ECCV 2024) as a generic multi-layer aggregator: the
last ``n_layers`` layers are visited **deepest first** through **one shared block** applied
recurrently: ``f_i = LN_i(h_i W_i)``, ``v = σ(g_i) ⊙ f_i + (1 − σ(g_i)) ⊙ s``, ``s ← Block(v)``
(``s = 0`` before the deepest layer; ``g_i ∈ R^r`` per layer, 0 at start; Block = one pre-norm
transformer encoder layer, width r, FFN 2r, shared over layers); output ``LN(mean(s))`` → head (r → C).
Dropped: R²'s text-query-modulated spatial pooling and its per-layer video–text contrastive
calibration losses (there is no query in classification); the shared temporal decoder becomes a
shared token-level encoder layer. Parameters: ``Σ_i (d_i·r + 3r) + k·r + (8r² + 11r) + 2r + (r·C + C)``
(``k = n_layers``).

Cached features
---------------
``cache=True`` (``unipt``, ``r2``, ``sherl`` with ``late_layers=0``) runs the backbone once over the
training, validation and test data and trains the side network on the stored (token-level) layer
features: one backbone pass instead of one per epoch, at the cost of holding
``N × (#layers) × T × d`` floats in memory. Live features (the default) keep memory flat in N.

Delta
-----
Kind ``head``: the side network's tensors ``new.side.*`` and the head ``new.head.*``;
``meta["side"]`` holds the spec (method, r, layers/taps, ...) and :func:`rebuild` turns
(ZooModel, Delta) back into the tuned model.

>>> res = tune(load_model("all-minilm-l6-v2"), train, test, method="unipt", config={"r": 96})  # doctest: +SKIP
>>> model = rebuild(load_model("all-minilm-l6-v2"), res.delta)                                # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..delta import NEW, Delta, apply
from ..errors import ConfigError
from ..registry import option
from ..zoo.base import MeanPooledEncoder, new_head
from ._common import Fitted, count_trainable, fit_and_evaluate, make_collate
from .registry import PEFT_TRAIN, STAGE

__all__ = ["UniPT", "SHERL", "R2Aggregator", "SideClassifier", "LayerTaps", "side_spec", "side_classifier",
           "rebuild", "param_count", "run", "SIDE_METHODS", "SideOptions", "SherlOptions", "R2Options"]

SIDE_METHODS = ("unipt", "sherl", "r2")
_EPS = 1e-6


@dataclass
class SideOptions:
    """What every side network reads (``unipt``; ``sherl`` and ``r2`` add theirs)."""

    r: int = option(96, low=1, help="width of the side network")
    layers: str | list[int] = option("all", help="text models: 'all' or the hidden-state indices read")
    taps: list[str] | None = option(None, help="image models: modules whose outputs are read "
                                    "(default: evenly spaced blocks)")
    grid: int = option(4, low=1, help="image models: each tap average-pooled to grid × grid tokens")
    cache: bool = option(False, help="run the backbone once and train on the stored features")

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"option layers must be 'all' or a list of hidden-state indices, got {self.layers!r}")


@dataclass
class SherlOptions(SideOptions):
    late_layers: int = option(1, low=0, help="m, the last pre-trained layers the merged features go through")
    late_tune: str = option("frozen", choices=("frozen", "full"), help="those layers frozen or trained")


@dataclass
class R2Options(SideOptions):
    r: int = option(128, low=1, help="width of the shared recurrent block")
    n_layers: int | None = option(4, low=1, help="the last n layers visited, deepest first (null: all)")
    heads: int = option(4, low=1, help="attention heads of the block")
    dropout: float = option(0.1, low=0.0, high=1.0, high_open=True, help="dropout in the block")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n, d), (B, n) → (B, d): mean over the real tokens."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def _proj(d_in: int, r: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, r), nn.LayerNorm(r))


# -------------------------------------------------------------------------------------- side networks
class UniPT(nn.Module):
    """UniPT's parallel interaction + confidence aggregation over layer features (see module doc).

    ``forward(feats, mask)``: ``feats`` is a list of (B, n, d_i), shallow → deep; returns (B, out_dim).
    """

    def __init__(self, dims: list[int], out_dim: int, r: int):
        super().__init__()
        if len(dims) < 2:
            raise ConfigError("unipt needs at least 2 layers of features")
        self.down = nn.ModuleList(_proj(d, r) for d in dims)
        self.proj = nn.Linear(r, r)
        self.gate = nn.Linear(r, 1, bias=False)  # w_g
        self.up = nn.Linear(r, out_dim)

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor, late: Callable | None = None) -> torch.Tensor:
        f = [down(h) for down, h in zip(self.down, feats)]
        anchor = f[-1]
        a_bar = masked_mean(anchor, mask)
        key_mask = mask.unsqueeze(1).to(anchor.dtype)  # (B, 1, n)
        msgs, conf = [], []
        for fi in f[:-1]:
            a = F.relu(anchor @ fi.transpose(1, 2)) * key_mask  # (B, n, n)
            a = a / a.sum(-1, keepdim=True).clamp(min=_EPS)
            msgs.append(a @ fi + fi)  # (A + I) f_i
            conf.append(self.gate(a_bar * masked_mean(fi, mask)))  # (B, 1)
        alpha = torch.softmax(torch.cat(conf, -1), -1)  # (B, L)
        agg = sum(alpha[:, i, None, None] * m for i, m in enumerate(msgs))
        out = self.up(F.relu(anchor + self.proj(agg)))
        return masked_mean(out, mask)


class SHERL(nn.Module):
    """SHERL's anti-redundancy early aggregation + gated merge into the late layers (see module doc)."""

    def __init__(self, dims: list[int], out_dim: int, r: int, late: nn.ModuleList | None = None):
        super().__init__()
        if len(dims) < 2:
            raise ConfigError("sherl needs at least 2 early layers of features")
        self.down = nn.ModuleList(_proj(d, r) for d in dims)
        self.w = nn.Linear(r, 1, bias=False)
        self.up = nn.Linear(r, out_dim)
        self.theta = nn.Parameter(torch.zeros(1))
        self.late = late  # trainable copy of the late layers (late_tune="full"), else None

    def gate(self) -> torch.Tensor:
        return torch.tanh(self.theta / 0.1)

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor, late: Callable | None = None) -> torch.Tensor:
        f = torch.stack([down(h) for down, h in zip(self.down, feats)])  # (k, B, n, r)
        g = f[-1]
        fn = F.normalize(f, dim=-1)
        redundancy = F.relu(torch.einsum("ibnr,jbnr->ijbn", fn, fn)).sum(1)  # (k, B, n), >= 1
        score = F.relu(self.w(f * g).squeeze(-1)) / redundancy.clamp(min=_EPS)
        a = score / score.sum(0, keepdim=True).clamp(min=_EPS)
        agg = (a.unsqueeze(-1) * f).sum(0) + g
        x = feats[-1] + self.gate() * self.up(agg)
        if late is not None:
            x = late(x, self.late)
        return masked_mean(x, mask)


class R2Aggregator(nn.Module):
    """R²-Tuning's reversed recurrent block: one shared block over layers, deepest first (see module doc)."""

    def __init__(self, dims: list[int], r: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if r % heads:
            raise ConfigError(f"r2 option r ({r}) must be divisible by heads ({heads})")
        self.down = nn.ModuleList(_proj(d, r) for d in dims)
        self.gates = nn.Parameter(torch.zeros(len(dims), r))
        self.block = nn.TransformerEncoderLayer(r, heads, dim_feedforward=2 * r, dropout=dropout,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(r)

    def forward(self, feats: list[torch.Tensor], mask: torch.Tensor, late: Callable | None = None) -> torch.Tensor:
        pad = ~mask.bool()
        state = None
        for i in reversed(range(len(feats))):  # deepest first
            fi = self.down[i](feats[i])
            sig = torch.sigmoid(self.gates[i])
            v = sig * fi if state is None else sig * fi + (1 - sig) * state
            state = self.block(v, src_key_padding_mask=pad)
        return self.norm(masked_mean(state, mask))


def param_count(method: str, dims: list[int], r: int, out_dim: int, n_classes: int) -> int:
    """The documented trainable-parameter count of a side network + head (``late_tune="frozen"``).

    ``dims``: feature dims of the layers the side network reads (for sherl: the early layers);
    ``out_dim``: backbone feature dim D (unipt, sherl).
    """
    per_layer = sum(d * r + 3 * r for d in dims)
    if method == "unipt":
        return per_layer + (r * r + r) + r + (r * out_dim + out_dim) + (out_dim * n_classes + n_classes)
    if method == "sherl":
        return per_layer + r + (r * out_dim + out_dim) + 1 + (out_dim * n_classes + n_classes)
    if method == "r2":
        return per_layer + len(dims) * r + (8 * r * r + 11 * r) + 2 * r + (r * n_classes + n_classes)
    raise ConfigError(f"unknown side-network method {method!r}")


# -------------------------------------------------------------------------------------- layer features
def _hf_layers(hf: nn.Module) -> nn.ModuleList:
    n = getattr(hf.config, "num_hidden_layers", None)
    for _, m in hf.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ConfigError(f"cannot find the {n} transformer layers of {type(hf).__name__}")


def _largest_sequential(backbone: nn.Module) -> tuple[str, nn.Sequential] | None:
    best = None
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Sequential) and (best is None or len(m) > len(best[1])):
            best = (name, m)
    return best


class LayerTaps(nn.Module):
    """Frozen multi-layer features of a backbone: ``forward(inputs) -> ([h_i (B, n, d_i)], mask (B, n))``.

    Text (Hugging Face encoder in a MeanPooledEncoder): ``layers`` index the hidden states
    (0 = embeddings … L = last layer). Images (any torch module): ``taps`` are module names whose
    outputs (B, C, H, W) are average-pooled to ``grid × grid`` tokens. Runs under ``torch.no_grad()``
    with the backbone in eval mode; with ``late_from`` (text only) it also records what the layer of
    that index receives (hidden state and keyword arguments such as the prepared attention mask),
    so that :meth:`run_late` can re-run the last layers on a modified hidden state.
    """

    def __init__(self, backbone: nn.Module, *, layers: list[int] | None = None, taps: list[str] | None = None,
                 grid: int = 4, late_from: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.hf = backbone.model if isinstance(backbone, MeanPooledEncoder) and hasattr(backbone.model, "config") \
            else None
        self.layers, self.taps, self.grid, self.late_from = layers, taps, int(grid), late_from
        self._late_call: tuple | None = None
        if self.hf is not None:
            if layers is None:
                raise ConfigError("text side networks need layer indices")
        elif not taps:
            raise ConfigError("side networks on non-Hugging-Face models need tap module names (option taps)")
        elif late_from is not None:
            raise ConfigError("late layers need a Hugging Face text encoder; use late_layers=0 on this model")

    def train(self, mode: bool = True) -> "LayerTaps":
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never trains (no dropout, fixed BatchNorm statistics)
        return self

    def forward(self, inputs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            if self.hf is not None:
                return self._text(inputs)
            return self._image(inputs)

    def _text(self, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        handle = None
        if self.late_from is not None:
            layer = _hf_layers(self.hf)[self.late_from]

            def grab(_m, args, kwargs):
                self._late_call = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.hf(**inputs, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        hs = out.hidden_states
        return [hs[i] for i in self.layers], inputs["attention_mask"]

    def _image(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        modules = dict(self.backbone.named_modules())
        captured: dict[str, torch.Tensor] = {}
        handles = [modules[t].register_forward_hook(lambda _m, _i, o, t=t: captured.__setitem__(t, o))
                   for t in self.taps]
        try:
            self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        feats = []
        for t in self.taps:
            o = captured[t]
            if o.dim() != 4:
                raise ConfigError(f"tap {t!r} gives shape {tuple(o.shape)}; side networks need (B, C, H, W) maps")
            feats.append(F.adaptive_avg_pool2d(o, self.grid).flatten(2).transpose(1, 2))  # (B, g², C)
        mask = torch.ones(feats[0].shape[:2], dtype=torch.long, device=feats[0].device)
        return feats, mask

    def run_late(self, x: torch.Tensor, layers: nn.ModuleList | None = None) -> torch.Tensor:
        """Run ``x`` through the late layers (``layers`` or the backbone's own, frozen) with grad enabled."""
        if self._late_call is None:
            raise RuntimeError("run_late needs a preceding forward pass (it reuses that pass's attention mask)")
        args, kwargs = self._late_call
        mods = layers if layers is not None else list(_hf_layers(self.hf))[self.late_from:]
        for layer in mods:
            out = layer(x, *args, **kwargs)
            x = out[0] if isinstance(out, (tuple, list)) else out
        return x


class SideClassifier(nn.Module):
    """Frozen backbone (in :class:`LayerTaps`) + side network + new linear head.

    ``forward(inputs)`` as :class:`~transferkit.zoo.base.Classifier`; with cached features the inputs
    are ``{"side_feats": [...], "side_mask": mask}``.
    """

    def __init__(self, taps: LayerTaps, side: nn.Module, out_dim: int, n_classes: int, seed: int = 0,
                 late: bool = False):
        super().__init__()
        self.taps, self.side, self.use_late = taps, side, bool(late)
        self.head = new_head(out_dim, n_classes, seed)
        for p in self.taps.parameters():
            p.requires_grad_(False)

    def forward(self, inputs: Any = None, **named: Any) -> torch.Tensor:
        inputs = named if inputs is None else inputs
        if isinstance(inputs, dict) and "side_feats" in inputs:
            feats, mask = list(inputs["side_feats"]), inputs["side_mask"]
        else:
            feats, mask = self.taps(inputs)
        late = self.taps.run_late if self.use_late else None
        return self.head(self.side(feats, mask, late=late))

    def side_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (side network + head), named as in ``state_dict``."""
        state = {"side." + k: v for k, v in self.side.state_dict().items()}
        state.update({"head." + k: v for k, v in self.head.state_dict().items()})
        return state


# -------------------------------------------------------------------------------------- build / rebuild
def _default_image_taps(model, n: int | None) -> tuple[list[str], list[int]]:
    found = _largest_sequential(model.backbone)
    if found is None:
        raise ConfigError(f"{model.name!r} has no nn.Sequential of blocks; pass side option taps=[module names]")
    prefix, seq = found
    names = [f"{prefix}.{c}" if prefix else c for c, _ in seq.named_children()]
    shapes = _probe_image(model, names)
    maps = [t for t in names if shapes[t] is not None]
    if len(maps) < 2:
        raise ConfigError(f"{model.name!r}: fewer than 2 feature-map blocks found; pass side option taps=")
    if n is not None and n < len(maps):  # evenly spaced, always including the deepest
        pick = np.unique(np.round(np.linspace(len(maps) - 1, 0, n)).astype(int))
        maps = [maps[i] for i in sorted(pick)]
    return maps, [shapes[t] for t in maps]


def _probe_image(model, names: list[str]) -> dict[str, int | None]:
    modules = dict(model.backbone.named_modules())
    missing = [t for t in names if t not in modules]
    if missing:
        raise ConfigError(f"unknown tap {missing[0]!r} for {model.name!r}")
    out: dict[str, int | None] = {}
    handles = [modules[t].register_forward_hook(
        lambda _m, _i, o, t=t: out.__setitem__(t, int(o.shape[1]) if torch.is_tensor(o) and o.dim() == 4 else None))
        for t in names]
    size = getattr(model.preprocess, "size", 32)
    was = model.backbone.training
    model.backbone.eval()
    try:
        with torch.no_grad():
            model.backbone(model.preprocess(np.zeros((1, size, size, 3), dtype=np.uint8)))
    finally:
        for h in handles:
            h.remove()
        model.backbone.train(was)
    return out


def side_spec(model, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able description of the side network ``method`` builds on ``model`` (kept in the Delta)."""
    if method not in SIDE_METHODS:
        raise ConfigError(f"unknown side-network method {method!r}; available: {', '.join(SIDE_METHODS)}")
    r = options.get("r", 96)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{method} option r must be a positive integer, got {r!r}")
    spec: dict[str, Any] = {"method": method, "r": r, "grid": int(options.get("grid", 4))}
    late_layers = int(options.get("late_layers", 0)) if method == "sherl" else 0
    late_tune = options.get("late_tune", "frozen") if method == "sherl" else "frozen"
    if late_tune not in ("frozen", "full"):
        raise ConfigError(f"sherl option late_tune must be 'frozen' or 'full', got {late_tune!r}")
    n_layers = options.get("n_layers") if method == "r2" else None
    hf = model.backbone.model if isinstance(model.backbone, MeanPooledEncoder) else None
    if hf is not None and getattr(hf, "config", None) is not None:
        L = int(hf.config.num_hidden_layers)
        d = int(hf.config.hidden_size)
        if not 0 <= late_layers < L:
            raise ConfigError(f"sherl option late_layers must be in 0..{L - 1}, got {late_layers}")
        layers = options.get("layers")
        if layers in (None, "all"):
            layers = list(range(L + 1 - late_layers))
            if n_layers is not None:
                layers = layers[-int(n_layers):]
        if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i <= L - late_layers for i in layers):
            raise ConfigError(f"{method} option layers must be 'all' or hidden-state indices in 0..{L - late_layers}")
        layers = sorted(set(layers))
        if method == "sherl" and layers[-1] != L - late_layers:  # g and the gated merge use h_{L-m}
            layers.append(L - late_layers)
        spec.update(layers=layers, taps=None, dims=[d] * len(layers), out_dim=d, late_layers=late_layers,
                    late_tune=late_tune)
    else:
        if model.modality == "text":
            raise ConfigError(f"{method} needs a Hugging Face text encoder or an image model; {model.name!r} is neither")
        if late_layers:
            raise ConfigError("sherl late_layers > 0 needs a Hugging Face text encoder; use late_layers=0 on this model")
        taps = options.get("taps")
        if taps:
            shapes = _probe_image(model, list(taps))
            bad = [t for t in taps if shapes[t] is None]
            if bad:
                raise ConfigError(f"tap {bad[0]!r} does not give a (B, C, H, W) feature map")
            dims = [shapes[t] for t in taps]
        else:
            taps, dims = _default_image_taps(model, n_layers if n_layers is not None else options.get("n_taps", 4))
        spec.update(layers=None, taps=list(taps), dims=dims, out_dim=dims[-1], late_layers=0, late_tune="frozen")
    if method == "r2":
        spec.update(heads=int(options.get("heads", 4)), dropout=float(options.get("dropout", 0.1)))
    return spec


def side_classifier(model, spec: dict[str, Any], n_classes: int, seed: int = 0) -> SideClassifier:
    """A SideClassifier over a frozen copy of ``model``'s backbone, built from ``spec``."""
    backbone = copy.deepcopy(model.backbone)
    late_layers = spec.get("late_layers", 0)
    L = None
    if spec["layers"] is not None:
        L = int(backbone.model.config.num_hidden_layers)
    taps = LayerTaps(backbone, layers=spec["layers"], taps=spec["taps"], grid=spec["grid"],
                     late_from=(L - late_layers) if late_layers else None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        side, out_dim = _make_side(spec, backbone, L)
    return SideClassifier(taps, side, out_dim, n_classes, seed, late=bool(late_layers))


def _make_side(spec: dict[str, Any], backbone: nn.Module, L: int | None) -> tuple[nn.Module, int]:
    method, r, late_layers = spec["method"], spec["r"], spec.get("late_layers", 0)
    if method == "unipt":
        side, out_dim = UniPT(spec["dims"], spec["out_dim"], r), spec["out_dim"]
    elif method == "sherl":
        late = None
        if late_layers and spec["late_tune"] == "full":
            late = copy.deepcopy(nn.ModuleList(list(_hf_layers(backbone.model))[L - late_layers:]))
            for p in late.parameters():
                p.requires_grad_(True)
        side, out_dim = SHERL(spec["dims"], spec["out_dim"], r, late), spec["out_dim"]
    else:
        side, out_dim = R2Aggregator(spec["dims"], r, spec["heads"], spec["dropout"]), r
    return side, out_dim


def rebuild(model, delta: Delta) -> SideClassifier:
    """The tuned model of a side-network Delta: frozen copy of ``model`` + side network + head, eval mode."""
    spec = delta.meta.get("side")
    if spec is None:
        raise ConfigError("this delta has no meta['side']; it was not made by a side-network method")
    head_w = delta.tensors.get(NEW + "head.weight")
    if head_w is None:
        raise ConfigError("side-network delta has no new.head.weight")
    clf = side_classifier(model, spec, int(head_w.shape[0]))
    return apply(clf, delta).eval()


# -------------------------------------------------------------------------------------- cached features
class _Cached(torch.utils.data.Dataset):
    """Per-sample layer features (each (n_real, d_i)) + label."""

    def __init__(self, feats: list[list[torch.Tensor]], y: np.ndarray):
        self.feats, self.y = feats, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.feats[i], int(self.y[i])


def _collate_cached(items):
    n = max(f[0].shape[0] for f, _ in items)
    k = len(items[0][0])
    feats = []
    for j in range(k):
        d = items[0][0][j].shape[1]
        buf = torch.zeros(len(items), n, d)
        for b, (f, _) in enumerate(items):
            buf[b, : f[j].shape[0]] = f[j]
        feats.append(buf)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for b, (f, _) in enumerate(items):
        mask[b, : f[0].shape[0]] = 1
    return {"inputs": {"side_feats": feats, "side_mask": mask},
            "labels": torch.tensor([y for _, y in items], dtype=torch.long)}


def cache_features(clf: SideClassifier, model, data, batch_size: int = 64) -> _Cached:
    """Run the frozen backbone once over ``data``; keep each sample's layer features (real tokens only)."""
    collate = make_collate(model.preprocess)
    clf.taps.eval()
    out: list[list[torch.Tensor]] = []
    for s in range(0, len(data.y), batch_size):
        items = [(data.X[i], int(data.y[i])) for i in range(s, min(s + batch_size, len(data.y)))]
        feats, mask = clf.taps(collate(items)["inputs"])
        for b in range(mask.shape[0]):
            keep = mask[b].bool()
            out.append([f[b][keep].clone() for f in feats])
    return _Cached(out, np.asarray(data.y))


# -------------------------------------------------------------------------------------- tune() runner
def run(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    from ..engine import CrossEntropy, evaluate, train

    spec = side_spec(model, method, options)
    clf = side_classifier(model, spec, n_classes, seed=init_seed)
    trainable = count_trainable(clf)
    if options.get("cache"):
        if spec.get("late_layers"):
            raise ConfigError("cache=True needs late_layers=0 (the late layers re-run on live activations)")
        sets = {k: cache_features(clf, model, d) for k, d in (("fit", fit), ("val", val), ("test", test)) if d is not None}
        result = train(clf, sets["fit"], CrossEntropy(), cfg, val_data=sets.get("val"), collate_fn=_collate_cached,
                       out_dir=out_dir, resume=resume)
        clf.eval()
        test_metrics = evaluate(clf, sets["test"], collate_fn=_collate_cached) if "test" in sets else {}
    else:
        result, test_metrics = fit_and_evaluate(clf, model, fit, val, test, cfg, out_dir, resume)
    tensors = {NEW + k: v.detach().clone() for k, v in clf.side_state().items()}
    delta = Delta(model.name, "head", tensors, {"side": spec, "requires": "transferkit.tune.side.rebuild"})
    head = sum(p.numel() for p in clf.head.parameters())
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, clf,
                  {"added_params": sum(t.numel() for t in tensors.values()), "head_params": head,
                   "side_params": trainable - head})


# -------------------------------------------------------------------------------------- registry
_INFO = {"family": "native", "modality": ["image", "text"], "train": {**PEFT_TRAIN, "lr": 2e-3}}
registry.register(
    STAGE, "unipt", fn=run, options=SideOptions, **_INFO,
    summary="UniPT side network: frozen backbone under no_grad; parallel interaction + confidence aggregation "
            "of all layers' features (+ new head).",
    paper="Diao et al. UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter and Memory, "
          "CVPR 2024 (arXiv:2308.14316)")
registry.register(
    STAGE, "sherl", fn=run, options=SherlOptions, **_INFO,
    summary="SHERL side network: anti-redundancy aggregation of early layers merged (tanh gate, 0 at start) into "
            "the last pre-trained layer(s); backprop only through the late layers.",
    paper="Diao et al. SHERL: Synthesizing High Accuracy and Efficient Memory for Resource-Limited Transfer "
          "Learning, ECCV 2024 (arXiv:2407.07523)")
registry.register(
    STAGE, "r2", fn=run, options=R2Options, **_INFO,
    summary="R²-Tuning's reversed recurrent block as a side network: one shared block over the last layers, "
            "deepest first (+ new head).",
    paper="Liu et al. R²-Tuning: Efficient Image-to-Video Transfer Learning for Video Temporal Grounding, "
          "ECCV 2024 (arXiv:2404.00801)")
