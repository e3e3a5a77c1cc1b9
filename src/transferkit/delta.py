"""Delta: what adaptation learned, relative to a named base model.

A Delta is a dict of tensors plus a ``kind`` and metadata:

- ``full``: task vector ``θ_tuned − θ_base`` for every changed base parameter;
- ``head``: no base parameter changed, only new tensors (a linear probe's head);
- ``lora``: low-rank factors ``<module>.lora_A`` (r×in) and ``<module>.lora_B`` (out×r) with a
  per-module ``scaling`` in ``meta["scaling"]`` (a float for all modules, or ``{module: float}``; when
  absent it is derived once from ``meta["lora_alpha"]``/``meta["r"]``: α/r, or α/√r with
  ``meta["use_rslora"]``). The dense update is ``ΔW = scaling · B @ A`` on ``<module>.weight``.
  Other tensors in a lora Delta (trained biases, ``new.`` heads) behave as in ``full``;
- ``sparse``: ``<name>.indices`` (flat int64 positions) + ``<name>.values``, with the dense shape in
  ``meta["shapes"][name]``; the dense update scatters (adds) the values into zeros of that shape;
- ``mask``: one boolean tensor per base parameter, of its shape (0/1 tensors of any dtype are turned
  into bool at construction). It is *multiplicative*: :func:`apply` sets ``θ ← θ ⊙ m`` (supermasks,
  pruning masks; ``scale`` must be 1). Its additive form depends on the base, so
  :func:`to_dense` needs it: ``to_dense(mask, base)`` is ``θ ⊙ m − θ = −θ ⊙ (1 − m)``, and
  ``base + to_dense(mask, base) == apply(base, mask)`` exactly. Without ``base``, :func:`to_dense` refuses
  a mask, and so does every merge method (they all read ``to_dense(delta)``): convert it first with
  :func:`as_additive` (a ``full`` Delta relative to the same base). ``new.`` tensors behave as in ``full``;
- methods that add modules the base lacks (adapters, prefixes, side networks, ScaLearn) use a
  ``head`` Delta: the new modules are ``new.*`` tensors and the meta says how to rebuild the model
  (e.g. ``meta["requires"]`` = ``transferkit.tune.adapters.rebuild`` or ``"peft"``); BitFit, IA3, DoRA and Conv2d LoRA are exact ``full`` deltas.

Tensors whose names are not in the base (a new classification head) are stored under
``new.<name>`` and are *set* by :func:`apply`, not added. :func:`apply` and :func:`to_dense` are
the only ways a Delta touches weights. On disk a Delta is ``delta.safetensors`` + ``delta.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelError
from .io import atomic_path, load_weights

NEW = "new."
KINDS = ("full", "head", "lora", "sparse", "mask")
LORA_A, LORA_B = ".lora_A", ".lora_B"
SPARSE_IDX, SPARSE_VAL = ".indices", ".values"


@dataclass
class Delta:
    base: str
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"unknown delta kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind == "mask":
            self.tensors = dict(self.tensors)
            for name, t in list(self.tensors.items()):
                if name.startswith(NEW) or t.dtype == torch.bool:
                    continue
                if not bool(((t == 0) | (t == 1)).all()):
                    raise ModelError(f"mask delta tensor {name!r} must be boolean or 0/1, got other values ({t.dtype})")
                self.tensors[name] = t != 0

    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def save(self, path: str | Path) -> Path:
        """Write ``delta.safetensors`` and ``delta.json`` into directory ``path``, atomically."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(tmp / "delta.safetensors"))
            (tmp / "delta.json").write_text(json.dumps({"base": self.base, "kind": self.kind, "meta": self.meta}, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        path = Path(path)
        try:
            info = json.loads((path / "delta.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read delta at {path}: {exc}") from None
        return cls(info["base"], info["kind"], load_weights(path / "delta.safetensors"), info.get("meta", {}))


def from_states(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], *, base_name: str,
                meta: dict | None = None) -> Delta:
    """The Delta that turns state dict ``base`` into ``tuned`` (unchanged tensors are left out)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in tuned.items():
        if name not in base:
            tensors[NEW + name] = value.detach().clone()
        elif value.is_floating_point():
            if value.shape != base[name].shape:
                raise ModelError(f"tensor {name} changed shape: {tuple(base[name].shape)} → {tuple(value.shape)}")
            diff = value.detach() - base[name].detach()
            if torch.any(diff != 0):
                tensors[name] = diff
    kind = "full" if any(not k.startswith(NEW) for k in tensors) else "head"
    return Delta(base_name, kind, tensors, dict(meta or {}))


def _lora_scaling(delta: Delta, module: str) -> float:
    scaling = delta.meta.get("scaling")
    if isinstance(scaling, dict):
        if module not in scaling:
            raise ModelError(f"lora delta has no scaling for module {module!r}")
        return float(scaling[module])
    if scaling is not None:
        return float(scaling)
    alpha, r = delta.meta.get("lora_alpha"), delta.meta.get("r")
    if alpha is None or r is None:
        raise ModelError("lora delta needs meta['scaling'] (or meta['lora_alpha'] and meta['r'])")
    if isinstance(r, dict):
        r = r[module]
    return float(alpha) / (float(r) ** 0.5 if delta.meta.get("use_rslora") else float(r))


def lora_factors(delta: Delta) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (A, B, scaling)}`` of a ``lora`` Delta, so that ``ΔW = scaling · B @ A``.

    Refuses variants whose update is not ``scaling · B @ A`` (DoRA magnitude vectors) instead of
    merging them silently wrong.
    """
    if delta.kind != "lora":
        raise ModelError(f"expected a lora delta, got kind {delta.kind!r}")
    if delta.meta.get("use_dora") or any("lora_magnitude_vector" in k for k in delta.tensors):
        raise ModelError("DoRA adapters are not supported: their update is not scaling·B@A")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, a in delta.tensors.items():
        if not name.endswith(LORA_A) or name.startswith(NEW):
            continue
        module = name[: -len(LORA_A)]
        b = delta.tensors.get(module + LORA_B)
        if b is None:
            raise ModelError(f"lora delta has {name} but no {module + LORA_B}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ModelError(f"lora factors of {module!r} must be A (r×in), B (out×r); got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        out[module] = (a, b, _lora_scaling(delta, module))
    for name in delta.tensors:
        if name.endswith(LORA_B) and not name.startswith(NEW) and name[: -len(LORA_B)] not in out:
            raise ModelError(f"lora delta has {name} but no matching {LORA_A}")
    return out


def _is_factor(delta: Delta, name: str) -> bool:
    if delta.kind == "lora":
        return name.endswith((LORA_A, LORA_B))
    if delta.kind == "sparse":
        return name.endswith((SPARSE_IDX, SPARSE_VAL))
    return False


def _base_state(base: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    return base.state_dict() if isinstance(base, nn.Module) else base


def _mask_target(state: Mapping[str, torch.Tensor], name: str, mask: torch.Tensor) -> torch.Tensor:
    if name not in state:
        raise ModelError(f"mask delta tensor {name!r} has no counterpart in the base")
    if state[name].shape != mask.shape:
        raise ModelError(f"mask delta tensor {name!r} has shape {tuple(mask.shape)}, base has {tuple(state[name].shape)}")
    return state[name]


def to_dense(delta: Delta, base: Mapping[str, torch.Tensor] | nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The additive part of ``delta`` as full tensors (new tensors excluded).

    ``lora`` factors become ``<module>.weight = scaling · B @ A`` (computed in at least float32);
    ``sparse`` index/value pairs become dense tensors of ``meta["shapes"][name]``; a ``mask`` becomes
    ``−θ ⊙ (1 − m)`` with ``θ`` from ``base`` (a state dict or module), which only a mask needs.
    """
    if delta.kind == "mask":
        if base is None:
            raise ModelError("a mask delta multiplies weights (θ ⊙ m): to_dense needs the base "
                             "(to_dense(delta, base)); merge methods take additive deltas, convert with as_additive(delta, base)")
        state = _base_state(base)
        dense = {}
        for name, m in delta.tensors.items():
            if not name.startswith(NEW):
                theta = _mask_target(state, name, m).detach()
                dense[name] = torch.where(m.to(theta.device), torch.zeros_like(theta), -theta)
        return dense
    dense = {k: v for k, v in delta.tensors.items() if not k.startswith(NEW) and not _is_factor(delta, k)}
    if delta.kind == "lora":
        for module, (a, b, scaling) in lora_factors(delta).items():
            dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
            key = module + ".weight"
            if key in dense:
                raise ModelError(f"lora delta has both factors and a dense tensor for {key}")
            dense[key] = scaling * (b.to(dtype) @ a.to(dtype))
    elif delta.kind == "sparse":
        shapes = delta.meta.get("shapes", {})
        for name, idx in delta.tensors.items():
            if not name.endswith(SPARSE_IDX) or name.startswith(NEW):
                continue
            target = name[: -len(SPARSE_IDX)]
            values = delta.tensors.get(target + SPARSE_VAL)
            if values is None or target not in shapes:
                raise ModelError(f"sparse delta tensor {target!r} needs {SPARSE_VAL} and meta['shapes'][{target!r}]")
            if idx.dtype not in (torch.int64, torch.int32) or idx.numel() != values.numel():
                raise ModelError(f"sparse delta tensor {target!r}: indices must be integers, one per value")
            flat = torch.zeros(int(torch.Size(shapes[target]).numel()), dtype=values.dtype, device=values.device)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= flat.numel()):
                raise ModelError(f"sparse delta tensor {target!r}: index out of range for shape {tuple(shapes[target])}")
            flat.index_add_(0, idx.reshape(-1).long(), values.reshape(-1))
            dense[target] = flat.view(*shapes[target])
        orphans = [k for k in delta.tensors if k.endswith(SPARSE_VAL) and not k.startswith(NEW)
                   and k[: -len(SPARSE_VAL)] + SPARSE_IDX not in delta.tensors]
        if orphans:
            raise ModelError(f"sparse delta tensor {orphans[0]} has no matching {SPARSE_IDX}")
    return dense


def as_additive(delta: Delta, base: Mapping[str, torch.Tensor] | nn.Module) -> Delta:
    """A ``mask`` Delta as the ``full`` Delta that has the same effect on ``base`` (new tensors kept).

    ``apply(base, as_additive(mask, base))`` equals ``apply(base, mask)``; the result is a task vector
    that merge methods accept. It holds only for this ``base``: the mask's effect depends on θ.
    """
    if delta.kind != "mask":
        raise ModelError(f"as_additive converts mask deltas; a {delta.kind!r} delta is additive already")
    tensors = to_dense(delta, base)
    tensors.update({k: v for k, v in delta.tensors.items() if k.startswith(NEW)})
    return Delta(delta.base, "full", tensors, {**delta.meta, "from_mask": True})


@torch.no_grad()
def apply(model: nn.Module, delta: Delta, scale: float = 1.0) -> nn.Module:
    """Add ``scale`` × ``delta`` to ``model``'s parameters in place; set its new tensors.

    A ``mask`` delta multiplies instead: ``θ ← θ ⊙ m`` (masked entries become exactly 0; ``scale``
    must be 1).
    """
    state = model.state_dict()
    if delta.kind == "mask":
        if scale != 1.0:
            raise ModelError(f"a mask delta multiplies weights (θ ⊙ m) and cannot be scaled; got scale={scale}")
        targets = [(_mask_target(state, k, m), m) for k, m in delta.tensors.items() if not k.startswith(NEW)]
        for theta, m in targets:  # all checked first: a bad tensor leaves the model untouched
            theta.masked_fill_(~m.to(theta.device), 0)
    items = [(k, v) for k, v in delta.tensors.items() if k.startswith(NEW)]
    if delta.kind in ("lora", "sparse"):
        items += list(to_dense(delta).items())
    elif delta.kind != "mask":
        items += [(k, v) for k, v in delta.tensors.items() if not k.startswith(NEW)]
    for name, value in items:
        target = name[len(NEW):] if name.startswith(NEW) else name
        if target not in state:
            raise ModelError(f"delta tensor {target!r} has no counterpart in the model")
        if state[target].shape != value.shape:
            raise ModelError(f"delta tensor {target!r} has shape {tuple(value.shape)}, model has {tuple(state[target].shape)}")
        if name.startswith(NEW):
            state[target].copy_(value)
        else:
            state[target].add_(value.to(state[target].dtype), alpha=scale)
    return model
