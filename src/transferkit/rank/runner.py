"""Rank candidate models on a target end to end: load data, extract (cached) features, score.

This is what ``transferkit rank`` runs; the metrics themselves live in one module each.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..errors import ModelError


def check_model_specs(models: list[str]) -> None:
    """Fail fast, before any work, on a model spec that cannot name a model."""
    from ..assets import catalogue

    known = sorted(n for n, e in catalogue().items() if e["kind"] == "model")
    for m in models:
        if m in known or m.startswith(("hf:", "timm:")) or Path(m).exists():
            continue
        raise ModelError(f"unknown model {m!r}; known: {', '.join(known)} (or a Hugging Face directory, hf:ID, timm:NAME)")
    dupes = {m for m in models if models.count(m) > 1}
    if dupes:
        raise ModelError(f"model(s) listed twice: {', '.join(sorted(dupes))}")


def rank_models(data: Any, models: list[str], metrics: list[str], *, limit: int | None = None,
                per_class: int | None = None, seed: int = 0, out_dir: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Score every model in ``models`` on ``data`` with every metric in ``metrics``.

    Returns a JSON-able dict: ``data``, ``n``, ``models``, ``metrics``, ``scores[model][metric]``,
    ``ranking[metric]`` (best first), ``seconds`` (feature extraction per model, scoring per
    metric) and ``notes`` for (model, metric) pairs skipped because the model lacks an input.
    """
    from ..data import Dataset, load_dataset
    from ..features import extract
    from ..zoo import load_model
    from . import rank_features

    check_model_specs(models)
    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    feats, extract_s = {}, {}
    for name in models:
        t0 = time.perf_counter()
        feats[name] = extract(load_model(name), ds, progress=progress)
        extract_s[name] = round(time.perf_counter() - t0, 3)
    ranked = rank_features(feats, metrics, seed=seed)
    result = {
        "data": ds.name, "n": len(ds), "classes": len(ds.classes), "models": list(models), "metrics": list(metrics),
        "scores": {m: {k: _finite(ranked["scores"][k].get(m)) for k in metrics} for m in models},
        "ranking": ranked["ranking"],
        "notes": [f"{s['model']}: {s['metric']} skipped: {s['reason']}" for s in ranked["skipped"]],
        "seconds": {"features": extract_s,
                    "metrics": {k: round(sum(ranked["time_s"].get(k, {}).values()), 4) for k in metrics}},
    }
    if out_dir:
        from ..io import write_json

        write_json(Path(out_dir) / "rank.json", result)
    return result


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
