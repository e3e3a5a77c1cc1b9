"""PED: potential-energy feature dynamics wrapped around a base metric.

Paper: X. Li, Z. Hu, Y. Ge, Y. Shan, L.-Y. Duan, "Exploring Model Transferability through the Lens of
Potential Energy", ICCV 2023 (reference: lixiaotong97/PED ``metrics.py``).

Fine-tuning pushes overlapping classes apart; PED simulates that cheaply before scoring:

1. Standardise X with a mean/std (std clamped at ``eps = 1e-3``).
2. Class means μ_c and radius R_c = sqrt(Σ_d var_{c,d}).
3. For each class pair, force F_ij = max(nσ·(R_i + R_j) − ‖μ_i − μ_j‖, 0); class i is displaced by
   Σ_j û_ij · min(½Δt²·F_ij, F_ij) with û_ij = (μ_i − μ_j)/‖μ_i − μ_j‖ (repulsion; equal and
   opposite for j); every sample of class i moves by its class's displacement; de-standardise.
4. Repeat at most ``max_steps = 6`` times while (total |displacement| of this step) / (that of the
   first step) > ``exit_ratio = 0.5``.
5. Score the moved features with the base metric (``base="sfda"`` default; any registered
   feature metric, e.g. ``"logme"`` or ``"nleep"``).

Defaults Δt = 0.1 and nσ = 0.6 (0.3 is the paper's other candidate).

**Target-only variant (default).** The paper standardises with the statistics of the same model's
ImageNet-val features ("general_X"; the reference raises NotImplementedError without them). Pass
them as ``reference=`` (an (M, D) array or a :class:`~transferkit.features.Features`) for the paper's
setting. Without them, the target features' own mean and std are used (computed once, before the
first step). The input array is never modified.

Cost. Every sample of a class moves by the same vector, so the class radii R_c never change and the
class means move by exactly the displacements: the steps run on the (C, D) class statistics alone
(computed once from the standardised features), and the moved features are formed once at the end as
X' = X + (Σ_steps disp · std)[y] — the same features as stepping the (N, D) array, up to round-off.
X' is a class translate of X, so its within-class scatter is that of X; inside a scoring pass
(:func:`~transferkit.rank._shared.declare_class_translate`; ``ped`` opens one when called on its own)
the base metric reuses it (SFDA: the shared scatter and its Cholesky factor).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import DataError
from ._base import METRICS, class_means, one_hot, register
from ._shared import declare_class_translate, in_shared_pass, shared_pass

__all__ = ["ped", "ped_dynamics"]


def _class_stats(Xs: np.ndarray, y: np.ndarray):
    """Class means μ_c (C, D) and radii R_c = sqrt(Σ_d var_{c,d}) (C,) of the standardised features.

    Overwrites ``Xs`` (a scratch array) with its square: one (N, D) temporary fewer.
    """
    means, counts = class_means(Xs, y)
    ex2 = (one_hot(y, len(means)).T @ np.square(Xs, out=Xs)) / np.maximum(counts, 1)[:, None]
    return means, np.sqrt(np.clip(ex2 - means**2, 0.0, None).sum(1))


def _step(means: np.ndarray, R: np.ndarray, dt: float, nsigma: float):
    """Per-class displacement (C, D) of one step and its total |displacement|."""
    diff = means[:, None, :] - means[None, :, :]  # μ_i − μ_j
    dist = np.linalg.norm(diff, axis=-1)
    F = np.maximum(abs(nsigma) * (R[:, None] + R[None, :]) - dist, 0.0)
    np.fill_diagonal(F, 0.0)
    mag = np.minimum(0.5 * dt**2 * F, F)
    unit = np.divide(diff, dist[..., None], out=np.zeros_like(diff), where=dist[..., None] > 0)
    disp = (unit * mag[..., None]).sum(1)  # (C, D)
    return disp, float(np.abs(disp).sum())


def ped_dynamics(X: np.ndarray, y: np.ndarray, *, reference=None, dt: float = 0.1, nsigma: float = 0.6,
                 exit_ratio: float = 0.5, max_steps: int = 6, eps: float = 1e-3) -> tuple[np.ndarray, int]:
    """Return (moved copy of X, number of steps taken). ``y`` must be 0-based class ids."""
    ref = X if reference is None else reference
    mean = ref.mean(0)
    std = np.maximum(ref.std(0), eps)
    Xs = X - mean  # new array (scratch: _class_stats overwrites it)
    Xs /= std
    means, R = _class_stats(Xs, y)  # moving whole classes changes neither R nor anything but μ
    del Xs
    shift = np.zeros_like(means)
    first = None
    steps = 0
    while steps < max_steps:
        disp, total = _step(means, R, dt, nsigma)
        if first is None:
            first = total
        if first == 0 or total / first <= exit_ratio:
            break
        means = means + disp
        shift += disp
        steps += 1
    Xm = (shift * std)[y]  # (X_std + Σ disp[y]) · std + mean = X + (Σ disp · std)[y], formed once
    Xm += X
    return Xm, steps


@register(
    "ped",
    citation="Li et al., Exploring Model Transferability through the Lens of Potential Energy, ICCV 2023",
)
def ped(X, y, *, probs=None, seed: int = 0, base: str = "sfda", reference=None, dt: float = 0.1,
        nsigma: float = 0.6, exit_ratio: float = 0.5, max_steps: int = 6, **base_opts) -> float:
    """Base metric (default SFDA) on features moved by the potential-energy dynamics."""
    if base not in METRICS or base == "ped" or METRICS[base].needs != frozenset({"features"}):
        raise DataError(f"ped: base must be a registered features-only metric other than ped, got {base!r}")
    if reference is not None:
        ref = getattr(reference, "X", reference)
        ref = np.asarray(ref, dtype=np.float64)
        if ref.ndim != 2 or len(ref) < 2 or not np.isfinite(ref).all():
            raise DataError(f"ped: reference features must be a finite (M >= 2, D) array, got shape {ref.shape}")
        if ref.shape[1] != X.shape[1]:
            raise DataError(f"ped: reference features have {ref.shape[1]} dims, target features {X.shape[1]}")
        reference = ref
    Xm, _ = ped_dynamics(X, y, reference=reference, dt=dt, nsigma=nsigma, exit_ratio=exit_ratio, max_steps=max_steps)
    with contextlib.nullcontext() if in_shared_pass() else shared_pass():
        declare_class_translate(Xm, X, y)  # same within-class scatter as X: the base metric may reuse it
        return float(METRICS[base].impl(Xm, y, seed=seed, **base_opts))
