"""LEEP: Log Expected Empirical Prediction.

Paper: C. V. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to Evaluate
Transferability of Learned Representations", ICML 2020.

With θ(x_i) ∈ Δ^{C_s} the source head's softmax and target labels y_i::

    P̂(y, z) = (1/N) Σ_i θ(x_i)_z · 1[y_i = y],   P̂(y | z) = P̂(y, z) / P̂(z)
    LEEP = (1/N) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z           (≤ 0, higher is better)

Needs the source-head probabilities (``probs``), not the features. Source classes z with P̂(z) = 0
are skipped. Deviation note: TencentARC/SFDA's ``LEEP()`` (copied by ETran, NCTI) returns the mean of
p instead of the mean of log p; this implementation uses log p as in the paper.
"""

from __future__ import annotations

import numpy as np

from ._base import one_hot, register

__all__ = ["leep", "empirical_predictor"]


def empirical_predictor(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return P̂(y | z) as a (C, C_s) matrix (columns with P̂(z) = 0 are zero)."""
    joint = one_hot(y).T @ probs / len(y)  # (C, Cs)
    pz = joint.sum(0)
    return np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)


@register(
    "leep",
    citation="Nguyen et al., LEEP: A New Measure to Evaluate Transferability of Learned Representations, ICML 2020",
    needs=("probs",),
)
def leep(X, y, *, probs=None, seed: int = 0) -> float:
    """LEEP from source-head probabilities ``probs`` (N, C_s) and labels ``y``; ``X`` is ignored."""
    cond = empirical_predictor(probs, y)
    eep = np.einsum("nz,nz->n", probs, cond[y])  # Σ_z P̂(y_i|z) θ(x_i)_z
    return float(np.mean(np.log(np.maximum(eep, np.finfo(np.float64).tiny))))
