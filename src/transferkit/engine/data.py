"""The engine's data plumbing: arrays, datasets and named streams as map-style Datasets, batches, the
seeded per-epoch order and each process's shard of it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import DataError

class _ArrayData(Dataset):
    """In-memory arrays: ``inputs`` (tensor or dict of tensors), ``labels`` (optional)."""

    def __init__(self, inputs: Any, labels: Any, batched: bool):
        self.inputs = inputs
        self.labels = labels
        self.batched = batched
        first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
        self.n = len(first)
        lengths = [len(v) for v in inputs.values()] if isinstance(inputs, dict) else [self.n]
        if labels is not None:
            lengths.append(len(labels))
        if len(set(lengths)) != 1:
            raise DataError(f"inputs and labels have different lengths: {sorted(set(lengths))}")

    def __len__(self) -> int:
        return self.n

    def _take(self, idx: Any) -> dict[str, Any]:
        x = {k: v[idx] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else self.inputs[idx]
        out = {"inputs": x}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._take(i)

    def __getitems__(self, idx: list[int]) -> Any:
        if self.batched:  # one fancy-indexing op instead of stacking per-item tensors
            return self._take(torch.as_tensor(idx, dtype=torch.long))
        return [self._take(i) for i in idx]


def _as_tensor(a: Any, what: str, labels: bool = False) -> torch.Tensor:
    try:
        t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    except Exception as exc:
        raise DataError(f"{what} cannot be turned into a tensor: {type(exc).__name__}") from None
    if t.ndim == 0:
        raise DataError(f"{what} must have a sample dimension, got a scalar")
    if labels and not t.is_floating_point() and t.dtype != torch.bool:
        return t.long()
    if t.dtype == torch.float64:
        t = t.float()
    return t


def _is_array(a: Any) -> bool:
    return isinstance(a, (torch.Tensor, np.ndarray)) or (isinstance(a, list) and not isinstance(a, str))


def _as_dataset(data: Any, what: str, batched: bool) -> Dataset:
    """A map-style Dataset from a Dataset, ``(X, y)``, ``(X,)`` or ``{"inputs": X, "labels": y}``."""
    if isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")
            and not isinstance(data, (tuple, list, Mapping, str, torch.Tensor, np.ndarray))):
        ds = data  # torch Dataset, or any map-style sequence (a Hugging Face datasets.Dataset)
    elif isinstance(data, (tuple, list)) and 1 <= len(data) <= 2 and all(
            _is_array(a) or isinstance(a, Mapping) for a in data):
        x = data[0]
        x = {k: _as_tensor(v, f"{what} inputs[{k!r}]") for k, v in x.items()} if isinstance(x, Mapping) \
            else _as_tensor(x, f"{what} inputs")
        y = _as_tensor(data[1], f"{what} labels", labels=True) if len(data) == 2 else None
        ds = _ArrayData(x, y, batched)
    elif isinstance(data, Mapping) and "inputs" in data:
        extra = sorted(set(data) - {"inputs", "labels"})
        if extra:
            raise DataError(f"{what} has unexpected keys {extra} (expected 'inputs' and 'labels')")
        return _as_dataset((data["inputs"], data["labels"]) if "labels" in data else (data["inputs"],),
                           what, batched)
    else:
        raise DataError(f"{what} must be a torch Dataset, an (inputs, labels) pair or a mapping with "
                        f"'inputs', got {type(data).__name__}")
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{what} must have a length (iterable datasets are not supported)") from None
    if n == 0:
        raise DataError(f"{what} is empty")
    return ds


def _streams(data: Any, batched: bool) -> list[tuple[str | None, Dataset]]:
    """One unnamed stream, or named streams for ``{"source": ..., "target": ...}``."""
    if isinstance(data, Mapping) and "inputs" not in data:
        if not data:
            raise DataError("train data is empty")
        return [(str(k), _as_dataset(v, f"train data {k!r}", batched)) for k, v in data.items()]
    return [(None, _as_dataset(data, "train data", batched))]


def _to_batch(b: Any) -> Any:
    if isinstance(b, Mapping):
        return b
    if isinstance(b, (tuple, list)):
        if len(b) == 2:
            return {"inputs": b[0], "labels": b[1]}
        if len(b) == 1:
            return {"inputs": b[0]}
    if isinstance(b, torch.Tensor):
        return {"inputs": b}
    raise DataError(f"cannot interpret a batch of type {type(b).__name__}; return a dict from collate_fn")


def _identity(x: Any) -> Any:
    return x


def _collate_for(ds: Dataset, collate_fn: Callable | None) -> Callable:
    if collate_fn is not None:
        return collate_fn
    if isinstance(ds, _ArrayData) and ds.batched:
        return _identity
    return default_collate


def _mix(*ints: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints."""
    a, b = np.random.SeedSequence([int(i) for i in ints]).generate_state(2, dtype=np.uint32)
    return int(a) << 31 ^ int(b)


def _order(n: int, seed: int, stream: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, stream, epoch)))


def _rank_batches(order: torch.Tensor, rank: int, world: int, bs: int) -> list[list[int]]:
    """This rank's micro-batches: every ``world``-th index of ``order``, padded to equal shard sizes."""
    n = len(order)
    per_rank = -(-n // world)
    if per_rank * world != n:
        order = order.repeat(-(-per_rank * world // n))[: per_rank * world]
    local = order[rank::world].tolist()
    return [local[i: i + bs] for i in range(0, len(local), bs)]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _loader(ds: Dataset, batches: list[list[int]], collate: Callable, workers: int, seed: int) -> DataLoader:
    return DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))
