"""Linear-probe baseline: cross-validated logistic-regression accuracy on frozen features.

Not a transferability *estimate* from a paper but the standard cheap ground truth (e.g. Kornblith,
Shlens, Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019, use L2-regularised logistic
regression on frozen features). Registered as a metric so it can be ranked and compared like any
other score, and used as an oracle for the scores in :mod:`transferkit.rank.evaluate`.

Defaults: features standardised inside each fold (``StandardScaler`` fitted on the training part),
multinomial ``LogisticRegression(C=1.0, max_iter=200, lbfgs)``, stratified ``n_splits=3`` folds with
shuffling seeded by ``seed``. ``n_splits`` is lowered to the size of the smallest class when that is
smaller (at least 2 samples per class are needed). Returns mean held-out accuracy in [0, 1].
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import DataError
from ._base import register

__all__ = ["linear_probe"]


@register(
    "linear_probe",
    citation="Kornblith, Shlens, Le, Do Better ImageNet Models Transfer Better?, CVPR 2019 (linear evaluation protocol)",
    stochastic=True,
)
def linear_probe(X, y, *, probs=None, seed: int = 0, n_splits: int = 3, C: float = 1.0, max_iter: int = 200) -> float:
    """Mean stratified k-fold accuracy of a standardised logistic-regression probe."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    min_count = int(np.bincount(y).min())
    if min_count < 2:
        raise DataError("linear_probe: every class needs at least 2 samples for cross-validation")
    k = max(2, min(int(n_splits), min_count))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    accs = []
    # lbfgs on (N, D) × (D, C) products: BLAS threads only add overhead here (3× slower wall on 2 cores)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for tr, te in cv.split(X, y):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(X[tr], y[tr])
            accs.append(float(np.mean(clf.predict(X[te]) == y[te])))
    return float(np.mean(accs))
