"""Robust weight signatures (RWS): robustness as a compact, composable weight patch.

Cai, Zhang, Wang, "Robust Weight Signatures: Gaining Robustness as Easy as Patching Weights?",
ICML 2023 (reference code: VITA-Group/Robust_Weight_Signatures, ``model_patching.py``, ``tools.py``).

Inputs: pre-trained weights θ_pre, a clean fine-tune θ_clean and, per corruption c, a fine-tune on
corrupted data θ_c (all from θ_pre). For every selected tensor n (per tensor, as the reference):

    τ_clean = θ_clean − θ_pre,   τ_c = θ_c − θ_pre
    RWS_c[n] = τ_c[n] − (⟨τ_c[n], τ_clean[n]⟩ / ‖τ_clean[n]‖²) · τ_clean[n]

i.e. the component of the corruption fine-tune orthogonal to the clean fine-tuning direction (τ_c
itself where τ_clean[n] = 0). Patched model: θ = θ_clean + Σ_c α_c · RWS_c (:func:`patch`); α sets
the robustness strength; signatures of several corruptions compose by addition.

Shallow layers only (``layers``): an int L keeps the tensors of the first L *weight layers* — the
modules owning a ≥ 2-D ``weight`` (conv, linear, embedding), in state-dict order — together with
every other parameter that precedes the (L+1)-th weight layer (their biases, the norm layers between
them). The reference's ``keep_num`` defaults to 7 conv layers for VGG-16 (also here: ``layers=7``).
``layers`` may also be a predicate ``name -> bool``, a list of names, or None (all). BatchNorm
running statistics and integer buffers are never part of a signature (the reference averages BN
tensors of the corruption models instead; here they are re-estimated, see below).

BatchNorm. After patching, :func:`reestimate_bn` recomputes the running statistics of every
BatchNorm layer on a few batches (of the target, e.g. corrupted, data): statistics reset, cumulative
averaging (``momentum=None``), the rest of the model in eval mode (no dropout), no gradients;
``blend=α`` mixes old and new statistics as the reference does for α < 1.

Storage (:meth:`Signature.save`): each tensor symmetric int8, per tensor, ``q = round(x/s)`` with
``s = max|x|/127`` (error ≤ s/2 per entry), in one safetensors file with the scales and metadata;
about 4× smaller than float32 (the reference's linear quantiser also supports other bit widths and a
log/tanh variant — not implemented). ``Signature`` objects add (``a + b``), scale (``α * s``) and
turn into a ``full`` :class:`~transferkit.delta.Delta` relative to the clean model (:meth:`to_delta`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..delta import Delta
from ..errors import ConfigError, ModelError

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_SCALE = "__scale__."


def _state(x: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.state_dict().items()}
    if isinstance(x, Mapping):
        return dict(x)
    raise ConfigError(f"expected a model or a state dict, got {type(x).__name__}")


def _is_signable(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and name.rsplit(".", 1)[-1] not in _BN_STATS


def shallow_names(state: Mapping[str, torch.Tensor] | nn.Module,
                  layers: int | Callable[[str], bool] | Sequence[str] | None = 7) -> list[str]:
    """Names of the tensors a signature covers (see the module docstring for ``layers``)."""
    state = _state(state)
    names = [n for n, t in state.items() if _is_signable(n, t)]
    if layers is None:
        return names
    if callable(layers):
        return [n for n in names if layers(n)]
    if isinstance(layers, (list, tuple, set, frozenset)):
        missing = [n for n in layers if n not in state]
        if missing:
            raise ConfigError(f"layers names a tensor the model lacks: {missing[0]!r}")
        return [n for n in names if n in set(layers)]
    if not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"layers must be an int >= 1, a predicate, a list of names or None; got {layers!r}")
    out, seen = [], []
    for n in names:
        module, leaf = n.rsplit(".", 1) if "." in n else ("", n)
        if leaf == "weight" and state[n].dim() >= 2 and module not in seen:
            if len(seen) == layers:
                break
            seen.append(module)
        out.append(n)
    return out


# ------------------------------------------------------------------------------------ quantisation
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: ``(q, scale)`` with ``x ≈ q·scale``, |error| ≤ scale/2."""
    x = x.detach().float()
    amax = x.abs().max() if x.numel() else torch.tensor(0.0)
    scale = (amax / 127.0) if amax > 0 else torch.tensor(1.0)
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.reshape(()).float()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


# ------------------------------------------------------------------------------------ signature
@dataclass
class Signature:
    """A robust weight signature: float32 tensors (shallow layers) plus metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: "Signature") -> "Signature":
        if not isinstance(other, Signature):
            return NotImplemented
        out = {k: v.clone() for k, v in self.tensors.items()}
        for k, v in other.tensors.items():
            if k in out and out[k].shape != v.shape:
                raise ConfigError(f"cannot add signatures: {k!r} has shapes {tuple(out[k].shape)} and {tuple(v.shape)}")
            out[k] = out[k] + v if k in out else v.clone()
        return Signature(out, {"composed_of": [self.meta.get("name", "?"), other.meta.get("name", "?")]})

    def __mul__(self, alpha: float) -> "Signature":
        return Signature({k: float(alpha) * v for k, v in self.tensors.items()}, dict(self.meta, scaled_by=float(alpha)))

    __rmul__ = __mul__

    def quantized(self) -> "Signature":
        """The signature after an int8 round trip (what :meth:`save` + :meth:`load` give back)."""
        return Signature({k: dequantize_int8(*quantize_int8(v)) for k, v in self.tensors.items()},
                         dict(self.meta, quantized="int8"))

    def nbytes(self, quantized: bool = True) -> int:
        return sum(v.numel() * (1 if quantized else 4) + (4 if quantized else 0) for v in self.tensors.values())

    def save(self, path: str | os.PathLike, quantize: bool = True) -> Path:
        """One safetensors file (int8 + per-tensor scales, or float32), written atomically."""
        from ..io import save_safetensors

        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.tensors.items():
            if quantize:
                q, s = quantize_int8(v)
                tensors[k], tensors[_SCALE + k] = q, s
            else:
                tensors[k] = v.detach().float()
        meta = {"transferkit": "robust_weight_signature", "quantized": "int8" if quantize else "none",
                "meta": json.dumps(self.meta, default=str)}
        return save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Signature":
        from safetensors import safe_open

        from ..io import load_weights

        tensors = load_weights(path)
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
        except Exception as exc:  # pragma: no cover - load_weights already read it
            raise ModelError(f"cannot read signature {path}: {exc}") from None
        if md.get("transferkit") != "robust_weight_signature":
            raise ModelError(f"{path} is not a robust weight signature file")
        out = {}
        for k, v in tensors.items():
            if k.startswith(_SCALE):
                continue
            out[k] = dequantize_int8(v, tensors[_SCALE + k]) if v.dtype == torch.int8 else v.float()
        return cls(out, json.loads(md.get("meta", "{}")))

    def to_delta(self, clean_name: str = "clean", alpha: float = 1.0) -> Delta:
        """α·RWS as a ``full`` Delta of the clean model (apply with :func:`transferkit.delta.apply`)."""
        return Delta(clean_name, "full", {k: float(alpha) * v for k, v in self.tensors.items()},
                     dict(self.meta, method="robust_weight_signature", alpha=float(alpha)))


def robust_signature(pre: nn.Module | Mapping[str, torch.Tensor], clean: nn.Module | Mapping[str, torch.Tensor],
                     corrupt: nn.Module | Mapping[str, torch.Tensor], *,
                     layers: int | Callable[[str], bool] | Sequence[str] | None = 7,
                     name: str | None = None) -> Signature:
    """RWS_c: (θ_c − θ_pre) minus its projection on (θ_clean − θ_pre), per tensor, shallow layers only."""
    sp, sc, sx = _state(pre), _state(clean), _state(corrupt)
    names = shallow_names(sp, layers)
    if not names:
        raise ConfigError("robust_signature: no tensor selected (check `layers`)")
    out: dict[str, torch.Tensor] = {}
    for n in names:
        for which, s in (("clean", sc), ("corrupt", sx)):
            if n not in s:
                raise ConfigError(f"robust_signature: the {which} model lacks tensor {n!r}")
            if s[n].shape != sp[n].shape:
                raise ConfigError(f"robust_signature: tensor {n!r} has shape {tuple(s[n].shape)} in the {which} "
                                  f"model, {tuple(sp[n].shape)} in the pre-trained one")
        base = sp[n].double()
        t_clean = (sc[n].double() - base).flatten()
        t_c = (sx[n].double() - base).flatten()
        norm2 = torch.dot(t_clean, t_clean)
        proj = t_c - (torch.dot(t_c, t_clean) / norm2) * t_clean if norm2 > 0 else t_c
        out[n] = proj.reshape(sp[n].shape).float()
    meta = {"name": name or "corruption", "layers": layers if isinstance(layers, (int, type(None))) else "custom",
            "n_tensors": len(out)}
    return Signature(out, meta)


def compose(signatures: Sequence[Signature], alphas: Sequence[float] | float = 1.0) -> Signature:
    """Σ_c α_c · RWS_c as one signature."""
    signatures = list(signatures)
    if not signatures:
        raise ConfigError("compose needs at least one signature")
    alphas = [float(alphas)] * len(signatures) if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if len(alphas) != len(signatures):
        raise ConfigError(f"compose: {len(alphas)} alphas for {len(signatures)} signatures")
    total = alphas[0] * signatures[0]
    for a, s in zip(alphas[1:], signatures[1:]):
        total = total + a * s
    total.meta = {"composed_of": [s.meta.get("name", "?") for s in signatures], "alphas": alphas}
    return total


@torch.no_grad()
def patch(clean: nn.Module | Mapping[str, torch.Tensor], signatures: Signature | Sequence[Signature],
          alphas: Sequence[float] | float = 1.0) -> nn.Module | dict[str, torch.Tensor]:
    """θ_clean + Σ_c α_c·RWS_c. A model is patched in place (and returned); a state dict is copied.

    The signature may live on another device than the model (e.g. a CPU signature patching a GPU model).
    """
    sigs = [signatures] if isinstance(signatures, Signature) else list(signatures)
    total = compose(sigs, alphas)
    if isinstance(clean, nn.Module):
        state = clean.state_dict()
        for k, v in total.tensors.items():
            if k not in state or state[k].shape != v.shape:
                raise ModelError(f"signature tensor {k!r} does not fit the model")
            state[k].add_(v.to(device=state[k].device, dtype=state[k].dtype))
        return clean
    state = _state(clean)
    out = dict(state)
    for k, v in total.tensors.items():
        if k not in state or state[k].shape != v.shape:
            raise ModelError(f"signature tensor {k!r} does not fit the state dict")
        out[k] = (state[k].float() + v.to(state[k].device)).to(state[k].dtype)
    return out


# ------------------------------------------------------------------------------------ BatchNorm
@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], *, blend: float = 1.0) -> nn.Module:
    """Recompute BatchNorm running statistics on ``batches`` (cumulative average over them).

    A batch is a tensor, ``(X, y)`` / ``[X, ...]`` (X is used), ``{"inputs": X, ...}``, or a dict of
    model keyword arguments. ``blend`` ∈ (0, 1]: final = (1 − blend)·old + blend·new. Modes and momenta
    are restored afterwards; other layers run in eval mode (no dropout) during the passes.
    """
    if not 0 < blend <= 1:
        raise ConfigError(f"reestimate_bn: blend must be in (0, 1], got {blend}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            x = batch
            if isinstance(x, (tuple, list)):
                x = x[0]
            if isinstance(x, Mapping) and "inputs" in x:
                x = x["inputs"]
            if isinstance(x, Mapping):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()})
            else:
                model(x.to(device))
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        for m, (mean, var) in zip(bns, old):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise ConfigError("reestimate_bn needs at least one batch")
    if blend < 1:
        for m, (mean, var) in zip(bns, old):
            m.running_mean.mul_(blend).add_(mean, alpha=1 - blend)
            m.running_var.mul_(blend).add_(var, alpha=1 - blend)
    return model


__all__ = ["Signature", "robust_signature", "compose", "patch", "reestimate_bn", "shallow_names",
           "quantize_int8", "dequantize_int8"]
