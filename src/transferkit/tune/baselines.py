"""Baselines every transfer method is measured against, and the :func:`tune` entry point.

- ``linear``: the backbone is frozen; features are extracted once (cached) and only a new linear
  head is trained on them with the engine (cross-entropy, AdamW). Delta kind ``head``.
- ``full``: backbone and new head are trained end to end on the raw data through the model's
  preprocessing. Delta kind ``full`` (task vector of the backbone + the new head).

The other methods live in their own modules and register there (:mod:`transferkit.registry`, stage
``tune``); :func:`tune` runs ``registry.get("tune", method).fn``.

Every method writes a run folder: ``delta/`` (safetensors + JSON), ``metrics.json``, ``history.json``
(the training curve) and ``curve.png``; PEFT methods also ``peft/`` (loadable with
``peft.PeftModel.from_pretrained``); a run given its :class:`~transferkit.data.split.Split` also
``split.json`` (the same record as the Delta's ``meta["split"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from .. import registry
from ..data.dataset import split_mask
from ..data.split import Split, read_split, write_split
from ..delta import NEW, Delta, from_states
from ..engine import CrossEntropy, TrainConfig, evaluate, is_main_process, train
from ..errors import ConfigError, DataError
from ..zoo.base import head_seed
from ._common import Fitted, Pairs, TuneResult, fit_and_evaluate, make_collate, plot_curve
from .registry import STAGE, PEFT_TRAIN, split_config

__all__ = ["TuneResult", "tune"]

_Pairs = Pairs  # backwards-compatible names
_collate = make_collate
_plot_curve = plot_curve


def tune(model, train_data, test_data=None, *, method: str = "linear", config: dict | None = None,
         out_dir: str | Path | None = None, resume: bool = False, val_fraction: float = 0.1,
         progress: bool = True, split: Split | None = None) -> TuneResult:
    """Adapt ``model`` (a ZooModel) to ``train_data`` with ``method``; evaluate on ``test_data``.

    ``config`` mixes method options (``r``, ``bottleneck``, … — ``transferkit tune --list`` or
    ``registry.describe(registry.get("tune", method))``) and training options
    (:class:`~transferkit.engine.TrainConfig`: ``epochs``, ``lr``, …); method options may also be nested
    under ``config["options"]``. Both are typed and range-checked before anything runs
    (:func:`~transferkit.tune.registry.split_config`): a bad value is a one-line ConfigError.

    ``split`` is the record of the train/test split ``train_data``/``test_data`` came from
    (:func:`~transferkit.data.split.make_split`); it is kept in the Delta's ``meta["split"]`` and written
    to ``out_dir/split.json``, so later evaluations use exactly the held-out items. With ``resume``, a run
    folder whose ``split.json`` records another split is refused (DataError).

    A validation split (``val_fraction`` of the training data, stratified) drives early stopping
    and best-checkpoint selection; the test split is only used for the final metrics. The caller's
    ``model`` is never modified: methods that change the backbone work on a copy.

    New modules (the head, and a method's adapters or side network) are initialised from
    :func:`~transferkit.zoo.head_seed` ``(seed, train_data.classes)``: the same label set and seed give
    the same start (one θ_pre for merging fine-tunes of one task), different label sets independent ones
    (per-task heads of merged tasks must not start from one matrix). The seed itself drives the data
    order, the validation split and dropout.

    Examples
    --------
    >>> res = tune(load_model("all-minilm-l6-v2"), train, test, method="lora",
    ...            config={"r": 8, "epochs": 2}, out_dir="runs/lora")            # doctest: +SKIP
    >>> res.metrics["test_accuracy"], res.metrics["trainable_pct"]             # doctest: +SKIP
    """
    m = registry.get(STAGE, method)
    options, train_opts = split_config(method, config)
    modality = m.info.get("modality", ())
    if model.modality not in modality:
        raise ConfigError(f"tune method {method!r} supports {' and '.join(modality)} models; "
                          f"{model.name!r} is a {model.modality} model")
    for ds in (train_data, test_data):  # before any method builds or trains anything
        if ds is not None and getattr(ds, "modality", model.modality) != model.modality:
            raise DataError(f"model {model.name!r} takes {model.modality} inputs but {ds.name!r} is "
                            f"{ds.modality} data")
    cfg = TrainConfig.from_dict({**train_opts, "progress": progress})
    opts = dataclasses.asdict(options) if options is not None else {}
    out_dir = Path(out_dir) if out_dir else None
    if split is not None:
        _check_split(split, train_data, test_data, out_dir, resume)
    n_classes = len(train_data.classes)
    val_mask = split_mask(train_data, val_fraction, cfg.seed) if val_fraction > 0 else np.zeros(len(train_data), bool)
    fit, val = train_data.subset(~val_mask), (train_data.subset(val_mask) if val_mask.any() else None)
    init_seed = head_seed(cfg.seed, train_data.classes)
    t0 = time.perf_counter()
    # every initialisation a method draws from the global RNG (adapters, prefixes, PEFT's lora_A) starts
    # from init_seed, so one seed gives one run (and a resumed run the same start); the caller's RNG is kept
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(init_seed)
        fitted: Fitted = m.fn(model, fit, val, test_data, n_classes=n_classes, method=method, options=opts,
                              cfg=cfg, out_dir=out_dir, resume=resume, progress=progress,
                              train_data=train_data, val_mask=val_mask, init_seed=init_seed)
    seconds = time.perf_counter() - t0
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    trainable = fitted.trainable_params
    added = fitted.extra.pop("added_params", 0)
    # total_params: parameters of the tuned model (backbone + what the method added, head included);
    # the linear probe keeps its historical count (the source model, source head included, + new head)
    total = model.n_params() + trainable if method == "linear" else backbone_params + added
    metrics = {
        "method": method, "model": model.name, "seconds": round(seconds, 2),
        "trainable_params": trainable, "total_params": total,
        "trainable_pct": round(100.0 * trainable / max(total, 1), 4),
        **fitted.extra,
        **{(k if k.startswith(("val_", "train_")) else f"train_{k}"): v for k, v in fitted.train_metrics.items()},
        **{f"test_{k}": v for k, v in fitted.test_metrics.items() if isinstance(v, (int, float))},
    }
    delta = fitted.delta
    delta.meta.update({"method": method, "classes": list(train_data.classes), "options": opts,
                       "config": cfg.__dict__ | {}})
    if split is not None:
        delta.meta["split"] = split.to_dict()
    if out_dir and is_main_process():  # under torchrun every rank holds the same result; one writes
        from ..io import write_json

        delta.save(out_dir / "delta")
        write_json(out_dir / "metrics.json", metrics)
        plot_curve(fitted.history, out_dir / "curve.png")
    return TuneResult(method, model.name, delta, metrics, fitted.history, out_dir, fitted.module)


def _check_split(split: Split, train_data, test_data, out_dir: Path | None, resume: bool) -> None:
    """``split`` must describe ``train_data``/``test_data``; a resumed folder must record the same split.

    The record is written to ``out_dir/split.json`` before training, so a killed run keeps it for ``--resume``.
    """
    if not isinstance(split, Split):
        raise ConfigError(f"split must be a transferkit.data.split.Split, got {type(split).__name__}")
    n_test = len(test_data) if test_data is not None else None
    if n_test is not None and (n_test != len(split.test_ids) or len(train_data) + n_test != split.n):
        raise DataError(f"the split record ({split.n} items, {len(split.test_ids)} held out) does not describe "
                        f"this data ({len(train_data)} training + {n_test} test items)")
    if out_dir is None:
        return
    if resume:
        before = read_split(out_dir)
        if before is not None and before.to_dict() != split.to_dict():
            raise DataError(f"cannot resume {out_dir}: it was started on another split ({_what(before)}), not "
                            f"{_what(split)}; resume with the same data options or use a new --out")
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_split(out_dir, split)


def _what(s: Split) -> str:
    sub = ", ".join(f"{k} {v}" for k, v in (("limit", s.limit), ("per_class", s.per_class)) if v is not None)
    return f"data {s.data}{', ' + sub if sub else ''}, seed {s.seed}, {len(s.test_ids)} of {s.n} held out"


def _run_linear(model, fit, val, test, *, n_classes, cfg, out_dir, resume, progress, train_data, val_mask,
                init_seed, **_) -> Fitted:
    from ..features import extract

    clf = model.classifier(n_classes, seed=init_seed)
    head = clf.head
    # one extraction of the whole training set (a cache hit after `rank`), split by the same mask
    whole = extract(model, train_data, progress=progress)
    feats = {"fit": whole.subset(np.flatnonzero(~val_mask))}
    if val is not None:
        feats["val"] = whole.subset(np.flatnonzero(val_mask))
    if test is not None:
        feats["test"] = extract(model, test, progress=progress)
    collate = lambda items: {"inputs": torch.from_numpy(np.stack([x for x, _ in items])),  # noqa: E731
                             "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
    pairs = {k: Pairs(f.X, f.y) for k, f in feats.items()}
    result = train(head, pairs["fit"], CrossEntropy(), cfg, val_data=pairs.get("val"), collate_fn=collate,
                   out_dir=out_dir, resume=resume)
    test_metrics = evaluate(head, pairs["test"], collate_fn=collate) if "test" in pairs else {}
    delta = Delta(model.name, "head", {NEW + "head." + k: v.detach().clone() for k, v in head.state_dict().items()})
    return Fitted(delta, result.metrics, result.history, test_metrics, delta.n_params(), None)


def _run_full(model, fit, val, test, *, n_classes, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    clf = model.classifier(n_classes, seed=init_seed)
    clf.backbone = copy.deepcopy(model.backbone)  # the caller's ZooModel stays the pretrained source
    base_state = {"backbone." + k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    for p in clf.parameters():
        p.requires_grad_(True)
    result, test_metrics = fit_and_evaluate(clf, model, fit, val, test, cfg, out_dir, resume)
    tuned = {"backbone." + k: v for k, v in clf.backbone.state_dict().items()}
    tuned.update({"head." + k: v for k, v in clf.head.state_dict().items()})
    delta = from_states(base_state, tuned, base_name=model.name)
    head = sum(p.numel() for p in clf.head.parameters())
    trainable = sum(p.numel() for p in clf.parameters())  # not the Delta's size: BN running stats change too
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, clf,
                  {"added_params": head, "head_params": head})


_BASELINE, _ANY = "baseline", ["image", "text"]
registry.register(
    STAGE, "linear", fn=_run_linear, family=_BASELINE, modality=_ANY,
    summary="Linear probe: frozen backbone, new linear head trained on cached features.",
    paper="Kornblith, Shlens, Le. Do Better ImageNet Models Transfer Better? CVPR 2019",
    train={"epochs": 30, "lr": 1e-2, "batch_size": 64, "weight_decay": 1e-4, "scheduler": "cosine"})
registry.register(
    STAGE, "full", fn=_run_full, family=_BASELINE, modality=_ANY,
    summary="Full fine-tuning: every backbone parameter and a new linear head.",
    paper="Howard & Ruder. Universal Language Model Fine-tuning (ULMFiT), ACL 2018",
    train={**PEFT_TRAIN, "lr": 5e-5})
