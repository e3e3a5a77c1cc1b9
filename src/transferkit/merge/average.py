"""Weight averaging and model soups.

Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon, Kornblith,
Schmidt, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (reference code: mlfoundations/model-soups).

Averaging models fine-tuned from one base equals averaging their task vectors:
mean_i θ_i = θ0 + mean_i τ_i, so everything here works on Deltas.

- :func:`average` — weighted average Σ w_i τ_i / Σ w_i (``weights=None``: uniform). Weights are
  normalised; for an unnormalised sum use :func:`~transferkit.merge.task_arithmetic`.
  ``heads="drop"`` (default, multi-task merging: heads are per task) or ``"average"`` (soups of one
  task: the fine-tuned heads are averaged too; they must have equal shapes).
- :func:`uniform_soup` — ``average(deltas, heads="average")``.
- :func:`greedy_soup` — the paper's Recipe 1: sort the ingredients by held-out score (``evaluate``
  on each alone, or the given ``scores``), start from the best, add each next one only if the soup's
  held-out score does **not drop** (≥, as in the paper). ``evaluate(delta) -> float`` (higher is
  better) receives the candidate soup as a Delta (with averaged heads). Greedy ≥ best individual ≥
  uniform is a legitimate outcome; a uniform soup over very different learning rates can fail.

Integer tensors are never averaged (skipped, the base value stays).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..delta import Delta
from ..errors import ConfigError
from ..registry import register
from ._common import MergeOptions, as_weights, check_deltas, first, get, make_delta, stack_bodies
from ._common import heads as _task_heads


def average(deltas: Sequence[Delta] | Delta, weights: Sequence[float] | None = None, *, heads: str = "drop",
            exclude: Sequence[str] = ()) -> Delta:
    """Weighted average of task vectors (uniform when ``weights`` is None); see the module doc."""
    deltas = check_deltas(deltas, "average")
    if heads not in ("drop", "average"):
        raise ConfigError(f"average: heads must be 'drop' or 'average', got {heads!r}")
    w = as_weights(weights, len(deltas), "average", 1.0)
    total = sum(w)
    if total == 0:
        raise ConfigError("average: the weights sum to 0")
    w = [x / total for x in w]
    names, bodies, meta = stack_bodies(deltas, exclude)
    out = {}
    for name in names:
        like = first(bodies, name)
        out[name] = sum(wi * get(b, name, like) for wi, b in zip(w, bodies))
    if heads == "average":
        out.update(_average_heads(deltas, w))
        meta["heads_dropped"] = []
    meta.update(method="average", weights=w, heads=heads)
    return make_delta(deltas[0].base, out, meta)


def _average_heads(deltas: list[Delta], w: list[float]) -> dict[str, torch.Tensor]:
    per = [_heads(d) for d in deltas]
    names = set().union(*per)
    out = {}
    for name in sorted(names):
        if any(name not in h for h in per):
            raise ConfigError(f"cannot average head {name!r}: not every delta has it")
        shapes = {tuple(h[name].shape) for h in per}
        if len(shapes) > 1:
            raise ConfigError(f"cannot average head {name!r}: shapes differ {sorted(shapes)}")
        if not per[0][name].is_floating_point():
            out[name] = per[0][name]
            continue
        out[name] = sum(wi * h[name].float() for wi, h in zip(w, per))
    return out


def _heads(d: Delta) -> dict[str, torch.Tensor]:
    return _task_heads(d)


def uniform_soup(deltas: Sequence[Delta]) -> Delta:
    """Uniform soup: the plain average of fine-tunes of one task, heads included."""
    out = average(deltas, heads="average")
    out.meta["method"] = "uniform_soup"
    return out


def greedy_soup(deltas: Sequence[Delta], evaluate: Callable[[Delta], float], *,
                scores: Sequence[float] | None = None) -> Delta:
    """Greedy soup (Recipe 1 of Wortsman et al.); ``meta["ingredients"]`` lists the chosen indices.

    ``evaluate`` is called once per ingredient (unless ``scores`` is given) and once per candidate.
    """
    deltas = check_deltas(deltas, "greedy_soup")
    if scores is None:
        scores = [float(evaluate(uniform_soup([d]))) for d in deltas]
    scores = as_weights(scores, len(deltas), "greedy_soup scores", 0.0)
    order = sorted(range(len(deltas)), key=lambda i: -scores[i])  # stable: ties keep input order
    chosen = [order[0]]
    best = scores[order[0]]
    history = [{"added": order[0], "score": best}]
    for i in order[1:]:
        candidate = chosen + [i]
        s = float(evaluate(uniform_soup([deltas[j] for j in candidate])))
        if s >= best:
            chosen, best = candidate, s
            history.append({"added": i, "score": s})
        else:
            history.append({"rejected": i, "score": s})
    out = uniform_soup([deltas[j] for j in chosen])
    out.meta.update(method="greedy_soup", ingredients=chosen, individual_scores=list(scores),
                    score=best, history=history)
    return out


_SOUPS = "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models, ICML 2022"
register("merge", "average", fn=average, options=MergeOptions, paper=_SOUPS,
         summary="weighted average of task vectors (a soup of different tasks; heads dropped)",
         streamable=True, per_layer=True, weights="normalized")
register("merge", "uniform_soup", fn=uniform_soup, options=None, paper=_SOUPS,
         summary="uniform soup of fine-tunes of one task: bodies and heads averaged", streamable=False,
         per_layer=False, weights=None, heads="averaged")

__all__ = ["average", "uniform_soup", "greedy_soup"]
