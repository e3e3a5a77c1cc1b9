"""Pure-torch definitions of the image architectures in the catalogue.

Each class reproduces the parameter names of the weight file it loads, so weights load with
``strict=True``:

- :class:`MobileNetV2` — torchvision key layout (``features.*``, ``classifier.1``).
- :class:`EfficientNetLite` — Lite0/1/2 as converted from TensorFlow (``_conv_stem``, ``_blocks.N.*``,
  ``_conv_head``, ``_fc``; ``_conv_head`` is loaded as ``_conv_top``, see ``RENAMED``), TensorFlow "SAME"
  padding, ReLU6, no squeeze-excitation.
- :class:`MNISTNet`, :class:`USPSNet`, :class:`SVHNNet` — the ccexam digit CNNs.

Every class has ``head_path``: the dotted name of its final ``nn.Linear``. :func:`split_head` swaps
that layer for ``nn.Identity`` so the network itself becomes the backbone (input → penultimate
features) and returns the removed layer as the head. Activations are not in-place, so forward hooks
(taps) see the values each module produced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

__all__ = ["MobileNetV2", "EfficientNetLite", "MNISTNet", "USPSNet", "SVHNNet", "split_head",
           "load_state_strict", "build"]


# --------------------------------------------------------------------------- helpers


def split_head(model: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """Replace submodule ``path`` of ``model`` by ``nn.Identity``; return (model, removed module)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = parent.get_submodule(child)
    parent._modules[child] = nn.Identity()
    return model, head


def load_state_strict(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line ModelError on any mismatch."""
    for old, new in getattr(model, "RENAMED", {}).items():
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                        f"model {tuple(own[k].shape)})")
    if problems:
        raise ModelError(f"weights do not fit {what}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # dtype surprises and the like
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"weights do not fit {what}: {first}") from None


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU6, padded to keep size/stride (torchvision's ConvBNReLU keys)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


# --------------------------------------------------------------------------- MobileNetV2


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names; ``forward`` gives logits."""

    head_path = "classifier.1"
    # (expansion t, channels c, repeats n, first stride s)
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- EfficientNet-Lite


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even inputs with stride 2)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: object = 0, groups: int = 1,
                 bias: bool = False):
        # nn.Conv2d's positional order, which PEFT's LoRA uses to build lora_A/lora_B of this type; ``padding``
        # is ignored: "SAME" padding is computed per input in forward
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted bottleneck without squeeze-excitation (Lite): expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, eps: float):
        super().__init__()
        hidden = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps)
        self._depthwise_conv = SameConv2d(hidden, hidden, k, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0..4 (ReLU6, no SE, stem and head not scaled); ``forward`` gives logits."""

    head_path = "_fc"
    # the file's ``_conv_head``: PEFT's modules_to_save matches module names by suffix, so a backbone module
    # named ``*head`` collides with the new classification ``head`` of every PEFT method
    RENAMED = {"_conv_head.": "_conv_top."}
    # (width multiplier, depth multiplier, resolution, dropout)
    VARIANTS = {"lite0": (1.0, 1.0, 224, 0.2), "lite1": (1.0, 1.1, 240, 0.2), "lite2": (1.1, 1.2, 260, 0.3),
                "lite3": (1.2, 1.4, 280, 0.3), "lite4": (1.4, 1.8, 300, 0.3)}
    # (repeats, kernel, first stride, expansion, in channels, out channels)
    STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ModelError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(self.VARIANTS)}")
        width, depth, self.image_size, dropout = self.VARIANTS[variant]
        eps = 1e-3

        def filters(c: int) -> int:
            scaled = c * width
            new = max(8, int(scaled + 4) // 8 * 8)
            return int(new + 8 if new < 0.9 * scaled else new)

        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=eps)
        blocks: list[nn.Module] = []
        last = len(self.STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(self.STAGES):
            cin = 32 if i == 0 else filters(cin)   # the stem is fixed at 32 channels
            cout = filters(cout)
            repeats = r if i in (0, last) else int(math.ceil(depth * r))
            for j in range(repeats):
                blocks.append(_MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, eps))
        self._blocks = nn.ModuleList(blocks)
        self._conv_top = SameConv2d(cout, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps)
        self.act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_top(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


# --------------------------------------------------------------------------- ccexam digit CNNs


class _DigitNet(nn.Module):
    """features → flatten → classifier, checking the spatial size first."""

    input_size: int
    in_channels: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.input_size,) * 2:
            raise ModelError(f"{type(self).__name__} expects (N, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}) inputs, got {tuple(x.shape)}")
        return self.classifier(self.features(x).flatten(1))


class MNISTNet(_DigitNet):
    """Two conv-ReLU-maxpool stages (32, 64 channels) → Linear(·, 128) → ReLU → Linear(128, 10)."""

    head_path = "classifier.2"
    in_channels = 1

    def __init__(self, input_size: int = 28, num_classes: int = 10):
        super().__init__()
        self.input_size = input_size
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (input_size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )


class USPSNet(_DigitNet):
    """As MNISTNet with batch norm after each conv and dropout 0.3 in the classifier."""

    head_path = "classifier.4"
    in_channels = 1

    def __init__(self, input_size: int = 16, num_classes: int = 10):
        super().__init__()
        self.input_size = input_size
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.3), nn.Linear(64 * (input_size // 4) ** 2, 128), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(128, num_classes),
        )


class SVHNNet(_DigitNet):
    """Three blocks of 2×(conv-BN-ReLU) + maxpool (32, 64, 128 channels) → 256 → 10, RGB input."""

    head_path = "classifier.4"
    in_channels = 3

    def __init__(self, input_size: int = 32, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.input_size = input_size

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(128 * (input_size // 8) ** 2, 256), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(256, num_classes),
        )


def build(arch: str, **kwargs) -> nn.Module:
    """Construct an architecture by short name: mobilenet-v2, lite0..lite4, mnist, usps, svhn."""
    if arch in ("mobilenet-v2", "mobilenet_v2"):
        return MobileNetV2(**kwargs)
    if arch in EfficientNetLite.VARIANTS:
        return EfficientNetLite(arch, **kwargs)
    digit = {"mnist": (MNISTNet, 28), "usps": (USPSNet, 16), "svhn": (SVHNNet, 32)}
    if arch in digit:
        cls, size = digit[arch]
        return cls(kwargs.pop("input_size", size), **kwargs)
    raise ModelError(f"unknown architecture {arch!r}; known: mobilenet-v2, {', '.join(EfficientNetLite.VARIANTS)}, "
                     "mnist, usps, svhn")
