"""What every distill method shares: loading teachers and students, the training data with frozen
models' logits (live or cached), option checking, evaluation and the run folder.

A *net* (:class:`Net`) is a loaded model with the ZooModel it comes from: a catalogue model (its source head
is kept as a classifier when its classes are the data's classes) or a ``transferkit tune`` run folder (the
tuned classifier rebuilt from its Delta). Frozen nets (teachers, KL+DP's initial student) run in eval mode
under ``no_grad`` inside the objective (live), or once over the training data before training (cached:
valid because the nets are frozen and the data carries no augmentation; the same training, fewer passes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import registry
from ..data.dataset import split_mask
from ..errors import ConfigError, DataError, ModelError

STAGE = "distill"

# what a distill run writes into its folder
DISTILL_FILES = ("split.json", "delta", "metrics.json", "history.json")


@dataclass
class Net:
    """A loaded model: ``zoo`` (the ZooModel: backbone, preprocess) and ``module``, a classifier over the
    data's classes (None: its head predicts other classes)."""

    name: str
    zoo: Any
    module: nn.Module | None
    classes: list[str] | None

    def preprocess(self, raw: Any) -> Any:
        return self.zoo.preprocess(raw)


@dataclass
class DistillResult:
    method: str
    student: nn.Module
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    delta: Any = None
    out_dir: Path | None = None


# ------------------------------------------------------------------------------------------ loading
def load_net(spec: Any, classes: list[str] | None = None, load: Callable | None = None) -> Net:
    """A catalogue name, a path the zoo loads, a loaded ZooModel or a ``transferkit tune`` run folder
    (``load`` loads a run's base model by name: the pipeline's, with its model options; default the zoo's)."""
    from ..zoo import Classifier, ZooModel, load_model

    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, ZooModel):
        zoo = spec
    elif not isinstance(spec, str):
        raise ConfigError(f"a teacher or student must be a catalogue model name, a model path, a `transferkit tune` "
                          f"run folder, a loaded ZooModel (wrap an nn.Module with transferkit.zoo.from_module) or a Net, got "
                          f"{type(spec).__name__} {registry.short(spec)}")
    else:
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "delta" / "delta.json").is_file():
            return _load_run(p, classes, load or load_model)
        zoo = load_model(spec)
    src = list(zoo.source_classes) if zoo.head is not None and zoo.source_classes else None
    module = None
    if src is not None and classes is not None and src == list(classes):
        module = Classifier(zoo.backbone, zoo.feature_dim, len(src))
        module.head = zoo.head
    return Net(zoo.name, zoo, module, src)


def _load_run(path: Path, classes: list[str] | None, load: Callable) -> Net:
    import importlib

    from ..delta import Delta, apply
    from ..merge.tasks import _head_classes
    from ..zoo import Classifier

    delta = Delta.load(path / "delta")
    zoo = load(delta.base)
    requires = delta.meta.get("requires")
    if requires and not requires.startswith(("transferkit.tune.", "transferkit.distill.")):  # PEFT runs: need PEFT
        raise ModelError(f"{path} is a {delta.meta.get('method', requires)} run, which distill cannot load; "
                         "tune the teacher with another method")
    if requires:
        mod, fn = requires.rsplit(".", 1)
        module = getattr(importlib.import_module(mod), fn)(zoo, delta)
    else:
        module = Classifier(copy.deepcopy(zoo.backbone), zoo.feature_dim, _head_classes(delta, str(path)))
        apply(module, delta)
    run_classes = [str(c) for c in delta.meta.get("classes", [])] or None
    if classes is not None and run_classes != list(classes):
        raise DataError(f"the run {path} was tuned on classes {registry.short(run_classes)}, the data has "
                        f"{registry.short(list(classes))}; distill needs the same label set")
    return Net(str(path), zoo, module.eval(), run_classes)


def check_modality(nets: list[Net], data) -> None:
    for net in nets:
        if net.zoo.modality != data.modality:
            raise DataError(f"model {net.name!r} takes {net.zoo.modality} inputs but {data.name!r} is "
                            f"{data.modality} data")


def require_classifier(net: Net, role: str, classes: list[str], hint: str) -> nn.Module:
    """The net's classifier over ``classes``, or a one-line ConfigError saying why there is none."""
    if net.module is None:
        what = f"predicts {registry.short(net.classes)}" if net.classes else "has no classification head"
        raise ConfigError(f"{role} {net.name!r} {what}, not the data's classes {registry.short(classes)}; {hint}")
    return net.module


def fresh_student(net: Net, classes: list[str], seed: int) -> nn.Module:
    """The student's backbone (a copy) under a new head seeded by ``head_seed(seed, classes)``."""
    from ..zoo import head_seed

    clf = net.zoo.classifier(len(classes), seed=head_seed(seed, classes))
    clf.backbone = copy.deepcopy(net.zoo.backbone)
    return clf.requires_grad_(True)


def start_student(net: Net, classes: list[str]) -> nn.Module:
    """A trainable copy of the net's classifier over ``classes`` (KL+DP starts from a pretrained student)."""
    module = require_classifier(net, "student", classes,
                                "KL+DP transfers into a model that already predicts them (a `transferkit tune` "
                                "run folder, or a catalogue model with these classes)")
    return copy.deepcopy(module).requires_grad_(True)


# ------------------------------------------------------------------------------------------ label maps
class LabelMapped(nn.Module):
    """A frozen classifier over its own classes seen through a label map (``target[i]``: the data class of its
    class ``i``, -1: dropped). The logit of data class ``j`` is ``T·log Σ_{i→j} exp(z_i/T)``: its softmax at
    temperature ``T`` sums the softened probabilities of the classes mapped to ``j``, renormalised over the
    mapped classes."""

    def __init__(self, module: nn.Module, target: list[int], n_classes: int, temperature: float):
        super().__init__()
        self.module, self.temperature = module, float(temperature)
        mask = torch.full((len(target), n_classes), float("-inf"))
        for i, j in enumerate(target):
            if j >= 0:
                mask[i, j] = 0.0
        self.register_buffer("log_mask", mask, persistent=False)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        from ..engine.objectives import logits_of

        z = logits_of(self.module(*args, **kwargs)) / self.temperature
        return self.temperature * torch.logsumexp(z.unsqueeze(-1) + self.log_mask.to(z.dtype), dim=1)


def map_teachers(teachers: list[Net], label_map: Mapping[str, str], classes: list[str],
                 temperature: float) -> list[Net]:
    """The teachers as classifiers over the data's ``classes`` through ``label_map`` (:class:`LabelMapped`);
    one-line ConfigErrors for a map that names a class no teacher predicts or no data class, a teacher
    without a head, and a data class that no class of a teacher is mapped to."""
    from ..zoo import Classifier

    classes = [str(c) for c in classes]
    if bare := [t.name for t in teachers if not t.classes or (t.module is None and t.zoo.head is None)]:
        raise ConfigError(f"teacher {bare[0]!r} has no classification head, so label_map has no class to map")
    if bad := [v for v in label_map.values() if v not in classes]:
        raise ConfigError(f"label_map maps to {registry.short(sorted(set(bad)))}, not classes of the data "
                          f"{registry.short(classes)}")
    known = {str(c) for t in teachers for c in t.classes or []}
    if unknown := [k for k in label_map if k not in known]:
        raise ConfigError(f"label_map maps {registry.short(unknown)}, which no teacher predicts (teacher classes: "
                          f"{registry.short(sorted(known))})")
    out = []
    for net in teachers:
        module = net.module
        if module is None:  # a catalogue head over its own classes
            module = Classifier(net.zoo.backbone, net.zoo.feature_dim, len(net.classes))
            module.head = net.zoo.head
        own = [str(c) for c in net.classes]
        target = [classes.index(label_map[c]) if c in label_map else -1 for c in own]
        if missing := [c for j, c in enumerate(classes) if j not in target]:
            raise ConfigError(f"label_map maps no class of teacher {net.name!r} (it predicts {registry.short(own)}) "
                              f"to the data classes {registry.short(missing)}; every data class needs one")
        out.append(Net(net.name, net.zoo, LabelMapped(module.eval(), target, len(classes), temperature).eval(),
                       classes))
    return out


# ------------------------------------------------------------------------------------------ options
def split_config(method: str, config: Mapping[str, Any] | None) -> tuple[Any, dict]:
    """``(options, train)``: the method's typed options and the TrainConfig options, both checked."""
    from ..engine import TrainConfig

    m = registry.get(STAGE, method)
    config = dict(config or {})
    keys = [f.name for f in dataclasses.fields(m.options)]
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    opts = {k: v for k, v in config.items() if k in keys}
    train = {k: v for k, v in config.items() if k in train_keys and k not in keys}
    for k in config:
        if k not in keys and k not in train_keys:
            raise ConfigError(f"unknown option {str(k)[:80]!r} for distill method {method!r}"
                              f"{registry.did_you_mean(k, [*keys, *train_keys])} (method options: "
                              f"{', '.join(keys)}; or a train option: epochs, lr, batch_size, …)")
    options = registry.parse_options(m.options, opts, f"distill method {method!r}")
    train = {**m.info.get("train", {}), **train}
    TrainConfig.from_dict(train)  # typed and range-checked
    return options, train


# ------------------------------------------------------------------------------------------ data
class Items(torch.utils.data.Dataset):
    """``(x, y, i)`` items of a Dataset: ``i`` indexes the cached logits of the frozen nets."""

    def __init__(self, ds):
        self.X, self.y = ds.X, ds.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        return self.X[i], int(self.y[i]), i


def _raw(xs: list) -> Any:
    return xs if isinstance(xs[0], str) else np.stack(xs)


def make_collate(student: Net, frozen: list[Net], cached: torch.Tensor | None) -> Callable:
    """Items → ``{"inputs", "labels"}`` plus, for the frozen nets, ``teacher_logits`` (cached rows,
    ``(B, K, C)``) or ``teacher_inputs`` (one input per net, through its own preprocessing)."""

    def collate(items):
        raw = _raw([x for x, _, _ in items])
        inputs = student.preprocess(raw)
        batch = {"inputs": inputs, "labels": torch.tensor([y for _, y, _ in items], dtype=torch.long)}
        if cached is not None:
            batch["teacher_logits"] = cached[torch.tensor([i for _, _, i in items])]
        elif frozen:
            seen: dict[str, Any] = {}
            for net in frozen:  # nets with the student's preprocessing reuse its inputs
                key = repr(net.zoo.preprocessing)
                seen.setdefault(key, inputs if net.zoo.preprocessing == student.zoo.preprocessing
                                else net.preprocess(raw))
            batch["teacher_inputs"] = [seen[repr(n.zoo.preprocessing)] for n in frozen]
        return batch

    return collate


@torch.no_grad()
def frozen_logits(nets: list[Net], data, batch_size: int = 256) -> torch.Tensor:
    """``(N, K, C)`` logits of every frozen net over ``data`` (eval mode, one pass each)."""
    from ..engine.objectives import forward

    out = []
    for net in nets:
        module = net.module.eval()
        rows = []
        for s in range(0, len(data), batch_size):
            rows.append(forward(module, net.preprocess(_raw(list(data.X[s: s + batch_size])))).float().cpu())
        out.append(torch.cat(rows))
    return torch.stack(out, 1)


def accuracy(module: nn.Module, net: Net, data) -> float:
    """Test accuracy of ``module`` (inputs through ``net``'s preprocessing)."""
    from ..engine import evaluate
    from ..tune._common import Pairs, make_collate as plain_collate

    return float(evaluate(module, Pairs(data.X, data.y), collate_fn=plain_collate(net.preprocess))["accuracy"])


def predictions(module: nn.Module, net: Net, data) -> np.ndarray:
    from ..engine import evaluate
    from ..tune._common import Pairs, make_collate as plain_collate

    return evaluate(module, Pairs(data.X, data.y), collate_fn=plain_collate(net.preprocess),
                    predictions=True)["predictions"]


class ValAccuracy:
    """Model-selection scorer: accuracy on the labelled validation items through the student's preprocessing."""

    name, higher_is_better = "accuracy", True

    def __init__(self, student: Net):
        self.student = student

    def __call__(self, model: nn.Module, val) -> float:
        return accuracy(model, self.student, val)


def fit_val(train, val_fraction: float, seed: int):
    """``(fit, val)``: a stratified validation part of the labelled training items (None when too few)."""
    labelled = train.labelled
    if val_fraction <= 0 or labelled.sum() < 20:
        return train, None
    lab = train.subset(labelled)
    mask = np.zeros(len(train), bool)
    mask[np.flatnonzero(labelled)[split_mask(lab, val_fraction, seed)]] = True
    return train.subset(~mask), train.subset(mask)


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


@contextlib.contextmanager
def bn_frozen(module: nn.Module, on: bool = True):
    """While inside, ``module``'s BatchNorm layers stay in eval mode when it trains: they normalise with their
    running statistics and do not update them (their affine weights still train)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if on else []
    for m in bns:
        m.train = types.MethodType(_eval_only, m)
    try:
        yield
    finally:
        for m in bns:
            del m.train


def train_student(student_module: nn.Module, student: Net, frozen: list[Net], objective: Callable, fit, val,
                  cfg, *, cache: bool, out_dir: Path | None = None, freeze_bn: bool = False) -> tuple[Any, dict]:
    """Train ``student_module`` with ``objective(frozen modules or None)``; the frozen nets' logits are
    cached once when ``cache`` (else the objective runs them per batch); ``freeze_bn`` keeps the student's
    BatchNorm layers in eval mode (:func:`bn_frozen`). Returns ``(TrainResult, timing)``."""
    from ..engine import train

    t0 = time.perf_counter()
    cached = frozen_logits(frozen, fit) if cache and frozen else None
    t_cache = time.perf_counter() - t0
    obj = objective(None if cached is not None else [n.module for n in frozen])
    collate = make_collate(student, frozen, cached)
    t1 = time.perf_counter()
    with bn_frozen(student_module, freeze_bn):
        result = train(student_module, Items(fit), obj, cfg, val_data=val, collate_fn=collate,
                       metric=ValAccuracy(student) if val is not None else "loss", out_dir=out_dir)
    student_module.eval()
    return result, {"cache_s": round(t_cache, 3), "train_s": round(time.perf_counter() - t1, 3),
                    "cached": cached is not None}


# ------------------------------------------------------------------------------------------ entry point
def distill(teachers: list, student: Any, train_data, test_data, *, method: str = "kd",
            config: Mapping[str, Any] | None = None, out_dir: str | Path | None = None, split=None,
            progress: bool = False) -> DistillResult:
    """Distil ``teachers`` (nets or specs) into ``student`` on ``train_data``; score on ``test_data`` only.

    ``config`` mixes the method's options (``transferkit distill --list``) and TrainConfig options
    (``epochs``, ``lr``, …), checked before anything loads. ``split`` (the record of the train/test split)
    is written into the student Delta's ``meta["split"]`` and ``out_dir/split.json``. The student is saved
    as a ``full`` Delta of its base model (``out_dir/delta``): a run folder that ``merge`` and ``distill``
    itself load like a ``tune`` run.
    """
    from ..data.dataset import validate
    from ..delta import from_states
    from ..engine import TrainConfig, is_main_process

    m = registry.get(STAGE, method)
    options, train_opts = split_config(method, config)
    cfg = TrainConfig.from_dict({**train_opts, "progress": progress})
    validate(train_data, need_labels=m.info.get("needs_labels", True))
    classes = list(train_data.classes)
    if m.info.get("check_data"):  # a method's options against the data, before any model loads (ncd)
        m.info["check_data"](options, classes)
    label_map = getattr(options, "label_map", None)  # kd: teacher class → data class
    teachers = [t if isinstance(t, Net) else load_net(t, None if label_map else classes) for t in teachers]
    student = student if isinstance(student, Net) else load_net(student, classes)
    if not teachers:
        raise ConfigError("distill needs at least one teacher")
    if label_map:
        teachers = map_teachers(teachers, label_map, classes, options.temperature)
    check_modality([*teachers, student], train_data)
    out_dir = Path(out_dir) if out_dir else None
    if out_dir and split is not None and is_main_process():
        from ..data.split import write_split

        out_dir.mkdir(parents=True, exist_ok=True)
        write_split(out_dir, split)
    t0 = time.perf_counter()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        module, history, extra = m.fn(teachers, student, train_data, test_data, options=options, cfg=cfg,
                                      classes=classes)
    metrics = {"method": method, "student": student.name, "teachers": [t.name for t in teachers],
               "seconds": round(time.perf_counter() - t0, 2),
               "student_params": sum(p.numel() for p in module.parameters()), **extra}
    if test_data is not None:
        if "test_accuracy" not in metrics:  # a method whose outputs are not the data's classes scores itself (ncd)
            metrics["test_accuracy"] = accuracy(module, student, test_data)
        if "teacher_test_accuracy" not in metrics:
            metrics["teacher_test_accuracy"] = {t.name: accuracy(t.module, t, test_data) for t in teachers
                                                if t.module is not None}
        if "start_test_accuracy" in metrics:
            metrics["transfer_delta"] = metrics["test_accuracy"] - metrics["start_test_accuracy"]
        metrics["n_test"] = len(test_data)
    base = {"backbone." + k: v for k, v in student.zoo.backbone.state_dict().items()}
    delta = from_states(base, dict(module.state_dict()), base_name=student.zoo.name)
    delta.meta.update({"method": f"distill:{method}", "classes": classes, "options": dataclasses.asdict(options),
                       "teachers": metrics["teachers"]})
    if "architecture" in extra:  # a student with a derived architecture (n2n, tas): its run folder rebuilds it
        delta.meta.update({"architecture": extra["architecture"], "requires": "transferkit.distill.arch.rebuild_run"})
    if split is not None:
        delta.meta["split"] = split.to_dict()
    if out_dir and is_main_process():
        from ..io import write_json

        delta.save(out_dir / "delta")
        write_json(out_dir / "history.json", history)
        write_json(out_dir / "metrics.json", metrics)
    return DistillResult(method, module, metrics, history, delta, out_dir)
