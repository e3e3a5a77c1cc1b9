"""The :func:`adapt` entry point: one method, one source → target shift, the held-out target part scored.

A method whose options have ``labelled_per_class`` (k) is semi-supervised: it is given the labels of k items
per class of the target's *training* part (:func:`few_labels`: stratified, seeded), and no other target label;
the held-out part is never trained on, whatever the method.

A source whose classes are not the target's needs an explicit ``label_map`` (source class → target class;
:func:`map_source`): the source is relabelled before any method sees it, source classes left out of the map
are dropped (partial adaptation: the target's label set is a subset of the source's), and every target class
must receive source items — there is no open-set option (a target class unseen in the source has nothing to
align with).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import registry
from ..data.dataset import Dataset, validate
from ..errors import ConfigError, DataError
from ._common import STAGE, match_images, unlabelled

__all__ = ["AdaptResult", "adapt", "ADAPT_FILES", "check_method", "few_labels", "map_source"]

# what an adapt run writes into its folder: metrics, the target's split record, the training curve, the
# held-out predictions (with the split's test ids) and the adapted classifier's state (Tent, CoTTA and reset
# models normalise with batch statistics: their BatchNorm layers have no running statistics)
ADAPT_FILES = ("metrics.json", "split.json", "history.json", "predictions.json", "model.safetensors")


@dataclass
class AdaptResult:
    method: str
    model: str
    metrics: dict[str, Any]
    predictions: dict[str, np.ndarray]
    history: list[dict] = field(default_factory=list)
    module: nn.Module | None = None
    out_dir: Path | None = None


def check_method(method: Any) -> registry.Method:
    """The registered adapt method ``method``; a scorer, a zero-shot method or an unknown name is a one-line
    ConfigError."""
    m = registry.get(STAGE, method)
    kind = m.info.get("kind")
    if kind in ("scorer", "zero-shot"):
        methods = [n for n, x in registry.methods(STAGE).items() if x.info.get("kind") not in ("scorer", "zero-shot")]
        what = ("a model-selection scorer" if kind == "scorer"
                else "a zero-shot method (Python: transferkit.adapt.zeroshot.zero_shot)")
        raise ConfigError(f"{method!r} is {what}, not an adapt method; methods: {', '.join(methods)}")
    return m


def few_labels(ds: Dataset, k: int, seed: int) -> np.ndarray:
    """Sorted positions of ``k`` labelled items of each class of ``ds``, drawn without replacement (seeded);
    a class with fewer than ``k`` labelled items is a one-line DataError."""
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(ds.classes):
        have = np.flatnonzero(ds.y == c)
        if len(have) < k:
            raise DataError(f"labelled_per_class {k} is more than the {len(have)} labelled item(s) of class "
                            f"{name!r} in the training part of the target {ds.name!r}")
        picked.append(rng.choice(have, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def map_source(source: Dataset, label_map: Any, classes: list[str]) -> Dataset:
    """``source`` relabelled through ``label_map`` (source class name → class name of ``classes``, the
    target's): items of unmapped source classes are dropped; the result has ``classes``. One-line errors for
    a map that is not a mapping of names, names a class the source lacks or a class not in ``classes``, and
    for a target class that receives no source item."""
    if not isinstance(label_map, dict) or not label_map:
        raise ConfigError(f"label_map must be a non-empty mapping source class → target class, got "
                          f"{registry.short(label_map)}")
    lm = {str(k): str(v) for k, v in label_map.items()}
    if unknown := [k for k in lm if k not in source.classes]:
        raise ConfigError(f"label_map maps {unknown[0]!r}, not a class of the source {source.name!r}"
                          f"{registry.did_you_mean(unknown[0], source.classes)} (classes: "
                          f"{registry.short(source.classes)})")
    if bad := [v for v in lm.values() if v not in classes]:
        raise ConfigError(f"label_map maps to {bad[0]!r}, not a class of the target{registry.did_you_mean(bad[0], classes)}"
                          f" (classes: {registry.short(classes)})")
    new = np.array([classes.index(lm[c]) if c in lm else -1 for c in source.classes], dtype=np.int64)
    keep = source.labelled & (new[np.maximum(source.y, 0)] >= 0)
    out = source.subset(keep)
    out.y = new[out.y]
    out.classes = list(classes)
    if empty := [c for c, n in out.class_counts().items() if n == 0]:
        raise DataError(f"label_map gives the target class {empty[0]!r} no source item; every target class "
                        "needs labelled source items (open-set adaptation is not supported)")
    return out


def adapt(model, source: Dataset, target_train: Dataset, target_test: Dataset, *, method: str,
          options: dict | None = None, seed: int = 0, out_dir: str | Path | None = None, split=None,
          progress: bool = False, label_map: dict | None = None) -> AdaptResult:
    """Adapt ``model`` (a ZooModel) from the labelled ``source`` to the target with ``method``.

    ``target_train`` is used without its labels (DANN trains on it; test-time methods do not use it), except
    the ``labelled_per_class`` items per class of a semi-supervised method (``metrics["target_labels_used"]``:
    their positions in ``target_train``);
    ``target_test`` is the held-out part: the methods see only its items (test-time methods adapt on them as
    a stream), and its labels, when it has any, only score the predictions (``accuracy``; test-time methods
    also ``source_only_accuracy``, the source model's). ``options`` are the method's options
    (``transferkit adapt --list``), typed and range-checked before anything runs. ``split`` is the record of
    the target's train/test split (written to ``out_dir/split.json``). ``label_map`` (source class → target
    class, :func:`map_source`) is required when the source's classes are not the target's.
    """
    m = check_method(method)
    opts = m.parse(options)
    if model.modality not in m.info.get("modality", ()):
        raise ConfigError(f"adapt method {method!r} supports {' and '.join(m.info['modality'])} models; "
                          f"{model.name!r} is a {model.modality} model")
    for ds, what in ((source, "source"), (target_train, "target"), (target_test, "target")):
        if not isinstance(ds, Dataset):
            raise DataError(f"the {what} must be a transferkit Dataset, got {type(ds).__name__}")
        if len(ds) == 0:
            raise DataError(f"the {what} {ds.name!r} is empty")
        if ds.modality != model.modality:
            raise DataError(f"model {model.name!r} takes {model.modality} inputs but the {what} {ds.name!r} is "
                            f"{ds.modality} data")
    validate(source)  # labelled, ≥ 2 classes
    n_source = len(source)
    if label_map is not None:
        classes = target_train.classes or target_test.classes
        if not classes:
            raise DataError(f"label_map needs the target's class names, and the target {target_train.name!r} "
                            "has none")
        source = validate(map_source(source, label_map, list(classes)))
    for ds in (target_train, target_test):
        if ds.classes and ds.classes != source.classes:
            raise DataError(f"the target {ds.name!r} has classes {registry.short(ds.classes)} but the source "
                            f"{source.name!r} has {registry.short(source.classes)}; map them with a label map "
                            "(label_map / --label-map FILE: source class → target class); open-set adaptation "
                            "is not supported")
    source, target_train, target_test = match_images(model, source, target_train, target_test)
    given, used = unlabelled(target_train), np.zeros(0, dtype=np.int64)
    if hasattr(opts, "labelled_per_class"):  # semi-supervised: k labels per class of the training part only
        used = few_labels(target_train, opts.labelled_per_class, seed)
        given.y[used] = target_train.y[used]
    t0 = time.perf_counter()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # the caller's random state is left as it was
        fitted = m.fn(model, source, given, target_test.X, options=opts, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"method": method, "model": model.name, "source": source.name,
                               "target": target_test.name, "seed": seed, "n_source": len(source),
                               "n_target_train": len(target_train), "n_test": len(target_test),
                               "target_labels_ignored": int(target_train.labelled.sum()) - len(used),
                               **({"label_map": {str(k): str(v) for k, v in label_map.items()},
                                   "source_items_dropped": n_source - len(source)} if label_map is not None else {}),
                               "seconds": round(seconds, 2), **fitted.extra}
    if hasattr(opts, "labelled_per_class"):
        metrics["target_labels_used"] = used.tolist()
    has = target_test.labelled
    if has.any():  # the held-out labels' only use
        for name, pred in fitted.predictions.items():
            key = "accuracy" if name == "adapted" else f"{name}_accuracy"
            metrics[key] = float((pred[has] == target_test.y[has]).mean())
        metrics["n_scored"] = int(has.sum())
    metrics["options"] = asdict(opts) if opts is not None else {}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _write(out, metrics, fitted, split)
    return AdaptResult(method, model.name, metrics, fitted.predictions, fitted.history, fitted.module, out)


def _write(out: Path, metrics: dict, fitted, split) -> None:
    from ..data.split import write_split
    from ..engine import is_main_process
    from ..io import mark, save_safetensors, write_json

    if not is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    if split is not None:
        write_split(out, split)
    write_json(out / "history.json", fitted.history)
    write_json(out / "predictions.json", {
        "test_ids": list(split.test_ids) if split is not None else None,
        **{k: v.tolist() for k, v in fitted.predictions.items()}})
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in fitted.module.state_dict().items()},
                     out / "model.safetensors")
    write_json(out / "metrics.json", metrics)  # last: its presence means the run finished
    mark(out, "adapt")
