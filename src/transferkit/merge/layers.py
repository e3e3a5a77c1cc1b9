"""Per-layer values of a merge: a number, a gradient over the layers, or a list of name filters.

A value (a model's ``weight``, the merge's ``lam``/``lambda``) is one of

- a number: the same everywhere;
- a **gradient** ``[v0, …, vm]``: interpolated linearly over the layer index found in the tensor name
  (``…layer.N.…``, ``layers``, ``h``, ``blocks``, ``block``, ``features``); tensors outside the numbered
  layers take ``v0`` when their name contains ``embed`` and ``vm`` otherwise;
- a **filter list** ``[{filter: attention, value: 0.5}, {value: 1}]``: the first entry whose ``filter`` is a
  substring of the tensor name, else the entry without ``filter`` (values may themselves be gradients).

:func:`value_for` evaluates a value at one tensor; :func:`scaled` multiplies a Delta's task vector tensor by
tensor. How a merge uses them (pre-scale each task vector by w_t(n), merge with unit coefficients,
post-scale the result by λ(n)) is :func:`transferkit.merge.run.merge_deltas`'s business.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from ..errors import ConfigError

__all__ = ["is_scalar", "check_value", "layer_of", "value_for", "n_layers", "scaled", "number"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block|features)\.(\d+)(?:\.|$)")


def number(v: Any, what: str) -> float:
    """``v`` as a finite float; a one-line ConfigError otherwise."""
    if isinstance(v, bool):
        raise ConfigError(f"{what}: expected a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{what}: expected a finite number, got {v!r}")
    return x


def is_scalar(value: Any) -> bool:
    """A number or None (not a per-layer value)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_value(value: Any, what: str) -> None:
    """A scalar, a non-empty gradient list of numbers, or a filter list ending in a default."""
    if is_scalar(value):
        if value is not None:
            number(value, what)
        return
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what}: expected a number, a list of numbers (gradient) or a list of "
                          f"{{filter, value}} entries, got {value!r}")
    if all(is_scalar(v) and v is not None for v in value):
        for v in value:
            number(v, what)
        return
    for v in value:
        if not isinstance(v, dict) or "value" not in v or set(v) - {"filter", "value"}:
            raise ConfigError(f"{what}: filter entries are {{filter: NAME, value: X}} (the last may omit filter), "
                              f"got {v!r}")
        check_value(v["value"], what)


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``encoder.layer.3.…`` → 3), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def value_for(value: Any, name: str, n_layers: int, what: str = "value") -> float:
    """The value of a scalar / gradient / filter spec at tensor ``name`` (see the module docstring)."""
    if is_scalar(value):
        return float(value)
    if all(is_scalar(v) for v in value):
        pts = [float(v) for v in value]
        if len(pts) == 1:
            return pts[0]
        layer = layer_of(name)
        if layer is None:
            return pts[0] if "embed" in name else pts[-1]
        t = layer / max(n_layers - 1, 1)
        pos = t * (len(pts) - 1)
        lo = min(int(math.floor(pos)), len(pts) - 2)
        frac = pos - lo
        return pts[lo] * (1 - frac) + pts[lo + 1] * frac
    default = None
    for v in value:
        if "filter" not in v:
            default = v["value"]
        elif str(v["filter"]) in name:
            return value_for(v["value"], name, n_layers, what)
    if default is None:
        raise ConfigError(f"{what}: no filter matches tensor {name!r} and there is no default entry")
    return value_for(default, name, n_layers, what)


def n_layers(deltas) -> int:
    """Number of numbered layers over the tensors of ``deltas`` (1 when none is numbered)."""
    layers = [layer_of(k) for d in deltas for k in d.tensors]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else 1


def scaled(delta, fn: Callable[[str], float]):
    """A ``full`` Delta whose body tensor n is fn(n)·τ[n] (heads kept as they are)."""
    from ..delta import NEW, Delta, to_dense

    tensors = {k: (v * fn(k) if v.is_floating_point() else v) for k, v in to_dense(delta).items()}
    tensors.update({k: v for k, v in delta.tensors.items() if k.startswith(NEW)})
    return Delta(delta.base, "full", tensors, dict(delta.meta))
