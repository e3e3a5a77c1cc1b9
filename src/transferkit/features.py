"""Features: the representation of a dataset under one backbone tap, extracted once and cached.

A :class:`Features` holds a float32 matrix (N×D), integer labels, optional source-head
probabilities (N×C_s), optional domain ids and a fingerprint (model, tap, preprocessing, data
hash). It is stored as safetensors + JSON; :func:`extract` streams batches through the model so
memory stays flat in N, and returns the cached copy on a second call with the same key.
"""

from __future__ import annotations

import hashlib
import sys
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError


@dataclass
class Features:
    """Frozen representations of one dataset under one model tap.

    Attributes
    ----------
    X : (N, D) float32 array of features.
    y : (N,) int64 array of labels in ``0..C-1``.
    probs : (N, C_s) float32 array of the source head's probabilities, or None.
    domains : (N,) int64 array of domain ids, or None.
    fingerprint : dict with ``model``, ``tap``, ``preprocessing`` and ``data`` keys.
    """

    X: np.ndarray
    y: np.ndarray
    probs: np.ndarray | None = None
    domains: np.ndarray | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y)
        if self.X.ndim != 2:
            raise DataError(f"features must be a 2-D (N, D) array, got shape {self.X.shape}")
        if self.y.shape != (len(self.X),):
            raise DataError(f"features have {len(self.X)} rows but labels have shape {self.y.shape}")
        if not np.issubdtype(self.y.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {self.y.dtype}")
        self.y = self.y.astype(np.int64)
        if not np.isfinite(self.X).all():
            raise DataError("features contain NaN or inf values")
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.ndim != 2 or len(self.probs) != len(self.X):
                raise DataError(f"source probabilities must be (N, C_s) with N={len(self.X)}, got {self.probs.shape}")
        if self.domains is not None:
            self.domains = np.asarray(self.domains, dtype=np.int64)
            if self.domains.shape != self.y.shape:
                raise DataError("domain ids must have one entry per sample")

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
    """Identity of a model's weights: catalogue name + verified package for catalogue models, else
    the name plus a sha256 of every backbone and head tensor (computed once per loaded model, so a
    re-trained model saved under the same name misses the cache)."""
    if "fingerprint" not in model.meta:
        if "catalogue" in model.meta:
            model.meta["fingerprint"] = f"{model.meta['catalogue']}@{model.meta.get('source')}"
        else:
            h = hashlib.sha256()
            for part in (model.backbone, model.head):
                for name, t in ({} if part is None else part.state_dict()).items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            model.meta["fingerprint"] = f"{model.name}@sha256:{h.hexdigest()[:32]}"
    return model.meta["fingerprint"]


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
    tap: str = "penultimate",
    batch_size: int = 64,
    cache: bool = True,
    progress: bool = True,
    device: str | None = None,
) -> Features:
    """Features of ``data`` under ``model`` at ``tap``, from the cache when present.

    Parameters
    ----------
    model : a :class:`~transferkit.zoo.base.ZooModel` or a name for :func:`transferkit.zoo.load_model`.
    data : a :class:`~transferkit.data.Dataset` (or a spec for :func:`transferkit.data.load_dataset`).
    tap : 'penultimate' or a backbone module name (see ``ZooModel.taps()``).
    batch_size : samples per forward pass; memory is flat in N beyond the (N, D) result.
    cache : read and write the on-disk cache keyed by :func:`fingerprint`.
    progress : show a progress bar on stderr.
    device : where the forward passes run: ``"cuda"`` when a GPU is present, else ``"cpu"`` (default),
        or any torch device string. The model is moved there for the extraction and back afterwards;
        the device is not part of the cache key (CPU and GPU features agree to float32 rounding,
        TF32 convolutions aside).
    """
    import torch
    from tqdm.auto import tqdm

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
    key = fingerprint(model, data, tap)
    path = cache_path(key, model.name)
    if cache and (path / "features.json").is_file():
        return load(path)

    n = len(data)
    X = probs = None
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
                feats, p = model.encode(inputs, tap)
                if X is None:
                    X = np.empty((n, feats.shape[1]), dtype=np.float32)
                    probs = None if p is None else np.empty((n, p.shape[1]), dtype=np.float32)
                X[start:start + len(feats)] = feats.float().cpu().numpy()
                if probs is not None:
                    probs[start:start + len(feats)] = p.cpu().numpy()
                bar.update(len(feats))
    finally:
        for m in modules:
            m.to(home)
    out = Features(X, data.y, probs, data.domains, key)
    if cache:
        save(out, path)
    return out


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
