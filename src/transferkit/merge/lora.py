"""Merging LoRA adapters in ΔW space.

LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. An adapter on
``<module>`` is ``ΔW = s · B @ A`` (A: r×in, B: out×r, s = α/r, or α/√r for rsLoRA), stored as a
``lora`` :class:`~transferkit.delta.Delta`.

:func:`merge_lora` forms Σ_i w_i ΔW_i — each adapter's scaling applied **exactly once** — and
returns it in one of three forms (``how``):

- ``"cat"`` — exact: A = [w_1 s_1 A_1; …; w_n s_n A_n], B = [B_1 … B_n], scaling 1; the rank is
  Σ r_i and ``B @ A`` equals Σ_i w_i s_i B_i A_i (up to floating-point rounding).
- ``"svd"`` (default) — the same sum truncated to rank ``rank`` (default: the largest adapter rank,
  as PEFT) by SVD, which by Eckart–Young is the best rank-r approximation in Frobenius norm. The
  SVD is taken of a small R×R core after QR of the stacked factors (R = Σ r_i), never of the dense
  out×in matrix. Factors are split as B = U√S, A = √S Vᵀ, scaling 1. ``meta["svd_error"]`` holds
  each module's relative Frobenius error ‖ΔW − ΔW_r‖/‖ΔW‖ and ``meta["svd_error_total"]`` the error
  over all modules together; both are 0 when ``rank`` ≥ the true rank.
- ``"dense"`` — the exact sum as a ``full`` Delta (``<module>.weight`` tensors).

``weights=None`` means 1 for every adapter (a sum, as PEFT's ``add_weighted_adapter``); pass
``[1/n]*n`` to average. Merging a single adapter with weight 1 returns the same ΔW (identity).

Never combining A and B linearly: PEFT's ``linear``/``ties``/``dare_*`` (non-SVD) combination types
mix A's and B's separately, so the product contains cross terms B_i A_j (PEFT issue #1155, PR #3013).
:func:`ab_linear_error` measures that error for a set of adapters, for reports. Other PEFT defects
avoided by construction: scaling applied twice on the SVD path (PR #3111) — factors here carry the
scaling and the output's ``scaling`` is 1; rsLoRA over-scaled by √r (PR #3449) — each adapter's
``meta["scaling"]`` (or α/√r with ``use_rslora``) is used as is; DoRA adapters are refused (their
update is not s·B@A; issue #3761). Non-factor additive tensors of the adapters (trained biases) are
summed with the same weights; ``new.`` heads (``modules_to_save``) are dropped and listed in
``meta["heads_dropped"]``. Only 2-D (Linear) LoRA factors are supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..delta import LORA_A, LORA_B, NEW, Delta, lora_factors
from ..errors import ConfigError, ModelError
from ..registry import option, register
from ._common import as_weights, check_deltas, compute_dtype, make_delta

HOWS = ("svd", "cat", "dense")


@dataclass
class LoraOptions:
    """Options of the ``lora`` merge method (:func:`merge_lora`)."""

    how: str = option("svd", choices=HOWS, help="svd (rank-r LoRA), cat (exact, ranks add up) or dense (full ΔW)")
    rank: int | None = option(None, low=1, help="rank of the svd result (default: the largest input rank)")

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        return {"how": self.how, "rank": self.rank}


def _factors(deltas: list[Delta]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    out = []
    for d in deltas:
        if d.kind != "lora":
            raise ConfigError(f"merge_lora takes lora deltas, got kind {d.kind!r}")
        try:
            out.append(lora_factors(d))
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
    return out


def _extras(deltas: list[Delta], w: list[float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weighted sum of the adapters' non-factor additive tensors (e.g. trained biases)."""
    out: dict[str, torch.Tensor] = {}
    for d, wi in zip(deltas, w):
        for k, v in d.tensors.items():
            if k.startswith(NEW) or k.endswith((LORA_A, LORA_B)) or not v.is_floating_point():
                continue
            term = wi * v.to(dtype)
            if k in out:
                if out[k].shape != term.shape:
                    raise ConfigError(f"adapters disagree on the shape of {k!r}")
                out[k] = out[k] + term
            else:
                out[k] = term
    return out


def _stacked(facs, w, module, dtype):
    """B_cat (out×R) and A_cat (R×in) with Σ w_i s_i B_i A_i = B_cat @ A_cat (weight on A)."""
    As, Bs = [], []
    for f, wi in zip(facs, w):
        if module in f:
            a, b, s = f[module]
            As.append((wi * s) * a.to(dtype))
            Bs.append(b.to(dtype))
    shapes = {(b.shape[0], a.shape[1]) for a, b in zip(As, Bs)}
    if len(shapes) > 1:
        raise ConfigError(f"adapters disagree on the shape of {module!r}: {sorted(shapes)}")
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def merge_lora(deltas: Sequence[Delta] | Delta, weights: Sequence[float] | None = None, how: str = "svd",
               rank: int | None = None) -> Delta:
    """Σ_i w_i ΔW_i of LoRA Deltas as ``cat`` (exact lora), ``svd`` (rank-``rank`` lora) or ``dense``.

    See the module docstring. Returns a ``lora`` Delta (``cat``/``svd``, ``meta["scaling"] = 1`` per
    module, ``meta["r"]`` per module) or a ``full`` Delta (``dense``).
    """
    deltas = check_deltas(deltas, "merge_lora")
    if how not in HOWS:
        raise ConfigError(f"merge_lora: how must be one of {', '.join(HOWS)}, got {how!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"merge_lora: rank must be a positive integer, got {rank!r}")
    w = as_weights(weights, len(deltas), "merge_lora", 1.0)
    facs = _factors(deltas)
    dtype = compute_dtype(t for f in facs for a, b, _ in f.values() for t in (a, b))
    modules = sorted(set().union(*facs))
    extras = _extras(deltas, w, dtype)
    heads = sorted({k for d in deltas for k in d.tensors if k.startswith(NEW)})
    meta = {"method": "lora_merge", "how": how, "weights": w, "n_deltas": len(deltas), "heads_dropped": heads}

    if how == "dense":
        out = dict(extras)
        for m in modules:
            B, A = _stacked(facs, w, m, dtype)
            key = m + ".weight"
            if key in out:
                raise ConfigError(f"adapters have both factors and a dense tensor for {key}")
            out[key] = B @ A
        return make_delta(deltas[0].base, out, meta)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    if how == "cat":
        for m in modules:
            B, A = _stacked(facs, w, m, dtype)
            tensors[m + LORA_A], tensors[m + LORA_B] = A, B
            ranks[m] = A.shape[0]
    else:
        target = rank or max(a.shape[0] for f in facs for a, _, _ in f.values())
        errors, tail_total, norm_total = {}, 0.0, 0.0
        for m in modules:
            B, A = _stacked(facs, w, m, dtype)
            new_b, new_a, tail2, norm2 = _truncated(B, A, target)
            tensors[m + LORA_A], tensors[m + LORA_B] = new_a.to(dtype), new_b.to(dtype)
            ranks[m] = new_a.shape[0]
            errors[m] = (tail2 / norm2) ** 0.5 if norm2 > 0 else 0.0
            tail_total += tail2
            norm_total += norm2
        meta.update(rank=target, svd_error=errors,
                    svd_error_total=(tail_total / norm_total) ** 0.5 if norm_total > 0 else 0.0)
    for k, v in extras.items():
        tensors[k] = v
    meta.update(scaling={m: 1.0 for m in modules}, r=ranks)
    return Delta(deltas[0].base, "lora", tensors, meta)


def _truncated(B: torch.Tensor, A: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of B @ A via QR + SVD of the small core (float64).

    Returns (B_r, A_r, squared Frobenius norm of the discarded part, squared norm of B @ A).
    """
    B64, A64 = B.double(), A.double()
    qb, rb = torch.linalg.qr(B64)              # out×k1, k1×R
    qa, ra = torch.linalg.qr(A64.T)            # in×k2,  k2×R
    core = rb @ ra.T                           # k1×k2, B@A = qb @ core @ qaᵀ
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    new_b = (qb @ u[:, :r]) * root
    new_a = root[:, None] * (vh[:r] @ qa.T)
    s2 = s.pow(2)
    return new_b, new_a, float(s2[r:].sum()), float(s2.sum())


def ab_linear_error(deltas: Sequence[Delta], weights: Sequence[float] | None = None) -> dict:
    """Relative error of combining A's and B's linearly (PEFT's ``linear``), versus the exact ΔW sum.

    The A/B-linear combination is ΔW_lin = (Σ_i √|w_i s_i| B_i) @ (Σ_i sign(w_i) √|w_i s_i| A_i),
    which needs equal ranks and contains the cross terms B_i A_j (i ≠ j). Returns
    ``{"per_module": {module: ‖ΔW_lin − ΔW‖/‖ΔW‖}, "total": …}``. For reports; never used to merge.
    """
    deltas = check_deltas(deltas, "ab_linear_error")
    w = as_weights(weights, len(deltas), "ab_linear_error", 1.0)
    facs = _factors(deltas)
    per, num, den = {}, 0.0, 0.0
    for m in sorted(set().union(*facs)):
        parts = [(f[m], wi) for f, wi in zip(facs, w) if m in f]
        if len({a.shape for (a, _, _), _ in parts}) > 1:
            raise ConfigError(f"ab_linear_error: adapters of {m!r} have different ranks")
        A_lin = sum(torch.sign(torch.tensor(wi)) * abs(wi * s) ** 0.5 * a.double() for (a, b, s), wi in parts)
        B_lin = sum(abs(wi * s) ** 0.5 * b.double() for (a, b, s), wi in parts)
        exact = sum(wi * s * (b.double() @ a.double()) for (a, b, s), wi in parts)
        e2 = float((B_lin @ A_lin - exact).pow(2).sum())
        n2 = float(exact.pow(2).sum())
        per[m] = (e2 / n2) ** 0.5 if n2 > 0 else 0.0
        num += e2
        den += n2
    return {"per_module": per, "total": (num / den) ** 0.5 if den > 0 else 0.0}


register("merge", "lora", fn=merge_lora, options=LoraOptions,
         paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
         summary="LoRA adapters merged in ΔW space: cat (exact), svd (rank r) or dense", streamable=False,
         per_layer=False, weights="kwarg", delta_kind="lora")
