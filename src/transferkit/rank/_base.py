"""Metric registry and input validation shared by every transferability metric.

Every metric is a plain function ``f(X, y, *, probs=None, seed=0, **opts) -> float`` registered with
:func:`register`. The registered (public) function validates its inputs once and converts them to the
canonical form (float64 features, labels remapped to ``0..C-1``, float64 row-normalised
probabilities) before calling the implementation; :func:`transferkit.rank.score` validates once and
calls the implementation directly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .. import registry
from ..errors import DataError

__all__ = ["Metric", "METRICS", "register", "register_set_level", "validate", "one_hot", "class_means"]


@dataclass(frozen=True)
class Metric:
    """A registered transferability metric.

    Attributes
    ----------
    name : registry key (``"logme"``, ``"leep"``, ...).
    fn : the validated public function ``fn(X, y, *, probs=None, seed=0, **opts) -> float``.
    impl : the implementation, called with already-validated inputs.
    citation : the paper the metric comes from.
    needs : inputs the metric consumes: ``"features"`` and/or ``"probs"`` (source-head probabilities).
    higher_is_better : always True for the metrics shipped here (scores are oriented so).
    stochastic : whether the value depends on ``seed``.
    """

    name: str
    fn: Callable[..., float]
    impl: Callable[..., float]
    citation: str
    needs: frozenset = field(default_factory=lambda: frozenset({"features"}))
    higher_is_better: bool = True
    stochastic: bool = False

    def __call__(self, X, y, **kw) -> float:
        return self.fn(X, y, **kw)


METRICS: dict[str, Metric] = {}


def options_from_signature(impl: Callable, name: str, exclude: tuple[str, ...] = ()) -> type | None:
    """A typed options dataclass from ``impl``'s keyword options (everything after ``seed``).

    Each option keeps its annotation (or the type of its default when unannotated) and its default, so
    a metric's options are written once, in its signature, and validated like every other method's.
    """
    fields = []
    for p in inspect.signature(impl, eval_str=True).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name in ("probs", "seed", *exclude):
            continue
        if p.annotation is not p.empty:
            tp = p.annotation
        elif p.default is None:
            tp = Any
        else:
            tp = type(p.default)
        fields.append((p.name, tp, dataclasses.field(default=p.default)))
    if not fields:
        return None
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}Options", fields,
                                      namespace={"__module__": impl.__module__})


def register(name: str, *, citation: str, needs=("features",), stochastic: bool = False, regression_ok: bool = False):
    """Decorator: register ``impl`` in the method registry (stage ``rank``) under ``name``; return its
    validating public wrapper. The options are read from ``impl``'s signature (:func:`options_from_signature`).
    """

    needs = frozenset(needs)

    def deco(impl):
        @functools.wraps(impl)
        def public(X, y, *, probs=None, seed: int = 0, **opts) -> float:
            Xv, yv, pv = validate(X, y, probs, needs=needs, name=name, regression=regression_ok and opts.get("regression", False))
            return float(impl(Xv, yv, probs=pv, seed=seed, **opts))

        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = Metric(name, public, impl, citation, needs, True, stochastic)
        public.metric = METRICS[name]
        summary = (inspect.getdoc(impl) or name).splitlines()[0]
        registry.register("rank", name, paper=citation, summary=summary, fn=public,
                          options=options_from_signature(impl, name), kind="per-model", needs=sorted(needs),
                          stochastic=stochastic)
        return public

    return deco


def register_set_level(name: str, fn: Callable, *, citation: str) -> None:
    """Register a set-level ranker ``fn(features_by_model, *, seed, **opts) -> {model: score}``: its scores
    depend on the whole candidate set, so it is not a per-model :class:`Metric`."""
    registry.register("rank", name, paper=citation, summary=(inspect.getdoc(fn) or name).splitlines()[0], fn=fn,
                      options=options_from_signature(fn, name, exclude=("details",)), kind="set-level")


def validate(X, y, probs=None, *, needs=frozenset({"features"}), name: str = "metric", regression: bool = False):
    """Check and canonicalise metric inputs; raise :class:`DataError` one-liners on bad input.

    Returns ``(X float64 (N, D) or None, y, probs float64 (N, Cs) or None)``. For classification ``y`` is
    remapped to ``0..C-1`` (int64, order of ``np.unique``); for regression it is float64 (N, K).
    """
    y = _to_numpy(y)
    if y is None or y.ndim == 0:
        raise DataError(f"{name}: labels must be a 1-D array")
    n = len(y)
    if "features" in needs or X is not None:
        if X is None:
            raise DataError(f"{name}: needs features, got None")
        X = np.asarray(_to_numpy(X), dtype=np.float64)
        if X.ndim != 2:
            raise DataError(f"{name}: features must be a 2-D (N, D) array, got shape {X.shape}")
        if len(X) != n:
            raise DataError(f"{name}: features have {len(X)} rows but labels have {n}")
        if X.shape[1] == 0:
            raise DataError(f"{name}: features have zero columns")
        if not np.isfinite(X).all():
            raise DataError(f"{name}: features contain NaN or inf values")
    if regression:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise DataError(f"{name}: regression targets must be (N,) or (N, K), got shape {y.shape}")
        if not np.isfinite(y).all():
            raise DataError(f"{name}: regression targets contain NaN or inf values")
        if n < 2:
            raise DataError(f"{name}: need at least 2 samples, got {n}")
    else:
        if y.ndim != 1:
            raise DataError(f"{name}: labels must be a 1-D array of class ids, got shape {y.shape}")
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.all(y == np.round(y)):
                raise DataError(f"{name}: labels must be integer class ids (pass regression=True for real targets)")
        elif y.dtype.kind not in "iub":
            raise DataError(f"{name}: labels must be integer class ids, got dtype {y.dtype}")
        if y.dtype.kind in "if" and (y == -1).any():
            raise DataError(f"{name}: labels contain -1 (unlabelled items); score only the labelled rows, "
                            f"e.g. features.subset(features.labelled)")
        classes, y = np.unique(y, return_inverse=True)
        y = y.astype(np.int64).reshape(-1)
        if len(classes) < 2:
            raise DataError(f"{name}: need at least 2 classes, got {len(classes)}")
    if "probs" in needs or probs is not None:
        if probs is None:
            raise DataError(f"{name}: needs source-head probabilities (probs), got None")
        probs = np.asarray(_to_numpy(probs), dtype=np.float64)
        if probs.ndim != 2 or len(probs) != n:
            raise DataError(f"{name}: probs must be (N, C_s) with N={n}, got shape {probs.shape}")
        if not np.isfinite(probs).all():
            raise DataError(f"{name}: probs contain NaN or inf values")
        if (probs < 0).any() or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
            raise DataError(f"{name}: probs must be probabilities (non-negative rows summing to 1), not logits")
        probs = probs / probs.sum(1, keepdims=True)
    return X, y, probs


def _to_numpy(a):
    if a is None:
        return None
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def one_hot(y: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    c = int(y.max()) + 1 if n_classes is None else n_classes
    out = np.zeros((len(y), c), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def class_means(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (C, D) class means and (C,) class counts for labels in ``0..C-1``."""
    c = int(y.max()) + 1
    counts = np.bincount(y, minlength=c).astype(np.float64)
    sums = one_hot(y, c).T @ X
    return sums / np.maximum(counts, 1)[:, None], counts
