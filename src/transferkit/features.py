"""Features: the representation of a dataset under one backbone tap, extracted once and cached.

A :class:`Features` holds a float32 matrix (N×D), integer labels (-1 marks an unlabelled row, as in
:class:`~transferkit.data.Dataset`), optional source-head probabilities (N×C_s), optional domain ids
(non-negative, one per row) and a fingerprint (model, tap, preprocessing, data hash). It is stored as
safetensors + JSON; :func:`extract` streams batches through the model so memory stays flat in N, and
returns the cached copy on a second call with the same key. ``extract(..., tap=[...])`` reads several
taps in one forward pass per batch and caches each tap under its own key.
"""

from __future__ import annotations

import hashlib
import sys
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DataError, ModelError
from .zoo.base import read_taps


@dataclass
class Features:
    """Frozen representations of one dataset under one model tap.

    Attributes
    ----------
    X : (N, D) float32 array of features.
    y : (N,) int64 array of labels in ``0..C-1``, -1 for an unlabelled row (``None``: all unlabelled).
    probs : (N, C_s) float32 array of the source head's probabilities, or None.
    domains : (N,) int64 array of non-negative domain ids, or None.
    fingerprint : dict with ``model``, ``tap``, ``preprocessing`` and ``data`` keys.
    """

    X: np.ndarray
    y: np.ndarray | None = None
    probs: np.ndarray | None = None
    domains: np.ndarray | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        if self.X.ndim != 2:
            raise DataError(f"features must be a 2-D (N, D) array, got shape {self.X.shape}")
        self.y = np.full(len(self.X), -1, dtype=np.int64) if self.y is None else np.asarray(self.y)
        if self.y.shape != (len(self.X),):
            raise DataError(f"features have {len(self.X)} rows but labels have shape {self.y.shape}")
        if not np.issubdtype(self.y.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {self.y.dtype}")
        if self.y.size and self.y.min() < -1:
            raise DataError(f"labels must be ≥ 0, or -1 for an unlabelled row; got {int(self.y.min())}")
        self.y = self.y.astype(np.int64)
        if not np.isfinite(self.X).all():
            raise DataError("features contain NaN or inf values")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.ndim != 2 or len(self.probs) != len(self.X):
                raise DataError(f"source probabilities must be (N, C_s) with N={len(self.X)}, got {self.probs.shape}")
        if self.domains is not None:
            self.domains = np.asarray(self.domains)
            if self.domains.shape != self.y.shape:
                raise DataError("domain ids must have one entry per sample")
            if not np.issubdtype(self.domains.dtype, np.integer):
                raise DataError(f"domain ids must be integers, got dtype {self.domains.dtype}")
            if self.domains.size and self.domains.min() < 0:
                raise DataError(f"domain ids must be ≥ 0, got {int(self.domains.min())}")
            self.domains = self.domains.astype(np.int64)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the rows that carry a label (``y != -1``)."""
        return self.y != -1

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, idx: np.ndarray) -> "Features":
        return Features(
            self.X[idx],
            self.y[idx],
            None if self.probs is None else self.probs[idx],
            None if self.domains is None else self.domains[idx],
            dict(self.fingerprint),
        )


def model_fingerprint(model: Any) -> str:
    """Identity of a model's weights: for catalogue models the name, the package and the sha256 of its
    cached files (re-verified against the catalogue when their size or mtime changed, see
    :mod:`transferkit.assets`), so changed weights under the same name miss the cache (or are refused)
    instead of returning stale features; else the name plus a sha256 of every backbone and head
    tensor (computed once per loaded model, so a re-trained model saved under the same name misses
    the cache)."""
    if "fingerprint" not in model.meta:
        if "catalogue" in model.meta:
            name = model.meta["catalogue"]
            digest = model.meta.get("weights_sha256") or _catalogue_weights_digest(name)
            model.meta["fingerprint"] = f"{name}@{model.meta.get('source')}@sha256:{digest[:32]}"
        else:
            h = hashlib.sha256()
            for part in (model.backbone, model.head):
                for name, t in ({} if part is None else part.state_dict()).items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            model.meta["fingerprint"] = f"{model.name}@sha256:{h.hexdigest()[:32]}"
    return model.meta["fingerprint"]


def _catalogue_weights_digest(name: str) -> str:
    """sha256 over the verified file hashes of catalogue model ``name`` and the assets it loads from."""
    from . import assets

    entry = assets.entry(name)
    names = [name, *[n for n in [(entry.get("options") or {}).get("tokenizer_from")] if n]]
    digests = {n: assets.files_digest(n) for n in names}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def fingerprint(model: Any, data: Any, tap: str) -> dict[str, Any]:
    """The cache key of (model, tap, preprocessing, data) as a JSON-able dict."""
    return {
        "model": model_fingerprint(model),
        "tap": tap,
        "preprocessing": model.preprocessing,
        "data": data.fingerprint(),
    }


def cache_path(key: dict[str, Any], model_name: str) -> Path:
    from .assets import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[-60:]
    return cache_dir() / "features" / f"{safe}-{digest}"


def extract(
    model: Any,
    data: Any,
    *,
    tap: str | Sequence[str] = "penultimate",
    batch_size: int = 64,
    cache: bool = True,
    progress: bool = True,
    device: str | None = None,
) -> Features | dict[str, Features]:
    """Features of ``data`` under ``model`` at ``tap``, from the cache when present.

    Parameters
    ----------
    model : a :class:`~transferkit.zoo.base.ZooModel` or a name for :func:`transferkit.zoo.load_model`.
    data : a :class:`~transferkit.data.Dataset` (or a spec for :func:`transferkit.data.load_dataset`);
        its unlabelled items give rows with label -1, its domain ids the rows' ``domains``.
    tap : 'penultimate' or a backbone module name (see ``ZooModel.taps()``), or a list of them: then
        the result is ``{tap: Features}`` and every tap not in the cache is read in the same forward
        pass (one backbone call per batch); each tap is cached under its own key, as for one tap.
    batch_size : samples per forward pass; memory is flat in N beyond the (N, D) results.
    cache : read and write the on-disk cache keyed by :func:`fingerprint`.
    progress : show a progress bar on stderr.
    device : where the forward passes run: ``"cuda"`` when a GPU is present, else ``"cpu"`` (default),
        or any torch device string. The model is moved there for the extraction and back afterwards;
        the device is not part of the cache key (CPU and GPU features agree to float32 rounding,
        TF32 convolutions aside).
    """
    from .data import Dataset, load_dataset
    from .zoo import load_model

    if not isinstance(data, Dataset):
        data = load_dataset(data)
    if isinstance(model, str):
        model = load_model(model)
    if model.modality != data.modality:
        raise DataError(f"model {model.name!r} takes {model.modality} inputs but {data.name!r} is {data.modality} data")
    if batch_size < 1:
        raise DataError(f"batch size must be ≥ 1, got {batch_size}")
    taps = [tap] if isinstance(tap, str) else list(dict.fromkeys(tap))
    if not taps or not all(isinstance(t, str) for t in taps):
        raise ModelError(f"tap must be a tap name or a non-empty list of names, got {tap!r}")
    keys = {t: fingerprint(model, data, t) for t in taps}
    paths = {t: cache_path(keys[t], model.name) for t in taps}
    out = {t: load(paths[t]) for t in taps if cache and (paths[t] / "features.json").is_file()}
    missing = [t for t in taps if t not in out]
    if missing:
        X, probs = _forward(model, data, missing, batch_size, progress, device)
        for t in missing:
            out[t] = Features(X[t], data.y, probs, data.domains, keys[t])
            if cache:
                save(out[t], paths[t])
    return out[tap] if isinstance(tap, str) else {t: out[t] for t in taps}


def _forward(model: Any, data: Any, taps: list[str], batch_size: int, progress: bool,
             device: str | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Stream ``data`` through ``model`` once: ``({tap: (N, D_tap) array}, source probs or None)``."""
    from tqdm.auto import tqdm

    from .zoo.base import PENULTIMATE

    known = model.taps()
    for t in taps:
        if t not in known:
            raise ModelError(f"unknown tap {t!r}; use 'penultimate' or a module name such as {next(iter(known[1:]), '')!r}")
    n = len(data)
    X: dict[str, np.ndarray] = {}
    probs = None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = [m for m in (model.backbone, model.head) if m is not None]
    home = next(model.backbone.parameters()).device
    try:
        for m in modules:
            m.to(dev)
        with torch.inference_mode(), tqdm(total=n, desc=f"features {model.name}", unit="ex", file=sys.stderr,
                                          disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                inputs = model.preprocess(data.X[start:start + batch_size])
                inputs = ({k: v.to(dev) if hasattr(v, "to") else v for k, v in inputs.items()}
                          if isinstance(inputs, dict) else inputs.to(dev))
                if len(taps) == 1:
                    feats, p = model.encode(inputs, taps[0])
                    batch = {taps[0]: feats}
                else:
                    batch, penultimate = read_taps(model.backbone, inputs, [t for t in taps if t != PENULTIMATE])
                    batch[PENULTIMATE] = penultimate
                    p = model.source_probs(penultimate)
                if not X:
                    X = {t: np.empty((n, batch[t].shape[1]), dtype=np.float32) for t in taps}
                    probs = None if p is None else np.empty((n, p.shape[1]), dtype=np.float32)
                for t in taps:
                    X[t][start:start + len(batch[t])] = batch[t].float().cpu().numpy()
                if probs is not None:
                    probs[start:start + len(p)] = p.cpu().numpy()
                bar.update(len(batch[taps[0]]))
    finally:
        for m in modules:
            m.to(home)
    return X, probs


def save(features: Features, path: str | Path) -> Path:
    """Write ``features`` to directory ``path`` (safetensors + JSON), atomically."""
    import torch
    from safetensors.torch import save_file

    from .io import atomic_path

    arrays = {"X": features.X, "y": features.y}
    if features.probs is not None:
        arrays["probs"] = features.probs
    if features.domains is not None:
        arrays["domains"] = features.domains
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp / "features.safetensors"))
        (tmp / "features.json").write_text(json.dumps({"fingerprint": features.fingerprint, "shape": list(features.X.shape)}, indent=2))
    return Path(path)


def load(path: str | Path) -> Features:
    """Read features written by :func:`save`."""
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "features.json").read_text())
        arrays = load_file(str(path / "features.safetensors"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read features from {path}: {exc}") from None
    return Features(arrays["X"], arrays["y"], arrays.get("probs"), arrays.get("domains"), meta["fingerprint"])
