"""The one shape every source model takes inside transferkit: :class:`ZooModel`.

A ZooModel pairs a *backbone* (preprocessed inputs → penultimate features, shape (B, D)) with the
source *head* when the model has one (penultimate features → source logits), and a *preprocess*
callable that turns a raw batch (uint8 images or strings) into the backbone's inputs. Any other
layer can be read as a *tap*: a module name from ``backbone.named_modules()``; its output is
pooled to (B, D_tap) — global average over space for conv maps, attention-masked mean over tokens
for sequences.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ModelError

PENULTIMATE = "penultimate"


@dataclass
class ZooModel:
    """A pretrained source model ready for feature extraction and tuning.

    Attributes
    ----------
    name : catalogue name or path the model was loaded from.
    modality : "image" or "text".
    backbone : module mapping ``preprocess(raw)`` to penultimate features (B, D).
    head : source classifier (features → logits) or None.
    feature_dim : D.
    preprocess : raw batch → backbone inputs (tensor for images, dict of tensors for text).
    preprocessing : JSON-able description of ``preprocess`` (part of the features cache key).
    source_classes : names of the head's classes, when known.
    meta : catalogue facts (params, licence, source, hub id).
    """

    name: str
    modality: str
    backbone: nn.Module
    head: nn.Module | None
    feature_dim: int
    preprocess: Callable[[Any], Any]
    preprocessing: dict[str, Any]
    source_classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.backbone.eval()
        if self.head is not None:
            self.head.eval()

    def taps(self) -> list[str]:
        """Names accepted by :meth:`features`: 'penultimate' plus every named backbone module."""
        return [PENULTIMATE] + [n for n, _ in self.backbone.named_modules() if n]

    @torch.no_grad()
    def features(self, inputs: Any, tap: str = PENULTIMATE) -> torch.Tensor:
        """Features (B, D) of preprocessed ``inputs`` at ``tap``."""
        if tap == PENULTIMATE:
            return self.backbone(inputs)
        return read_tap(self.backbone, inputs, tap)

    @torch.no_grad()
    def encode(self, inputs: Any, tap: str = PENULTIMATE) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: features at ``tap`` and the source head's probabilities (or None)."""
        if tap == PENULTIMATE:
            feats = self.backbone(inputs)
            return feats, self.source_probs(feats)
        penultimate, tapped = read_tap(self.backbone, inputs, tap, return_output=True)
        return tapped, self.source_probs(penultimate)

    @torch.no_grad()
    def source_probs(self, penultimate: torch.Tensor) -> torch.Tensor | None:
        """Softmax of the source head on penultimate features, or None without a head."""
        if self.head is None:
            return None
        return torch.softmax(self.head(penultimate).float(), dim=-1)

    def classifier(self, n_classes: int, seed: int = 0) -> "Classifier":
        """Backbone plus a fresh linear head for ``n_classes`` (the model that tuning trains)."""
        return Classifier(self.backbone, self.feature_dim, n_classes, seed)

    def n_params(self) -> int:
        mods = [self.backbone] + ([self.head] if self.head is not None else [])
        return sum(p.numel() for m in mods for p in m.parameters())


def head_seed(seed: int, classes: Sequence[Any]) -> int:
    """The seed of a task's new head: a stable hash of the run ``seed`` and the task's class names.

    Tasks with the same label set tuned from the same seed share their head initialisation (a common
    θ_pre for soups, robust weight signatures, clean-vs-corrupted fine-tunes); tasks with different
    label sets get independent heads, so per-task heads never start from one matrix — with a shared
    start a short fine-tune barely moves the heads, every body learns to push *its* class 1 along the
    same direction, and merging tasks whose labels mean different things cancels them
    (``benchmarks/merge_text.py --heads shared-seed``).
    """
    text = f"{int(seed)}\x1e" + "\x1f".join(str(c) for c in classes)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def new_head(in_dim: int, n_classes: int, seed: int = 0) -> nn.Linear:
    """A fresh classification head: weights U(±1/√in_dim) from ``seed``, bias 0 (reproducible)."""
    head = nn.Linear(in_dim, n_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / in_dim**0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    return head


class Classifier(nn.Module):
    """``backbone`` followed by a new ``nn.Linear`` head; ``forward(inputs) -> logits``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = new_head(feature_dim, n_classes, seed)

    def forward(self, inputs: Any = None, **named: torch.Tensor) -> torch.Tensor:
        """``inputs`` as one tensor or dict, or text inputs as keywords (``model(**batch)``)."""
        return self.head(self.backbone(named if inputs is None else inputs))


def read_tap(backbone: nn.Module, inputs: Any, tap: str, return_output: bool = False):
    """Run ``backbone`` and return the pooled output of its submodule ``tap``.

    With ``return_output`` the backbone's own output comes first: ``(output, tapped)``.
    """
    tapped, result = read_taps(backbone, inputs, [tap])
    return (result, tapped[tap]) if return_output else tapped[tap]


def read_taps(backbone: nn.Module, inputs: Any, taps: list[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """One backbone call: ``({tap: pooled output}, backbone output)``.

    Each tap is its submodule's output at its last call (the first element of a tuple, the
    ``last_hidden_state`` of a model output), pooled by :func:`pool` with the attention mask.
    """
    modules = dict(backbone.named_modules())
    for tap in taps:
        if tap not in modules:
            raise ModelError(f"unknown tap {tap!r}; use 'penultimate' or a module name such as "
                             f"{next(iter(list(modules)[1:]), '')!r}")
    captured: dict[str, Any] = {}
    handles = [modules[t].register_forward_hook(lambda _m, _i, out, t=t: captured.__setitem__(t, out)) for t in taps]
    try:
        result = backbone(inputs)
    finally:
        for h in handles:
            h.remove()
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    tapped = {}
    for t in taps:
        out = captured[t]
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        tapped[t] = pool(out, mask)
    return tapped, result


def pool(out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) → spatial mean; (B, T, H) → masked token mean; (B, D) unchanged."""
    if out.dim() == 4:
        return out.mean(dim=(2, 3))
    if out.dim() == 3:
        if mask is None:
            return out.mean(dim=1)
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if out.dim() == 2:
        return out
    raise ModelError(f"cannot pool a tap output of shape {tuple(out.shape)}")


class ImagePreprocess:
    """uint8 images (N, H, W) or (N, H, W, 3) → normalised float tensor (N, C, S, S).

    Grey images are replicated to 3 channels for RGB models; colour images are averaged to one
    channel for grey models. Resizing is bilinear with antialiasing.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], channels: int = 3):
        self.size, self.channels = int(size), int(channels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(), "resize": "bilinear-antialias"}

    def __call__(self, images: Any) -> torch.Tensor:
        arr = np.asarray(images)
        if not arr.flags.writeable:  # e.g. PIL-backed arrays; torch warns on non-writable memory
            arr = arr.copy()
        x = torch.as_tensor(arr)
        if x.dim() == 3:
            x = x.unsqueeze(-1)
        if x.dim() != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"images must be (N, H, W) or (N, H, W, 3), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        if arr.dtype == np.uint8:  # float images are taken to be in [0, 1] already
            x = x / 255.0
        if x.shape[1] != self.channels:
            x = x.expand(-1, 3, -1, -1) if self.channels == 3 else x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std


class TextPreprocess:
    """list[str] → tokenizer outputs (input_ids, attention_mask, …) padded to the batch."""

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": type(self.tokenizer).__name__, "vocab_size": self.tokenizer.vocab_size,
                "max_length": self.max_length, "lowercase": getattr(self.tokenizer, "do_lower_case", None)}

    def __call__(self, texts: Any) -> dict[str, torch.Tensor]:
        texts = [str(t) for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(enc)


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder followed by attention-masked mean pooling (sentence-transformers style)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor] | None = None, **named: torch.Tensor) -> torch.Tensor:
        inputs = named if inputs is None else inputs
        out = self.model(**inputs)
        return pool(out.last_hidden_state, inputs["attention_mask"])
