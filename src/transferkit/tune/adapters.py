"""Adapters of the unified view of parameter-efficient transfer learning (He et al., ICLR 2022).

Every method adds a modification ``Δh`` to the output ``h`` of a frozen sublayer (attention or FFN)
whose input is ``x``:

================================  ============================  ==========  ============================
method                            Δh                            input       composition
================================  ============================  ==========  ============================
sequential adapter (Houlsby,      ReLU(h W_down) W_up           h           h ← h + s·Δh
Pfeiffer) ``method="adapter"``
parallel adapter                  ReLU(x W_down) W_up           x           h ← h + s·Δh  (s = 1)
``method="parallel-adapter"``
scaled parallel adapter           ReLU(x W_down) W_up           x           h ← h + s·Δh  (s = 4, or
``"scaled-parallel-adapter"``                                               learnable)
prefix tuning (attention)         softmax(x W_q P_kᵀ) P_v       x           h ← (1 − λ(x)) h + λ(x) Δh
MAM ``method="mam"``              prefix (l = 30) on attention + scaled parallel adapter (s = 4) on FFN
================================  ============================  ==========  ============================

Placement in a BERT-style layer (BERT, RoBERTa, MiniLM, MPNet): ``h`` is the sublayer output after
its dense projection and dropout, *before* the residual add and LayerNorm (``LN(h + Δh + x)``);
``x`` is the sublayer input (the layer input for attention, the attention output for the FFN).

How it is wired
---------------
:func:`add_adapters` inserts into a Hugging Face encoder, in place, with forward hooks whose
functions are bound methods of the adapter modules (so a ``copy.deepcopy`` of the model keeps
working adapters):

- adapters are child modules ``<layer>.attention.output.adapter`` / ``<layer>.output.adapter``
  (BERT) — trainable parameters with ordinary state-dict names;
- a forward pre-hook on the sublayer stores ``x`` (parallel only); a forward hook on the sublayer's
  output dropout adds ``s·Δh``;
- prefix tuning: ``<encoder>.prefix_encoder`` produces per-layer keys/values, handed to the
  encoder as a pre-filled key/value cache by a forward pre-hook on the encoder, which also grows
  the attention mask by ``l`` ones and pins the real tokens' positions to ``0..T-1``. Attention
  then runs over ``[P_k; K]`` and ``[P_v; V]`` — the concatenated form, which :func:`prefix_attention`
  and :func:`gated_prefix_attention` show equal to the paper's gated form. Outputs keep the input
  length, so mean pooling sees real tokens only.

Initialisation ``init="zero"`` (the reference code's ``ffn_adapter_init_option="lora"``): Kaiming-
uniform down-projection, zero up-projection and biases, so an inserted adapter leaves the model's
outputs bitwise unchanged until it is trained. ``init="normal"``: both projections N(0, 0.01²)
(Houlsby's near-identity init).

Delta
-----
Adapters are not mergeable into the base weights; the Delta is kind ``head``: every adapter tensor
and the head as new tensors (``new.backbone.model.<...>.adapter.down.weight``, …) with the adapter
layout in ``meta["adapters"]``. :func:`rebuild` turns (ZooModel, Delta) back into the tuned model.

>>> res = tune(model, train, test, method="mam", config={"prefix_length": 30, "bottleneck": 512})  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..delta import NEW, Delta, apply
from ..errors import ConfigError
from ..registry import option
from ..zoo.base import Classifier
from ._common import Fitted, count_trainable, fit_and_evaluate, require_text_hf
from .registry import PEFT_TRAIN, STAGE

__all__ = ["BottleneckAdapter", "PrefixEncoder", "add_adapters", "adapter_spec", "rebuild", "prefix_attention",
           "gated_prefix_attention", "run", "Bottleneck", "AdapterCore", "Placed", "Scaled", "AdapterOptions",
           "ParallelAdapterOptions", "ScaledParallelAdapterOptions", "MamOptions"]

POSITIONS = ("attn", "ffn", "both")


# ------------------------------------------------------------------------------------- options
# one shape grown by inheritance: Bottleneck → AdapterCore (+ init) → AdapterOptions (+ position)
# → ParallelAdapterOptions (+ scale) → ScaledParallelAdapterOptions (s = 4); MAM = AdapterCore + scale
# + prefix. The mixins Placed and Scaled are listed first so that their fields come last.
@dataclass
class Bottleneck:
    """Width and dropout of a bottleneck adapter (every adapter method, ``shared-adapter`` too)."""

    bottleneck: int = option(64, low=1, help="r, the down-projection width")
    dropout: float = option(0.0, low=0.0, high=1.0, high_open=True, help="dropout inside the adapter")


@dataclass
class AdapterCore(Bottleneck):
    init: str = option("zero", choices=("zero", "normal"), help="zero: starts as the identity; normal: N(0, 0.01²)")


@dataclass
class Placed:
    position: str = option("ffn", choices=POSITIONS, help="the sublayer(s) adapted")


@dataclass
class Scaled:
    scale: float = option(1.0, help="s, the scale of the adapter's output")
    learnable_scale: bool = option(False, help="s is a trainable scalar initialised to scale")


@dataclass
class AdapterOptions(Placed, AdapterCore):
    pass


@dataclass
class ParallelAdapterOptions(Scaled, AdapterOptions):
    pass


@dataclass
class ScaledParallelAdapterOptions(ParallelAdapterOptions):
    scale: float = option(4.0, help="s, the scale of the adapter's output")


@dataclass
class MamOptions(Scaled, AdapterCore):
    bottleneck: int = option(512, low=1, help="r, the down-projection width of the FFN adapter")
    scale: float = option(4.0, help="s, the scale of the FFN adapter's output")
    prefix_length: int = option(30, low=1, help="l, prefix keys/values per attention layer")
    prefix_hidden: int | None = option(512, low=1, help="width of the MLP reparameterising the prefix "
                                       "(null: the prefix itself is the parameter)")


# ------------------------------------------------------------------------------------- the maths
def _attn_logits(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    logits = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return logits


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                     mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention over prefix-extended keys and values: ``softmax(q [P_k; K]ᵀ·s) [P_v; V]``.

    Shapes: ``q`` (..., T, d), ``k``/``v`` (..., S, d), ``pk``/``pv`` (..., l, d) (broadcast over the
    leading dims), ``mask`` (..., T, S) or broadcastable, True where a real key may be attended.
    ``scale`` defaults to 1/√d.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pk, pv = pk.expand(*k.shape[:-2], *pk.shape[-2:]), pv.expand(*v.shape[:-2], *pv.shape[-2:])
    full_mask = None
    if mask is not None:
        mask = mask.bool().expand(*q.shape[:-1], k.shape[-2])
        full_mask = torch.cat([torch.ones(*mask.shape[:-1], pk.shape[-2], dtype=torch.bool, device=mask.device), mask], -1)
    logits = _attn_logits(q, torch.cat([pk, k], -2), scale, full_mask)
    return torch.softmax(logits, -1) @ torch.cat([pv, v], -2)


def gated_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                           mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The unified view's form of prefix tuning (He et al., Eq. 7):

    ``(1 − λ(x))·Attn(q, K, V) + λ(x)·softmax(q P_kᵀ) P_v`` with
    ``λ(x) = Σ_i exp(q P_kᵀ)_i / (Σ_i exp(q P_kᵀ)_i + Σ_j exp(q Kᵀ)_j)`` (logits scaled by ``scale``).
    Equal to :func:`prefix_attention` up to float rounding.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    real = _attn_logits(q, k, scale, mask)
    pref = (q @ pk.transpose(-1, -2)) * scale
    lse_real, lse_pref = torch.logsumexp(real, -1, keepdim=True), torch.logsumexp(pref, -1, keepdim=True)
    lam = torch.sigmoid(lse_pref - lse_real)  # = e^{lse_pref} / (e^{lse_pref} + e^{lse_real})
    attn = torch.softmax(real, -1) @ v
    delta = torch.softmax(pref, -1) @ pv
    return (1 - lam) * attn + lam * delta


# ------------------------------------------------------------------------------------- modules
class BottleneckAdapter(nn.Module):
    """``s · W_up(dropout(ReLU(W_down z)))`` inserted at one sublayer of a transformer layer.

    Parameters
    ----------
    dim : hidden size d.
    bottleneck : r, the down-projection width.
    mode : ``"sequential"`` (z = the sublayer output h) or ``"parallel"`` (z = the sublayer input x).
    scale : s; with ``learnable_scale`` a trainable scalar initialised to ``scale``.
    dropout : dropout inside the adapter.
    init : ``"zero"`` (up-projection and biases 0: the adapter starts as the identity) or ``"normal"``.
    """

    def __init__(self, dim: int, bottleneck: int, mode: str = "parallel", scale: float = 1.0,
                 learnable_scale: bool = False, dropout: float = 0.0, init: str = "zero"):
        super().__init__()
        if mode not in ("sequential", "parallel"):
            raise ConfigError(f"adapter mode must be 'sequential' or 'parallel', got {mode!r}")
        if init not in ("zero", "normal"):
            raise ConfigError(f"adapter init must be 'zero' or 'normal', got {init!r}")
        if int(bottleneck) < 1:
            raise ConfigError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.mode = mode
        self.down = nn.Linear(dim, int(bottleneck))
        self.up = nn.Linear(int(bottleneck), dim)
        self.drop = nn.Dropout(float(dropout))
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.scale = float(scale)
        with torch.no_grad():
            if init == "zero":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.up.weight)
            else:
                nn.init.normal_(self.down.weight, std=0.01)
                nn.init.normal_(self.up.weight, std=0.01)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        self._x: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"mode={self.mode}, scale={'learnable' if isinstance(self.scale, nn.Parameter) else self.scale}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(F.relu(self.down(z)))) * self.scale

    # hooks (bound methods: they follow the module through deepcopy)
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._x = args[0] if args else kwargs["hidden_states"]

    def _inject(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.mode == "sequential":
            return output + self(output)
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("parallel adapter: the sublayer input was not captured")
        return output + self(x)


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys and values ``P_k, P_v`` (l × d per layer), optionally reparameterised.

    With ``hidden`` (Li & Liang's reparameterisation, the unified view's ``attn_mode="prefix"``)
    ``[P_k; P_v]`` of all layers = ``MLP(E)``, ``E`` an l × d embedding and ``MLP`` = Linear(d,
    hidden) → tanh → Linear(hidden, 2·L·d); without, the l × 2·L·d prefix is a parameter itself.
    """

    def __init__(self, n_layers: int, n_heads: int, dim: int, length: int, hidden: int | None = None):
        super().__init__()
        if int(length) < 1:
            raise ConfigError(f"prefix length must be >= 1, got {length}")
        self.n_layers, self.n_heads, self.dim, self.length = int(n_layers), int(n_heads), int(dim), int(length)
        out = 2 * self.n_layers * self.dim
        if hidden:
            self.embedding = nn.Parameter(torch.randn(self.length, self.dim))
            self.mlp = nn.Sequential(nn.Linear(self.dim, int(hidden)), nn.Tanh(), nn.Linear(int(hidden), out))
        else:
            self.prefix = nn.Parameter(torch.randn(self.length, out) * 0.02)
            self.mlp = None
        self._cache_kw = "cache"

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(P_k, P_v)]`` per layer, each (batch, heads, l, d/heads)."""
        flat = self.mlp(self.embedding) if self.mlp is not None else self.prefix
        hd = self.dim // self.n_heads
        kv = flat.view(self.length, self.n_layers, 2, self.n_heads, hd).permute(1, 2, 3, 0, 4)
        return [(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(self.n_layers)]

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers import DynamicCache

        if args:  # positional input_ids
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        ref = kwargs.get("input_ids")
        ref = kwargs.get("inputs_embeds") if ref is None else ref
        B, T = ref.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.long, device=ref.device)
        kwargs["attention_mask"] = torch.cat([torch.ones(B, self.length, dtype=mask.dtype, device=mask.device), mask], 1)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(T, device=ref.device).unsqueeze(0).expand(B, -1)
        cache = DynamicCache()
        for i, (k, v) in enumerate(self.key_values(B)):
            cache.update(k.to(ref.device), v.to(ref.device), i)
        kwargs[self._cache_kw] = cache
        return args, kwargs


# ------------------------------------------------------------------------------------- insertion
def _layer_sites(layer: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]] | None:
    """``{"attn": (x-module, h-owner), "ffn": (...)}`` of a BERT/MPNet-style layer, or None.

    ``x-module``'s first input is the sublayer input x; ``h-owner.dropout``'s output is h.
    """
    att, inter, out = (getattr(layer, n, None) for n in ("attention", "intermediate", "output"))
    if not all(isinstance(m, nn.Module) for m in (att, inter, out)):
        return None
    if not isinstance(getattr(out, "dropout", None), nn.Dropout):
        return None
    if isinstance(getattr(getattr(att, "output", None), "dropout", None), nn.Dropout):
        owner = att.output  # BERT / RoBERTa: BertSelfOutput
    elif isinstance(getattr(att, "dropout", None), nn.Dropout):
        owner = att  # MPNet: dropout applied in MPNetAttention
    else:
        return None
    return {"attn": (att, owner), "ffn": (inter, out)}


def encoder_layers(hf: nn.Module) -> list[tuple[str, dict]]:
    """The transformer layers of ``hf`` that adapters can be inserted into, with their sites."""
    layers = [(n, s) for n, m in hf.named_modules() if (s := _layer_sites(m)) is not None]
    if not layers:
        raise ConfigError(f"no BERT-style transformer layer (attention/intermediate/output) found in "
                          f"{type(hf).__name__}; adapters support BERT, RoBERTa, MiniLM and MPNet encoders")
    return layers


def add_adapters(hf: nn.Module, *, attn: str | None = None, ffn: str | None = None, bottleneck: int = 64,
                 scale: float = 1.0, learnable_scale: bool = False, dropout: float = 0.0, init: str = "zero",
                 prefix_length: int = 0, prefix_hidden: int | None = None) -> list[str]:
    """Insert unified-view modules into the Hugging Face encoder ``hf`` in place.

    Parameters
    ----------
    attn, ffn : None, ``"sequential"`` or ``"parallel"``: the adapter at the attention / FFN sublayer.
    bottleneck, scale, learnable_scale, dropout, init : see :class:`BottleneckAdapter`.
    prefix_length : l > 0 adds prefix tuning to every attention layer (:class:`PrefixEncoder`,
        reparameterised by an MLP of width ``prefix_hidden`` when given).

    Returns
    -------
    The names (in ``hf``) of the new parameters. Everything else of ``hf`` is left as it was
    (freeze it yourself, or use :func:`transferkit.tune.tune`).
    """
    dim = int(hf.config.hidden_size)
    before = {n for n, _ in hf.named_parameters()}
    layers = encoder_layers(hf)
    for where, mode in (("attn", attn), ("ffn", ffn)):
        if mode is None:
            continue
        for _, sites in layers:
            x_module, owner = sites[where]
            if hasattr(owner, "adapter"):
                raise ConfigError(f"{type(owner).__name__} already has an adapter")
            ad = BottleneckAdapter(dim, bottleneck, mode, scale, learnable_scale, dropout, init)
            owner.add_module("adapter", ad)
            if mode == "parallel":
                x_module.register_forward_pre_hook(ad._capture, with_kwargs=True)
            owner.dropout.register_forward_hook(ad._inject)
    if prefix_length:
        params = inspect.signature(hf.forward).parameters
        kw = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
        if kw is None:
            raise ConfigError(f"prefix tuning needs an encoder that accepts a key/value cache; "
                              f"{type(hf).__name__} does not")
        if hasattr(hf, "prefix_encoder"):
            raise ConfigError("the encoder already has a prefix")
        pe = PrefixEncoder(len(layers), int(hf.config.num_attention_heads), dim, prefix_length, prefix_hidden)
        pe._cache_kw = kw
        hf.add_module("prefix_encoder", pe)
        hf.register_forward_pre_hook(pe._inject, with_kwargs=True)
    return [n for n, _ in hf.named_parameters() if n not in before]


def adapter_spec(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The :func:`add_adapters` arguments of a registry method and its options."""
    common = {k: options[k] for k in ("bottleneck", "dropout", "init") if k in options}
    if method == "mam":
        return {"attn": None, "ffn": "parallel", "scale": float(options["scale"]),
                "learnable_scale": bool(options.get("learnable_scale", False)),
                "prefix_length": int(options["prefix_length"]), "prefix_hidden": options.get("prefix_hidden"),
                **common}
    position = options.get("position", "ffn")
    if position not in POSITIONS:
        raise ConfigError(f"{method} option position must be one of {', '.join(POSITIONS)}, got {position!r}")
    mode = "sequential" if method == "adapter" else "parallel"
    return {"attn": mode if position in ("attn", "both") else None,
            "ffn": mode if position in ("ffn", "both") else None,
            "scale": float(options.get("scale", 1.0)), "learnable_scale": bool(options.get("learnable_scale", False)),
            **common}


def adapted_classifier(model, n_classes: int, spec: dict[str, Any], seed: int = 0) -> tuple[Classifier, list[str]]:
    """A copy of ``model`` as a Classifier with adapters ``spec`` inserted; only they and the head train."""
    require_text_hf(model, "adapter")
    clf = Classifier(copy.deepcopy(model.backbone), model.feature_dim, n_classes, seed)
    for p in clf.backbone.parameters():
        p.requires_grad_(False)
    new = add_adapters(clf.backbone.model, **spec)
    names = ["backbone.model." + n for n in new]
    return clf, names


def rebuild(model, delta: Delta) -> Classifier:
    """The tuned model of an adapter-method Delta: a copy of ``model`` + adapters + head, eval mode."""
    spec = delta.meta.get("adapters")
    if spec is None:
        raise ConfigError("this delta has no meta['adapters']; it was not made by an adapter method")
    head_w = delta.tensors.get(NEW + "head.weight")
    if head_w is None:
        raise ConfigError("adapter delta has no new.head.weight")
    clf, _ = adapted_classifier(model, int(head_w.shape[0]), spec)
    return apply(clf, delta).eval()


def run(model, fit, val, test, *, n_classes, method, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    spec = adapter_spec(method, options)
    clf, names = adapted_classifier(model, n_classes, spec, seed=init_seed)
    trainable = count_trainable(clf)
    result, test_metrics = fit_and_evaluate(clf, model, fit, val, test, cfg, out_dir, resume)
    state = clf.state_dict()
    tensors = {NEW + n: state[n].detach().clone() for n in names}
    tensors.update({NEW + "head." + k: v.detach().clone() for k, v in clf.head.state_dict().items()})
    delta = Delta(model.name, "head", tensors, {"adapters": spec, "requires": "transferkit.tune.adapters.rebuild"})
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, clf,
                  {"added_params": trainable, "head_params": sum(p.numel() for p in clf.head.parameters())})


# ------------------------------------------------------------------------------------- registry
_UNIFIED = "He et al. Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022 (arXiv:2110.04366)"
_INFO = {"family": "native", "modality": ["text"]}
registry.register(
    STAGE, "adapter", fn=run, options=AdapterOptions, train={**PEFT_TRAIN, "lr": 1e-3}, **_INFO,
    summary="Sequential bottleneck adapter h ← h + f(h W_down) W_up after the FFN (Pfeiffer) or both sublayers "
            "(Houlsby, position='both').",
    paper="Houlsby et al. Parameter-Efficient Transfer Learning for NLP, ICML 2019 (arXiv:1902.00751); "
          "Pfeiffer et al. AdapterFusion, EACL 2021 (arXiv:2005.00247)")
registry.register(
    STAGE, "parallel-adapter", fn=run, options=ParallelAdapterOptions, train={**PEFT_TRAIN, "lr": 1e-3}, **_INFO,
    summary="Parallel adapter h ← h + s·f(x W_down) W_up next to the FFN (or attention) sublayer.", paper=_UNIFIED)
registry.register(
    STAGE, "scaled-parallel-adapter", fn=run, options=ScaledParallelAdapterOptions, train={**PEFT_TRAIN, "lr": 1e-3},
    **_INFO, summary="Scaled parallel adapter (s = 4) on the FFN, the unified view's best single modification.",
    paper=_UNIFIED)
registry.register(
    STAGE, "mam", fn=run, options=MamOptions, **_INFO,
    # lr 1e-4: at 5e-4 the 512-wide, s = 4 FFN adapter keeps MiniLM at chance (measured on vader:movies,
    # 200/class, 4 epochs: 5e-4 → 0.50, 1e-4 → 0.74, 5e-5 → 0.72)
    train={**PEFT_TRAIN, "lr": 1e-4},
    summary="MAM adapter: prefix tuning on attention (l = 30) + scaled parallel adapter (s = 4) on the FFN.",
    paper=_UNIFIED)
