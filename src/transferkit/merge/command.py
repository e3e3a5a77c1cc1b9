"""``transferkit merge``: the command-line face of :mod:`transferkit.merge`.

Two forms::

    transferkit merge CONFIG.yaml --out DIR [--evaluate D1,D2] [--json]
    transferkit merge --method ties --base B --models A,C --out DIR [--param k=0.2 --param lambda=1.0]

The YAML is familiar to mergekit users (``merge_method``, ``base_model``, ``models``, ``parameters``)::

    merge_method: ties              # average | task_arithmetic | ties | dare_linear | dare_ties | fisher
                                    # | lora | uniform_soup | negation   (aliases: linear, ta, dare)
    base_model: all-minilm-l6-v2    # optional for tune run folders (their Delta names the base);
                                    # required for checkpoints (a .safetensors file or folder)
    models:
      - model: runs/tweets          # a `transferkit tune` run folder (delta/), a Delta folder, or a
        parameters: {weight: 1.0}   #   safetensors checkpoint (file, or folder of shards)
        data: vader:tweets          # the task's dataset (for --evaluate and for fisher)
      - model: runs/spam
        weight: [0.5, 1.0]          # per-layer gradient: interpolated across the numbered layers
    parameters:
      lambda: 1.0                   # scalar, gradient list, or filters: [{filter: attention, value: 0.5}, {value: 1}]
      density: 0.2                  # ties: kept fraction k; dare_*: keep probability 1 − p
      scope: global                 # ties trim scope: global (paper) | per_tensor (mergekit/PEFT)

Inputs. Run folders / Deltas are merged in memory with the functions of :mod:`transferkit.merge` and
the result is written as a Delta (``DIR/delta/``: apply it to the base with
:func:`transferkit.delta.apply`; per-task heads are not merged — :func:`~transferkit.merge.attach_head`
puts one back). Checkpoints are merged tensor by tensor with :func:`~transferkit.merge.stream_merge`
(never loaded whole) into safetensors shards in ``DIR``. Either way ``DIR/merge.json`` reports the
method, the resolved parameters, the inputs, what was skipped/excluded, and the evaluation. The output
folder is written atomically: on any error nothing is left behind.

Per-layer values (``weight``, ``lambda``) work for Delta inputs with ``average``, ``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties`` and ``negation``: a gradient list ``[v0, …, vm]`` is
interpolated linearly over the layer index found in the tensor name (``…layer.N.…``, ``layers``,
``h``, ``blocks``, ``features``); tensors outside the numbered layers take ``v0`` when their name
contains ``embed`` and ``vm`` otherwise. A filter list takes the first entry whose ``filter`` is a
substring of the tensor name, else the entry without ``filter``. Per-tensor weights w_t(n) scale each
task vector before merging (normalised per tensor for ``average``), per-tensor λ(n) scales the merged
result; with TIES, weights therefore act *before* trimming and sign election (an approximation of
mergekit's weighted TIES). Checkpoints and ``fisher``/``lora`` take scalar values only.

Parameters by method (unknown keys are an error):

=================  =====================================================================================
``average``        per-model ``weight`` (normalised)
``task_arithmetic`` ``lambda`` (1.0), per-model ``weight`` (coefficient λ·w_t)
``ties``           ``k``/``density`` (0.2), ``lambda`` (None → 1.0 for mean, 0.3 for sum), ``scope``
                   (``global`` for Deltas; ``per_tensor`` default for checkpoints, one pass), ``agg``
                   (``mean``; mergekit's ``normalize: false`` → ``sum``), ``tie_break`` (``majority``)
``dare_linear``    ``p`` (0.9) or ``density`` (= 1 − p), ``seed`` (0), ``lambda`` (1.0)
``dare_ties``      as ``dare_linear`` plus the TIES keys; ``k`` defaults to 1.0 (no magnitude trim on top
                   of the random drop, as mergekit's dare_ties)
``fisher``         ``n_examples`` (256 per model, from each model's ``data``), ``empirical`` (false),
                   ``floor`` (1e-6), ``favor_target`` (true), ``normalize`` (true), per-model ``weight``
``lora``           ``how`` (``svd`` | ``cat`` | ``dense``), ``rank`` (svd), per-model ``weight``
``uniform_soup``   fine-tunes of one task: bodies *and* heads averaged
``negation``       one model, ``lambda`` (1.0): θ0 − λτ
=================  =====================================================================================

Every method also takes ``exclude`` (tensor names or prefixes ending in ``.``, left at the base), and
checkpoint merges take ``shard_size`` (``"2GB"``).

``--evaluate D1,D2,…`` (or ``data:`` per model, or a top-level ``evaluate:`` list) gives one dataset per
model, in order: the merged body is measured on each with that model's head, next to the individual
fine-tune, on the test split that ``transferkit tune`` makes with the same ``--limit``/``--per-class``/
``--seed``; ``normalized`` = merged ÷ individual.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..clitools import emit, read_config, table
from ..errors import ConfigError, ModelError

METHODS: dict[str, str] = {
    "average": "weighted average of task vectors (model soup of different tasks; heads dropped)",
    "task_arithmetic": "θ0 + λ Σ w_t τ_t (Ilharco et al., ICLR 2023)",
    "ties": "TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., NeurIPS 2023)",
    "dare_linear": "DARE drop-and-rescale, then task arithmetic (Yu et al., ICML 2024)",
    "dare_ties": "DARE drop-and-rescale, then TIES",
    "fisher": "Fisher-weighted averaging, per-example diagonal Fisher (Matena & Raffel, NeurIPS 2022)",
    "lora": "LoRA adapters merged in ΔW space: cat (exact), svd (rank r) or dense",
    "uniform_soup": "uniform soup of fine-tunes of one task, heads averaged (Wortsman et al., ICML 2022)",
    "negation": "θ0 − λτ: forget a task (one model)",
}
ALIASES = {"linear": "average", "ta": "task_arithmetic", "task-arithmetic": "task_arithmetic", "dare": "dare_linear",
           "dare-linear": "dare_linear", "dare-ties": "dare_ties", "soup": "uniform_soup", "negate": "negation",
           "fisher_merge": "fisher", "lora_merge": "lora"}
STREAMABLE = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties")
PER_LAYER = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "negation")

_TIES_KEYS = ("k", "density", "lambda", "scope", "agg", "tie_break", "normalize")
PARAMS: dict[str, tuple[str, ...]] = {
    "average": (),
    "task_arithmetic": ("lambda",),
    "ties": _TIES_KEYS,
    "dare_linear": ("p", "density", "seed", "lambda"),
    "dare_ties": ("p", "density", "seed") + _TIES_KEYS,
    "fisher": ("n_examples", "empirical", "floor", "favor_target", "normalize", "batch_size"),
    "lora": ("how", "rank"),
    "uniform_soup": (),
    "negation": ("lambda",),
}
COMMON = ("exclude", "shard_size")
KEY_ALIASES = {"lam": "lambda", "trim_scope": "scope", "aggregate": "agg", "drop_rate": "p", "svd_rank": "rank",
               "out_shard_size": "shard_size"}
TOP_KEYS = ("merge_method", "method", "base_model", "base", "models", "parameters", "evaluate", "name", "dtype",
            "out_shard_size")
MODEL_KEYS = ("model", "weight", "data", "name", "parameters", "density", "k", "p")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block|features)\.(\d+)(?:\.|$)")


# ------------------------------------------------------------------------------------ the command
def merge(
    config: Optional[Path] = typer.Argument(None, help="mergekit-style YAML (merge_method, base_model, models, "
                                                        "parameters). Omit it to use --method/--models."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (merged Delta or shards + merge.json)."),
    method: Optional[str] = typer.Option(None, "--method", help="Merge method (see --list); overrides the YAML."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: zoo name/path (Deltas) or checkpoint."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated run folders or checkpoints."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated per-model weights."),
    param: list[str] = typer.Option([], "--param", help="KEY=VALUE merge parameter (repeatable), e.g. k=0.2."),
    evaluate: Optional[str] = typer.Option(None, "--evaluate", help="Comma-separated datasets, one per model."),
    limit: Optional[int] = typer.Option(None, help="Evaluation/Fisher data: at most this many samples."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Evaluation/Fisher data: per class."),
    seed: int = typer.Option(0, help="Seed of the evaluation split (as `transferkit tune`)."),
    list_methods: bool = typer.Option(False, "--list", help="List the merge methods and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Merge fine-tunes (task vectors) of one base: TIES, DARE, task arithmetic, Fisher, soups, LoRA.

    Example: transferkit merge --method ties --base all-minilm-l6-v2 --models runs/a,runs/b --out runs/merged
    """
    if list_methods:
        emit(METHODS, as_json, lambda d: [typer.echo(f"{k:16s} {v}") for k, v in d.items()])
        return
    if out is None:
        raise ConfigError("merge needs --out DIR")
    spec = build_spec(config, method=method, base=base, models=models, weights=weights, params=param,
                      evaluate=evaluate)
    report = run_merge(spec, out, limit=limit, per_class=per_class, seed=seed)
    emit(report, as_json, render_merge)


def render_merge(report: dict) -> None:
    ev = report.get("evaluation")
    if ev:
        rows = [[Path(t["model"]).name, t["data"], t["merged"], t["individual"], t["normalized"]] for t in ev["tasks"]]
        rows.append(["average", "", ev["merged_avg"], ev["individual_avg"], ev["normalized_avg"]])
        table(f"merged ({report['method']}) vs individual fine-tunes (test accuracy)",
              ["model", "data", "merged", "individual", "normalized"], rows)
    for w in report.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"{report['method']}: {report['n_models']} models → {report['out']} ({report['output']['format']})")


# ------------------------------------------------------------------------------------ the spec
def build_spec(config: Path | None, *, method: str | None = None, base: str | None = None,
               models: str | None = None, weights: str | None = None, params: list[str] | None = None,
               evaluate: str | None = None) -> dict[str, Any]:
    """One normalised spec from the YAML (if any) and the short-form options (which take precedence)."""
    import yaml

    data: dict[str, Any] = read_config(config) if config is not None else {}
    unknown = [k for k in data if k not in TOP_KEYS]
    if "slices" in data:
        raise ConfigError("'slices' (layer-range assembly) is not supported; list whole models under 'models'")
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the merge config; known: {', '.join(TOP_KEYS)}")
    m = method or data.get("merge_method") or data.get("method")
    if not m:
        raise ConfigError("no merge method: set merge_method in the YAML or pass --method (see --list)")
    m = ALIASES.get(str(m), str(m))
    if m not in METHODS:
        raise ConfigError(f"unknown merge method {m!r}; known: {', '.join(METHODS)}")

    entries: list[dict[str, Any]] = []
    if models is not None:
        names = [s.strip() for s in models.split(",") if s.strip()]
        entries = [{"model": n} for n in names]
    else:
        raw = data.get("models")
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise ConfigError("'models' must be a list of paths or {model: …} entries")
        for item in raw:
            entries.append(_model_entry(item))
    if not entries:
        raise ConfigError("no models to merge: list them under 'models' or pass --models")
    if weights is not None:
        ws = [s.strip() for s in weights.split(",") if s.strip()]
        if len(ws) != len(entries):
            raise ConfigError(f"--weights has {len(ws)} values for {len(entries)} models")
        for e, w in zip(entries, ws):
            e["weight"] = _number(w, "--weights")

    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError("'parameters' must be a mapping")
    parameters = {KEY_ALIASES.get(k, k): v for k, v in parameters.items()}
    if "out_shard_size" in data:
        parameters["shard_size"] = data["out_shard_size"]
    for item in params or []:
        if "=" not in item:
            raise ConfigError(f"--param takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        parameters[KEY_ALIASES.get(k.strip(), k.strip())] = yaml.safe_load(v)
    # per-model density/k/p: allowed when every model agrees (then it is the global value)
    for key in ("density", "k", "p"):
        vals = [e.pop(key) for e in entries if key in e]
        if vals:
            if len(vals) != len(entries) or any(v != vals[0] for v in vals):
                raise ConfigError(f"per-model {key!r} must be the same for every model (differing values are not "
                                  f"supported); set it under 'parameters'")
            parameters.setdefault(key, vals[0])
    allowed = PARAMS[m] + COMMON
    for k in parameters:
        if k not in allowed:
            raise ConfigError(f"unknown parameter {k!r} for merge method {m!r}; known: {', '.join(allowed)}")

    ev = evaluate if evaluate is not None else data.get("evaluate")
    if isinstance(ev, str):
        ev = [s.strip() for s in ev.split(",") if s.strip()]
    if ev is not None:
        if not isinstance(ev, list) or len(ev) != len(entries):
            raise ConfigError(f"evaluate needs one dataset per model ({len(entries)}), got {ev!r}")
        for e, d in zip(entries, ev):
            e["data"] = str(d)
    return {"method": m, "base": base or data.get("base_model") or data.get("base"), "models": entries,
            "parameters": parameters, "evaluate": ev is not None or None,
            "dtype": data.get("dtype")}


def _model_entry(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"model": item}
    if not isinstance(item, dict) or "model" not in item:
        raise ConfigError(f"each entry of 'models' must be a path or a mapping with 'model', got {item!r}")
    unknown = [k for k in item if k not in MODEL_KEYS]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in a models entry; known: {', '.join(MODEL_KEYS)}")
    entry = {k: v for k, v in item.items() if k != "parameters"}
    nested = item.get("parameters") or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"'parameters' of model {item['model']!r} must be a mapping")
    for k, v in nested.items():
        k = KEY_ALIASES.get(k, k)
        if k not in ("weight", "density", "k", "p"):
            raise ConfigError(f"unknown per-model parameter {k!r} (model {item['model']!r}); known: weight, density, "
                              "k, p")
        entry[k] = v
    entry["model"] = str(entry["model"])
    return entry


def _number(v: Any, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{what}: expected a finite number, got {v!r}")
    return x


# ------------------------------------------------------------------------------------ per-layer values
def is_scalar(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_value(value: Any, what: str) -> None:
    """A scalar, a non-empty gradient list of numbers, or a filter list ending in a default."""
    if is_scalar(value):
        if value is not None:
            _number(value, what)
        return
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what}: expected a number, a list of numbers (gradient) or a list of "
                          f"{{filter, value}} entries, got {value!r}")
    if all(is_scalar(v) and v is not None for v in value):
        for v in value:
            _number(v, what)
        return
    for v in value:
        if not isinstance(v, dict) or "value" not in v or set(v) - {"filter", "value"}:
            raise ConfigError(f"{what}: filter entries are {{filter: NAME, value: X}} (the last may omit filter), "
                              f"got {v!r}")
        check_value(v["value"], what)


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def value_for(value: Any, name: str, n_layers: int, what: str = "value") -> float:
    """The value of a scalar / gradient / filter spec at tensor ``name`` (see the module docstring)."""
    if is_scalar(value):
        return float(value)
    if all(is_scalar(v) for v in value):
        pts = [float(v) for v in value]
        if len(pts) == 1:
            return pts[0]
        layer = layer_of(name)
        if layer is None:
            return pts[0] if "embed" in name else pts[-1]
        t = layer / max(n_layers - 1, 1)
        pos = t * (len(pts) - 1)
        lo = min(int(math.floor(pos)), len(pts) - 2)
        frac = pos - lo
        return pts[lo] * (1 - frac) + pts[lo + 1] * frac
    default = None
    for v in value:
        if "filter" not in v:
            default = v["value"]
        elif str(v["filter"]) in name:
            return value_for(v["value"], name, n_layers, what)
    if default is None:
        raise ConfigError(f"{what}: no filter matches tensor {name!r} and there is no default entry")
    return value_for(default, name, n_layers, what)


# ------------------------------------------------------------------------------------ inputs
def resolve_input(path: str) -> tuple[str, Any]:
    """``("delta", Delta)`` for a run folder / Delta folder, ``("checkpoint", Path)`` for safetensors."""
    from ..delta import Delta

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model not found: {p} (expected a tune run folder, a Delta folder or a safetensors checkpoint)")
    if p.is_dir() and (p / "delta" / "delta.json").is_file():
        return "delta", Delta.load(p / "delta")
    if p.is_dir() and (p / "delta.json").is_file():
        return "delta", Delta.load(p)
    if p.is_file() and p.suffix == ".safetensors":
        return "checkpoint", p
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json"))):
        return "checkpoint", p
    raise ModelError(f"{p} is neither a tune run folder (delta/), a Delta folder (delta.json) nor a safetensors "
                     "checkpoint")


def _same_base(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------------ running
def run_merge(spec: dict[str, Any], out: Path, *, limit: int | None = None, per_class: int | None = None,
              seed: int = 0) -> dict[str, Any]:
    """Merge as ``spec`` says (see :func:`build_spec`), write ``out``, return the report."""
    from ..io import atomic_path

    t0 = time.perf_counter()
    method, params, entries = spec["method"], dict(spec["parameters"]), spec["models"]
    if method == "negation" and len(entries) != 1:
        raise ConfigError(f"negation takes exactly one model, got {len(entries)}")
    for e in entries:
        if "weight" in e:
            check_value(e["weight"], f"weight of {e['model']}")
    if "lambda" in params:
        check_value(params["lambda"], "lambda")
    resolved = [resolve_input(e["model"]) for e in entries]
    kinds = {k for k, _ in resolved}
    if len(kinds) > 1:
        raise ConfigError("cannot mix Delta run folders and safetensors checkpoints in one merge")
    kind = kinds.pop()
    out = Path(out)
    report: dict[str, Any] = {"method": method, "n_models": len(entries), "out": str(out),
                              "models": [{"model": e["model"], **({"weight": e["weight"]} if "weight" in e else {}),
                                          **({"data": e["data"]} if "data" in e else {})} for e in entries]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec.get("dtype"):
            warnings.warn(f"dtype {spec['dtype']!r} is ignored: Deltas are merged and saved in float32, checkpoints "
                          "keep the base checkpoint's dtypes")
        if kind == "checkpoint":
            if spec.get("evaluate"):
                raise ConfigError("--evaluate needs Delta run folders (from `transferkit tune`), not checkpoints")
            if not spec.get("base"):
                raise ConfigError("merging checkpoints needs the base checkpoint (base_model / --base)")
            kw = _stream_kwargs(method, params, entries)
            from .streaming import stream_merge

            with atomic_path(out) as tmp:
                res = stream_merge(spec["base"], [p for _, p in resolved], tmp, method, **kw)
                report.update(base=str(spec["base"]), parameters=_jsonable(res.meta),
                              output={"format": "safetensors shards", "shards": res.shards,
                                      "index": "model.safetensors.index.json", "n_tensors": res.n_tensors,
                                      "bytes": res.total_bytes, "passes": res.passes})
                report["seconds"] = round(time.perf_counter() - t0, 3)
                report["warnings"] = [str(w.message) for w in caught]
                (tmp / "merge.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            return report

        deltas = [d for _, d in resolved]
        for e, d in zip(entries, deltas):
            d.meta.setdefault("name", e.get("name") or e["model"])
        base_name = deltas[0].base
        if spec.get("base"):
            for e, d in zip(entries, deltas):
                if not _same_base(d.base, str(spec["base"])):
                    raise ConfigError(f"incompatible models: {e['model']} was tuned from {d.base!r}, not from the "
                                      f"base {spec['base']!r}")
        for e, d in zip(entries, deltas):
            if d.base != base_name and not _same_base(d.base, base_name):
                raise ConfigError(f"incompatible models: {e['model']} was tuned from {d.base!r}, "
                                  f"{entries[0]['model']} from {base_name!r}")
            d.base = base_name
        merged = merge_deltas(method, deltas, entries, params, limit=limit, per_class=per_class, seed=seed,
                              base_spec=str(spec.get("base") or base_name))
        evaluation = None
        if spec.get("evaluate"):
            evaluation = evaluate_merged(merged, deltas, entries, str(spec.get("base") or base_name),
                                         limit=limit, per_class=per_class, seed=seed)
        report.update(base=base_name, parameters=_jsonable({k: v for k, v in merged.meta.items()
                                                            if k not in ("coefficients",)}),
                      output={"format": "delta", "delta": "delta", "kind": merged.kind,
                              "n_tensors": len(merged.tensors), "n_params": merged.n_params()})
        if evaluation is not None:
            report["evaluation"] = evaluation
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["warnings"] = [str(w.message) for w in caught]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            merged.save(tmp / "delta")
            (tmp / "merge.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _scalar_weights(entries: list[dict], method: str) -> list[float] | None:
    if not any("weight" in e for e in entries):
        return None
    ws = [e.get("weight", 1.0) for e in entries]
    for e, w in zip(entries, ws):
        if not is_scalar(w):
            raise ConfigError(f"per-layer weights are not supported for {method} (model {e['model']}); use a number")
    return [float(w) for w in ws]


def _ties_kwargs(method: str, params: dict) -> dict[str, Any]:
    if "k" in params and "density" in params and method == "ties":
        raise ConfigError("give either k or density (the same thing for ties), not both")
    k = params.get("k", params.get("density") if method == "ties" else None)
    if k is None:
        k = 1.0 if method == "dare_ties" else 0.2
    agg = params.get("agg")
    if "normalize" in params:
        norm_agg = "mean" if params["normalize"] else "sum"
        if agg is not None and agg != norm_agg:
            raise ConfigError(f"normalize={params['normalize']} contradicts agg={agg!r}")
        agg = norm_agg
    kw = {"k": k, "agg": agg or "mean", "tie_break": params.get("tie_break", "majority")}
    if "scope" in params:
        kw["scope"] = params["scope"]
    return kw


def _dare_p(params: dict) -> float:
    if "p" in params and "density" in params:
        raise ConfigError("give either p (drop probability) or density (keep probability = 1 − p), not both")
    if "density" in params:
        return 1.0 - _number(params["density"], "density")
    return _number(params.get("p", 0.9), "p")


def _stream_kwargs(method: str, params: dict, entries: list[dict]) -> dict[str, Any]:
    if method not in STREAMABLE:
        raise ConfigError(f"checkpoint inputs support {', '.join(STREAMABLE)}; {method!r} needs tune run folders "
                          "(Deltas)")
    lam = params.get("lambda")
    if not is_scalar(lam):
        raise ConfigError("per-layer lambda needs Delta inputs (tune run folders); checkpoints take a number")
    w = _scalar_weights(entries, method)
    kw: dict[str, Any] = {"exclude": _exclude(params)}
    if "shard_size" in params:
        kw["shard_size"] = params["shard_size"]
    if method == "average":
        kw["weights"] = w
        return kw
    if method in ("task_arithmetic", "dare_linear"):
        lam = 1.0 if lam is None else float(lam)
        kw["lam"] = [lam * x for x in w] if w else lam
    else:
        if w and any(x != 1.0 for x in w):
            raise ConfigError(f"per-model weights are not supported by {method} on checkpoints; use Deltas")
        kw.update(_ties_kwargs(method, params))
        kw["lam"] = None if lam is None else float(lam)
    if method.startswith("dare"):
        kw["p"] = _dare_p(params)
        kw["seed"] = int(params.get("seed", 0))
    return kw


def _exclude(params: dict) -> tuple[str, ...]:
    ex = params.get("exclude") or ()
    if isinstance(ex, str):
        ex = [ex]
    if not isinstance(ex, (list, tuple)) or not all(isinstance(x, str) for x in ex):
        raise ConfigError(f"exclude must be a list of tensor names or prefixes, got {ex!r}")
    return tuple(ex)


def _n_layers(deltas) -> int:
    layers = [layer_of(k) for d in deltas for k in d.tensors]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else 1


def _scaled(delta, fn: Callable[[str], float]):
    """A ``full`` Delta whose body tensor n is fn(n)·τ[n] (heads kept as they are)."""
    from ..delta import NEW, Delta, to_dense

    tensors = {k: (v * fn(k) if v.is_floating_point() else v) for k, v in to_dense(delta).items()}
    tensors.update({k: v for k, v in delta.tensors.items() if k.startswith(NEW)})
    return Delta(delta.base, "full", tensors, dict(delta.meta))


def merge_deltas(method: str, deltas: list, entries: list[dict], params: dict, *, limit=None, per_class=None,
                 seed: int = 0, base_spec: str | None = None):
    """Merge Deltas in memory with :mod:`transferkit.merge`; per-layer values as the module docstring says."""
    from . import (
        average,
        dare_merge,
        merge_lora,
        negate,
        task_arithmetic,
        ties,
        uniform_soup,
    )

    exclude = _exclude(params)
    lam = params.get("lambda")
    per_layer_w = any("weight" in e and not is_scalar(e["weight"]) for e in entries)
    per_layer = per_layer_w or not is_scalar(lam)
    if per_layer and method not in PER_LAYER:
        raise ConfigError(f"per-layer values are not supported for {method}; use numbers")

    if method == "fisher":
        return _fisher(deltas, entries, params, exclude, limit, per_class, seed, base_spec)
    if method == "lora":
        if any(d.kind != "lora" for d in deltas):
            raise ConfigError("merge method 'lora' needs LoRA Deltas (tune --method lora run folders)")
        return merge_lora(deltas, _scalar_weights(entries, method), how=params.get("how", "svd"),
                          rank=params.get("rank"))
    if method == "uniform_soup":
        if any("weight" in e for e in entries):
            raise ConfigError("uniform_soup takes no weights (use average)")
        return uniform_soup(deltas)

    if not per_layer:
        w = _scalar_weights(entries, method)
        lam_f = None if lam is None else float(lam)
        if method == "average":
            return average(deltas, w, exclude=exclude)
        if method == "negation":
            return negate(deltas[0], 1.0 if lam_f is None else lam_f, exclude=exclude)
        if method in ("ties", "dare_ties") and w is not None and any(x != 1.0 for x in w):
            deltas = [_scaled(d, lambda n, x=x: x) for d, x in zip(deltas, w)]
            w = None
        if method == "task_arithmetic":
            lam_f = 1.0 if lam_f is None else lam_f
            return task_arithmetic(deltas, [lam_f * x for x in w] if w else lam_f, exclude=exclude)
        if method == "ties":
            return ties(deltas, lam=lam_f, exclude=exclude, **_ties_kwargs(method, params))
        p, dseed = _dare_p(params), int(params.get("seed", 0))
        if method == "dare_linear":
            lam_f = 1.0 if lam_f is None else lam_f
            return dare_merge(deltas, p, dseed, lam=[lam_f * x for x in w] if w else lam_f, exclude=exclude)
        return dare_merge(deltas, p, dseed, merge="ties", lam=lam_f, exclude=exclude, **_ties_kwargs(method, params))

    # per-layer: pre-scale each task vector by w_t(n), merge with unit coefficients, post-scale by λ(n)
    L = _n_layers(deltas)
    w_specs = [e.get("weight", 1.0) for e in entries]
    if method == "average":
        def norm_w(t: int) -> Callable[[str], float]:
            def f(n: str) -> float:
                tot = sum(value_for(s, n, L, "weight") for s in w_specs)
                if tot == 0:
                    raise ConfigError(f"average: the weights of tensor {n!r} sum to 0")
                return value_for(w_specs[t], n, L, "weight") / tot
            return f
        scaled = [_scaled(d, norm_w(t)) for t, d in enumerate(deltas)]
        merged = task_arithmetic(scaled, 1.0, exclude=exclude)
        lam_spec: Any = 1.0 if lam is None else lam
    else:
        scaled = [_scaled(d, lambda n, s=s: value_for(s, n, L, "weight")) for d, s in zip(deltas, w_specs)]
        if method == "negation":
            merged = task_arithmetic(scaled, -1.0, exclude=exclude)
            lam_spec = 1.0 if lam is None else lam
        elif method == "task_arithmetic":
            merged = task_arithmetic(scaled, 1.0, exclude=exclude)
            lam_spec = 1.0 if lam is None else lam
        elif method == "ties":
            kw = _ties_kwargs(method, params)
            merged = ties(scaled, lam=1.0, exclude=exclude, **kw)
            lam_spec = (1.0 if kw["agg"] == "mean" else 0.3) if lam is None else lam
        else:
            p, dseed = _dare_p(params), int(params.get("seed", 0))
            if method == "dare_linear":
                merged = dare_merge(scaled, p, dseed, lam=1.0, exclude=exclude)
                lam_spec = 1.0 if lam is None else lam
            else:
                kw = _ties_kwargs(method, params)
                merged = dare_merge(scaled, p, dseed, merge="ties", lam=1.0, exclude=exclude, **kw)
                lam_spec = (1.0 if kw["agg"] == "mean" else 0.3) if lam is None else lam
    merged.tensors = {n: v * value_for(lam_spec, n, L, "lambda") for n, v in merged.tensors.items()}
    merged.meta.update(lam=lam_spec, weights=w_specs, per_layer=True, n_layers=L)
    return merged


# ------------------------------------------------------------------------------------ data-dependent parts
def _head_classes(delta, what: str) -> int:
    from ..delta import NEW

    w = delta.tensors.get(NEW + "head.weight")
    if w is None:
        raise ConfigError(f"{what} has no task head (new.head.weight); it must be a `transferkit tune` run folder")
    return int(w.shape[0])


def _load_base(base_spec: str):
    from ..zoo import load_model

    return load_model(base_spec)


def _task_split(data: str, limit, per_class, seed):
    from ..data import load_dataset, train_test_split

    ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    return train_test_split(ds, seed=seed)


def _classifier(zm, delta, n_classes: int):
    from ..delta import apply
    from ..zoo import Classifier

    clf = Classifier(copy.deepcopy(zm.backbone), zm.feature_dim, n_classes)
    try:
        apply(clf, delta)
    except ModelError as exc:
        raise ConfigError(f"the merged model does not fit the base model: {exc}") from None
    return clf.eval()


def _fisher(deltas, entries, params, exclude, limit, per_class, seed, base_spec):
    from . import compute_fisher, fisher_merge

    missing = [e["model"] for e in entries if not e.get("data")]
    if missing:
        raise ConfigError(f"fisher needs each model's training data (data: per model, or --evaluate); missing for "
                          f"{missing[0]}")
    n = int(params.get("n_examples", 256))
    bs = int(params.get("batch_size", 4))
    if n < 1 or bs < 1:
        raise ConfigError("fisher: n_examples and batch_size must be positive")
    zm = _load_base(base_spec)
    fishers = []
    for e, d in zip(entries, deltas):
        train, _ = _task_split(e["data"], limit, per_class, seed)
        clf = _classifier(zm, d, _head_classes(d, e["model"]))
        names = [k for k, _ in clf.named_parameters() if not k.startswith("head.")]
        for prm in clf.parameters():
            prm.requires_grad_(True)
        m = min(n, len(train.y))
        empirical = bool(params.get("empirical", False))
        batches = [(zm.preprocess(_rows(train.X, s, bs)), _labels(train.y, s, bs)) if empirical
                   else zm.preprocess(_rows(train.X, s, bs)) for s in range(0, m, bs)]
        typer.echo(f"fisher: {e['model']} on {m} examples of {e['data']}", err=True)
        try:
            f = compute_fisher(clf, batches, empirical=empirical, n_examples=n, params=names, method="vmap")
        except Exception:  # noqa: BLE001 - torch.func cannot trace every model: exact per-example loop instead
            f = compute_fisher(clf, batches, empirical=empirical, n_examples=n, params=names, method="loop")
        fishers.append(f)
    w = _scalar_weights(entries, "fisher")
    return fisher_merge(deltas, fishers, weights=w, floor=float(params.get("floor", 1e-6)),
                        favor_target=bool(params.get("favor_target", True)),
                        normalize=bool(params.get("normalize", True)), exclude=exclude)


def _rows(X, s: int, bs: int):
    import numpy as np

    part = X[s:s + bs]
    return [str(x) for x in part] if not isinstance(part, np.ndarray) or part.dtype.kind in "UO" else part


def _labels(y, s: int, bs: int):
    import torch

    return torch.as_tensor(y[s:s + bs]).long()


def evaluate_merged(merged, deltas, entries, base_spec: str, *, limit=None, per_class=None, seed: int = 0) -> dict:
    """Test accuracy of the merged body with each model's head, next to the individual fine-tune."""
    from ..engine import evaluate
    from ..tune._common import Pairs, make_collate
    from ._common import attach_head

    zm = _load_base(base_spec)
    collate = make_collate(zm.preprocess)
    rows = []
    for e, d in zip(entries, deltas):
        n_classes = _head_classes(d, e["model"])
        _, test = _task_split(e["data"], limit, per_class, seed)
        if len(test.classes) != n_classes:
            raise ConfigError(f"{e['data']} has {len(test.classes)} classes but the head of {e['model']} has {n_classes}")
        data = Pairs(test.X, test.y)
        with_head = merged if merged.meta.get("method") == "uniform_soup" else attach_head(merged, d)
        acc_m = float(evaluate(_classifier(zm, with_head, n_classes), data, collate_fn=collate)["accuracy"])
        acc_i = float(evaluate(_classifier(zm, d, n_classes), data, collate_fn=collate)["accuracy"])
        rows.append({"model": e["model"], "data": e["data"], "n": len(test.y), "merged": acc_m, "individual": acc_i,
                     "normalized": acc_m / acc_i if acc_i > 0 else float("nan")})
        typer.echo(f"evaluate: {e['data']}: merged {acc_m:.4f}, individual {acc_i:.4f}", err=True)
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"split": {"limit": limit, "per_class": per_class, "seed": seed, "as": "transferkit tune's test split"},
            "tasks": rows, "merged_avg": mean("merged"), "individual_avg": mean("individual"),
            "normalized_avg": mean("normalized")}


__all__ = ["merge", "render_merge", "build_spec", "run_merge", "merge_deltas", "value_for", "METHODS"]
