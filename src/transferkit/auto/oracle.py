"""The oracle of the ``auto`` search: every arm trained for all its epochs, each scored on the held-out split.

It answers "how close did the search come to the best of all its arms, and at what share of their compute":
the same split, arms, epochs, validation fifth and seed as :func:`~transferkit.auto.search.search`, no
pruning, no budget. Its test accuracies are a yardstick for the report and the benchmark, never an input
of the search.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

from .search import DEFAULT_METHODS, LR_FACTORS, VAL_FRACTION, _lr_factors, _methods, arm_cost, arm_schedule, make_arms


def oracle(data: Any, models: Sequence[str] | str, *, methods: Sequence[str] | str = DEFAULT_METHODS,
           epochs: int = 9, lr_factors: Sequence[float] | str = LR_FACTORS, limit: int | None = None,
           per_class: int | None = None, test_size: float = 0.3, seed: int = 0,
           model_options: dict[str, dict[str, Any]] | None = None, dataset: Any = None,
           progress: Callable[[str], None] | None = None, split: tuple | None = None) -> dict[str, Any]:
    """Train every arm; returns ``arms`` (name, model, method, lr, val and test accuracy, seconds, epochs, cost),
    ``best`` (the arm with the best test accuracy), ``seconds`` and ``cost`` (total training compute: seconds,
    and epochs of backbone training as an epoch budget counts them)."""
    from ..data.split import make_split
    from ..tune import tune
    from ..zoo import load_model

    say = progress or (lambda line: None)
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if str(m).strip()]
    opts = model_options or {}
    train, test, split = split or make_split(data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed,
                                             test_size=test_size, dataset=dataset)
    zms = {n: load_model(n, **opts.get(n, {})) for n in names}
    arms = make_arms(names, _methods(methods), _lr_factors(lr_factors), {n: zms[n].modality for n in names})
    rows = []
    for arm in arms:
        t0 = time.perf_counter()
        arm_epochs = arm_schedule(arm.method, epochs)
        res = tune(zms[arm.model], train, test, method=arm.method,
                   config={"lr": arm.lr, "epochs": arm_epochs, "seed": seed}, val_fraction=VAL_FRACTION,
                   progress=False)
        history = [h for h in res.history if "val_accuracy" in h]
        acc = float(res.metrics["test_accuracy"])
        rows.append({"name": arm.name, "model": arm.model, "method": arm.method, "lr": arm.lr,
                     "val_accuracy": float(history[-1]["val_accuracy"]) if history else None,
                     "test_accuracy": acc, "seconds": round(time.perf_counter() - t0, 3),
                     "epochs": float(arm_epochs), "cost": arm_cost(arm.method, arm_epochs)})
        say(f"oracle {len(rows)}/{len(arms)}: {arm.name}: test {acc:.4f}")
    best = max(rows, key=lambda r: r["test_accuracy"])
    n = len(test)
    return {"data": split.data, "n_test": n, "arms": rows,
            "best": {**best, "test_se": math.sqrt(best["test_accuracy"] * (1 - best["test_accuracy"]) / n)},
            "seconds": round(sum(r["seconds"] for r in rows), 3), "cost": float(sum(r["cost"] for r in rows))}


def compare(res: dict, orc: dict) -> dict:
    """The search's winner against the oracle: accuracy ÷ the best arm's, compute ÷ all arms' compute (epochs
    of backbone training, and seconds — the search's seconds include its first feature extractions, the
    oracle's hit the cache)."""
    win, best = res["winner"], orc["best"]
    cost = sum(a["cost"] for a in res["arms"])
    seconds = sum(a["seconds"] for a in res["arms"])
    acc = win["test_accuracy"] / best["test_accuracy"] if best["test_accuracy"] else float("nan")
    share = cost / orc["cost"] if orc["cost"] else float("nan")
    return {**orc, "accuracy_ratio": acc, "compute_ratio_epochs": share,
            "compute_ratio_seconds": seconds / orc["seconds"] if orc["seconds"] else None,
            "headline": f"auto chose {win['name']}: {100 * acc:.1f} % of the best of all {len(orc['arms'])} arms "
                        f"({best['name']}, test {best['test_accuracy']:.4f}), at {100 * share:.1f} % of their "
                        f"training epochs"}
