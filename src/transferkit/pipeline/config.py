"""PIPELINE.yaml → a validated :class:`PipelineConfig`.

The runner owns the core keys (``name``, ``targets``, ``models``, ``model_options``, ``seeds``,
``limits``); every other top-level key belongs to the stage that registered it (``metrics`` → rank,
``tune`` → tune and ground truth, ``merge`` → merge) and is validated by that stage's ``parse``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..registry import short
from ..registry import did_you_mean as _did_you_mean
from .stage import stages

__all__ = ["Target", "Limits", "PipelineConfig", "load_config", "default_pipeline", "DEFAULT_PIPELINE",
           "DEMO_MODELS", "DEMO_TARGETS", "slug", "label"]

_CORE_KEYS = ("name", "targets", "models", "model_options", "seeds", "limits")
_TARGET_KEYS = ("data", "name", "limit", "per_class", "test_size")
_LIMIT_KEYS = ("samples", "per_class", "epochs", "time")


@dataclass(frozen=True)
class Target:
    """One target dataset: ``data`` spec, a folder-safe ``name``, sub-sampling and the test fraction."""

    data: Any
    name: str
    limit: int | None = None
    per_class: int | None = None
    test_size: float = 0.3


@dataclass
class Limits:
    samples: int | None = None     # default per-target ``limit`` (stratified sub-sample)
    per_class: int | None = None   # default per-target ``per_class``
    epochs: int | None = None      # cap on the epochs of every tune run
    time: float | None = None      # seconds; past it, budgeted units (ground truth) are skipped


@dataclass
class PipelineConfig:
    """A validated pipeline; build it with :func:`load_config`.

    ``sections`` maps each stage's name to the spec its ``parse`` returned (``cfg.section("tune")``).
    """

    targets: list[Target]
    models: list[str]
    sections: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    limits: Limits = field(default_factory=Limits)
    name: str = "pipeline"
    source: str | None = None  # the YAML file it came from
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # model spec → load_model options

    def section(self, stage: str) -> Any:
        return self.sections.get(stage)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able form that :func:`load_config` reads back to the same config."""
        targets = []
        for t in self.targets:
            # a Dataset object (Python API) is recorded by name and content hash; it cannot be re-read from YAML
            data = t.data if isinstance(t.data, str) else f"<dataset {t.data.name} {t.data.fingerprint()[:16]}>"
            targets.append({"data": data, "name": t.name, "limit": t.limit, "per_class": t.per_class,
                            "test_size": t.test_size})
        out: dict[str, Any] = {"name": self.name, "targets": targets, "models": list(self.models)}
        for stage in stages():
            if stage.key is not None and stage.key not in out:
                out[stage.key] = stage.dump(self.sections.get(stage.name))
        out["seeds"] = list(self.seeds)
        out["limits"] = dataclasses.asdict(self.limits)
        if self.model_options:  # only when set, so configs without it keep their fingerprint
            out["model_options"] = {m: dict(o) for m, o in self.model_options.items()}
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_keys(d: Mapping, allowed, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"unknown key {short(key)} in {where}{_did_you_mean(key, allowed)} (known: {', '.join(allowed)})")


def mapping(v: Any, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(v).__name__} {short(v)}")
    for k in v:
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings, got {short(k)}")
    return dict(v)


def integer(v: Any, where: str, *, minimum: int = 1, optional: bool = True) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where} must be an integer ≥ {minimum}{' or null' if optional else ''}, got {short(v)}")
    if v < minimum:
        raise ConfigError(f"{where} must be ≥ {minimum}, got {v}")
    return int(v)


def number(v: Any, where: str, *, optional: bool = True) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where} must be a positive number{' or null' if optional else ''}, got {short(v)}")
    return float(v)


def boolean(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, got {short(v)}")
    return v


def string(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where} must be a non-empty string, got {short(v)}")
    return v.strip()


def string_list(v: Any, where: str, *, allow_str: bool = True) -> list[str]:
    if isinstance(v, str) and allow_str:
        v = [s.strip() for s in v.split(",") if s.strip()]
    if not isinstance(v, (list, tuple)) or not v:
        raise ConfigError(f"{where} must be a non-empty list, got {short(v)}")
    return [string(x, f"{where}[{i}]") for i, x in enumerate(v)]


def _resolve_path(spec: str, base_dir: Path | None) -> str:
    """A relative path that exists next to the YAML (and not in the working directory) is resolved there."""
    if base_dir is None or os.path.isabs(spec) or os.path.exists(spec):
        return spec
    cand = base_dir / spec
    return str(cand) if cand.exists() else spec


def slug(text: str) -> str:
    """A folder-safe name."""
    s = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text)).strip("-.")
    return s[-60:] or "target"


def label(spec: str) -> str:
    """A short display name for a model spec (a folder's name for a path)."""
    return Path(spec).name if (os.sep in spec or "/" in spec) and not spec.startswith(("hf:", "timm:")) else spec


def _check_target_data(spec: str, where: str) -> None:
    from ..data.builtin import builtin_names, is_builtin

    if is_builtin(spec) or os.path.exists(os.path.expanduser(spec)):
        return
    names = builtin_names()
    raise ConfigError(f"{where}: unknown dataset {short(spec)}{_did_you_mean(spec, names)} (built-in: {', '.join(names)}; "
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
        item = mapping(item, where)
        check_keys(item, _TARGET_KEYS, where)
        if "data" not in item:
            raise ConfigError(f"{where}: missing 'data' (a dataset spec)")
        data = item["data"]
        if isinstance(data, (str, os.PathLike)):
            data = _resolve_path(string(str(data), f"{where}.data"), base_dir)
            _check_target_data(data, where)
            default_name = Path(data).stem if os.path.exists(data) else data
        else:
            from ..data import Dataset

            if not isinstance(data, Dataset):
                raise ConfigError(f"{where}.data must be a dataset spec (string) or a transferkit Dataset, "
                                  f"got {type(data).__name__}")
            default_name = data.name
        name = slug(string(item.get("name", default_name), f"{where}.name"))
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        test_size = item.get("test_size", 0.3)
        if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0 < test_size < 1:
            raise ConfigError(f"{where}.test_size must be a fraction in (0, 1), got {short(test_size)}")
        targets.append(Target(data, name, integer(item.get("limit"), f"{where}.limit", minimum=2),
                              integer(item.get("per_class"), f"{where}.per_class"), float(test_size)))
    return targets


def _parse_models(raw: Any, base_dir: Path | None) -> list[str]:
    from ..errors import ModelError
    from ..rank.runner import check_model_specs

    if raw is None:
        raise ConfigError("missing 'models': list the candidate source models, e.g. models: [all-minilm-l6-v2]")
    models = [_resolve_path(m, base_dir) for m in string_list(raw, "models")]
    for m in models:
        try:
            check_model_specs([m])
        except ModelError as e:
            from ..zoo import model_names

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
    from ..assets import catalogue

    out = {}
    for spec, opts in mapping(raw, "model_options").items():
        model = _resolve_path(spec, base_dir)
        if model not in models:
            raise ConfigError(f"model_options: {short(spec)} is not one of the models{_did_you_mean(spec, models)}")
        opts = mapping(opts, f"model_options.{spec}")
        if "trust_remote_code" in opts:  # a pipeline file may come from anywhere: code runs only by a typed flag
            raise ConfigError(f"model_options.{spec}.trust_remote_code is not allowed in a pipeline file: a model's "
                              "own code runs only with the command-line flag `transferkit run --trust-remote-code`")
        entry = catalogue().get(model)
        known = (entry.get("options") or {}) if entry is not None else None
        for k, v in opts.items():
            if known is None:
                break  # not a catalogue model: its loader checks the options
            if k not in known:
                raise ConfigError(f"unknown option {short(k)} in model_options.{spec}{_did_you_mean(k, known)} "
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
                                  f"{default!r}, got {short(v)}")
        out[model] = opts
    return out


def _parse_seeds(raw: Any) -> list[int]:
    if raw is None:
        return [0]
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    if not raw:
        raise ConfigError("seeds must be a non-empty list of integers")
    seeds = [integer(s, f"seeds[{i}]", minimum=0, optional=False) for i, s in enumerate(raw)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {seeds}")
    return seeds


def _parse_limits(raw: Any) -> Limits:
    raw = mapping(raw, "limits")
    check_keys(raw, _LIMIT_KEYS, "limits")
    return Limits(integer(raw.get("samples"), "limits.samples", minimum=2), integer(raw.get("per_class"), "limits.per_class"),
                  integer(raw.get("epochs"), "limits.epochs"), number(raw.get("time"), "limits.time"))


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
        from ..io import read_yaml_file

        path = Path(path_or_dict).expanduser()
        raw = read_yaml_file(path, "pipeline file")  # missing file, invalid YAML, alias bombs: one-line errors
        source, base_dir = str(path), path.parent
    else:
        raw = path_or_dict
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a pipeline must be a mapping with 'targets' and 'models', got {type(raw).__name__}")
    raw = mapping(raw, "pipeline")
    registered = stages()
    check_keys(raw, [*_CORE_KEYS, *dict.fromkeys(s.key for s in registered if s.key)], "pipeline")
    models = _parse_models(raw.get("models"), base_dir)
    cfg = PipelineConfig(
        targets=_parse_targets(raw.get("targets"), base_dir), models=models,
        seeds=_parse_seeds(raw.get("seeds")), limits=_parse_limits(raw.get("limits")),
        name=string(raw.get("name", Path(source).stem if source else "pipeline"), "name"), source=source,
        model_options=_parse_model_options(raw.get("model_options"), models, base_dir))
    for stage in registered:  # in run order: a stage's parse sees the specs of the stages before it
        cfg.sections[stage.name] = stage.parse(raw.get(stage.key) if stage.key else None, cfg)
    return cfg


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
    with TIES; ``auto`` searches model × method × lr on a small grid within an epoch budget, and its
    oracle (every arm of that grid trained to the end) says how close it came. ``quick`` (CI) also uses smaller ImageNet inputs and fewer epochs.
    """
    from .stages.tune import default_method

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
        # auto on a smaller grid than the benchmark's, so that its oracle (every arm trained to the end) fits
        # the demo: 4 candidates (3 with quick) × linear/full × 2 lrs, 3 epochs per arm (2 with quick), a budget
        # of about a fifth of the oracle's backbone epochs (5 of 24; quick: 3 of 12)
        "auto": {"models": DEMO_MODELS[4:] if quick else ["mobilenet-v2", *DEMO_MODELS[4:]],
                 "methods": ["linear", "full"], "lr_factors": [1, 3], "epochs": 2 if quick else 3,
                 "budget": "3ep" if quick else "5ep", "oracle": True},
        "seeds": [0],
        "limits": {"time": 600},
    }


DEFAULT_PIPELINE: dict[str, Any] = default_pipeline()


