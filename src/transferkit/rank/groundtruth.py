"""Measured transfer accuracy of candidate models (or layers): the ground truth that rankings are judged by.

Two protocols, both cached on disk under ``<transferkit cache>/groundtruth/`` keyed by the model
(name or fingerprint, preprocessing, the files of a local model directory), the tap, the train and test
data fingerprints, the protocol and its configuration, so a re-run of ``transferkit rank
--ground-truth …`` or of ``benchmarks/rank_zoo.py`` is cheap:

* ``linear`` — linear probe on the (cached) frozen features at ``tap``: features standardised with the
  training statistics, multinomial logistic regression (L-BFGS) for every inverse regularisation C in
  a small grid; C is chosen on a stratified validation split of the training data (``val_fraction``),
  the model is refitted on all training data with that C and scored on the test split.
* ``finetune`` — full fine-tuning through :func:`transferkit.tune.tune` (``method="full"``: backbone and
  a new linear head) for every learning rate in a small grid (defaults per modality below); the lr is
  chosen by the validation accuracy of ``tune``'s own validation split (ties: lower validation loss,
  then the smaller lr), and that run's test accuracy is the ground truth.

Both report the accuracy of the validation-selected setting (``accuracy``) and, for reference, the best
test accuracy over the grid (``oracle_accuracy``, optimistic). The test-set class probabilities of the
selected setting are cached too (``test_probs``), the oracle for ensemble selection (averaged members).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["FINETUNE_LRS", "LINEAR_CS", "PROTOCOLS", "cache_key", "grid_edge_notes", "gt_cache_dir", "measure"]

PROTOCOLS = ("linear", "finetune")
VERSION = 1
# Few-shot targets give few optimizer steps: a constant, fairly high lr trains the new head in time
# (with 1e-4 and a decaying schedule over ~12 steps the head stayed near chance in our runs).
FINETUNE_LRS = {"image": (3e-3, 1e-3), "text": (3e-4, 1e-4)}
FINETUNE_DEFAULTS = {"epochs": 3, "batch_size": 16, "weight_decay": 0.01, "scheduler": "constant", "warmup_ratio": 0.0}
LINEAR_CS = (0.01, 0.1, 1.0, 10.0)


def gt_cache_dir() -> Path:
    from ..assets import cache_dir

    return cache_dir() / "groundtruth"


def _model_identity(model) -> dict[str, Any]:
    ident: dict[str, Any] = {"model": model.meta.get("fingerprint", model.name), "preprocessing": model.preprocessing}
    src = Path(str(model.meta.get("source") or model.name))
    if src.is_dir():  # a local directory: its files (size, mtime) are part of the identity
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in src.iterdir() if p.is_file())
    return ident


def cache_key(model, train, test, protocol: str, tap: str, config: dict) -> dict[str, Any]:
    return {"version": VERSION, **_model_identity(model), "tap": tap, "train": train.fingerprint(),
            "test": test.fingerprint(), "protocol": protocol, "config": config}


def _path(key: dict, name: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]
    return gt_cache_dir() / f"{safe}-{key['protocol']}-{digest}"


def measure(model, train, test, *, protocol: str = "linear", tap: str = "penultimate", config: dict | None = None,
            lrs=None, cs=None, seed: int = 0, cache: bool = True, progress: bool = False) -> dict[str, Any]:
    """Measure the transfer accuracy of ``model`` (a ZooModel or a name) from ``train`` to ``test``.

    Parameters
    ----------
    protocol : "linear" (probe on frozen features at ``tap``) or "finetune" (full fine-tuning).
    config : finetune only — training options for :func:`transferkit.tune.tune` (``epochs``,
        ``batch_size``, …; defaults :data:`FINETUNE_DEFAULTS`).
    lrs : finetune learning-rate grid (default :data:`FINETUNE_LRS` for the model's modality).
    cs : linear-probe grid of inverse L2 strengths (default :data:`LINEAR_CS`).
    cache : read/write the on-disk cache.

    Returns
    -------
    dict with ``accuracy`` (test accuracy of the validation-selected setting), ``oracle_accuracy``,
    ``selected`` (the chosen lr or C), ``grid`` (one record per setting), ``seconds`` (compute time
    of the measurement; the cached value on a cache hit), ``cached`` (bool), ``protocol``, ``tap`` and
    ``test_probs`` (N_test × C float32 array, not JSON).
    """
    from ..zoo import load_model

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown ground truth {protocol!r}; use {' or '.join(PROTOCOLS)}")
    if isinstance(model, str):
        model = load_model(model)
    if protocol == "finetune" and tap != "penultimate":
        raise ConfigError("ground truth 'finetune' measures whole models; use 'linear' to measure layers (taps)")
    if protocol == "finetune":
        cfg = {**FINETUNE_DEFAULTS, **(config or {})}
        grid = [float(v) for v in (lrs or FINETUNE_LRS.get(model.modality, (1e-4,)))]
        cfg_key = {"train": cfg, "lrs": grid, "seed": seed}
    else:
        if config:
            raise ConfigError(f"ground truth 'linear' takes no training options, got {', '.join(config)}")
        grid = [float(v) for v in (cs or LINEAR_CS)]
        cfg_key = {"cs": grid, "seed": seed}
    key = cache_key(model, train, test, protocol, tap, cfg_key)
    path = _path(key, model.name)
    if cache and (path / "result.json").is_file() and (path / "test_probs.npy").is_file():
        try:
            doc = json.loads((path / "result.json").read_text())
            doc["test_probs"] = np.load(path / "test_probs.npy")
            doc["cached"] = True
            return doc
        except (OSError, ValueError):
            pass  # unreadable cache entry: measure again
    t0 = time.perf_counter()
    if protocol == "finetune":
        doc, probs = _finetune(model, train, test, cfg, grid, seed, progress)
    else:
        doc, probs = _linear(model, train, test, tap, grid, seed, progress)
    doc.update({"model": model.name, "protocol": protocol, "tap": tap, "seconds": round(time.perf_counter() - t0, 3),
                "n_train": len(train), "n_test": len(test)})
    if cache:
        _save(path, doc, probs, key)
    return {**doc, "test_probs": probs, "cached": False}


def _save(path: Path, doc: dict, probs: np.ndarray, key: dict) -> None:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        tmp.mkdir()
        np.save(tmp / "test_probs.npy", probs.astype(np.float32))
        (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
        (tmp / "result.json").write_text(json.dumps(doc, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------- linear probe
def _linear(model, train, test, tap: str, cs: list[float], seed: int, progress: bool):
    from sklearn.linear_model import LogisticRegression

    from ..features import extract

    ftr = extract(model, train, tap=tap, progress=progress)
    fte = extract(model, test, tap=tap, progress=progress)
    C = len(train.classes)
    if len(np.unique(ftr.y)) < 2:
        raise DataError("ground truth: the training split needs at least 2 classes")
    fit_idx, val_idx = _stratified_split(ftr.y, 0.2, seed)

    def fit(X, y, c):
        mu, sd = X.mean(0), X.std(0) + 1e-8
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit((X - mu) / sd, y)
        return clf, mu, sd

    def probs_of(clf, mu, sd, X):
        p = np.zeros((len(X), C))
        p[:, clf.classes_] = clf.predict_proba((X - mu) / sd)
        return p

    Xtr, ytr = ftr.X.astype(np.float64), ftr.y
    Xte, yte = fte.X.astype(np.float64), fte.y
    records = []
    for c in cs:
        rec = {"C": c}
        if len(np.unique(ytr[fit_idx])) >= 2 and len(val_idx):
            clf, mu, sd = fit(Xtr[fit_idx], ytr[fit_idx], c)
            pv = probs_of(clf, mu, sd, Xtr[val_idx])
            rec["val_accuracy"] = float(np.mean(pv.argmax(1) == ytr[val_idx]))
            rec["val_loss"] = float(-np.mean(np.log(np.clip(pv[np.arange(len(val_idx)), ytr[val_idx]], 1e-12, None))))
        clf, mu, sd = fit(Xtr, ytr, c)
        pt = probs_of(clf, mu, sd, Xte)
        rec["test_accuracy"] = float(np.mean(pt.argmax(1) == yte))
        rec["_probs"] = pt
        records.append(rec)
    best = _select(records, "C", prefer_small=False)
    probs = best.pop("_probs")
    for r in records:
        r.pop("_probs", None)
    return {"accuracy": best["test_accuracy"], "oracle_accuracy": max(r["test_accuracy"] for r in records),
            "selected": {"C": best["C"]}, "grid": records}, probs


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, val): per class round(fraction·n_c) validation items, at least 1 when n_c ≥ 2."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        ix = rng.permutation(np.flatnonzero(y == c))
        if len(ix) >= 2:
            val.extend(ix[:min(max(int(round(fraction * len(ix))), 1), len(ix) - 1)].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val


def grid_edge_notes(runs: dict[str, dict]) -> list[str]:
    """One note per grid edge that candidates' selected settings sit on: ``runs`` {candidate: measure() result}.

    A selection at the smallest or largest grid value means the grid may not bracket the best setting,
    and the ground truth under-rates those candidates (seen on the image zoo: ImageNet CNNs choosing the
    smallest lr of {3e-3, 1e-3} fine-tuned below their own linear probe; a wider grid changed the ranking).
    With a 2-value grid every choice is at an edge: the note then just says so.
    """
    notes = []
    by_grid: dict[tuple, list[tuple[str, float]]] = {}
    for name, res in runs.items():
        (param, value), = res["selected"].items()
        grid = tuple(sorted(float(r[param]) for r in res["grid"]))
        if len(grid) >= 2:
            by_grid.setdefault((param, grid), []).append((name, float(value)))
    for (param, grid), picks in by_grid.items():
        what = "lr" if param == "lr" else "C (inverse L2 strength)"
        flag = "--lrs" if param == "lr" else "the C grid"
        for edge, word, side in ((grid[0], "smallest", "below"), (grid[-1], "largest", "above")):
            at = sorted(n for n, v in picks if v == edge)
            if at:
                notes.append(f"ground truth: {len(at)} of {len(picks)} candidates chose the {word} {what} of the grid "
                             f"({', '.join(f'{g:g}' for g in grid)}): {', '.join(at)} — the best setting may lie "
                             f"{side} it; widen {flag} if their accuracy matters")
    return notes


def _select(records: list[dict], param: str, *, prefer_small: bool) -> dict:
    """The record with the best validation accuracy (ties: lower validation loss, then the grid order)."""
    scored = [r for r in records if "val_accuracy" in r]
    if not scored:
        return records[0]
    return min(scored, key=lambda r: (-r["val_accuracy"], r.get("val_loss", 0.0),
                                      r[param] if prefer_small else -r[param]))


# ------------------------------------------------------------------------------------------- fine-tuning
def _finetune(model, train, test, cfg: dict, lrs: list[float], seed: int, progress: bool):
    from ..tune import tune

    records = []
    for lr in lrs:
        t0 = time.perf_counter()
        res = tune(model, train, test, method="full", config={**cfg, "lr": lr, "seed": seed}, progress=progress)
        m = res.metrics
        rec = {"lr": lr, "test_accuracy": float(m["test_accuracy"]), "seconds": round(time.perf_counter() - t0, 3)}
        if "val_accuracy" in m:
            rec["val_accuracy"] = float(m["val_accuracy"])
        if "val_loss" in m:
            rec["val_loss"] = float(m["val_loss"])
        rec["_probs"] = _predict_probs(res.module, model, test)
        records.append(rec)
        del res
    best = _select(records, "lr", prefer_small=True)
    probs = best.pop("_probs")
    for r in records:
        r.pop("_probs", None)
    return {"accuracy": best["test_accuracy"], "oracle_accuracy": max(r["test_accuracy"] for r in records),
            "selected": {"lr": best["lr"]}, "grid": records, "config": cfg}, probs


def _predict_probs(module, model, ds, batch_size: int = 64) -> np.ndarray:
    import torch

    module.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(ds), batch_size):
            raw = ds.X[s:s + batch_size]
            out.append(torch.softmax(module(model.preprocess(raw)).float(), -1).numpy())
    return np.concatenate(out).astype(np.float64)
