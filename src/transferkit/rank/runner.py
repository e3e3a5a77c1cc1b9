"""Rank candidate models (or layers of one model) on a target end to end.

Load data, extract (cached) features, score every candidate with every requested metric, and
optionally: select an ensemble (``ensemble=K``), measure each candidate's real transfer accuracy
(``ground_truth="linear"|"finetune"``, cached — :mod:`transferkit.rank.groundtruth`) and judge
every metric's ranking against it (weighted Kendall τ, rel@1, regret, Pearson). This is what
``transferkit rank`` runs; the metrics themselves live in one module each.

Metric names accepted in ``metrics``: every registry metric (:data:`transferkit.rank.METRICS`),
``"all"`` (all of them), the set-level rankers ``"etran"`` and ``"ncti"``, and ``"auto"`` (rank
aggregation of :data:`transferkit.rank.auto.DEFAULT_METRICS`; its component metrics are computed
too, and shown when ``"auto"`` is the only name given).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError

AUTO = "auto"
ENSEMBLE_METHODS = ("osborn", "ms-leep", "e-leep")
MAX_AUTO_LAYERS = 6


def check_model_specs(models: list[str]) -> None:
    """Fail fast, before any work, on a model spec that cannot name a model."""
    from ..assets import catalogue

    known = sorted(n for n, e in catalogue().items() if e["kind"] == "model")
    for m in models:
        if not isinstance(m, str):
            continue  # an already-loaded ZooModel
        if m in known or m.startswith(("hf:", "timm:")) or Path(m).exists():
            continue
        raise ModelError(f"unknown model {m!r}; known: {', '.join(known)} (or a Hugging Face directory, hf:ID, timm:NAME)")
    names = [_name(m) for m in models]
    dupes = {m for m in names if names.count(m) > 1}
    if dupes:
        raise ModelError(f"model(s) listed twice: {', '.join(sorted(dupes))}")


def parse_metrics(metrics: str | Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split a metric list into (shown, per-model metrics to compute, set-level rankers).

    ``shown`` is what the table reports (``"auto"`` included when asked for). Unknown names raise
    a one-line :class:`ConfigError`.
    """
    from .. import registry
    from . import METRICS
    from .auto import DEFAULT_METRICS

    set_level_names = [n for n, m in registry.methods("rank").items() if m.info["kind"] == "set-level" and n != AUTO]
    known = [*METRICS, *set_level_names, AUTO, "all"]
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    names: list[str] = []
    for m in metrics:
        for n in (list(METRICS) if m == "all" else [m]):
            if n not in names:
                names.append(n)
    if not names:
        raise ConfigError("no metric given; known: " + ", ".join(known))
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}{registry.did_you_mean(unknown[0], known)}; "
                          f"known: {', '.join(known)}")
    shown = list(names)
    if shown == [AUTO]:
        shown = [*DEFAULT_METRICS, AUTO]
    per_model = [m for m in shown if m in METRICS]
    if AUTO in shown:
        per_model += [m for m in DEFAULT_METRICS if m not in per_model]
    set_level = [m for m in shown if m in set_level_names]
    return shown, per_model, set_level


def _name(m) -> str:
    return m if isinstance(m, str) else m.name


def auto_layers(model) -> list[str]:
    """A handful of evenly spaced block outputs of ``model`` plus ``penultimate``.

    The blocks are the children of the backbone's longest ``nn.Sequential``/``nn.ModuleList``
    (MobileNet ``features.*``, EfficientNet ``_blocks.*``, BERT ``encoder.layer.*``).
    """
    from torch import nn

    best: tuple[int, str, list[str]] = (0, "", [])
    for name, mod in model.backbone.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > best[0]:
            best = (len(mod), name, [f"{name}.{c}" if name else c for c, _ in mod.named_children()])
    blocks = best[2]
    if len(blocks) > MAX_AUTO_LAYERS - 1:
        idx = np.unique(np.round(np.linspace(0, len(blocks) - 1, MAX_AUTO_LAYERS - 1)).astype(int))
        blocks = [blocks[i] for i in idx]
    return blocks + ["penultimate"]


def resolve_layers(model, layers: str | Sequence[str]) -> list[str]:
    """Validate ``layers`` (tap names, or ``"auto"``) against ``model.taps()``."""
    if isinstance(layers, str):
        layers = [t.strip() for t in layers.split(",") if t.strip()]
    layers = list(layers)
    if layers == ["auto"]:
        return auto_layers(model)
    if not layers:
        raise ConfigError("--layers needs at least one layer name, or 'auto'")
    taps = model.taps()
    known = set(taps)
    for t in layers:
        if t not in known:
            hint = ", ".join(auto_layers(model))
            raise ModelError(f"unknown layer {t!r} of model {model.name!r} ({len(taps)} taps); e.g. {hint} — or --layers auto")
    dupes = sorted({t for t in layers if layers.count(t) > 1})
    if dupes:
        raise ConfigError(f"layer(s) listed twice: {', '.join(dupes)}")
    return layers


def rank_models(data: Any, models: Sequence, metrics, *, limit: int | None = None,
                per_class: int | None = None, seed: int = 0, out_dir: str | Path | None = None,
                progress: bool = True, layers: str | Sequence[str] | None = None, ensemble: int | None = None,
                ground_truth: str | None = None, test_size: float = 0.3, gt_config: dict | None = None,
                gt_lrs: Sequence[float] | None = None, options: dict | None = None) -> dict[str, Any]:
    """Score every candidate on ``data`` with every metric in ``metrics``.

    Parameters
    ----------
    data : dataset spec or :class:`~transferkit.data.Dataset`.
    models : model names / paths (or loaded ZooModels). With ``layers``: exactly one model.
    metrics : metric names (see the module docstring), a list or a comma-separated string.
    layers : rank these taps of the one model instead of models (``"auto"``: evenly spaced blocks).
    ensemble : also select an ensemble of this many models (OSBORN; MS-LEEP and E-LEEP when every
        model has source-head probabilities).
    ground_truth : ``"linear"`` or ``"finetune"`` — split the data (``test_size``), score on the
        training part, measure each candidate's test accuracy and evaluate every ranking.
    gt_config, gt_lrs : fine-tuning options and lr grid for ``ground_truth="finetune"``.

    Returns a JSON-able dict: ``data``, ``n`` (samples scored), ``classes``, ``candidates``
    ("models" or "layers"), ``models`` (the candidates), ``metrics`` (shown), ``scores[candidate][metric]``,
    ``ranking[metric]`` (best first), ``agreement`` (pairwise Kendall τ between metric rankings),
    ``seconds`` (feature extraction per candidate, scoring per metric), ``notes``, and optionally
    ``ensemble``, ``ground_truth`` (measured accuracies) and ``evaluation`` (τ_w, rel@1, regret,
    Pearson per metric).
    """
    from ..data import Dataset, load_dataset
    from ..data.split import make_split
    from ..features import extract
    from ..zoo import load_model
    from . import rank_features

    shown, per_model, set_level = parse_metrics(metrics)
    models = list(models)
    if not models:
        raise ConfigError("no model given")
    if ground_truth is not None and ground_truth not in ("linear", "finetune"):
        raise ConfigError(f"unknown ground truth {ground_truth!r}; use linear or finetune")
    if layers is not None:
        if len(models) != 1:
            raise ConfigError(f"--layers ranks the layers of one model; got {len(models)} models")
        if ground_truth == "finetune":
            raise ConfigError("--ground-truth finetune measures whole models; use --ground-truth linear with --layers")
        if ensemble is not None:
            raise ConfigError("--ensemble selects among models, not layers")
    check_model_specs(models)
    if ensemble is not None:
        if isinstance(ensemble, bool) or not isinstance(ensemble, (int, np.integer)) or ensemble < 1:
            raise ConfigError(f"--ensemble must be a positive integer, got {ensemble!r}")
        if ensemble > len(models):
            raise ConfigError(f"--ensemble {ensemble} exceeds the number of candidate models ({len(models)})")

    # candidates: (name, model object, tap)
    if layers is not None:
        model = models[0] if not isinstance(models[0], str) else load_model(models[0])
        taps = resolve_layers(model, layers)
        cands = [(t, model, t) for t in taps]
    else:
        cands = [(_name(m), m, "penultimate") for m in models]
    names = [c[0] for c in cands]

    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    if isinstance(data, Dataset) and (limit or per_class):
        ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    train = test = split = None
    scored_ds = ds
    if ground_truth:  # the one split function; recorded with the result (and as split.json with out_dir)
        train, test, split = make_split(data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed,
                                        test_size=test_size, dataset=ds)
        scored_ds = train

    loaded: dict[str, Any] = {}
    feats, extract_s = {}, {}
    for name, m, tap in cands:
        t0 = time.perf_counter()
        if isinstance(m, str):
            m = loaded.setdefault(m, load_model(m))
        loaded[name] = m
        feats[name] = extract(m, scored_ds, tap=tap, progress=progress)
        extract_s[name] = round(time.perf_counter() - t0, 3)

    notes: list[str] = []
    scores: dict[str, dict[str, float]] = {}
    metric_s: dict[str, float] = {}
    ranked = rank_features(feats, per_model, seed=seed, options=options) if per_model else None
    if ranked:
        for k in per_model:
            scores[k] = dict(ranked["scores"][k])
            metric_s[k] = round(sum(ranked["time_s"].get(k, {}).values()), 4)
        notes += [f"{s['model']}: {s['metric']} skipped: {s['reason']}" for s in ranked["skipped"]]
    for k in set_level:
        scores[k], metric_s[k] = _set_level(k, feats, seed, notes, (options or {}).get(k, {}))
    if AUTO in shown:
        from .auto import DEFAULT_METRICS, aggregate_ranks

        t0 = time.perf_counter()
        agg = aggregate_ranks({k: scores[k] for k in DEFAULT_METRICS}, names)
        scores[AUTO] = {m: v for m, v in agg["scores"].items() if math.isfinite(v)}
        metric_s[AUTO] = round(sum(metric_s[k] for k in DEFAULT_METRICS) + time.perf_counter() - t0, 4)
        notes += [f"auto: {s['metric']} not used: {s['reason']}" for s in agg["skipped"]]
    scores = {k: {m: float(v) for m, v in sc.items() if v is not None and math.isfinite(float(v))} for k, sc in scores.items()}

    result: dict[str, Any] = {
        "data": ds.name, "n": len(scored_ds), "classes": len(ds.classes),
        "candidates": "layers" if layers is not None else "models",
        "models": names, "metrics": shown,
        "scores": {m: {k: _finite(scores.get(k, {}).get(m)) for k in shown} for m in names},
        "ranking": {k: _order(scores.get(k, {})) for k in shown},
        "agreement": agreement({k: scores.get(k, {}) for k in shown}),
        "notes": notes,
        "seconds": {"features": extract_s, "metrics": {k: metric_s.get(k, 0.0) for k in shown}},
    }
    if layers is not None:
        result["model"] = _name(models[0])
    if ground_truth:
        result["n_test"] = len(test)
    if ensemble is not None:
        result["ensemble"] = _ensemble(feats, int(ensemble), seed, notes)

    if ground_truth:
        measured, probs = {}, {}
        gt_s = {}
        for name, _, tap in cands:
            from .groundtruth import measure

            res = measure(loaded[name], train, test, protocol=ground_truth, tap=tap, config=gt_config, lrs=gt_lrs,
                          seed=seed, progress=progress)
            measured[name] = res["accuracy"]
            probs[name] = res.pop("test_probs")
            gt_s[name] = res["seconds"]
            result.setdefault("ground_truth_runs", {})[name] = {k: res[k] for k in ("accuracy", "oracle_accuracy",
                                                                                     "selected", "grid", "cached", "seconds")}
        from .groundtruth import grid_edge_notes

        notes.extend(grid_edge_notes(result["ground_truth_runs"]))
        result["ground_truth"] = {"protocol": ground_truth, "accuracy": measured, "seconds": gt_s,
                                  "n_train": len(train), "n_test": len(test),
                                  "split": {k: v for k, v in split.to_dict().items() if k != "test_ids"}}
        result["evaluation"] = evaluation({k: scores.get(k, {}) for k in shown}, measured, notes)
        if ensemble is not None:
            _evaluate_ensemble(result["ensemble"], probs, test.y, int(ensemble))

    if out_dir:
        write_outputs(result, out_dir)
        if split is not None:
            from ..data.split import write_split

            write_split(out_dir, split)
    return result


def _set_level(name: str, feats: dict, seed: int, notes: list[str], opts: dict) -> tuple[dict, float]:
    from .. import registry
    from ..errors import TransferkitError

    method = registry.get("rank", name)
    method.parse(opts)
    t0 = time.perf_counter()
    try:
        sc = method.fn(feats, seed=seed, **opts)
    except TransferkitError as e:
        notes.append(f"{name} skipped: {e}")
        sc = {}
    return dict(sc), round(time.perf_counter() - t0, 4)


def _order(sc: dict) -> list[str]:
    return sorted(sc, key=lambda m: (-sc[m], str(m)))


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def agreement(scores_by_metric: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Pairwise Kendall τ between the metrics' scores over the candidates both scored.

    Returns ``{"kendall_tau": {a: {b: τ or None}}, "mean": {a: mean τ with the others or None}}``;
    τ is None where fewer than 2 common candidates or a constant score make it undefined.
    """
    from scipy.stats import kendalltau

    ms = list(scores_by_metric)
    tau: dict[str, dict[str, float | None]] = {a: {} for a in ms}
    for a, b in itertools.combinations(ms, 2):
        common = sorted(set(scores_by_metric[a]) & set(scores_by_metric[b]))
        val = None
        if len(common) >= 2:
            x = [scores_by_metric[a][m] for m in common]
            y = [scores_by_metric[b][m] for m in common]
            if np.ptp(x) > 0 and np.ptp(y) > 0:
                t = float(kendalltau(x, y).statistic)
                val = t if math.isfinite(t) else None
        tau[a][b] = tau[b][a] = val
    mean = {}
    for a in ms:
        vals = [v for b, v in tau[a].items() if v is not None]
        mean[a] = float(np.mean(vals)) if vals else None
    return {"kendall_tau": tau, "mean": mean}


def evaluation(scores_by_metric: dict[str, dict[str, float]], measured: dict[str, float], notes: list[str]) -> dict:
    """τ_w, Kendall τ, Pearson, Spearman, rel@1/@3, regret and the pick of each metric vs ``measured``."""
    import warnings

    from .evaluate import evaluate_scores

    out = {}
    for k, sc in scores_by_metric.items():
        common = {m: v for m, v in sc.items() if m in measured}
        if len(common) < 2:
            notes.append(f"{k}: not evaluated (scored {len(common)} candidate(s); need 2)")
            continue
        with warnings.catch_warnings():  # constant scores or accuracies: correlations are undefined (None)
            warnings.simplefilter("ignore")
            ev = evaluate_scores(common, {m: measured[m] for m in common}, ks=(1, 3))
        out[k] = {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in ev.items()}
        out[k]["n"] = len(common)
    return out


def _ensemble(feats: dict, k: int, seed: int, notes: list[str]) -> dict[str, Any]:
    from ..errors import TransferkitError
    from .ensemble import select_ensemble

    out: dict[str, Any] = {"k": k, "methods": {}}
    for method in ENSEMBLE_METHODS:
        if method != "osborn" and any(f.probs is None for f in feats.values()):
            notes.append(f"ensemble {method} skipped: needs source-head probabilities for every model")
            continue
        try:
            r = select_ensemble(feats, k, method, seed=seed)
        except TransferkitError as e:
            notes.append(f"ensemble {method} skipped: {e}")
            continue
        out["methods"][method] = {"selected": r["selected"], "value": r["value"], "guarantee": r["guarantee"],
                                  "scores": r["scores"], "notes": r["notes"]}
    return out


def _evaluate_ensemble(ens: dict, probs: dict[str, np.ndarray], y: np.ndarray, k: int) -> None:
    """Measured accuracy (averaged fine-tuned probabilities) of each selection vs the best k-subset."""
    from math import comb

    from .ensemble import ensemble_accuracy

    names = sorted(probs)
    ens["single_accuracy"] = {m: ensemble_accuracy(probs, y, [m]) for m in names}
    if comb(len(names), k) <= 5000:
        accs = {S: ensemble_accuracy(probs, y, list(S)) for S in itertools.combinations(names, k)}
        best = max(accs, key=lambda S: (accs[S], [-names.index(m) for m in S]))
        ens["best"] = {"members": list(best), "accuracy": accs[best]}
        ens["mean_subset_accuracy"] = float(np.mean(list(accs.values())))
    top_single = sorted(names, key=lambda m: -ens["single_accuracy"][m])[:k]
    ens["top_k_by_accuracy"] = {"members": top_single, "accuracy": ensemble_accuracy(probs, y, top_single)}
    for r in ens["methods"].values():
        r["accuracy"] = ensemble_accuracy(probs, y, r["selected"])
        if "best" in ens and ens["best"]["accuracy"] > 0:
            r["rel"] = r["accuracy"] / ens["best"]["accuracy"]


# --------------------------------------------------------------------------------------------- outputs
def to_csv(result: dict) -> str:
    """One row per candidate: score and rank per metric (+ measured accuracy)."""
    import csv
    import io

    metrics = result["metrics"]
    measured = (result.get("ground_truth") or {}).get("accuracy", {})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["candidate"] + [f"{m}" for m in metrics] + [f"{m}_rank" for m in metrics]
    if measured:
        head.append(f"measured_accuracy_{result['ground_truth']['protocol']}")
    w.writerow(head)
    for cand in result["models"]:
        row = [cand]
        row += ["" if result["scores"][cand].get(m) is None else repr(result["scores"][cand][m]) for m in metrics]
        row += [str(result["ranking"][m].index(cand) + 1) if cand in result["ranking"][m] else "" for m in metrics]
        if measured:
            row.append(repr(measured.get(cand, "")))
        w.writerow(row)
    return buf.getvalue()


def write_outputs(result: dict, out_dir: str | Path) -> None:
    """``ranking.json``, ``ranking.csv`` and (for older readers) ``rank.json``, each written atomically."""
    from ..io import write_json, write_text

    out = Path(out_dir)
    write_json(out / "ranking.json", result)
    write_text(out / "ranking.csv", to_csv(result))
    write_json(out / "rank.json", result)
