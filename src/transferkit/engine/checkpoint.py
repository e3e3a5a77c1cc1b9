"""Training checkpoints: ``out_dir/checkpoints/step-N/``.

A checkpoint folder holds

- ``<group>.safetensors`` — tensors by name: ``model`` (trainable parameters and all buffers of the
  model), ``objective`` (same for an objective that is an ``nn.Module``), ``best`` (the best weights
  seen so far, when validating);
- ``state.pt`` — optimizer, scheduler, grad-scaler state, step, history, early-stopping counters and
  the config, saved with ``torch.save`` and read back with ``torch.load(weights_only=True)`` (only
  tensors, numbers, strings, lists, tuples and dicts go in);
- ``COMPLETE`` — written last.

The folder is built under a temporary name and renamed into place, and a folder without ``COMPLETE``
is never read, so a run killed at any moment leaves either a whole checkpoint or none. Only the last
``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..io import atomic_path

__all__ = [
    "MARKER",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "module_state",
    "load_module_state",
]

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(root: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/step-<step>/`` atomically and prune to the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # leftovers of a run killed while writing
    for p in root.glob(".step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    final = root / f"step-{int(step)}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for group, named in tensors.items():
            named = {k: v.detach().contiguous().cpu() for k, v in named.items()}
            save_file(named, str(tmp / f"{group}.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / MARKER).write_text(json.dumps({"step": int(step)}) + "\n")
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint folder: ``(tensor groups, state)``. Raises ModelError when unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MARKER).is_file():
        raise ModelError(f"checkpoint {path} is incomplete (no {MARKER} marker)")
    try:
        tensors = {p.name[: -len(".safetensors")]: load_file(str(p), device="cpu")
                   for p in sorted(path.glob("*.safetensors"))}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many different types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first}") from None
    return tensors, state


def module_state(module: nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Parameters that require grad (or all, with ``trainable_only=False``) plus all buffers, by name."""
    out = {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
    out.update(dict(module.named_buffers()))
    return out


def load_module_state(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the same-named parameters/buffers of ``module`` in place."""
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    missing = sorted(set(tensors) - set(targets))
    if missing:
        raise ModelError(f"checkpoint has tensors the model lacks: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, value in tensors.items():
            t = targets[name]
            if t.shape != value.shape:
                raise ModelError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                 f"model has {tuple(t.shape)}")
            t.copy_(value.to(device=t.device, dtype=t.dtype))
