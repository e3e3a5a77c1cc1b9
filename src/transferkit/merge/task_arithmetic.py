"""Task arithmetic: add, negate and combine task vectors.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models with Task
Arithmetic", ICLR 2023 (reference code: mlfoundations/task_vectors).

With pre-trained weights θ0 and task vectors τ_t = θ_t − θ0 (a ``full`` :class:`Delta`):

- addition  θ = θ0 + λ Σ_t τ_t                 :func:`task_arithmetic`
- negation  θ = θ0 − λ τ                        :func:`negate`
- analogy   θ = θ0 + λ (τ_C + τ_B − τ_A)        :func:`analogy` ("A is to B as C is to D")

Defaults: ``lam=1.0``. The paper picks λ on held-out validation data over a 0..1 grid; its README uses
0.8 for a sum of two vectors and 0.5 for negation, fusion_bench 0.3 for eight tasks — tune it.
``lam`` may also be one coefficient per task (Σ_t λ_t τ_t).

Negating from a merge (θ0 + λ Σ τ_t − λ_neg τ_s) removes τ_s's interference too: at λ_neg = λ it is the
merge without task s, so the other tasks move by as much as that merge differs from the full one
(measured: +3.3 pp on one of four text tasks, ``benchmarks/results/merge_negation.md``); choose λ_neg on
validation data with the other tasks as controls.

Deviations / conventions: only the body is combined; ``new.`` heads are dropped (listed in
``meta["heads_dropped"]``; :func:`transferkit.merge.attach_head` restores one task's head). Integer
tensors are skipped, as in the reference. Missing tensors count as zero task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..delta import Delta
from ..registry import option, register
from ._common import MergeOptions, as_weights, check_deltas, first, get, make_delta, stack_bodies
from .layers import check_value, is_scalar


@dataclass
class TaskArithmeticOptions(MergeOptions):
    """λ of task arithmetic; the shape TIES and DARE extend (see :mod:`transferkit.merge._common`)."""

    lam: float | list | None = option(
        None, help="λ (mergekit: lambda): a number, a per-layer gradient [v0, …, vm] or filters "
                   "[{filter, value}]; default 1.0")

    def validate(self) -> None:
        super().validate()
        check_value(self.lam, "lambda")

    def default_lam(self) -> float:
        """λ when none is given."""
        return 1.0

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        lam = float(self.lam) if is_scalar(self.lam) and self.lam is not None else self.default_lam()
        return {**super().kwargs(checkpoint=checkpoint), "lam": lam}


@dataclass
class SparseOptions(TaskArithmeticOptions):
    """Task arithmetic on sparsified task vectors (TIES: by magnitude, DARE: at random)."""

    density: float | None = option(None, low=0.0, high=1.0, low_open=True,
                                   help="fraction of each task vector the sparsification keeps (mergekit's "
                                        "density; ties: = k, dare: = 1 − p)")


def task_arithmetic(deltas: Sequence[Delta] | Delta, lam: float | Sequence[float] = 1.0, *,
                    exclude: Sequence[str] = ()) -> Delta:
    """Σ_t λ_t τ_t as a ``full`` Delta.

    Parameters
    ----------
    deltas : Deltas of one base (task vectors τ_t).
    lam : scaling λ, one float for all tasks or one per task.
    exclude : tensor names (or prefixes ending in ``.``) to leave at the base value.
    """
    deltas = check_deltas(deltas, "task_arithmetic")
    lams = as_weights(lam, len(deltas), "task_arithmetic", 1.0)
    names, bodies, meta = stack_bodies(deltas, exclude)
    out = {}
    for name in names:
        like = first(bodies, name)
        acc = sum(lam_t * get(b, name, like) for lam_t, b in zip(lams, bodies))
        out[name] = acc
    meta.update(method="task_arithmetic", lam=lams if isinstance(lam, Sequence) else float(lam))
    return make_delta(deltas[0].base, out, meta)


def negate(delta: Delta, lam: float = 1.0, *, exclude: Sequence[str] = ()) -> Delta:
    """−λ τ: forget the task of ``delta`` (apply to the base model; heads are dropped)."""
    check_deltas([delta], "negate")
    out = task_arithmetic([delta], -float(lam), exclude=exclude)
    out.meta.update(method="negation", lam=float(lam))
    return out


register("merge", "task_arithmetic", fn=task_arithmetic, options=TaskArithmeticOptions,
         paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
         summary="θ0 + λ Σ w_t τ_t: add task vectors", streamable=True, per_layer=True, weights="coefficient")
register("merge", "negation", fn=negate, options=TaskArithmeticOptions,
         paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
         summary="θ0 − λτ: forget a task (one model)", streamable=False, per_layer=True, weights="prescale",
         n_models=1)


def analogy(a: Delta, b: Delta, c: Delta, lam: float = 1.0, *, exclude: Sequence[str] = ()) -> Delta:
    """λ (τ_C + τ_B − τ_A): "A is to B as C is to D", the estimate of τ_D."""
    check_deltas([a, b, c], "analogy")
    out = task_arithmetic([c, b, a], [float(lam), float(lam), -float(lam)], exclude=exclude)
    out.meta.update(method="analogy", lam=float(lam))
    return out
