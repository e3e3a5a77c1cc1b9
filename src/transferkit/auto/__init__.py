"""``auto``: which model and which method for a target, within a budget — and how close that came to the best.

>>> import transferkit.auto
>>> res = transferkit.auto("opencv-digits", ["digits-mnist", "digits-usps"], budget="2m")     # doctest: +SKIP
>>> res["winner"]["name"], res["winner"]["test_accuracy"]                                     # doctest: +SKIP

``transferkit.auto(...)`` is :func:`search` (the module is callable); :func:`oracle` trains every arm to the
end, for measuring how close the search came. See :mod:`.search` for the algorithm, storage and resume.
"""

from __future__ import annotations

import sys
import types

from .budget import Budget, parse_budget
from .oracle import compare, oracle
from .search import DEFAULT_METHODS, LR_FACTORS, SUPPORTED, Arm, evaluate_delta, make_arms, search

__all__ = ["search", "oracle", "compare", "Budget", "parse_budget", "make_arms", "evaluate_delta", "Arm", "DEFAULT_METHODS",
           "LR_FACTORS", "SUPPORTED"]


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
