"""DARE: Drop And REscale delta parameters.

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (reference code: yule-BUAA/MergeLM, ``mask_weights_utils.py``).

τ̂ = (m ⊙ τ) / (1 − p), m ~ Bernoulli(1 − p) independently per entry, so E[τ̂] = τ (unbiased). Then
merge the sparsified deltas with task arithmetic or TIES (:func:`dare_merge`).

Rules followed here (``/work/shared/methods/merge.md`` §4):

- **deltas only**: :func:`dare` takes a :class:`Delta`; a state dict of fine-tuned weights is refused
  (dropping fine-tuned weights directly fails badly, MergeLM issue #3). ``lora``/``sparse`` Deltas are
  densified first (dropping entries of A or B is not DARE on ΔW); ``new.`` heads are kept unchanged
  (they are set, not added); integer tensors are left untouched.
- **exact rescale** by 1/(1 − p) — not mergekit's L1-norm-matching rescale.
- **seeded**: each tensor gets its own ``torch.Generator`` seeded from ``(seed, crc32(name))``, so the
  mask of a tensor depends only on the seed and its name (not on dict order or which other tensors are
  present — the same mask in a streaming, tensor-at-a-time merge). Results vary with the seed (a
  mergekit user saw up to 15% spread): report several seeds.
- **warn on large deltas**: DARE works when deltas are small (|δ| ≲ 0.002–0.005) and breaks down near
  0.03 (paper §4.6); a :class:`LargeDeltaWarning` is emitted when the mean |δ| of the body exceeds
  ``warn_above`` (default 0.005).

Defaults: ``p=0.9``, ``seed=0``. ``p=0`` returns an identical copy; ``p=1`` is refused.

Merge methods (registered as ``dare_linear`` and ``dare_ties``): :func:`dare_linear` (DARE, then task
arithmetic) and :func:`dare_ties` (DARE, then TIES; ``k`` defaults to 1.0 — no magnitude trim on top of the
random drop, as mergekit's dare_ties). ``density`` is the keep probability 1 − p (mergekit's name).
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..delta import NEW, Delta, to_dense
from ..errors import ConfigError
from ..registry import option, register
from ._common import check_deltas
from .task_arithmetic import SparseOptions
from .ties import TiesConsensus


class LargeDeltaWarning(UserWarning):
    """DARE applied to deltas too large for random dropping to be harmless."""


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


def drop_and_rescale(tensor: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """(m ⊙ tensor)/(1 − p) with m ~ Bernoulli(1 − p) drawn from ``generator``."""
    if p == 0:
        return tensor.clone()
    keep = torch.rand(tensor.shape, generator=generator, device=tensor.device) >= p
    return torch.where(keep, tensor / (1.0 - p), torch.zeros_like(tensor))


def dare(delta: Delta, p: float = 0.9, seed: int = 0, *, warn_above: float | None = 0.005) -> Delta:
    """Drop each delta entry with probability ``p`` and rescale the rest by exactly 1/(1 − p).

    Returns a ``full`` Delta (heads copied unchanged); ``meta`` records ``dare_p``, ``dare_seed``,
    ``mean_abs_delta`` and the kept fraction.
    """
    if not isinstance(delta, Delta):
        raise ConfigError("dare takes a Delta (task vector θ_ft − θ_base), not fine-tuned weights; "
                          "build one with transferkit.delta.from_states")
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise ConfigError(f"dare: drop probability p must be in [0, 1), got {p!r}")
    dense = to_dense(delta)
    floats = {k: v for k, v in dense.items() if v.is_floating_point()}
    n = sum(v.numel() for v in floats.values())
    mean_abs = float(sum(v.abs().double().sum() for v in floats.values()) / n) if n else 0.0
    if warn_above is not None and mean_abs > warn_above:
        warnings.warn(f"DARE on large deltas (mean |δ| = {mean_abs:.3g} > {warn_above}): random dropping "
                      "is only harmless for small deltas (≲ 0.005); expect degradation", LargeDeltaWarning,
                      stacklevel=2)
    out: dict[str, torch.Tensor] = {}
    kept = 0
    for name, value in dense.items():
        if name in floats:
            out[name] = drop_and_rescale(value, float(p), _generator(seed, name, value.device))
            kept += int((out[name] != 0).sum())
        else:
            out[name] = value.clone()
    out.update({k: v.clone() for k, v in delta.tensors.items() if k.startswith(NEW)})
    meta = dict(delta.meta)
    for key in ("scaling", "lora_alpha", "r", "use_rslora", "shapes"):
        meta.pop(key, None)
    nonzero = sum(int((v != 0).sum()) for v in floats.values())
    meta.update(dare_p=float(p), dare_seed=int(seed), mean_abs_delta=mean_abs,
                dare_kept_fraction=kept / nonzero if nonzero else 1.0, densified_from=delta.kind)
    kind = "full" if any(not k.startswith(NEW) for k in out) else "head"
    return Delta(delta.base, kind, out, meta)


def dare_merge(deltas: Sequence[Delta], p: float = 0.9, seed: int = 0, *, merge: str = "task_arithmetic",
               warn_above: float | None = 0.005, **kwargs) -> Delta:
    """DARE each delta (seed ``seed + i`` for delta i), then merge with ``merge``.

    ``merge`` is ``"task_arithmetic"`` (DARE-linear; ``lam`` in kwargs) or ``"ties"`` (DARE-TIES;
    kwargs go to :func:`~transferkit.merge.ties`).
    """
    from .task_arithmetic import task_arithmetic
    from .ties import ties

    deltas = check_deltas(deltas, "dare_merge")
    dropped = [dare(d, p, seed + i, warn_above=warn_above) for i, d in enumerate(deltas)]
    if merge == "task_arithmetic":
        out = task_arithmetic(dropped, **kwargs)
    elif merge == "ties":
        out = ties(dropped, **kwargs)
    else:
        raise ConfigError(f"dare_merge: merge must be 'task_arithmetic' or 'ties', got {merge!r}")
    out.meta.update(method=f"dare_{out.meta['method']}", dare_p=float(p), dare_seed=int(seed))
    return out


def dare_linear(deltas: Sequence[Delta], p: float = 0.9, seed: int = 0, *, lam: float | Sequence[float] = 1.0,
                exclude: Sequence[str] = (), warn_above: float | None = 0.005) -> Delta:
    """DARE-linear: :func:`dare` each delta, then :func:`~transferkit.merge.task_arithmetic` with ``lam``."""
    return dare_merge(deltas, p, seed, lam=lam, exclude=exclude, warn_above=warn_above)


def dare_ties(deltas: Sequence[Delta], p: float = 0.9, seed: int = 0, *, k: float = 1.0, lam: float | None = None,
              scope: str = "global", agg: str = "mean", tie_break: str = "majority", exclude: Sequence[str] = (),
              warn_above: float | None = 0.005) -> Delta:
    """DARE-TIES: :func:`dare` each delta, then :func:`~transferkit.merge.ties` (``k=1``: no extra trim)."""
    return dare_merge(deltas, p, seed, merge="ties", k=k, lam=lam, scope=scope, agg=agg, tie_break=tie_break,
                      exclude=exclude, warn_above=warn_above)


@dataclass
class DareOptions(SparseOptions):
    """DARE-linear: task arithmetic on randomly dropped and rescaled task vectors; ``density`` is 1 − p."""

    p: float | None = option(None, low=0.0, high=1.0, high_open=True,
                             help="drop probability (0.9); or give density = 1 − p")
    seed: int = option(0, help="seed of the random drop (delta i uses seed + i)")

    def validate(self) -> None:
        super().validate()
        if self.p is not None and self.density is not None:
            raise ValueError("give either p (drop probability) or density (keep probability = 1 − p), not both")

    def drop_p(self) -> float:
        if self.density is not None:
            return 1.0 - float(self.density)
        return 0.9 if self.p is None else float(self.p)

    def kwargs(self, *, checkpoint: bool = False) -> dict[str, Any]:
        return {**super().kwargs(checkpoint=checkpoint), "p": self.drop_p(), "seed": int(self.seed)}


@dataclass
class DareTiesOptions(TiesConsensus, DareOptions):
    """DARE-TIES: DARE's options plus TIES's sign consensus (``k`` 1.0: no magnitude trim by default)."""

    DEFAULT_K: ClassVar[float] = 1.0


register("merge", "dare_linear", fn=dare_linear, options=DareOptions,
         paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024",
         summary="DARE drop-and-rescale, then task arithmetic", streamable=True, per_layer=True,
         weights="coefficient")
register("merge", "dare_ties", fn=dare_ties, options=DareTiesOptions,
         paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024",
         summary="DARE drop-and-rescale, then TIES", streamable=True, per_layer=True, weights="prescale")
