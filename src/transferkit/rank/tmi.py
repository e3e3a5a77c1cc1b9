"""TMI: transferability as intra-class feature variance (k-NN entropy).

Paper: H. Xu, U. Kang, "Fast and Accurate Transferability Measurement by Evaluating Intra-class
Feature Variance", ICCV 2023. Re-implemented from the paper's description (the reference code,
snudatalab/TMI, carries a non-commercial licence and is not used).

Features are centred globally. For every class c with n_c ≥ 2 samples, the differential entropy of
its features is estimated with the Kozachenko–Leonenko k-NN estimator under the max-norm (whose unit
ball has volume 2^d, i.e. log c_d = 0 with diameters)::

    h_c = −ψ(k) + ψ(n_c) + (d / n_c) Σ_i log(2 r_i)

r_i = distance from x_i to its k-th nearest neighbour in the class (``k = 3``, reduced to n_c − 1
for tiny classes), clamped below at ``min_dist = 1.0`` (the paper's guard against duplicate points).
TMI = mean_c (p_c · h_c) over classes with finite h_c, p_c = n_c / N — an estimate (up to the factor
1/C) of H(X | Y). Higher intra-class variance = less collapsed features = higher score.

Caveats (documented, not fixed): the (d/n_c) Σ log r term makes the score scale-dependent (features
with larger norms win), the 1.0 clamp interacts with the scale, and k-NN entropy is unreliable for
d in the thousands with small n_c. TMI does not depend on how far apart the classes are — only on
the within-class spread.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist, pdist, squareform
from scipy.special import digamma

from ._base import register
from ._shared import centred

__all__ = ["tmi", "kl_entropy"]


def kl_entropy(Z: np.ndarray, k: int = 3, min_dist: float = 1.0, workers: int = 1) -> float:
    """Kozachenko–Leonenko entropy (nats) of the rows of Z under the max-norm."""
    n, d = Z.shape
    k = int(min(k, n - 1))
    if k < 1:
        return float("nan")
    if d > 32:  # a k-d tree degenerates to brute force in high dimension: pairwise distances, in row blocks
        step = max(1, 4_000_000 // n)
        if step >= n:  # one block: pdist computes each pair once (half of cdist's work; max-norm distances are exact)
            kth = np.partition(squareform(pdist(Z, "chebyshev")), k, axis=1)[:, k]
        else:
            kth = np.concatenate([np.partition(cdist(Z[i:i + step], Z, "chebyshev"), k, axis=1)[:, k]
                                  for i in range(0, n, step)])
    else:
        kth = cKDTree(Z).query(Z, k=k + 1, p=np.inf, workers=workers)[0][:, k]
    r = np.maximum(kth, min_dist)
    return float(-digamma(k) + digamma(n) + d * np.mean(np.log(2.0 * r)))


@register(
    "tmi",
    citation="Xu, Kang, Fast and Accurate Transferability Measurement by Evaluating Intra-class Feature Variance, ICCV 2023",
)
def tmi(X, y, *, probs=None, seed: int = 0, k: int = 3, min_dist: float = 1.0, workers: int = 1) -> float:
    """Mean over classes of p_c · h_c (k-NN entropy of the class's centred features)."""
    Z = centred(X)
    n = len(y)
    vals = []
    for c in range(int(y.max()) + 1):
        Zc = Z[y == c]
        if len(Zc) < 2:
            continue
        h = kl_entropy(Zc, k=k, min_dist=min_dist, workers=workers)
        if np.isfinite(h):
            vals.append(len(Zc) / n * h)
    return float(np.mean(vals)) if vals else float("nan")
