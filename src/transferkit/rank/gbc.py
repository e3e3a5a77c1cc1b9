"""GBC: Gaussian Bhattacharyya Coefficient.

Paper: M. Pándy, A. Agostinelli, J. Uijlings, V. Ferrari, T. Mensink, "Transferability Estimation
using Bhattacharyya Class Separability", CVPR 2022.

1. PCA-reduce the features (``pca=0.8``: keep 80% of the variance, the default of
   google-research/stable_transfer ``pca_reduction``; an int keeps that many dimensions; None skips).
2. Per class c: mean μ_c and per-dimension variance σ_c (biased), clamped at ≥ 1e-4.
3. Bhattacharyya distance between the Gaussians of classes c, c' (σ̄ = (σ_c + σ_c')/2)::

       D_B = ⅛ Σ_d (μ_c − μ_c')² / σ̄ + ½ Σ_d [log σ̄ − ½ log σ_c − ½ log σ_c']

4. GBC = −Σ_{c ≠ c'} exp(−D_B(c, c'))  (ordered pairs; ≤ 0, higher = better separated).

PCA is exact (:mod:`transferkit.rank._shared`; shared with N-LEEP within a scoring pass).

``gaussian_type="spherical"`` (default, as in the widely used ports; the paper's choice is unverified)
replaces σ_c by its mean over dimensions, i.e. Σ = s_c I_d. Deviation note: the stable_transfer
code then sums log of the scalar variance once, which drops the factor d in the log-determinant
term; this implementation uses the exact spherical distance (factor d).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ._base import class_means, one_hot, register
from ._shared import pca as shared_pca

__all__ = ["gbc"]


def _pca(X: np.ndarray, pca):
    if pca is None:
        return X
    if isinstance(pca, float) and not 0 < pca <= 1:
        raise DataError("gbc: pca must be a fraction in (0, 1], an int or None")
    return shared_pca(X, pca)


@register(
    "gbc",
    citation="Pándy et al., Transferability Estimation using Bhattacharyya Class Separability, CVPR 2022",
)
def gbc(X, y, *, probs=None, seed: int = 0, pca=0.8, gaussian_type: str = "spherical", min_var: float = 1e-4) -> float:
    """GBC score; see the module docstring."""
    if gaussian_type not in ("spherical", "diagonal"):
        raise DataError(f"gbc: gaussian_type must be 'spherical' or 'diagonal', got {gaussian_type!r}")
    Z = _pca(X, pca)
    d = Z.shape[1]
    mu, counts = class_means(Z, y)
    ex2 = (one_hot(y).T @ (Z**2)) / counts[:, None]
    var = np.maximum(ex2 - mu**2, min_var)  # (C, d)
    diff2 = (mu[:, None, :] - mu[None, :, :]) ** 2  # (C, C, d)
    if gaussian_type == "spherical":
        s = var.mean(1)
        sbar = (s[:, None] + s[None, :]) / 2
        db = diff2.sum(-1) / (8 * sbar) + 0.5 * d * (np.log(sbar) - 0.5 * np.log(s)[:, None] - 0.5 * np.log(s)[None, :])
    else:
        vbar = (var[:, None, :] + var[None, :, :]) / 2
        lv = np.log(var)
        db = (diff2 / vbar).sum(-1) / 8 + 0.5 * (np.log(vbar).sum(-1) - 0.5 * lv.sum(1)[:, None] - 0.5 * lv.sum(1)[None, :])
    bc = np.exp(-db)
    np.fill_diagonal(bc, 0.0)
    return float(-bc.sum())
