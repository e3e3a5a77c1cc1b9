"""NCE: Negative Conditional Entropy.

Paper: A. T. Tran, C. V. Nguyen, T. Hassner, "Transferability and Hardness of Supervised
Classification Tasks", ICCV 2019.

With z_i = argmax of the source head's probabilities (``probs``) and target labels y_i::

    P̂(y, z) = #{i : y_i = y, z_i = z} / N
    NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z)        (≤ 0, higher is better)

Needs only the hard source predictions; pass them as ``probs`` (the argmax is taken; ties go to the
lowest index) or use :func:`nce_from_labels` with integer source predictions.
"""

from __future__ import annotations

import numpy as np

from ._base import register

__all__ = ["nce", "nce_from_labels"]


def nce_from_labels(z: np.ndarray, y: np.ndarray) -> float:
    """−H(Y|Z) for integer source predictions ``z`` and target labels ``y`` (both 0-based)."""
    z = np.asarray(z, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= n
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    cond = np.divide(joint, pz, out=np.ones_like(joint), where=pz > 0)
    return float(np.sum(joint[nz] * np.log(cond[nz])))


@register(
    "nce",
    citation="Tran, Nguyen, Hassner, Transferability and Hardness of Supervised Classification Tasks, ICCV 2019",
    needs=("probs",),
)
def nce(X, y, *, probs=None, seed: int = 0) -> float:
    """NCE from the argmax of ``probs`` (N, C_s) and labels ``y``; ``X`` is ignored."""
    return nce_from_labels(np.argmax(probs, axis=1), y)
