"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023 (reference code: prateeky2806/ties-merging, ``src/utils/merge_utils.py``).

For task vectors τ_1..τ_T of one base:

1. **Trim** — keep the top-``k`` fraction of each τ_t by magnitude, zero the rest.
   ``scope="global"`` (default, as in the paper): one threshold per task over *all* merged
   parameters (the whole model flattened). ``scope="per_tensor"`` (as PEFT and mergekit do): one
   threshold per task per tensor. They differ whenever tensors have different scales: globally, a
   tensor of small entries can lose everything; per tensor, every tensor keeps its own top-k.
   The kept count is ``ceil(k·d)`` of the ``d`` entries in scope (at least one), and entries tied with
   the threshold are all kept. (The reference keeps ``int(k·d)+1``; PEFT/mergekit keep ``int(k·d)``,
   which empties tensors with fewer than 1/k entries.) Exact zeros are never "kept".
2. **Elect** — γ = sign(Σ_t τ̂_t), the sign of the total mass. **Zero handling:** where the mass is
   exactly 0 (all trimmed entries cancel), ``tie_break="majority"`` (default, as the reference) uses
   the majority of the elected signs over the trim scope, sign(Σ_p γ_p) (whole model for ``global``,
   the tensor for ``per_tensor``; +1 if that is 0 too); ``tie_break="positive"`` uses +1 (PEFT's
   ``>= 0 → +1``). Coordinates where every τ̂_t is 0 merge to 0 whatever γ is.
3. **Disjoint merge** — over the tasks whose trimmed entry is non-zero and has sign γ:
   ``agg="mean"`` (default, the paper) averages them; ``agg="sum"`` adds them (fusion_bench's variant).
4. Result ``λ·τ_m`` as a ``full`` Delta; apply to θ0.

**λ defaults:** ``lam=None`` resolves to 1.0 for ``agg="mean"`` (the paper's no-validation
recommendation: k = 0.2, λ = 1; its README sweeps λ over 0.8..2.5 for T5/IA³) and to 0.3 for
``agg="sum"`` (fusion_bench's value). A disjoint sum is the disjoint mean times the number of agreeing
tasks at each coordinate, so good λ values for the two differ by roughly that factor (≈3× in
practice). Tune λ on validation data when you can. ``meta`` records ``trim_scope``, ``aggregate``, ``tie_break``, ``k``, ``lam``
and the fraction of entries kept per task.

Not implemented: per-task weights inside TIES (mergekit's ``weight``), the paper's alternative sign
rules (``normfrac``/``normmass``). Heads (``new.``) are dropped, integer tensors skipped (see
:mod:`transferkit.merge`); ``exclude`` removes tensors (e.g. embeddings, TIES's ``remove_keys``)
from trimming and merging. The global scope flattens all T task vectors at once (memory ≈ 2·T·model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..delta import Delta
from ..errors import ConfigError
from ..registry import option, register
from ._common import MergeOptions, check_deltas, first, get, make_delta, stack_bodies
from .task_arithmetic import SparseOptions

SCOPES = ("global", "per_tensor")
AGGS = ("mean", "sum")
TIE_BREAKS = ("majority", "positive")
DEFAULT_LAM = {"mean": 1.0, "sum": 0.3}


@dataclass
class TiesConsensus(MergeOptions):
    """TIES's trim and sign election: the options TIES and DARE-TIES share (a mixin of their options)."""

    DEFAULT_K: ClassVar[float] = 0.2

    k: float | None = option(None, low=0.0, high=1.0, low_open=True,
                             help="fraction of each task vector kept by magnitude (ties 0.2; dare_ties 1.0: no trim)")
    scope: str | None = option(None, choices=SCOPES, help="trim scope: global (paper; default for Deltas) or "
                                                          "per_tensor (mergekit/PEFT; default for checkpoints)")
    agg: str | None = option(None, choices=AGGS, help="disjoint mean (paper, default) or sum")
    tie_break: str = option("majority", choices=TIE_BREAKS, help="sign of zero total mass: majority or positive")
    normalize: bool | None = option(None, help="mergekit's switch: false means agg=sum")

    def validate(self) -> None:
        super().validate()
        if self.normalize is not None and self.agg is not None and self.agg != ("mean" if self.normalize else "sum"):
            raise ValueError(f"normalize={self.normalize} contradicts agg={self.agg!r}")

    def aggregate(self) -> str:
        if self.agg is not None:
            return self.agg
        return "sum" if self.normalize is False else "mean"

    def trim_k(self) -> float:
        return self.DEFAULT_K if self.k is None else float(self.k)

    def default_lam(self) -> float:
        return DEFAULT_LAM[self.aggregate()]

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        return {**super().kwargs(checkpoint=checkpoint), "k": self.trim_k(), "agg": self.aggregate(),
                "scope": self.scope or ("per_tensor" if checkpoint else "global"), "tie_break": self.tie_break}


@dataclass
class TiesOptions(TiesConsensus, SparseOptions):
    """TIES: task arithmetic on magnitude-trimmed task vectors with sign consensus; ``density`` is ``k``."""

    def validate(self) -> None:
        super().validate()
        if self.k is not None and self.density is not None:
            raise ValueError("give either k or density (the same thing for ties), not both")

    def trim_k(self) -> float:
        return float(self.density) if self.density is not None else super().trim_k()


def trim_mask(values: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the top-``k`` fraction of each row of ``values`` (T×d) by magnitude.

    Keeps ``ceil(k·d)`` entries per row (at least 1), all entries tied with the threshold, never zeros.
    """
    d = values.shape[1]
    a = values.abs()
    if d == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    n_keep = min(d, max(1, math.ceil(k * d - 1e-9)))
    thr = a.kthvalue(d - n_keep + 1, dim=1, keepdim=True).values
    return (a >= thr) & (values != 0)


def elect_sign(trimmed: torch.Tensor, tie_break: str = "majority") -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) over dim 0 of ``trimmed`` (T×...), zero mass resolved by ``tie_break``."""
    gamma = torch.sign(trimmed.sum(dim=0))
    if tie_break == "majority":
        fill = torch.sign(gamma.sum())
        fill = fill if fill != 0 else torch.ones((), dtype=gamma.dtype)
    else:
        fill = torch.ones((), dtype=gamma.dtype)
    return torch.where(gamma == 0, fill.to(gamma), gamma)


def disjoint_merge(trimmed: torch.Tensor, gamma: torch.Tensor, agg: str = "mean") -> torch.Tensor:
    """Combine the entries of ``trimmed`` (T×...) that are non-zero and agree with ``gamma``."""
    agree = (torch.sign(trimmed) == gamma.unsqueeze(0)) & (trimmed != 0)
    selected = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    total = selected.sum(dim=0)
    if agg == "sum":
        return total
    return total / agree.sum(dim=0).clamp(min=1).to(total.dtype)



def check_options(k: float, scope: str, agg: str, tie_break: str, lam: float | None) -> tuple[str, float]:
    """Validate TIES options (one-line ConfigError); return the canonical scope and λ."""
    if not (isinstance(k, (int, float)) and 0 < k <= 1):
        raise ConfigError(f"ties: k is the kept fraction in (0, 1] (20% → 0.2), got {k!r}")
    scope = {"per-tensor": "per_tensor"}.get(scope, scope)
    if scope not in SCOPES:
        raise ConfigError(f"ties: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if agg not in AGGS:
        raise ConfigError(f"ties: agg must be one of {', '.join(AGGS)}, got {agg!r}")
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"ties: tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    return scope, (DEFAULT_LAM[agg] if lam is None else float(lam))

def ties(deltas: Sequence[Delta], k: float = 0.2, lam: float | None = None, scope: str = "global",
         agg: str = "mean", *, tie_break: str = "majority", exclude: Sequence[str] = ()) -> Delta:
    """TIES-merge task vectors; see the module docstring for the algorithm and defaults.

    Parameters
    ----------
    deltas : Deltas of one base (at least one).
    k : fraction of entries kept per task, in (0, 1]; 1 disables trimming.
    lam : λ applied to the merged vector; None → 1.0 for ``agg="mean"``, 0.3 for ``agg="sum"``.
    scope : ``"global"`` (paper) or ``"per_tensor"`` (PEFT/mergekit).
    agg : ``"mean"`` (disjoint mean, paper) or ``"sum"``.
    tie_break : ``"majority"`` (reference) or ``"positive"`` (PEFT) for zero total mass.
    exclude : tensor names (or prefixes ending in ``.``) left out of trimming and merging.
    """
    deltas = check_deltas(deltas, "ties")
    scope, lam = check_options(k, scope, agg, tie_break, lam)

    names, bodies, meta = stack_bodies(deltas, exclude)
    T = len(deltas)
    stacked = {}
    for name in names:
        like = first(bodies, name)
        stacked[name] = torch.stack([get(b, name, like) for b in bodies])
    kept = torch.zeros(T)
    total = sum(v[0].numel() for v in stacked.values())
    trimmed: dict[str, torch.Tensor] = {}
    if scope == "global" and names:
        flat = torch.cat([stacked[n].reshape(T, -1) for n in names], dim=1)
        mask = trim_mask(flat, k)
        kept += mask.sum(dim=1).float()
        offset = 0
        for n in names:
            size = stacked[n][0].numel()
            m = mask[:, offset:offset + size].reshape(stacked[n].shape)
            trimmed[n] = torch.where(m, stacked[n], torch.zeros_like(stacked[n]))
            offset += size
        del flat, mask
        gamma_all = {n: torch.sign(trimmed[n].sum(dim=0)) for n in names}
        fill = torch.sign(sum(g.sum() for g in gamma_all.values()))
        if tie_break == "positive" or fill == 0:
            fill = torch.ones(())
        gammas = {n: torch.where(g == 0, fill.to(g), g) for n, g in gamma_all.items()}
    else:
        gammas = {}
        for n in names:
            m = trim_mask(stacked[n].reshape(T, -1), k).reshape(stacked[n].shape)
            kept += m.reshape(T, -1).sum(dim=1).float()
            trimmed[n] = torch.where(m, stacked[n], torch.zeros_like(stacked[n]))
            gammas[n] = elect_sign(trimmed[n], tie_break)
    out = {n: lam * disjoint_merge(trimmed[n], gammas[n], agg) for n in names}
    meta.update(method="ties", k=float(k), lam=lam, trim_scope=scope, aggregate=agg, tie_break=tie_break,
                kept_fraction=[float(x) / total if total else 0.0 for x in kept])
    return make_delta(deltas[0].base, out, meta)


register("merge", "ties", fn=ties, options=TiesOptions,
         paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
         summary="TIES-Merging: trim, elect sign, disjoint mean", streamable=True, per_layer=True,
         weights="prescale")
