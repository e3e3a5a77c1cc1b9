"""The merge spec: a mergekit-style YAML (or the CLI's short form) → one validated :class:`MergeSpec`.

The YAML is familiar to mergekit users (``merge_method``, ``base_model``, ``models``, ``parameters``)::

    merge_method: ties              # a registered merge method (`transferkit merge --list`) or an alias
                                    #   (linear, ta, dare, soup, negate, …: see ALIASES)
    base_model: all-minilm-l6-v2    # optional for tune run folders (their Delta names the base);
                                    # required for checkpoints (a .safetensors file or folder)
    models:
      - model: runs/tweets          # a `transferkit tune` run folder (delta/), a Delta folder, or a
        parameters: {weight: 1.0}   #   safetensors checkpoint (file, or folder of shards)
        data: vader:tweets          # the task's dataset; must be the data the run was tuned on
      - model: runs/spam
        weight: [0.5, 1.0]          # per-layer gradient (see transferkit.merge.layers)
    parameters:                     # the method's options, validated by the registry (typed, ranged)
      lambda: 1.0                   # scalar, gradient list, or filters: [{filter: attention, value: 0.5}, {value: 1}]
      density: 0.2                  # ties: kept fraction k; dare_*: keep probability 1 − p
      scope: global                 # ties trim scope: global (paper) | per_tensor (mergekit/PEFT)
    evaluate: [vader:tweets, spam]  # or `true`: each run's recorded data
    out_shard_size: 2GB             # checkpoint merges: largest output shard

Option keys take mergekit's names too (:data:`KEY_ALIASES`: ``lambda`` → ``lam``, ``trim_scope`` →
``scope``, …). Per-model ``density``/``k``/``p`` are accepted when every model gives the same value (it is
then the method's option). Every problem is a one-line :class:`~transferkit.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import registry
from ..errors import ConfigError
from ..registry import short
from .layers import check_value, number

__all__ = ["MergeSpec", "ModelEntry", "build_spec", "get_method", "parse_options", "ALIASES", "KEY_ALIASES"]

ALIASES = {"linear": "average", "ta": "task_arithmetic", "task-arithmetic": "task_arithmetic", "dare": "dare_linear",
           "dare-linear": "dare_linear", "dare-ties": "dare_ties", "soup": "uniform_soup", "negate": "negation",
           "fisher_merge": "fisher", "lora_merge": "lora"}
KEY_ALIASES = {"lambda": "lam", "trim_scope": "scope", "aggregate": "agg", "drop_rate": "p", "svd_rank": "rank"}
TOP_KEYS = ("merge_method", "method", "base_model", "base", "models", "parameters", "evaluate", "name", "dtype",
            "out_shard_size")
MODEL_KEYS = ("model", "weight", "data", "name", "parameters", "density", "k", "p")
_PER_MODEL = ("weight", "density", "k", "p")


@dataclass
class ModelEntry:
    """One model of a merge: its path, per-model weight (None: not given), data and display name."""

    model: str
    weight: Any = None
    data: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class MergeSpec:
    """A validated merge: ``options`` is an instance of the method's registered options dataclass."""

    method: str
    models: list[ModelEntry]
    options: Any = None
    base: str | None = None
    evaluate: bool = False
    dtype: str | None = None
    shard_size: int | str | None = None

    @property
    def info(self) -> Mapping[str, Any]:
        return registry.get("merge", self.method).info

    def weights(self) -> list[Any] | None:
        """Per-model weights (1.0 where not given), or None when no model gives one."""
        if all(e.weight is None for e in self.models):
            return None
        return [1.0 if e.weight is None else e.weight for e in self.models]


def get_method(name: Any) -> registry.Method:
    """The registered merge method ``name`` (aliases resolved); unknown → ConfigError with a did-you-mean."""
    return registry.get("merge", ALIASES.get(name, name) if isinstance(name, str) else name)


def parse_options(name: str, values: Mapping[str, Any] | None, where: str | None = None) -> Any:
    """The typed options of merge method ``name`` from a mapping (mergekit key aliases accepted)."""
    m = get_method(name)
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'merge parameters'} must be a mapping, got {type(values).__name__}")
    canon: dict[str, Any] = {}
    for k, v in values.items():
        key = KEY_ALIASES.get(k, k)
        if key in canon:
            raise ConfigError(f"{where or 'merge parameters'}: {short(k)} and {short(key)} are the same option; give one")
        canon[key] = v
    return m.parse(canon, where or f"merge method {short(m.name)}")


def build_spec(config: Mapping[str, Any] | None = None, *, method: str | None = None, base: str | None = None,
               models: str | list[str] | None = None, weights: str | list[Any] | None = None,
               params: list[str] | None = None, evaluate: str | list[str] | bool | None = None) -> MergeSpec:
    """One validated spec from a mergekit-style mapping (the YAML) and the short-form options.

    The short-form options take precedence: ``method``, ``base``, ``models`` (comma-separated or a list),
    ``weights`` (one per model), ``params`` (``KEY=VALUE`` strings, YAML-parsed values) and ``evaluate``
    (one dataset per model, comma-separated or a list; ``True``: each run's recorded data).
    """
    import yaml

    data: Mapping[str, Any] = config or {}
    if "slices" in data:
        raise ConfigError("'slices' (layer-range assembly) is not supported; list whole models under 'models'")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {short(unknown[0])} in the merge config{registry.did_you_mean(unknown[0], TOP_KEYS)};"
                          f" known: {', '.join(TOP_KEYS)}")
    name = method or data.get("merge_method") or data.get("method")
    if not name:
        raise ConfigError("no merge method: set merge_method in the YAML or pass --method (see --list)")
    m = _method(str(name))

    if models is not None:
        names = models.split(",") if isinstance(models, str) else [str(x) for x in models]
        entries = [{"model": n.strip()} for n in names if n.strip()]
    else:
        raw = data.get("models") or []
        if not isinstance(raw, list):
            raise ConfigError("'models' must be a list of paths or {model: …} entries")
        entries = [_model_entry(item) for item in raw]
    if not entries:
        raise ConfigError("no models to merge: list them under 'models' or pass --models")
    if weights is not None:
        ws = [s.strip() for s in weights.split(",") if s.strip()] if isinstance(weights, str) else list(weights)
        if len(ws) != len(entries):
            raise ConfigError(f"--weights has {len(ws)} values for {len(entries)} models")
        for e, w in zip(entries, ws):
            e["weight"] = number(w, "--weights")

    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ConfigError("'parameters' must be a mapping")
    parameters = dict(parameters)
    for item in params or []:
        if "=" not in item:
            raise ConfigError(f"--param takes KEY=VALUE, got {short(item)}")
        k, v = item.split("=", 1)
        parameters[k.strip()] = yaml.safe_load(v)
    shard_size = parameters.pop("shard_size", parameters.pop("out_shard_size", data.get("out_shard_size")))
    # per-model density/k/p: allowed when every model agrees (then it is the method's option)
    for key in ("density", "k", "p"):
        vals = [e.pop(key) for e in entries if key in e]
        if vals:
            if len(vals) != len(entries) or any(v != vals[0] for v in vals):
                raise ConfigError(f"per-model {short(key)} must be the same for every model (differing values are not "
                                  f"supported); set it under 'parameters'")
            parameters.setdefault(key, vals[0])
    options = parse_options(m.name, parameters)

    ev = evaluate if evaluate is not None else data.get("evaluate")
    if isinstance(ev, str):
        ev = [s.strip() for s in ev.split(",") if s.strip()]
    if ev is not None and ev is not False and ev is not True:
        if not isinstance(ev, list) or len(ev) != len(entries):
            raise ConfigError(f"evaluate needs one dataset per model ({len(entries)}), got {short(ev)}")
        for e, d in zip(entries, ev):
            e["data"] = str(d)
    model_entries = [ModelEntry(**e) for e in entries]
    for e in model_entries:
        if e.weight is not None:
            check_value(e.weight, f"weight of {e.model}")
    n = m.info.get("n_models")
    if n is not None and len(model_entries) != n:
        raise ConfigError(f"{m.name} takes exactly {n} model{'s' if n != 1 else ''}, got {len(model_entries)}")
    return MergeSpec(m.name, model_entries, options, base=base or data.get("base_model") or data.get("base"),
                     evaluate=bool(ev), dtype=data.get("dtype"), shard_size=shard_size)


def _method(name: str) -> registry.Method:
    try:
        return get_method(name)
    except ConfigError:
        known = list(registry.methods("merge")) + list(ALIASES)
        raise ConfigError(f"unknown merge method {short(name)}{registry.did_you_mean(name, known)}; known: "
                          f"{', '.join(registry.methods('merge'))} (aliases: {', '.join(ALIASES)})") from None


def _model_entry(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"model": item}
    if not isinstance(item, Mapping) or "model" not in item:
        raise ConfigError(f"each entry of 'models' must be a path or a mapping with 'model', got {short(item)}")
    unknown = [k for k in item if k not in MODEL_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {short(unknown[0])} in a models entry; known: {', '.join(MODEL_KEYS)}")
    entry = {k: v for k, v in item.items() if k != "parameters"}
    nested = item.get("parameters") or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"'parameters' of model {short(item['model'])} must be a mapping")
    for k, v in nested.items():
        if k not in _PER_MODEL:
            raise ConfigError(f"unknown per-model parameter {short(k)} (model {short(item['model'])}); known: "
                              f"{', '.join(_PER_MODEL)}")
        entry[k] = v
    entry["model"] = str(entry["model"])
    if entry.get("data") is not None:
        entry["data"] = str(entry["data"])
    return entry
