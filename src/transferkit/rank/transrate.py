"""TransRate: transferability as the coding-rate gain of the labels.

Paper: L.-K. Huang, J. Huang, Y. Rong, Q. Yang, Y. Wei, "Frustratingly Easy Transferability
Estimation", ICML 2022.

Coding rate of n centred samples Z ∈ R^{n×d} at distortion ε::

    R(Z, ε) = ½ logdet( I_d + ZᵀZ / (n ε) )
    TrR = R(Z, ε) − (1/C) Σ_c R(Z_c, ε)          (higher is better)

where Z_c are the rows of class c (with their own n_c). Computed from the eigenvalues of the smaller
of ZᵀZ and ZZᵀ (same non-zero spectrum), so the cost is O(N·D·min(N, D)).

Defaults and deviations: ε = 1e-4 with the 1/(nε) scaling of tllib ``transrate``; the paper writes
d/(nε²) — which is canonical is unverified, the choice only rescales ε. Features are centred per
dimension (the paper's "centred"); tllib subtracts one global scalar mean instead.
"""

from __future__ import annotations

import numpy as np

from ._base import register
from ._shared import centred, spectrum

__all__ = ["transrate", "coding_rate"]


def coding_rate(Z: np.ndarray, eps: float = 1e-4) -> float:
    """½ logdet(I + ZᵀZ/(nε)) for Z (n, d), via the smaller Gram matrix."""
    n, d = Z.shape
    G = Z @ Z.T if n < d else Z.T @ Z
    w = np.clip(np.linalg.eigvalsh(G), 0.0, None)
    return float(0.5 * np.sum(np.log1p(w / (n * eps))))


@register(
    "transrate",
    citation="Huang et al., Frustratingly Easy Transferability Estimation, ICML 2022",
)
def transrate(X, y, *, probs=None, seed: int = 0, eps: float = 1e-4) -> float:
    """TransRate R(Z) − mean_c R(Z_c) on per-dimension centred features."""
    Z = centred(X)
    C = int(y.max()) + 1
    rz = float(0.5 * np.sum(np.log1p(spectrum(X)[0] / (len(Z) * eps))))  # coding_rate(Z), shared spectrum
    rzy = sum(coding_rate(Z[y == c], eps) for c in range(C))
    return float(rz - rzy / C)
