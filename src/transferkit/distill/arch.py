"""Students derived from a teacher's architecture: layers removed, channels kept (the shared builder of
``n2n`` and ``tas``).

A teacher made of a conv → linear chain (the zoo's digit CNNs: ``digits-mnist``, ``digits-usps``,
``digits-svhn``, or a ``transferkit tune`` run of them) is read as an :class:`Arch`: the input's channels and
size and one :class:`Layer` per conv or linear layer (a conv layer carries its batch norm and the 2×2 max
pool after its ReLU; a linear layer the dropout before it; the last linear layer is the classifier head).
:func:`derive` removes layers and sets output widths; :class:`ChainNet` builds any Arch, and
:func:`inherit` copies the teacher's weights into it: a kept layer whose input comes from the same teacher
layer as in the teacher keeps the *first* ``out × in`` slice of its weights (and of its batch norm), any
other layer keeps its fresh initialisation. A removed conv layer leaves its max pool in place, so the
spatial sizes (and the head) stay valid. At full width and depth the built net reproduces the teacher's
outputs exactly.

:func:`count` gives ``(parameters, FLOPs)`` of an Arch analytically; FLOPs are the multiply-accumulates of
the conv and linear layers (bias, batch norm, ReLU and pooling not counted), the convention of TAS's
reference counter without its bias term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError

_HINT = "n2n and tas derive students from conv → linear chains: the zoo's digit CNNs or tune runs of them"


@dataclass(frozen=True)
class Layer:
    kind: str  # "conv", "fc" or "pool" (a removed conv layer's max pool)
    out: int = 0
    kernel: int = 0
    padding: int = 0
    bn: bool = False
    pool: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class Arch:
    in_channels: int
    size: int
    layers: tuple[Layer, ...]

    @property
    def compute(self) -> list[int]:
        """Indices of the conv and linear layers (the ones with weights)."""
        return [i for i, layer in enumerate(self.layers) if layer.kind != "pool"]


# --------------------------------------------------------------------------------------------- reading
def _leaves(module: nn.Module) -> list[nn.Module]:
    kids = list(module.children())
    return [module] if not kids else [m for k in kids for m in _leaves(k)]


def describe(module: nn.Module) -> tuple[Arch, list[nn.Module]]:
    """``(arch, modules)`` of a classifier (backbone + head) over a digit CNN; ``modules[i]`` holds layer i's
    weights (``(conv, bn or None)`` or the linear layer). A one-line ConfigError for any other network."""
    backbone, head = getattr(module, "backbone", None), getattr(module, "head", None)
    if not hasattr(backbone, "features") or not hasattr(backbone, "classifier") or not isinstance(head, nn.Linear):
        raise ConfigError(f"cannot read {type(backbone).__name__} as a layer chain; {_HINT}")
    layers: list[Layer] = []
    mods: list = []
    for m in _leaves(backbone.features):
        if isinstance(m, nn.Conv2d):
            k, s, p = m.kernel_size, m.stride, m.padding
            if k[0] != k[1] or s != (1, 1) or p[0] != p[1] or m.groups != 1 or m.bias is None or 2 * p[0] != k[0] - 1:
                raise ConfigError(f"conv layer {m} is not a size-keeping stride-1 conv with bias; {_HINT}")
            layers.append(Layer("conv", m.out_channels, k[0], p[0]))
            mods.append([m, None])
        elif isinstance(m, nn.BatchNorm2d) and layers and not layers[-1].bn:
            layers[-1] = replace(layers[-1], bn=True)
            mods[-1][1] = m
        elif isinstance(m, nn.MaxPool2d) and layers and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2)):
            layers[-1] = replace(layers[-1], pool=True)
        elif not isinstance(m, nn.ReLU):
            raise ConfigError(f"unexpected {type(m).__name__} in the features; {_HINT}")
    dropout = 0.0
    for m in [*_leaves(backbone.classifier), head]:
        if isinstance(m, nn.Dropout):
            dropout = m.p
        elif isinstance(m, nn.Linear):
            layers.append(Layer("fc", m.out_features, dropout=dropout))
            mods.append(m)
            dropout = 0.0
        elif not isinstance(m, (nn.ReLU, nn.Identity)):
            raise ConfigError(f"unexpected {type(m).__name__} in the classifier; {_HINT}")
    if not layers or layers[0].kind != "conv":
        raise ConfigError(f"no conv layers in {type(backbone).__name__}; {_HINT}")
    return Arch(mods[0][0].in_channels, int(backbone.input_size), tuple(layers)), mods


# --------------------------------------------------------------------------------------------- deriving
def derive(arch: Arch, keep: list[bool] | None = None, widths: list[int] | None = None) -> tuple[Arch, list[int]]:
    """``(student arch, sources)``: ``arch`` without the layers where ``keep`` is False (a removed conv layer
    leaves its pool) and with ``widths[i]`` output channels for layer i (the head keeps its classes);
    ``sources[j]`` is the teacher layer that student layer j comes from."""
    keep = keep or [True] * len(arch.layers)
    widths = widths or [layer.out for layer in arch.layers]
    last = len(arch.layers) - 1
    if not keep[last] or widths[last] != arch.layers[last].out:
        raise ConfigError("the classifier head cannot be removed or resized")
    layers, sources = [], []
    for i, (layer, k, w) in enumerate(zip(arch.layers, keep, widths)):
        if k and layer.kind != "pool":
            if not 1 <= w <= layer.out:
                raise ConfigError(f"width {w} of layer {i} is outside 1..{layer.out}")
            layers.append(replace(layer, out=int(w)))
        elif layer.kind == "pool" or layer.pool:
            layers.append(Layer("pool"))
        else:
            continue
        sources.append(i)
    return Arch(arch.in_channels, arch.size, tuple(layers)), sources


def count(arch: Arch) -> tuple[int, int]:
    """``(parameters, FLOPs)`` of ``arch`` (FLOPs: multiply-accumulates of its conv and linear layers)."""
    params = flops = 0
    c, s = arch.in_channels, arch.size
    features = None
    for layer in arch.layers:
        if layer.kind == "conv":
            s = s + 2 * layer.padding - layer.kernel + 1
            macs = layer.out * c * layer.kernel ** 2
            params += macs + layer.out + (2 * layer.out if layer.bn else 0)
            flops += macs * s * s
            c = layer.out
        elif layer.kind == "fc":
            fan_in = features if features is not None else c * s * s
            params += layer.out * fan_in + layer.out
            flops += layer.out * fan_in
            features = layer.out
        if layer.pool or layer.kind == "pool":
            s //= 2
    return params, flops


# --------------------------------------------------------------------------------------------- building
class ChainNet(nn.Module):
    """The network of an :class:`Arch`: ``units[i]`` is layer i (conv [BN] ReLU [pool], [dropout] linear
    ReLU, a lone pool; the last linear layer has no ReLU). ``forward(x) -> logits``."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        units, c, s, features = [], arch.in_channels, arch.size, None
        last = len(arch.layers) - 1
        for i, layer in enumerate(arch.layers):
            parts: list[nn.Module] = []
            if layer.kind == "conv":
                parts += [nn.Conv2d(c, layer.out, layer.kernel, padding=layer.padding)]
                parts += [nn.BatchNorm2d(layer.out)] if layer.bn else []
                parts += [nn.ReLU()]
                c, s = layer.out, s + 2 * layer.padding - layer.kernel + 1
            elif layer.kind == "fc":
                fan_in = features if features is not None else c * s * s
                parts += [nn.Dropout(layer.dropout)] if layer.dropout else []
                parts += [nn.Linear(fan_in, layer.out)] + ([nn.ReLU()] if i < last else [])
                features = layer.out
            if layer.pool or layer.kind == "pool":
                parts.append(nn.MaxPool2d(2))
                s //= 2
            units.append(nn.Sequential(*parts))
        self.units = nn.ModuleList(units)
        self._flatten_at = next(i for i, layer in enumerate(arch.layers) if layer.kind == "fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, unit in enumerate(self.units):
            if i == self._flatten_at:
                x = x.flatten(1)
            x = unit(x)
        return x

    def weights(self, i: int):
        """Layer i's weight modules: ``[conv, bn or None]`` or the linear layer."""
        unit = self.units[i]
        if self.arch.layers[i].kind == "conv":
            return [unit[0], unit[1] if self.arch.layers[i].bn else None]
        return next(m for m in unit if isinstance(m, nn.Linear))


def spatial_sizes(arch: Arch) -> list[int]:
    """The spatial size of each layer's input."""
    out, s = [], arch.size
    for layer in arch.layers:
        out.append(s)
        if layer.kind == "conv":
            s = s + 2 * layer.padding - layer.kernel + 1
        if layer.pool or layer.kind == "pool":
            s //= 2
    return out


@torch.no_grad()
def inherit(student: ChainNet, teacher_arch: Arch, teacher_mods: list, sources: list[int] | None = None) -> ChainNet:
    """Copy the teacher's weights into ``student`` (layer by layer through ``sources``, the first slices)."""
    arch = student.arch
    sources = sources if sources is not None else list(range(len(arch.layers)))
    t_prev = {j: max([k for k in teacher_arch.compute if k < j], default=-1) for j in teacher_arch.compute}
    t_size, s_size = spatial_sizes(teacher_arch), spatial_sizes(arch)
    prev = -1  # the teacher layer the current input comes from (-1: the image)
    for i in arch.compute:
        j = sources[i]
        if t_prev[j] == prev and t_size[j] == s_size[i]:
            dst, src = student.weights(i), teacher_mods[j]
            if arch.layers[i].kind == "conv":
                (dconv, dbn), (sconv, sbn) = dst, src
                dconv.weight.copy_(sconv.weight[: dconv.out_channels, : dconv.in_channels])
                dconv.bias.copy_(sconv.bias[: dconv.out_channels])
                if dbn is not None:
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(dbn, name).copy_(getattr(sbn, name)[: dbn.num_features])
                    dbn.num_batches_tracked.copy_(sbn.num_batches_tracked)
            else:
                w = src.weight
                if teacher_arch.layers[t_prev[j]].kind == "conv":  # the first linear layer: over (C, H, W) maps
                    c_t = w.shape[1] // (t_size[j] ** 2)
                    w = w.reshape(w.shape[0], c_t, -1)[:, : dst.in_features // (s_size[i] ** 2)].reshape(w.shape[0], -1)
                dst.weight.copy_(w[: dst.out_features, : dst.in_features])
                dst.bias.copy_(src.bias[: dst.out_features])
        prev = j
    return student


def from_teacher(module: nn.Module, keep: list[bool] | None = None, widths: list[int] | None = None,
                 seed: int = 0) -> ChainNet:
    """A student of ``module`` (a digit-CNN classifier): layers removed / widths set, teacher weights
    inherited where they fit, the rest freshly initialised from ``seed``."""
    arch, mods = describe(module)
    student_arch, sources = derive(arch, keep, widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ChainNet(student_arch)
    return inherit(net, arch, mods, sources)


def architecture(net: ChainNet) -> dict:
    """A JSON description of ``net``'s architecture (for metrics and the Delta's meta)."""
    params, flops = count(net.arch)
    return {"in_channels": net.arch.in_channels, "size": net.arch.size, "params": params, "flops": flops,
            "layers": [{k: v for k, v in vars(layer).items() if v} for layer in net.arch.layers]}


def rebuild(description: dict) -> ChainNet:
    """The :class:`ChainNet` of an :func:`architecture` description."""
    layers = tuple(Layer(**layer) for layer in description["layers"])
    return ChainNet(Arch(int(description["in_channels"]), int(description["size"]), layers))



def rebuild_run(zoo, delta) -> ChainNet:
    """The student of an n2n / tas run folder (``meta["requires"]``): its architecture with its weights."""
    from ..delta import apply

    return apply(rebuild(delta.meta["architecture"]), delta).eval()


def teacher_module(teachers: list, student, classes: list[str], method: str) -> tuple:
    """``(teacher, its classifier)``: the one network a compression method derives its student from; the
    student given must be that teacher's base model. One-line ConfigErrors otherwise."""
    from ._common import require_classifier
    from .kd import TEACHER_HINT

    if len(teachers) != 1:
        raise ConfigError(f"{method} compresses one network (the one teacher), got {len(teachers)} teachers")
    teacher = teachers[0]
    module = require_classifier(teacher, "teacher", classes, TEACHER_HINT)
    if student.zoo.preprocessing != teacher.zoo.preprocessing:
        raise ConfigError(f"{method} derives the student from the teacher: pass the teacher's base model "
                          f"({teacher.zoo.name!r}) as the student")
    return teacher, module
