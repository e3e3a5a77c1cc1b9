"""Running a merge: Deltas in memory (:func:`merge_deltas`), or a whole spec into an output folder (:func:`run_merge`).

:func:`merge_deltas` is the one generic runner of every registered merge method: it validates the options
with the registry, then follows the method's registry ``info`` (see :mod:`transferkit.merge._common`):

- scalar values: per-model weights act as the method says (``normalized``: the method's own weights;
  ``coefficient``: λ·w_t; ``prescale``: w_t·τ_t before the method, e.g. before TIES's trim and sign
  election — an approximation of mergekit's weighted TIES; ``kwarg``: passed as ``weights=``);
- per-layer values (methods with ``per_layer``; :mod:`transferkit.merge.layers`): each task vector is
  pre-scaled tensor by tensor by w_t(n) (normalised per tensor for ``average``), merged with unit
  coefficients, and the result post-scaled by λ(n);
- ``needs_data`` (Fisher): each model's Fisher on its training part — the train part of the split the
  Delta records (:func:`transferkit.merge.tasks.task_split`), or ``train_sets`` / ``fishers`` given.

:func:`run_merge` resolves the inputs of a :class:`~transferkit.merge.spec.MergeSpec` — tune run folders /
Delta folders (merged in memory, written as ``DIR/delta/``; per-task heads are not merged, apply the result
with :func:`transferkit.delta.apply` and put a head back with :func:`~transferkit.merge.attach_head`) or
safetensors checkpoints (``streamable`` methods only, merged tensor by tensor by
:func:`~transferkit.merge.stream_merge` into shards) — optionally evaluates the merged model on each
task's recorded held-out part (:func:`~transferkit.merge.tasks.evaluate_merged`), and writes
``DIR/merge.json`` (method, options, resolved parameters, inputs, skipped/excluded tensors, evaluation,
warnings) atomically: on any error nothing is left behind. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import registry
from ..errors import ConfigError, ModelError
from .layers import check_value, is_scalar, n_layers, scaled, value_for
from .spec import MergeSpec, get_method, parse_options

__all__ = ["merge_deltas", "run_merge", "resolve_input", "MERGE_FILES"]

# what a merge writes into its output folder (a Delta, or safetensors shards + index), and the marker
MERGE_FILES = ("merge.json", "delta", "*.safetensors", "*.safetensors.index.json")


def _options(m: registry.Method, options: Any) -> Any:
    if m.options is not None and isinstance(options, m.options):
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"options of merge method {m.name!r} must be a mapping or {m.options.__name__ if m.options else 'None'}")
    return parse_options(m.name, options)


def merge_deltas(method: str, deltas: Sequence, options: Mapping[str, Any] | Any = None, *,
                 weights: Sequence[Any] | None = None, fishers: Sequence[Mapping] | None = None,
                 train_sets: Sequence[Any] | None = None, base: Any = None,
                 progress: Callable[[str], None] | None = None):
    """Merge Deltas with the registered merge method ``method`` (aliases accepted); returns a Delta.

    Parameters
    ----------
    method : a merge method (``transferkit merge --list``) or an alias (``linear``, ``dare``, …).
    deltas : Deltas of one base.
    options : the method's options, a mapping (validated by the registry; mergekit names such as
        ``lambda`` accepted) or an instance of its options dataclass.
    weights : per-model weights (numbers, or per-layer values for ``per_layer`` methods); None: none.
    fishers, train_sets, base : Fisher only — precomputed Fishers, or each model's training Dataset
        (default: the train part of the split its Delta records) and the base model to compute them with
        (default ``deltas[0].base``).
    """
    m = get_method(method)
    opts = _options(m, options)
    info = m.info
    deltas = list(deltas)
    n = info.get("n_models")
    if n is not None and len(deltas) != n:
        raise ConfigError(f"{m.name} takes exactly {n} model{'s' if n != 1 else ''}, got {len(deltas)}")
    kind = info.get("delta_kind")
    if kind and any(d.kind != kind for d in deltas):
        raise ConfigError(f"merge method {m.name!r} needs {kind} Deltas (tune --method {kind} run folders)")
    w_specs = None if weights is None else list(weights)
    if w_specs is not None:
        if len(w_specs) != len(deltas):
            raise ConfigError(f"{m.name}: {len(w_specs)} weights for {len(deltas)} models")
        for i, w in enumerate(w_specs):
            check_value(w, f"weight of model {i}")
        if info.get("weights") is None:
            raise ConfigError(f"{m.name} takes no per-model weights")
    lam = getattr(opts, "lam", None)
    per_layer = not is_scalar(lam) or any(not is_scalar(w) for w in w_specs or ())
    if per_layer and not info.get("per_layer"):
        raise ConfigError(f"per-layer values are not supported for {m.name}; use numbers")
    kw = opts.kwargs() if opts is not None else {}
    if per_layer:
        return _per_layer(m, deltas, opts, kw, w_specs)
    w = None if w_specs is None else [float(x) for x in w_specs]
    how = info.get("weights")
    if info.get("needs_data"):
        if fishers is None:
            from . import tasks

            if train_sets is None:
                train_sets = [tasks.task_split(d, what=str(d.meta.get("name") or f"model {i}"),
                                               instead="merge_deltas(..., train_sets=[...])")[0]
                              for i, d in enumerate(deltas)]
            fishers = tasks.task_fishers(deltas, train_sets, base, opts, progress=progress)
        return m.fn(deltas, fishers, weights=w, **kw)
    if how in ("normalized", "kwarg"):
        return m.fn(deltas, weights=w, **kw)
    if how == "coefficient" and w is not None:
        kw["lam"] = [kw["lam"] * x for x in w]
    if how == "prescale" and w is not None and any(x != 1.0 for x in w):
        deltas = [scaled(d, lambda _n, x=x: x) for d, x in zip(deltas, w)]
    return m.fn(deltas[0] if n == 1 else deltas, **kw)


def _per_layer(m: registry.Method, deltas: list, opts: Any, kw: dict[str, Any], w_specs: list | None):
    """Pre-scale each task vector by w_t(n), merge with unit coefficients, post-scale by λ(n)."""
    from .task_arithmetic import task_arithmetic

    L = n_layers(deltas)
    w_specs = w_specs if w_specs is not None else [1.0] * len(deltas)
    if m.info.get("weights") == "normalized":
        def norm_w(t: int) -> Callable[[str], float]:
            def f(name: str) -> float:
                total = sum(value_for(s, name, L, "weight") for s in w_specs)
                if total == 0:
                    raise ConfigError(f"{m.name}: the weights of tensor {name!r} sum to 0")
                return value_for(w_specs[t], name, L, "weight") / total
            return f
        merged = task_arithmetic([scaled(d, norm_w(t)) for t, d in enumerate(deltas)], 1.0, exclude=kw["exclude"])
        merged.meta["method"] = m.name
    else:
        parts = [scaled(d, lambda name, s=s: value_for(s, name, L, "weight")) for d, s in zip(deltas, w_specs)]
        merged = m.fn(parts[0] if m.info.get("n_models") == 1 else parts, **{**kw, "lam": 1.0})
    lam = getattr(opts, "lam", None)
    lam_spec = lam if lam is not None else (opts.default_lam() if hasattr(opts, "default_lam") else 1.0)
    merged.tensors = {name: v * value_for(lam_spec, name, L, "lambda") for name, v in merged.tensors.items()}
    merged.meta.update(lam=lam_spec, weights=w_specs, per_layer=True, n_layers=L)
    return merged


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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------ running a spec
def run_merge(spec: MergeSpec, out: str | Path, *, limit: int | None = None, per_class: int | None = None,
              seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Merge as ``spec`` says, write ``out`` (atomically), return the report (also ``out/merge.json``).

    ``limit``/``per_class``/``seed`` only choose the Fisher data of a Delta that records no split (as
    `transferkit tune` loaded and split it); recorded splits are reused as they are.
    """
    from ..io import MARKER, atomic_path, check_out, dumps_json

    t0 = time.perf_counter()
    m = get_method(spec.method)
    # before any work: never replace an input (a run folder), a file, or a folder transferkit did not write
    check_out(out, names=MERGE_FILES, replaces=True, inputs=[e.model for e in spec.models] + [spec.base])
    resolved = [resolve_input(e.model) for e in spec.models]
    kinds = {k for k, _ in resolved}
    if len(kinds) > 1:
        raise ConfigError("cannot mix Delta run folders and safetensors checkpoints in one merge")
    kind = kinds.pop()
    out = Path(out)
    report: dict[str, Any] = {"method": m.name, "n_models": len(spec.models), "out": str(out),
                              "models": [e.to_dict() for e in spec.models],
                              "options": _jsonable(dataclasses.asdict(spec.options)) if spec.options is not None else {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec.dtype:
            warnings.warn(f"dtype {spec.dtype!r} is ignored: Deltas are merged and saved in float32, checkpoints "
                          "keep the base checkpoint's dtypes")
        if kind == "checkpoint":
            if spec.evaluate:
                raise ConfigError("--evaluate needs Delta run folders (from `transferkit tune`), not checkpoints")
            if not spec.base:
                raise ConfigError("merging checkpoints needs the base checkpoint (base_model / --base)")
            kw = _stream_kwargs(m, spec)
            from .streaming import stream_merge

            with atomic_path(out) as tmp:
                res = stream_merge(spec.base, [p for _, p in resolved], tmp, m.name, **kw)
                report.update(base=str(spec.base), parameters=_jsonable(res.meta),
                              output={"format": "safetensors shards", "shards": res.shards,
                                      "index": "model.safetensors.index.json", "n_tensors": res.n_tensors,
                                      "bytes": res.total_bytes, "passes": res.passes})
                report["seconds"] = round(time.perf_counter() - t0, 3)
                report["warnings"] = [str(w.message) for w in caught]
                (tmp / "merge.json").write_text(dumps_json(_jsonable(report)) + "\n")
                (tmp / MARKER).write_text(json.dumps({"written_by": "transferkit", "command": "merge"}) + "\n")
            return report

        deltas = [d for _, d in resolved]
        base_name = _check_bases(spec, deltas)
        base_spec = str(spec.base or base_name)
        for e, d in zip(spec.models, deltas):
            d.meta.setdefault("name", e.name or e.model)
        train_sets, legacy = (_fisher_train_sets(spec, deltas, limit, per_class, seed) if m.info.get("needs_data")
                              else (None, False))
        if (limit is not None or per_class is not None or seed != 0) and not legacy:
            warnings.warn("--limit/--per-class/--seed are ignored: they only choose the Fisher data of runs that "
                          "record no split; evaluation uses each run's recorded held-out part")
        merged = merge_deltas(m.name, deltas, spec.options, weights=spec.weights(), train_sets=train_sets,
                              base=base_spec, progress=progress)
        if spec.evaluate:
            from .tasks import evaluate_merged

            report["evaluation"] = evaluate_merged(merged, deltas, [e.data for e in spec.models], base_spec,
                                                   names=[e.model for e in spec.models], progress=progress)
        report.update(base=base_name, parameters=_jsonable({k: v for k, v in merged.meta.items()
                                                            if k not in ("coefficients",)}),
                      output={"format": "delta", "delta": "delta", "kind": merged.kind,
                              "n_tensors": len(merged.tensors), "n_params": merged.n_params()})
        if "evaluation" in report:  # keep the historical key order: evaluation after the output
            report["evaluation"] = report.pop("evaluation")
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["warnings"] = [str(w.message) for w in caught]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            merged.save(tmp / "delta")
            (tmp / "merge.json").write_text(dumps_json(_jsonable(report)) + "\n")
            (tmp / MARKER).write_text(json.dumps({"written_by": "transferkit", "command": "merge"}) + "\n")
    return report


def _check_bases(spec: MergeSpec, deltas: list) -> str:
    """The common base name of the Deltas (ConfigError when they, or ``spec.base``, disagree)."""
    base_name = deltas[0].base
    for e, d in zip(spec.models, deltas):
        if spec.base and not _same_base(d.base, str(spec.base)):
            raise ConfigError(f"incompatible models: {e.model} was tuned from {d.base!r}, not from the "
                              f"base {spec.base!r}")
    for e, d in zip(spec.models, deltas):
        if d.base != base_name and not _same_base(d.base, base_name):
            raise ConfigError(f"incompatible models: {e.model} was tuned from {d.base!r}, "
                              f"{spec.models[0].model} from {base_name!r}")
        d.base = base_name
    return base_name


def _fisher_train_sets(spec: MergeSpec, deltas: list, limit, per_class, seed) -> tuple[list, bool]:
    """Each model's Fisher data — the train part of its recorded split (a run that records none: of a fresh
    split, as `transferkit tune` made it) — and whether any run records no split."""
    from ..data.split import make_split
    from .tasks import task_split

    sets, legacy = [], False
    for e, d in zip(spec.models, deltas):
        if d.meta.get("split") is not None:
            sets.append(task_split(d, e.data, what=e.model)[0])
        elif e.data:
            warnings.warn(f"{e.model} records no split: its Fisher uses the training part of {e.data} split as "
                          f"`transferkit tune --seed {seed}` would (--limit/--per-class/--seed)")
            sets.append(make_split(e.data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed)[0])
            legacy = True
        else:
            raise ConfigError(f"fisher needs each model's training data (data: per model, --evaluate, or a run that "
                              f"records its split); missing for {e.model}")
    return sets, legacy


def _stream_kwargs(m: registry.Method, spec: MergeSpec) -> dict[str, Any]:
    """:func:`stream_merge` keyword arguments of a checkpoint merge (scalar values only)."""
    if not m.info.get("streamable"):
        names = [n for n, x in registry.methods("merge").items() if x.info.get("streamable")]
        raise ConfigError(f"checkpoint inputs support {', '.join(names)}; {m.name!r} needs tune run folders (Deltas)")
    opts = spec.options
    if not is_scalar(getattr(opts, "lam", None)):
        raise ConfigError("per-layer lambda needs Delta inputs (tune run folders); checkpoints take a number")
    for e in spec.models:
        if not is_scalar(e.weight):
            raise ConfigError(f"per-layer weights need Delta inputs (model {e.model}); checkpoints take a number")
    w = spec.weights()
    w = None if w is None else [float(x) for x in w]
    kw = opts.kwargs(checkpoint=True)
    if spec.shard_size is not None:
        kw["shard_size"] = spec.shard_size
    how = m.info.get("weights")
    if how == "normalized":
        kw["weights"] = w
    elif how == "coefficient" and w is not None:
        kw["lam"] = [kw["lam"] * x for x in w]
    elif w is not None and any(x != 1.0 for x in w):
        raise ConfigError(f"per-model weights are not supported by {m.name} on checkpoints; use Deltas")
    return kw
