"""``transferkit run PIPELINE.yaml``: rank → ground truth → tune top-k → merge → report, in one run folder.

>>> from transferkit.pipeline import load_config, run_pipeline, DEFAULT_PIPELINE
>>> cfg = load_config("examples/pipeline.yaml")           # doctest: +SKIP  (validated; ConfigError on bad input)
>>> summary = run_pipeline(cfg, "runs/text")               # doctest: +SKIP
>>> summary = run_pipeline(cfg, "runs/text", resume=True)  # doctest: +SKIP  (finished stages are not redone)

The YAML (every key but ``targets`` and ``models`` is optional; see ``docs/pipeline.md``)::

    name: text-sentiment
    targets:                      # dataset specs (built-in names, CSV/JSONL/parquet/npz paths, image folders)
      - vader:movies
      - {data: vader:amazon, name: amazon, limit: 400, per_class: 200, test_size: 0.3}
    models: [all-minilm-l6-v2, paraphrase-minilm-l3-v2]   # catalogue names, HF dirs, hf:ID, timm:NAME
    model_options: {all-minilm-l6-v2: {max_length: 64}}    # load_model options, used by every stage
    metrics: [logme, linear_probe]                         # or "all"
    tune:
      method: lora                # any transferkit.tune method
      top_k: 1                    # candidates tuned per target, best-ranked first
      select_by: logme            # metric whose ranking picks them (default: the first metric)
      config: {epochs: 2, r: 8}   # method options + TrainConfig options
      ground_truth: true          # also tune every candidate: measured accuracy → τ_w, rel@1
      ground_truth_method: linear # default: the tune method (and its config)
      ground_truth_config: {}
    merge: {method: ties, options: {k: 0.2}}   # merges per-target deltas of one base (≥ 2 targets)
    seeds: [0]                    # tune runs repeat per seed (mean ± std); seeds[0] samples and splits the data
    limits: {samples: 400, per_class: null, epochs: 3, time: 600}

Run folder: ``state.json`` (finished stages, written atomically), ``pipeline.yaml`` (the resolved
config), one folder per stage (``rank/``, ``ground_truth/``, ``tune/``, ``merge/``, ``report/``),
``summary.json`` and ``report.html``. Every unit of work (one model on one target for one seed) is
stored when it finishes, so a resumed run also skips the finished units of an interrupted stage.
Features come from transferkit's shared cache (``TRANSFERKIT_CACHE``), so rank and linear probes
extract each (model, data) pair once across stages and runs.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import difflib
import hashlib
import inspect
import json
import math
import os
import shlex
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError, TransferkitError

__all__ = ["STAGES", "MERGE_METHODS", "PipelineConfig", "Target", "TuneSpec", "MergeSpec", "Limits",
           "load_config", "run_pipeline", "default_pipeline", "DEFAULT_PIPELINE"]

STAGES = ("rank", "ground_truth", "tune", "merge", "report")
MERGE_METHODS = ("ties", "task_arithmetic", "average")
STATE_VERSION = 1

_TOP_KEYS = ("name", "targets", "models", "model_options", "metrics", "tune", "merge", "seeds", "limits")
_TARGET_KEYS = ("data", "name", "limit", "per_class", "test_size")
_TUNE_KEYS = ("method", "top_k", "select_by", "config", "ground_truth", "ground_truth_method", "ground_truth_config")
_MERGE_KEYS = ("method", "options")
_LIMIT_KEYS = ("samples", "per_class", "epochs", "time")


# ----------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class Target:
    """One target dataset: ``data`` spec, a folder-safe ``name``, sub-sampling and the test fraction."""

    data: Any
    name: str
    limit: int | None = None
    per_class: int | None = None
    test_size: float = 0.3


@dataclass
class TuneSpec:
    method: str
    top_k: int = 1
    select_by: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    ground_truth: bool = False
    ground_truth_method: str = ""
    ground_truth_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    method: str = "ties"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Limits:
    samples: int | None = None     # default per-target ``limit`` (stratified sub-sample)
    per_class: int | None = None   # default per-target ``per_class``
    epochs: int | None = None      # cap on the epochs of every tune run
    time: float | None = None      # seconds; past it, remaining ground-truth runs are skipped


@dataclass
class PipelineConfig:
    """A validated pipeline; build it with :func:`load_config`."""

    targets: list[Target]
    models: list[str]
    metrics: list[str]
    tune: TuneSpec
    merge: MergeSpec | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    limits: Limits = field(default_factory=Limits)
    name: str = "pipeline"
    source: str | None = None  # the YAML file it came from
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # model spec → load_model options

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able form that :func:`load_config` reads back to the same config."""
        tune = dataclasses.asdict(self.tune)
        targets = []
        for t in self.targets:
            # a Dataset object (Python API) is recorded by name and content hash; it cannot be re-read from YAML
            data = t.data if isinstance(t.data, str) else f"<dataset {t.data.name} {t.data.fingerprint()[:16]}>"
            targets.append({"data": data, "name": t.name, "limit": t.limit, "per_class": t.per_class,
                            "test_size": t.test_size})
        out = {
            "name": self.name,
            "targets": targets,
            "models": list(self.models),
            "metrics": list(self.metrics),
            "tune": tune,
            "merge": dataclasses.asdict(self.merge) if self.merge else None,
            "seeds": list(self.seeds),
            "limits": dataclasses.asdict(self.limits),
        }
        if self.model_options:  # only when set, so configs without it keep their fingerprint
            out["model_options"] = {m: dict(o) for m, o in self.model_options.items()}
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(d: Mapping, allowed, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}{_did_you_mean(key, allowed)} (known: {', '.join(allowed)})")


def _mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(v).__name__} {v!r}")
    for k in v:
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings, got {k!r}")
    return dict(v)


def _int(v: Any, where: str, *, minimum: int = 1, optional: bool = True) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where} must be an integer ≥ {minimum}{' or null' if optional else ''}, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{where} must be ≥ {minimum}, got {v}")
    return int(v)


def _number(v: Any, where: str, *, optional: bool = True) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where} must be a positive number{' or null' if optional else ''}, got {v!r}")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {v!r}")
    return v.strip()


def _str_list(v: Any, where: str, *, allow_str: bool = True) -> list[str]:
    if isinstance(v, str) and allow_str:
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where} must be a non-empty list, got {v!r}")
    return [_str(x, f"{where}[{i}]") for i, x in enumerate(v)]


def _tune_methods() -> dict:
    from .tune import METHODS

    return METHODS


def default_method() -> str:
    """``lora`` when the tune module provides it, else ``full``."""
    return "lora" if "lora" in _tune_methods() else "full"


def _check_method(method: str, where: str) -> str:
    methods = _tune_methods()
    if method not in methods:
        raise ConfigError(f"unknown tune method {method!r} in {where}{_did_you_mean(method, methods)} "
                          f"(available: {', '.join(methods)})")
    return method


def _check_tune_config(method: str, config: dict, where: str) -> None:
    """Unknown or mistyped method/train options fail at load time, not after the rank stage."""
    try:
        from .tune.registry import split_config
    except ImportError:  # older tune module: train options only
        split_config = None
    try:
        from .engine import TrainConfig

        if split_config is not None:
            _, train = split_config(method, config)
        else:
            train = config
        TrainConfig.from_dict({k: v for k, v in train.items() if k != "progress"})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _resolve_path(spec: str, base_dir: Path | None) -> str:
    """A relative path that exists next to the YAML (and not in the working directory) is resolved there."""
    if base_dir is None or os.path.isabs(spec) or os.path.exists(spec):
        return spec
    cand = base_dir / spec
    return str(cand) if cand.exists() else spec


def _slug(text: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text)).strip("-.")
    return s[-60:] or "target"


def _check_target_data(spec: str, where: str) -> None:
    from .data.builtin import builtin_names, is_builtin

    if is_builtin(spec) or os.path.exists(os.path.expanduser(spec)):
        return
    names = builtin_names()
    raise ConfigError(f"{where}: unknown dataset {spec!r}{_did_you_mean(spec, names)} (built-in: {', '.join(names)}; "
                      "or an existing CSV/JSONL/parquet/npz file or image folder)")


def _parse_targets(raw: Any, base_dir: Path | None) -> list[Target]:
    if raw is None:
        raise ConfigError("missing 'targets': give at least one dataset, e.g. targets: [vader:movies]")
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, (list, tuple)):
        raw = [raw]
    if not raw:
        raise ConfigError("'targets' is empty: give at least one dataset, e.g. targets: [vader:movies]")
    targets, names = [], set()
    for i, item in enumerate(raw):
        where = f"targets[{i}]"
        if not isinstance(item, Mapping):
            item = {"data": item}
        item = _mapping(item, where)
        _check_keys(item, _TARGET_KEYS, where)
        if "data" not in item:
            raise ConfigError(f"{where}: missing 'data' (a dataset spec)")
        data = item["data"]
        if isinstance(data, (str, os.PathLike)):
            data = _resolve_path(_str(str(data), f"{where}.data"), base_dir)
            _check_target_data(data, where)
            default_name = Path(data).stem if os.path.exists(data) else data
        else:
            from .data import Dataset

            if not isinstance(data, Dataset):
                raise ConfigError(f"{where}.data must be a dataset spec (string) or a transferkit Dataset, "
                                  f"got {type(data).__name__}")
            default_name = data.name
        name = _slug(_str(item.get("name", default_name), f"{where}.name"))
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        test_size = item.get("test_size", 0.3)
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0 < test_size < 1:
            raise ConfigError(f"{where}.test_size must be a fraction in (0, 1), got {test_size!r}")
        targets.append(Target(data, name, _int(item.get("limit"), f"{where}.limit", minimum=2),
                              _int(item.get("per_class"), f"{where}.per_class"), float(test_size)))
    return targets


def _parse_models(raw: Any, base_dir: Path | None) -> list[str]:
    from .errors import ModelError
    from .rank.runner import check_model_specs

    if raw is None:
        raise ConfigError("missing 'models': list the candidate source models, e.g. models: [all-minilm-l6-v2]")
    models = [_resolve_path(m, base_dir) for m in _str_list(raw, "models")]
    for m in models:
        try:
            check_model_specs([m])
        except ModelError as e:
            from .zoo import model_names

            msg, hint = str(e), _did_you_mean(m, model_names())
            if hint and "; " in msg:
                first, rest = msg.split("; ", 1)
                msg = f"{first}{hint} {rest}"
            raise ConfigError(f"models: {msg}") from None
    try:
        check_model_specs(models)
    except ModelError as e:
        raise ConfigError(f"models: {e}") from None
    return models


def _parse_model_options(raw: Any, models: list[str], base_dir: Path | None) -> dict[str, dict[str, Any]]:
    """``{model: {option: value}}`` for :func:`transferkit.zoo.load_model`; a catalogue model accepts the
    options of its catalogue entry (e.g. ``size`` of an image model), each with the type of its default."""
    from .assets import catalogue

    out = {}
    for spec, opts in _mapping(raw, "model_options").items():
        model = _resolve_path(spec, base_dir)
        if model not in models:
            raise ConfigError(f"model_options: {spec!r} is not one of the models{_did_you_mean(spec, models)}")
        opts = _mapping(opts, f"model_options.{spec}")
        entry = catalogue().get(model)
        known = (entry.get("options") or {}) if entry is not None else None
        for k, v in opts.items():
            if known is None:
                break  # not a catalogue model: its loader checks the options
            if k not in known:
                raise ConfigError(f"unknown option {k!r} in model_options.{spec}{_did_you_mean(k, known)} "
                                  f"(known: {', '.join(known)})")
            default = known[k]
            if isinstance(default, bool) or isinstance(v, bool):
                ok = isinstance(v, bool) and isinstance(default, bool)
            elif isinstance(default, (int, float)):  # sizes, lengths: positive numbers
                ok = isinstance(v, (int, float) if isinstance(default, float) else int) and v > 0
            else:
                ok = isinstance(v, type(default))
            if not ok:
                raise ConfigError(f"model_options.{spec}.{k} must be of the type of the catalogue default "
                                  f"{default!r}, got {v!r}")
        out[model] = opts
    return out


def _parse_metrics(raw: Any) -> list[str]:
    from .rank import METRICS, resolve_metrics

    names = _str_list(raw if raw is not None else ["logme"], "metrics")
    for n in names:
        if n != "all" and n not in METRICS:
            raise ConfigError(f"unknown metric {n!r} in metrics{_did_you_mean(n, METRICS)} (known: {', '.join(sorted(METRICS))}, all)")
    return resolve_metrics(names)


def _merge_fn(method: str) -> Callable:
    from . import merge

    return getattr(merge, method)


def _parse_merge(raw: Any) -> MergeSpec | None:
    if raw is None or raw is False:
        return None
    if isinstance(raw, str):
        raw = {"method": raw}
    raw = _mapping(raw, "merge")
    _check_keys(raw, _MERGE_KEYS, "merge")
    method = _str(raw.get("method", "ties"), "merge.method")
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}{_did_you_mean(method, MERGE_METHODS)} (available: {', '.join(MERGE_METHODS)})")
    options = _mapping(raw.get("options"), "merge.options")
    params = [p for p in inspect.signature(_merge_fn(method)).parameters.values()
              if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    allowed = [p.name for p in params]
    for k in options:
        if k not in allowed:
            raise ConfigError(f"unknown option {k!r} for merge method {method!r}{_did_you_mean(k, allowed)} (known: {', '.join(allowed)})")
    return MergeSpec(method, options)


def _parse_seeds(raw: Any) -> list[int]:
    if raw is None:
        return [0]
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    if not raw:
        raise ConfigError("seeds must be a non-empty list of integers")
    seeds = [_int(s, f"seeds[{i}]", minimum=0, optional=False) for i, s in enumerate(raw)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    return seeds


def _parse_limits(raw: Any) -> Limits:
    raw = _mapping(raw, "limits")
    _check_keys(raw, _LIMIT_KEYS, "limits")
    return Limits(_int(raw.get("samples"), "limits.samples", minimum=2), _int(raw.get("per_class"), "limits.per_class"),
                  _int(raw.get("epochs"), "limits.epochs"), _number(raw.get("time"), "limits.time"))


def _parse_tune(raw: Any, models: list[str], metrics: list[str]) -> TuneSpec:
    raw = _mapping(raw, "tune")
    _check_keys(raw, _TUNE_KEYS, "tune")
    method = _check_method(_str(raw.get("method", default_method()), "tune.method"), "tune.method")
    top_k = _int(raw.get("top_k", 1), "tune.top_k", optional=False)
    if top_k > len(models):
        raise ConfigError(f"tune.top_k is {top_k} but there are only {len(models)} candidate model(s)")
    select_by = _str(raw.get("select_by", metrics[0]), "tune.select_by")
    if select_by not in metrics:
        raise ConfigError(f"tune.select_by {select_by!r} is not one of the metrics ({', '.join(metrics)}){_did_you_mean(select_by, metrics)}")
    config = _mapping(raw.get("config"), "tune.config")
    _check_tune_config(method, config, "tune.config")
    gt = _bool(raw.get("ground_truth", False), "tune.ground_truth")
    gt_method = _check_method(_str(raw.get("ground_truth_method", method), "tune.ground_truth_method"), "tune.ground_truth_method")
    if "ground_truth_config" in raw:
        gt_config = _mapping(raw["ground_truth_config"], "tune.ground_truth_config")
    else:
        gt_config = dict(config) if gt_method == method else {}
    _check_tune_config(gt_method, gt_config, "tune.ground_truth_config")
    return TuneSpec(method, top_k, select_by, config, gt, gt_method, gt_config)


def load_config(path_or_dict: str | os.PathLike | Mapping | PipelineConfig) -> PipelineConfig:
    """Read and validate a pipeline (a YAML path, a dict or a :class:`PipelineConfig`).

    Every problem raises a one-line :class:`~transferkit.errors.ConfigError`: unknown keys (with a
    did-you-mean), missing ``targets``/``models``, unknown datasets, models, metrics, tune or merge
    methods and options, ``top_k`` larger than the number of candidates, and values of the wrong type.
    Relative paths in a YAML file are resolved against the file's folder when they exist there.
    """
    if isinstance(path_or_dict, PipelineConfig):
        return path_or_dict
    source, base_dir = None, None
    if isinstance(path_or_dict, (str, os.PathLike)):
        import yaml

        path = Path(path_or_dict).expanduser()
        if not path.is_file():
            raise ConfigError(f"pipeline file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        source, base_dir = str(path), path.parent
    else:
        raw = path_or_dict
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a pipeline must be a mapping with 'targets' and 'models', got {type(raw).__name__}")
    raw = _mapping(raw, "pipeline")
    _check_keys(raw, _TOP_KEYS, "pipeline")
    targets = _parse_targets(raw.get("targets"), base_dir)
    models = _parse_models(raw.get("models"), base_dir)
    model_options = _parse_model_options(raw.get("model_options"), models, base_dir)
    metrics = _parse_metrics(raw.get("metrics"))
    tune = _parse_tune(raw.get("tune"), models, metrics)
    return PipelineConfig(
        targets=targets, models=models, metrics=metrics, tune=tune, merge=_parse_merge(raw.get("merge")),
        seeds=_parse_seeds(raw.get("seeds")), limits=_parse_limits(raw.get("limits")),
        name=_str(raw.get("name", Path(source).stem if source else "pipeline"), "name"), source=source,
        model_options=model_options)


# ----------------------------------------------------------------------------------------------------------
# default pipeline (the demo)

DEMO_TARGETS = ["opencv-digits", "sklearn-digits"]
DEMO_MODELS = ["mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
               "digits-mnist", "digits-usps", "digits-svhn"]
DEMO_RESIZED = DEMO_MODELS[:4]  # the ImageNet CNNs (global pooling: any input size); the digit CNNs have fixed sizes
DEMO_IMAGE_SIZE = {False: 64, True: 32}


def default_pipeline(quick: bool = False) -> dict[str, Any]:
    """The demo: 7 real image models ranked, fine-tuned, tuned and merged on two handwritten-digit targets.

    Targets: OpenCV's digits (20×20) and scikit-learn's digits (8×8), 60 images per class each
    (``quick``: 20). Candidates: MobileNetV2, EfficientNet-Lite0/1/2 (ImageNet; run at
    ``DEMO_IMAGE_SIZE`` px instead of 224–260 px in every stage, so the ranked features and the
    fine-tuned network see the same inputs) and the MNIST/USPS/SVHN digit CNNs. Ranked by LogME,
    LEEP, NCE and TransRate; ground truth = a short full fine-tune of every candidate on every
    target; the LogME top-2 per target tuned with ``lora`` (``full`` when LoRA is unavailable), the
    better validation accuracy picked; the per-target deltas of a base tuned on both targets merged
    with TIES. ``quick`` (CI) also uses smaller ImageNet inputs and fewer epochs.
    """
    method = default_method()
    lr = 5e-3 if method == "lora" else 5e-4
    size = DEMO_IMAGE_SIZE[quick]
    return {
        "name": "demo-quick" if quick else "demo",
        "targets": [{"data": t, "name": t, "per_class": 20 if quick else 60} for t in DEMO_TARGETS],
        "models": list(DEMO_MODELS),
        "model_options": {m: {"size": size} for m in DEMO_RESIZED},
        "metrics": ["logme", "leep", "nce", "transrate"],
        "tune": {"method": method, "top_k": 2, "select_by": "logme", "config": {"epochs": 3 if quick else 5, "lr": lr},
                 "ground_truth": True, "ground_truth_method": "full",
                 "ground_truth_config": {"epochs": 2 if quick else 3, "lr": 1e-3, "batch_size": 16,
                                         "scheduler": "constant", "warmup_ratio": 0.0}},
        "merge": {"method": "ties", "options": {"k": 0.2}},
        "seeds": [0],
        "limits": {"time": 600},
    }


DEFAULT_PIPELINE: dict[str, Any] = default_pipeline()


# ----------------------------------------------------------------------------------------------------------
# run helpers


def _fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    """One line per unit of work on stderr: stage, target, model, elapsed and the stage's ETA.

    The ETA is the stage's remaining work at the pace measured so far, each unit weighted by its
    model's expected cost (see :func:`_unit_weight`), so a zoo that mixes small and large models
    is not estimated from the small ones alone.
    """

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[transferkit] {text}", file=self.stream, flush=True)

    def unit(self, stage: str, i: int, n: int, what: str, eta: float | None) -> None:
        self.line(f"{stage} {i}/{n} | {what} | elapsed {_fmt_s(time.perf_counter() - self.t0)} | ETA {_fmt_s(eta)}")


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled by a thread with psutil).

    ``peak_rss_mb`` is the highest RSS seen, ``delta_mb`` its rise over the RSS at entry; on CUDA
    also ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``). Falls back to ``ru_maxrss`` (the
    process' lifetime high-water mark) where psutil is missing.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = 0
        self.cuda_peak: int | None = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss if self._proc is not None else _maxrss()

    def __enter__(self) -> "PeakMemory":
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover
            self._proc = None
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except Exception:  # pragma: no cover
            pass
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        try:
            import torch

            if torch.cuda.is_available():
                self.cuda_peak = int(torch.cuda.max_memory_allocated())
        except Exception:  # pragma: no cover
            pass

    def as_dict(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(self.peak / 2**20, 1), "delta_rss_mb": round((self.peak - self.start) / 2**20, 1)}
        if self.cuda_peak is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def _maxrss() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def environment() -> dict[str, Any]:
    """Versions and hardware that a result depends on."""
    import platform
    from importlib import metadata

    pkgs = {}
    for p in ("transferkit", "torch", "transformers", "peft", "accelerate", "numpy", "scikit-learn", "safetensors"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pkgs[p] = None
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "packages": pkgs}
    try:
        env["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        pass
    return env


def _label(spec: str) -> str:
    """A short display name for a model spec (a folder's name for a path)."""
    return Path(spec).name if (os.sep in spec or "/" in spec) and not spec.startswith(("hf:", "timm:")) else spec


class _Pairs:
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], int(self.y[i])


def _raw_collate(preprocess):
    import numpy as np
    import torch

    def collate(items):
        xs = [x for x, _ in items]
        raw = xs if isinstance(xs[0], str) else np.stack(xs)
        return {"inputs": preprocess(raw), "labels": torch.tensor([y for _, y in items], dtype=torch.long)}
    return collate


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def _val_accuracy(metrics: dict) -> float | None:
    for k in ("val_val_accuracy", "val_accuracy", "best_val_accuracy"):
        if isinstance(metrics.get(k), (int, float)):
            return float(metrics[k])
    return None


class _Run:
    """Mutable state of one pipeline run (folder, state file, datasets, progress)."""

    def __init__(self, cfg: PipelineConfig, out: Path, resume: bool, progress: bool):
        self.cfg, self.out, self.resume = cfg, out, resume
        self.progress = _Progress(progress)
        self._data: dict[str, tuple[Any, Any]] = {}
        self.results: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self.state: dict[str, Any] = {}
        self.command = ""

    # -- state ---------------------------------------------------------------------------------------
    def load_state(self) -> None:
        path = self.out / "state.json"
        fp = self.cfg.fingerprint()
        if self.resume and path.is_file():
            try:
                state = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"cannot resume: {path} is unreadable ({e})") from None
            if state.get("config") != fp:
                raise ConfigError(f"cannot resume: {self.out} holds a run of a different pipeline config; "
                                  "use a new --out or run without --resume")
            self.state = state
        else:
            if not self.resume:
                self._clean()
            self.state = {"version": STATE_VERSION, "config": fp, "stages": {}, "elapsed_s": 0.0,
                          "started": _now()}

    def _clean(self) -> None:
        """A fresh run removes the artifacts of an earlier run in the same folder (only ours)."""
        for name in (*STAGES, "state.json", "summary.json", "report.html", "pipeline.yaml"):
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def save_state(self) -> None:
        from .io import write_json

        write_json(self.out / "state.json", self.state)

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") in ("done", "skipped")

    def elapsed(self) -> float:
        """Seconds spent on this pipeline, earlier (resumed) runs' finished stages included."""
        return float(self.state.get("elapsed_s", 0.0)) + (time.perf_counter() - self.t0)

    # -- data ----------------------------------------------------------------------------------------
    def data(self, target: Target):
        if target.name not in self._data:
            from .data import load_dataset, train_test_split

            lim = self.cfg.limits
            ds = load_dataset(target.data, limit=target.limit or lim.samples, per_class=target.per_class or lim.per_class,
                              seed=self.cfg.seeds[0])
            self._data[target.name] = train_test_split(ds, test_size=target.test_size, seed=self.cfg.seeds[0])
        return self._data[target.name]

    def model(self, spec: str):
        """Load candidate ``spec`` with its ``model_options``: every stage sees the same preprocessing."""
        from .zoo import load_model

        return load_model(spec, **self.cfg.model_options.get(spec, {}))

    def tune_config(self, method: str, config: dict, seed: int) -> dict:
        cfg = dict(config)
        cfg["seed"] = seed
        cap = self.cfg.limits.epochs
        if cap is not None:
            default = _method_default(method, "epochs")
            cfg["epochs"] = min(int(cfg.get("epochs", default if default is not None else cap)), cap)
        return cfg


def _method_default(method: str, key: str) -> Any:
    info = _tune_methods().get(method)
    if isinstance(info, Mapping) and isinstance(info.get("train"), Mapping):
        return info["train"].get(key)
    try:
        from .tune.baselines import DEFAULTS

        return DEFAULTS.get(method, {}).get(key)
    except ImportError:  # pragma: no cover
        return None


def _finite_json(obj: Any) -> Any:
    """NaN/inf (an undefined correlation, a failed score) become null, so every JSON file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _tune_unit(run: _Run, stage: str, target: Target, model: str, method: str, config: dict, seed: int) -> dict:
    """Tune ``model`` on ``target`` once (or read the stored result of a finished unit on resume)."""
    from .io import write_json
    from .tune import tune

    unit_dir = run.out / stage / target.name / _slug(_label(model)) / f"seed{seed}"
    record_path = unit_dir / "unit.json"
    if run.resume and record_path.is_file():
        rec = json.loads(record_path.read_text())
        rec["resumed"] = True
        return rec
    train, test = run.data(target)
    cfg = run.tune_config(method, config, seed)
    resume_unit = run.resume and unit_dir.exists()
    if unit_dir.exists() and not resume_unit:
        shutil.rmtree(unit_dir)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = tune(run.model(model), train, test, method=method, config=cfg, out_dir=unit_dir,
                   resume=resume_unit, progress=False)
        seconds = time.perf_counter() - t0
    m = res.metrics
    rec = {
        "stage": stage, "target": target.name, "model": model, "label": _label(model), "method": method, "seed": seed,
        "config": cfg, "accuracy": m.get("test_accuracy"), "val_accuracy": _val_accuracy(m),
        "seconds": round(seconds, 2), "trainable_params": m.get("trainable_params"), "total_params": m.get("total_params"),
        **mem.as_dict(), "history": res.history, "metrics": m, "dir": str(unit_dir.relative_to(run.out)),
        "delta_kind": res.delta.kind,
    }
    rec = _finite_json(rec)
    write_json(record_path, rec)
    return rec


def _aggregate(records: list[dict]) -> dict:
    """Per (target, model): mean ± std of accuracy over seeds plus the first seed's run details."""
    first = records[0]
    acc, acc_std = _mean_std([r["accuracy"] for r in records])
    val, _ = _mean_std([r["val_accuracy"] for r in records])
    keep = ("model", "label", "method", "trainable_params", "total_params", "delta_kind", "dir", "history")
    return {
        **{k: first.get(k) for k in keep},
        "accuracy": acc, "accuracy_std": acc_std, "val_accuracy": val,
        "seconds": round(sum(r["seconds"] for r in records) / len(records), 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
        "delta_rss_mb": max(r.get("delta_rss_mb", 0.0) for r in records),
        "seeds": {str(r["seed"]): {"accuracy": r["accuracy"], "val_accuracy": r["val_accuracy"], "seconds": r["seconds"]}
                  for r in records},
    }


def _unit_weight(run: _Run, unit: tuple) -> float:
    """Expected relative cost of a unit: the rank stage's feature-extraction time of its (target, model)
    once known, else the model's catalogue parameter count, else 1."""
    if len(unit) >= 2 and isinstance(unit[0], Target):
        secs = (((run.results.get("rank") or {}).get(unit[0].name) or {}).get("seconds") or {}).get(unit[1]) or {}
        if isinstance(secs.get("features"), (int, float)) and secs["features"] > 0:
            return float(secs["features"]) + 0.5
    model = unit[1] if len(unit) >= 2 else unit[0]
    try:
        from .assets import catalogue

        params = catalogue().get(model, {}).get("params")
    except Exception:  # noqa: BLE001  (an estimate only)
        params = None
    return max(float(params) / 1e6, 0.2) if isinstance(params, (int, float)) else 1.0


def _run_units(run: _Run, stage: str, units: list[tuple], fn: Callable, *, budget: bool = False) -> tuple[list, list]:
    """Run ``fn(*unit)`` for every unit with progress/ETA; with ``budget`` stop once limits.time is spent."""
    durations, done_w, out, skipped = [], [], [], []
    weights = [_unit_weight(run, unit) for unit in units]
    for i, unit in enumerate(units, 1):
        what = " | ".join(_label(str(u)) if not isinstance(u, Target) else u.name for u in unit[:2])
        if len(unit) > 2:
            what += f" | seed {unit[-1]}"
        limit = run.cfg.limits.time
        if budget and limit is not None and run.elapsed() > limit:
            skipped.append({"unit": [u.name if isinstance(u, Target) else u for u in unit],
                            "reason": f"time limit of {limit:g} s reached"})
            continue
        eta = sum(durations) / sum(done_w) * sum(weights[i - 1:]) if durations else None
        run.progress.unit(stage, i, len(units), what, eta)
        t0 = time.perf_counter()
        rec = fn(*unit)
        if not rec.get("resumed"):
            durations.append(time.perf_counter() - t0)
            done_w.append(weights[i - 1])
        out.append(rec)
    if skipped:
        run.progress.line(f"{stage}: {len(skipped)} unit(s) skipped: time limit of {run.cfg.limits.time:g} s reached")
    return out, skipped


# ----------------------------------------------------------------------------------------------------------
# stages: each returns a JSON-able dict stored as <out>/<stage>/result.json


def _stage_rank(run: _Run) -> dict:
    from .io import write_json
    from .rank.runner import rank_models

    cfg = run.cfg
    units = [(t, m) for t in cfg.targets for m in cfg.models]

    def one(target: Target, model: str) -> dict:
        path = run.out / "rank" / target.name / f"{_slug(_label(model))}.json"
        if run.resume and path.is_file():
            return {**json.loads(path.read_text()), "resumed": True}
        train, _ = run.data(target)
        spec = run.model(model) if model in cfg.model_options else model
        res = rank_models(train, [spec], cfg.metrics, seed=cfg.seeds[0], progress=False)
        name = res["models"][0]
        rec = {"target": target.name, "model": model, "n": res["n"], "classes": res["classes"], "data": res["data"],
               "scores": res["scores"][name], "notes": res.get("notes", []),
               "seconds": {"features": res["seconds"]["features"].get(name),
                           "metrics": res["seconds"].get("metrics", {})}}
        write_json(path, rec)
        return rec

    recs, _ = _run_units(run, "rank", units, one)
    out: dict[str, Any] = {}
    for target in cfg.targets:
        mine = [r for r in recs if r["target"] == target.name]
        train, test = run.data(target)
        scores = {r["model"]: r["scores"] for r in mine}
        ranking = {}
        for metric in cfg.metrics:
            ok = {m: s[metric] for m, s in scores.items() if s.get(metric) is not None and math.isfinite(s[metric])}
            ranking[metric] = sorted(ok, key=lambda m: (-ok[m], m))
        out[target.name] = {
            "data": str(target.data) if isinstance(target.data, (str, os.PathLike)) else target.data.name,
            "n_train": len(train), "n_test": len(test), "classes": list(train.classes),
            "models": list(cfg.models), "metrics": list(cfg.metrics), "scores": scores, "ranking": ranking,
            "notes": [n for r in mine for n in r["notes"]],
            "seconds": {r["model"]: r["seconds"] for r in mine},
        }
    return out


def _stage_ground_truth(run: _Run) -> dict:
    from .rank import evaluate as ev

    cfg = run.cfg
    if not cfg.tune.ground_truth:
        return {"skipped": "tune.ground_truth is false"}
    units = [(t, m, s) for t in cfg.targets for m in cfg.models for s in cfg.seeds]
    recs, skipped = _run_units(run, "ground_truth", units,
                               lambda t, m, s: _tune_unit(run, "ground_truth", t, m, cfg.tune.ground_truth_method,
                                                          cfg.tune.ground_truth_config, s), budget=True)
    rank = run.results["rank"]
    out: dict[str, Any] = {"method": cfg.tune.ground_truth_method, "config": cfg.tune.ground_truth_config,
                           "runs": {}, "accuracy": {}, "evaluation": {}, "skipped_units": skipped}
    for target in cfg.targets:
        runs = {}
        for model in cfg.models:
            mine = [r for r in recs if r["target"] == target.name and r["model"] == model]
            if mine:
                runs[model] = _aggregate(mine)
        accs = {m: r["accuracy"] for m, r in runs.items() if r["accuracy"] is not None}
        out["runs"][target.name] = runs
        out["accuracy"][target.name] = accs
        evaluation = {}
        for metric in cfg.metrics:
            scores = {m: s[metric] for m, s in rank[target.name]["scores"].items()
                      if m in accs and s.get(metric) is not None and math.isfinite(s[metric])}
            accs_m = {m: accs[m] for m in scores}
            try:
                with warnings.catch_warnings():  # constant accuracies/scores: correlations are NaN, said once here
                    warnings.simplefilter("ignore")
                    evaluation[metric] = {**ev.evaluate_scores(scores, accs_m, ks=(1, 3) if len(scores) >= 3 else (1,)),
                                          "n_models": len(scores)}
            except TransferkitError as e:
                evaluation[metric] = {"error": str(e), "n_models": len(scores)}
        out["evaluation"][target.name] = evaluation
    return out


def _select(run: _Run, target: Target) -> list[str]:
    rank = run.results["rank"][target.name]
    ranked = rank["ranking"].get(run.cfg.tune.select_by, [])
    rest = [m for m in run.cfg.models if m not in ranked]  # unscored models go last, in config order
    return (ranked + rest)[: run.cfg.tune.top_k]


def _stage_tune(run: _Run) -> dict:
    cfg = run.cfg
    spec = cfg.tune
    gt = run.results.get("ground_truth", {})
    same_as_gt = (spec.ground_truth and "skipped" not in gt and spec.ground_truth_method == spec.method
                  and spec.ground_truth_config == spec.config)
    selected = {t.name: _select(run, t) for t in cfg.targets}
    units = [(t, m, s) for t in cfg.targets for m in selected[t.name] for s in cfg.seeds]

    def one(target: Target, model: str, seed: int) -> dict:
        if same_as_gt:  # the ground-truth stage already tuned this model with this method and config
            path = run.out / "ground_truth" / target.name / _slug(_label(model)) / f"seed{seed}" / "unit.json"
            if path.is_file():
                return {**json.loads(path.read_text()), "reused_from": "ground_truth", "resumed": True}
        return _tune_unit(run, "tune", target, model, spec.method, spec.config, seed)

    recs, _ = _run_units(run, "tune", units, one)
    out: dict[str, Any] = {"method": spec.method, "config": spec.config, "top_k": spec.top_k,
                           "select_by": spec.select_by, "selected": selected, "runs": {}, "chosen": {}}
    for target in cfg.targets:
        runs = {}
        for model in selected[target.name]:
            mine = [r for r in recs if r["target"] == target.name and r["model"] == model]
            runs[model] = {**_aggregate(mine), "reused_from": mine[0].get("reused_from")}
        out["runs"][target.name] = runs
        # the final pick: best validation accuracy among the tuned candidates (ties: ranking order);
        # the test split is never used to choose
        order = selected[target.name]
        best = max(order, key=lambda m: (runs[m]["val_accuracy"] if runs[m]["val_accuracy"] is not None else -1.0,
                                         -order.index(m)))
        out["chosen"][target.name] = {"target": target.name, **{k: v for k, v in runs[best].items() if k != "history"}}
    return out


def _stage_merge(run: _Run) -> dict:
    cfg = run.cfg
    if cfg.merge is None:
        return {"skipped": "merge is not configured"}
    tuned = run.results["tune"]["runs"]
    by_base: dict[str, list[str]] = {}
    for target in cfg.targets:
        for model in tuned.get(target.name, {}):
            by_base.setdefault(model, []).append(target.name)
    groups = {b: ts for b, ts in by_base.items() if len(ts) >= 2}
    # why (not) merged, in words: a merge combines deltas of one base model tuned on several targets
    single = {b: ts[0] for b, ts in by_base.items() if len(ts) == 1}
    info = {"method": cfg.merge.method, "options": cfg.merge.options,
            "tuned": {t.name: [_label(m) for m in tuned.get(t.name, {})] for t in cfg.targets},
            "not_merged": [f"{_label(b)} (tuned on {t} only)" for b, t in single.items()]}
    if not groups:
        if len(cfg.targets) < 2:
            why = "there is one target; a merge needs the deltas of one base model tuned on 2 or more targets"
        else:
            picks = "; ".join(f"{t}: {', '.join(ms) or 'none'}" for t, ms in info["tuned"].items())
            why = (f"no base model was tuned on 2 or more targets (tuned per target: {picks}), so there are no "
                   "deltas of one base to merge; a larger tune.top_k tunes more candidates per target")
        return {"skipped": why, **info}
    units = [(b,) for b in groups]
    recs, _ = _run_units(run, "merge", units, lambda b: _merge_group(run, b, groups[b]))
    out = {**info, "groups": recs}
    norm = [t["normalized"] for g in recs for t in g.get("tasks", []) if t.get("normalized") is not None]
    out["mean_normalized"] = sum(norm) / len(norm) if norm else None
    return out


def _merge_group(run: _Run, base: str, target_names: list[str]) -> dict:
    import torch

    from .delta import Delta, apply
    from .engine import evaluate
    from .io import write_json
    from .merge import attach_head

    cfg = run.cfg
    gdir = run.out / "merge" / _slug(_label(base))
    if run.resume and (gdir / "group.json").is_file():
        return {**json.loads((gdir / "group.json").read_text()), "resumed": True}
    seed = cfg.seeds[0]
    targets = {t.name: t for t in cfg.targets}
    runs = run.results["tune"]["runs"]
    deltas = [Delta.load(run.out / runs[t][base]["dir"] / "delta") for t in target_names]
    rec: dict[str, Any] = {"base": base, "label": _label(base), "targets": target_names, "method": cfg.merge.method,
                           "tasks": []}
    if any(d.meta.get("requires") == "peft" for d in deltas):
        rec["skipped"] = f"{deltas[0].meta.get('method')} deltas are not mergeable (they need PEFT to load)"
        return rec
    t0 = time.perf_counter()
    merged = _merge_fn(cfg.merge.method)(deltas, **cfg.merge.options)
    merged.save(gdir / "delta")
    for name, delta in zip(target_names, deltas):
        _, test = run.data(targets[name])
        zm = run.model(base)
        clf = copy.deepcopy(zm.classifier(len(test.classes), seed=seed))
        apply(clf, attach_head(merged, delta))
        clf.eval()
        with torch.inference_mode():
            acc = evaluate(clf, _Pairs(test.X, test.y), collate_fn=_raw_collate(zm.preprocess))["accuracy"]
        individual = runs[name][base]["accuracy"] if len(cfg.seeds) == 1 else \
            runs[name][base]["seeds"][str(seed)]["accuracy"]
        rec["tasks"].append({"target": name, "individual": individual, "merged": float(acc),
                             "normalized": float(acc) / individual if individual else None})
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(gdir / "group.json", rec)
    return rec


def _stage_report(run: _Run) -> dict:
    from .io import write_json
    from .report import write_report

    summary = _summary(run)
    write_json(run.out / "summary.json", summary)
    path = write_report(summary, run.out, figures_dir=run.out / "report")
    return {"report": str(path.relative_to(run.out))}


def _summary(run: _Run) -> dict:
    cfg = run.cfg
    r = run.results
    return _finite_json({
        "name": cfg.name,
        "out": str(run.out),
        "config": cfg.to_dict(),
        "config_source": cfg.source,
        "command": run.command,
        "reproduce": f"transferkit run {shlex.quote(str(run.out / 'pipeline.yaml'))} --out NEW_DIR",
        "environment": environment(),
        "targets": [{"name": t.name, "data": r["rank"][t.name]["data"], "n_train": r["rank"][t.name]["n_train"],
                     "n_test": r["rank"][t.name]["n_test"], "classes": len(r["rank"][t.name]["classes"])}
                    for t in cfg.targets],
        "rank": r.get("rank"),
        "ground_truth": r.get("ground_truth"),
        "tune": r.get("tune"),
        "merge": r.get("merge"),
        "stages": {k: dict(v) for k, v in run.state["stages"].items()},
        "seconds": round(run.elapsed(), 1),
        "peak_rss_mb": round(_maxrss() / 2**20, 1),
        "started": run.state.get("started"),
    })


# ----------------------------------------------------------------------------------------------------------


def _default_command(out: Path, cfg: PipelineConfig) -> str:
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog.startswith("transferkit"):
        return shlex.join(["transferkit", *sys.argv[1:]])
    src = cfg.source or str(out / "pipeline.yaml")
    return f"transferkit run {shlex.quote(src)} --out {shlex.quote(str(out))}"


def run_pipeline(config: str | os.PathLike | Mapping | PipelineConfig, out_dir: str | os.PathLike, *,
                 resume: bool = False, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run the pipeline into ``out_dir`` and return the summary (also written to ``summary.json``).

    Stages, in order: ``rank`` (every metric on every target's training split), ``ground_truth``
    (tune every candidate: measured accuracy, τ_w and rel@k of each metric), ``tune`` (the top-k
    candidates by ``select_by`` with the tune method, over every seed; the final pick per target is
    the best *validation* accuracy), ``merge`` (per base model tuned on ≥ 2 targets: merge the task
    deltas, evaluate each task with its own head, normalized accuracy = merged ÷ individual) and
    ``report`` (``summary.json`` + ``report.html``). ``state.json`` records finished stages
    atomically; with ``resume=True`` they are read back instead of recomputed, and finished units of
    an interrupted stage are reused. A fresh run (``resume=False``) clears the folder's earlier
    pipeline artifacts. ``command`` is the command line shown in the report (default: ``sys.argv``
    when run through the CLI).
    """
    import yaml

    from .io import write_json, write_text

    cfg = load_config(config)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out, resume, progress)
    run.load_state()
    run.command = command or run.state.get("command") or _default_command(out, cfg)
    run.state["command"] = run.command
    write_text(out / "pipeline.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.save_state()
    mod = sys.modules[__name__]
    for i, stage in enumerate(STAGES, 1):
        result_path = out / stage / "result.json"
        if resume and run.done(stage) and result_path.is_file():
            run.results[stage] = json.loads(result_path.read_text())
            run.progress.line(f"stage {i}/{len(STAGES)} {stage}: finished earlier, skipped (resume)")
            continue
        run.progress.line(f"stage {i}/{len(STAGES)} {stage}")
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            result = _finite_json(getattr(mod, f"_stage_{stage}")(run))
        seconds = time.perf_counter() - t0
        status = "skipped" if "skipped" in result else "done"
        if stage != "report":
            write_json(result_path, result)
        run.results[stage] = result
        run.state["stages"][stage] = {"status": status, "seconds": round(seconds, 2), "finished": _now(), **mem.as_dict()}
        run.state["elapsed_s"] = float(run.state.get("elapsed_s", 0.0)) + seconds
        run.t0 = time.perf_counter()
        if stage == "report":  # the summary written inside the stage lacks the report's own timing
            write_json(result_path, result)
        run.save_state()
        run.progress.line(f"stage {i}/{len(STAGES)} {stage}: {status} in {_fmt_s(seconds)}"
                          + (f" ({result['skipped']})" if status == "skipped" else ""))
    summary = _summary(run)
    summary["report"] = str(out / "report.html")
    write_json(out / "summary.json", summary)
    run.progress.line(f"done in {_fmt_s(run.elapsed())}: {out / 'report.html'}")
    return summary
