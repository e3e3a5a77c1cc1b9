"""The per-task data of a merge: each run's recorded held-out part (evaluation) and training part (Fisher).

A tuned Delta records its train/test split in ``meta["split"]`` (:class:`transferkit.data.split.Split`).
Everything here reuses that record through :func:`transferkit.data.split.held_out` instead of splitting
the data again:

- :func:`evaluate_merged` scores the merged body (with each task's own head) and each individual
  fine-tune on exactly the items the run held out — never on items it was trained on. Data named for a
  task must be the run's recorded data (else a one-line :class:`~transferkit.errors.DataError`); a Delta
  that records no split is refused unless its test set is passed explicitly (``test_sets=``).
- :func:`task_fishers` estimates each model's diagonal Fisher on its training part only.

Library code: nothing here prints; progress goes to an optional ``progress(line)`` callback.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from ..errors import ConfigError, DataError, ModelError

__all__ = ["task_split", "evaluate_merged", "task_fishers", "load_base"]


def task_split(delta, data: Any = None, *, what: str = "this model",
               instead: str = "evaluate_merged(..., test_sets=[...])"):
    """``(train, test)`` of the split recorded in ``delta.meta["split"]``, reloaded.

    data : the data asked for (a spec, or an in-memory :class:`~transferkit.data.Dataset`); None: the
        recorded data. Data that is not the recorded data is refused (one-line DataError).
    instead : the Python alternative the error names for a Delta that records no split.
    """
    from ..data import Dataset
    from ..data.split import held_out

    record = delta.meta.get("split")
    if record is None:
        raise DataError(f"{what} records no held-out split (its Delta has no meta['split']), so the items it was "
                        f"not trained on are unknown; tune it again with this version of transferkit (Python: "
                        f"give its data explicitly, {instead})")
    if isinstance(data, Dataset):
        return held_out(record, dataset=data, what=what)
    return held_out(record, data, what=what)


def load_base(base: Any):
    """A ZooModel from a zoo name / path (a loaded ZooModel is returned as is)."""
    if not isinstance(base, str):
        return base
    from ..zoo import load_model

    return load_model(base)


def _head_classes(delta, what: str) -> int:
    from ..delta import NEW

    w = delta.tensors.get(NEW + "head.weight")
    if w is None:
        raise ConfigError(f"{what} has no task head (new.head.weight); it must be a `transferkit tune` run folder")
    return int(w.shape[0])


def _classifier(zm, delta, n_classes: int):
    from ..delta import apply
    from ..zoo import Classifier

    clf = Classifier(copy.deepcopy(zm.backbone), zm.feature_dim, n_classes)
    try:
        apply(clf, delta)
    except ModelError as exc:
        raise ConfigError(f"the merged model does not fit the base model: {exc}") from None
    return clf.eval()


def _names(deltas, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(deltas):
            raise ConfigError(f"{len(names)} names for {len(deltas)} models")
        return [str(n) for n in names]
    return [str(d.meta.get("name") or f"model {i}") for i, d in enumerate(deltas)]


def _per_task(values: Sequence[Any] | None, n: int, what: str) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ConfigError(f"{what}: {len(values)} given for {n} models (one per model)")
    return values


def evaluate_merged(merged, deltas: Sequence, tasks: Sequence[Any] | None = None, base: Any = None, *,
                    test_sets: Sequence[Any] | None = None, names: Sequence[str] | None = None,
                    batch_size: int = 128, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Held-out accuracy of the merged model on each task, next to that task's individual fine-tune.

    Parameters
    ----------
    merged : the merged Delta (its body; task i is scored with delta i's head, unless it carries heads).
    deltas : the merged fine-tunes (Deltas with a ``new.head``), in task order.
    tasks : one data spec per delta (None, or None entries: the data recorded in the delta's split). Each
        must be the delta's recorded data; its recorded held-out part is what is scored.
    base : the base model (zoo name / path or a loaded ZooModel); default ``deltas[0].base``.
    test_sets : explicit test Datasets, one per delta, instead of the recorded split (for Deltas that
        record none); the caller vouches that they were held out.
    names : display names (default ``meta["name"]``).

    Returns
    -------
    ``{"tasks": [{"model", "data", "n", "test_sha256", "merged", "individual", "normalized"}, …],
    "merged_avg", "individual_avg", "normalized_avg", "split"}``; normalized = merged ÷ individual.
    """
    from ..engine import evaluate
    from ..tune._common import Pairs, make_collate
    from ._common import attach_head, heads

    deltas = list(deltas)
    labels = _names(deltas, names)
    specs = _per_task(tasks, len(deltas), "tasks")
    given = _per_task(test_sets, len(deltas), "test_sets") if test_sets is not None else None
    parts = []
    for i, d in enumerate(deltas):  # resolve every task's data first: a bad one fails before any scoring
        if given is not None:
            test = given[i]
            parts.append((test, getattr(test, "name", f"test set {i}"), None))
        else:
            _, test = task_split(d, specs[i], what=labels[i])
            rec = d.meta["split"]
            parts.append((test, str(specs[i]) if specs[i] is not None else rec["data"], rec.get("test_sha256")))
    zm = load_base(base if base is not None else deltas[0].base)
    collate = make_collate(zm.preprocess)
    rows = []
    for d, label, (test, data_label, sha) in zip(deltas, labels, parts):
        n_classes = _head_classes(d, label)
        if len(test.classes) != n_classes:
            raise ConfigError(f"{data_label} has {len(test.classes)} classes but the head of {label} has {n_classes}")
        pairs = Pairs(test.X, test.y)
        with_head = merged if heads(merged) else attach_head(merged, d)
        acc_m = float(evaluate(_classifier(zm, with_head, n_classes), pairs, collate_fn=collate,
                               batch_size=batch_size)["accuracy"])
        acc_i = float(evaluate(_classifier(zm, d, n_classes), pairs, collate_fn=collate,
                               batch_size=batch_size)["accuracy"])
        rows.append({"model": label, "data": data_label, "n": len(test.y), "test_sha256": sha, "merged": acc_m,
                     "individual": acc_i, "normalized": acc_m / acc_i if acc_i > 0 else float("nan")})
        if progress:
            progress(f"evaluate: {label} on {data_label}: merged {acc_m:.4f}, individual {acc_i:.4f}")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"split": "given test sets" if given is not None else "each run's recorded held-out part",
            "tasks": rows, "merged_avg": mean("merged"), "individual_avg": mean("individual"),
            "normalized_avg": mean("normalized")}


def task_fishers(deltas: Sequence, train_sets: Sequence[Any], base: Any, options: Any = None, *,
                 names: Sequence[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Each fine-tune's diagonal Fisher (body parameters) on its training data ``train_sets[i]``.

    ``options``: a :class:`~transferkit.merge.fisher.FisherOptions` (``n_examples``, ``batch_size``,
    ``empirical``); the Fisher is estimated on the first ``n_examples`` items.
    """
    from .fisher import FisherOptions, compute_fisher

    opts = options if options is not None else FisherOptions()
    deltas = list(deltas)
    labels = _names(deltas, names)
    train_sets = _per_task(train_sets, len(deltas), "train_sets")
    zm = load_base(base if base is not None else deltas[0].base)
    out = []
    for d, label, train in zip(deltas, labels, train_sets):
        clf = _classifier(zm, d, _head_classes(d, label))
        params = [k for k, _ in clf.named_parameters() if not k.startswith("head.")]
        for prm in clf.parameters():
            prm.requires_grad_(True)
        m, bs = min(opts.n_examples, len(train.y)), opts.batch_size
        batches = [(zm.preprocess(_rows(train.X, s, bs)), _labels(train.y, s, bs)) if opts.empirical
                   else zm.preprocess(_rows(train.X, s, bs)) for s in range(0, m, bs)]
        if progress:
            progress(f"fisher: {label} on {m} training examples")
        try:
            f = compute_fisher(clf, batches, empirical=opts.empirical, n_examples=opts.n_examples, params=params,
                               method="vmap")
        except Exception:  # noqa: BLE001 - torch.func cannot trace every model: exact per-example loop instead
            f = compute_fisher(clf, batches, empirical=opts.empirical, n_examples=opts.n_examples, params=params,
                               method="loop")
        out.append(f)
    return out


def _rows(X, s: int, bs: int):
    import numpy as np

    part = X[s:s + bs]
    return [str(x) for x in part] if not isinstance(part, np.ndarray) or part.dtype.kind in "UO" else part


def _labels(y, s: int, bs: int):
    import torch

    return torch.as_tensor(y[s:s + bs]).long()
