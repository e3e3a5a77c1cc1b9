"""Shared plumbing of the merge methods: validation, body/head split, output Deltas.

Conventions every merge method follows:

- all inputs are :class:`~transferkit.delta.Delta` objects of the **same base** (else ``ConfigError``);
- only the **body** is merged: the additive tensors of ``to_dense(delta)`` (so ``lora`` and ``sparse``
  Deltas are densified first). A tensor a Delta lacks counts as an unchanged (zero) task vector there;
- per-task **heads** (tensors named ``new.<name>``, set rather than added by ``apply``) are *not*
  merged and not returned: the merged Delta carries only the body, ``meta["heads_dropped"]`` lists the
  head names seen, and :func:`attach_head` puts one task's head back onto the merged body for evaluation
  on that task. (Soups, which combine fine-tunes of one task, average heads instead; see ``average``.)
- integer/bool tensors are never averaged: they are left out of the result (so ``apply`` leaves the
  base's value) and listed in ``meta["skipped"]``;
- arithmetic runs in at least float32 and the result keeps that dtype (``apply`` casts to the model's).

Every merge method registers once, where it lives, in :mod:`transferkit.registry` (stage ``merge``) with a
typed options dataclass. The options of the task-vector methods are one shape grown by inheritance, as in
mergekit's "generalized task arithmetic": :class:`MergeOptions` (``exclude``) →
:class:`~transferkit.merge.task_arithmetic.TaskArithmeticOptions` (+ ``lam``) →
:class:`~transferkit.merge.task_arithmetic.SparseOptions` (+ ``density``, the fraction a sparsification
keeps) → TIES (+ the sign-consensus options of :class:`~transferkit.merge.ties.TiesConsensus`) and DARE
(+ ``p``, ``seed``); DARE-TIES is DARE plus the same consensus mixin. Each options class knows the keyword
arguments of its method's function (:meth:`MergeOptions.kwargs`). The registry entry's ``info`` says
how the generic runner (:func:`transferkit.merge.run.merge_deltas`) treats it: ``streamable`` (checkpoints
merge tensor by tensor), ``per_layer`` (per-layer weights/λ), ``weights`` (how per-model weights act:
``normalized``, ``coefficient`` (λ·w_t), ``prescale`` (w_t·τ_t before merging), ``kwarg`` (passed as
``weights=``) or None (no weights)), ``n_models``, ``needs_data`` (Fisher), ``delta_kind``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..delta import NEW, Delta, to_dense
from ..errors import ConfigError
from ..registry import option


@dataclass
class MergeOptions:
    """Options every task-vector merge takes; subclasses add theirs (see the module docstring).

    Cross-field checks go in :meth:`validate` (raise ``ValueError``: the registry turns it into a one-line
    ConfigError); :meth:`kwargs` gives the keyword arguments of the method's registered function.
    """

    exclude: list[str] | str = option([], help="tensor names, or prefixes ending in '.', left at the base")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(x, str) for x in self.exclude):
            raise ValueError(f"exclude must be a list of tensor names or prefixes, got {self.exclude!r}")

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        """Keyword arguments of the registered function (``checkpoint``: of :func:`stream_merge`)."""
        return {"exclude": tuple(self.exclude)}


def check_deltas(deltas: Sequence[Delta] | Iterable[Delta], what: str = "merge", min_n: int = 1) -> list[Delta]:
    """Validate the inputs of a merge: a non-empty list of Deltas that share one base name."""
    if isinstance(deltas, Delta):
        deltas = [deltas]
    deltas = list(deltas)
    if len(deltas) < min_n:
        raise ConfigError(f"{what} needs at least {min_n} delta(s), got {len(deltas)}")
    for d in deltas:
        if not isinstance(d, Delta):
            raise ConfigError(f"{what} takes Delta objects (task vectors), got {type(d).__name__}")
    bases = sorted({d.base for d in deltas})
    if len(bases) > 1:
        raise ConfigError(f"cannot {what} deltas of different bases: {', '.join(map(repr, bases))}")
    return deltas


def compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def body(delta: Delta) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(floating additive tensors, names of skipped non-floating tensors) of one Delta."""
    dense = to_dense(delta)
    keep = {k: v for k, v in dense.items() if v.is_floating_point()}
    return keep, sorted(k for k in dense if k not in keep)


def stack_bodies(deltas: Sequence[Delta], exclude: Iterable[str] = ()) -> tuple[list[str], list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Union of the body tensor names, each Delta's body in a common dtype, and bookkeeping meta.

    ``exclude`` holds tensor names or name prefixes (ending in ``.``) that are not merged at all.
    Raises ``ConfigError`` when two Deltas disagree on a tensor's shape.
    """
    exclude = tuple(exclude)
    bodies, skipped, excluded = [], set(), set()
    for d in deltas:
        b, s = body(d)
        skipped.update(s)
        for name in list(b):
            if _excluded(name, exclude):
                excluded.add(name)
                del b[name]
        bodies.append(b)
    names = sorted(set().union(*bodies))
    shapes: dict[str, torch.Size] = {}
    for b in bodies:
        for k, v in b.items():
            if shapes.setdefault(k, v.shape) != v.shape:
                raise ConfigError(f"deltas disagree on the shape of {k!r}: {tuple(shapes[k])} vs {tuple(v.shape)}")
    dtype = compute_dtype(v for b in bodies for v in b.values())
    device = next((v.device for b in bodies for v in b.values()), torch.device("cpu"))
    bodies = [{k: v.to(device=device, dtype=dtype) for k, v in b.items()} for b in bodies]
    meta = {
        "n_deltas": len(deltas),
        "skipped": sorted(skipped),
        "excluded": sorted(excluded),
        "heads_dropped": sorted({k for d in deltas for k in d.tensors if k.startswith(NEW)}),
    }
    return names, bodies, meta


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or (e.endswith(".") and name.startswith(e)) for e in exclude)


def get(body_: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """The body's tensor ``name``, or zeros (an unchanged tensor) when the Delta lacks it."""
    t = body_.get(name)
    return torch.zeros_like(like) if t is None else t


def first(bodies: Sequence[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    return next(b[name] for b in bodies if name in b)


def make_delta(base: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Delta:
    return Delta(base, "full", tensors, meta)


def heads(delta: Delta) -> dict[str, torch.Tensor]:
    """The per-task tensors (``new.<name>``) of a Delta."""
    return {k: v for k, v in delta.tensors.items() if k.startswith(NEW)}


def attach_head(merged: Delta, task_delta: Delta) -> Delta:
    """``merged``'s body plus ``task_delta``'s head(s): the model to evaluate on that task."""
    check_deltas([merged, task_delta], "attach a head to")
    tensors = {k: v for k, v in merged.tensors.items() if not k.startswith(NEW)}
    tensors.update(heads(task_delta))
    meta = dict(merged.meta, head_from=task_delta.meta.get("name", "task delta"))
    kind = "head" if merged.kind == "head" or (merged.kind == "full" and not merged.tensors) else merged.kind
    return Delta(merged.base, kind, tensors, meta)


def as_weights(weights: Sequence[float] | float | None, n: int, what: str, default: float) -> list[float]:
    if weights is None:
        return [default] * n
    if isinstance(weights, (int, float)):
        return [float(weights)] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"{what}: got {len(weights)} weights for {n} deltas")
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise ConfigError(f"{what}: weights must be finite")
    return weights
