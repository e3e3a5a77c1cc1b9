"""Delta: what adaptation learned, relative to a named base model.

A Delta is a dict of tensors plus a ``kind`` and metadata:

- ``full``: task vector ``θ_tuned − θ_base`` for every changed base parameter;
- ``head``: no base parameter changed, only new tensors (a linear probe's head);
- further kinds (``lora``, ``sparse``, ``bias``, ``adapter``) arrive with the tune issue.

Tensors whose names are not in the base (a new classification head) are stored under
``new.<name>`` and are *set* by :func:`apply`, not added. :func:`apply` and :func:`to_dense` are
the only ways a Delta touches weights. On disk a Delta is ``delta.safetensors`` + ``delta.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .io import atomic_path, load_weights

NEW = "new."
KINDS = ("full", "head")


@dataclass
class Delta:
    base: str
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"unknown delta kind {self.kind!r}; known: {', '.join(KINDS)}")

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


def to_dense(delta: Delta) -> dict[str, torch.Tensor]:
    """The additive part of ``delta`` as full tensors (new tensors excluded)."""
    return {k: v for k, v in delta.tensors.items() if not k.startswith(NEW)}


@torch.no_grad()
def apply(model: nn.Module, delta: Delta, scale: float = 1.0) -> nn.Module:
    """Add ``scale`` × ``delta`` to ``model``'s parameters in place; set its new tensors."""
    state = model.state_dict()
    for name, value in delta.tensors.items():
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
