"""Pipeline stage ``tune``: the top-k ranked candidates per target, over every seed (YAML key ``tune``).

The final pick per target is the best *validation* accuracy among the tuned candidates; the held-out
split is only scored. :func:`tune_unit` (one model, one target, one seed) is shared with the
ground-truth stage, which tunes every candidate.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import registry
from ...errors import ConfigError
from ...runtime import PeakMemory
from ..config import boolean, check_keys, integer, label, mapping, slug, string
from ..runner import finite_json
from ..stage import Stage, register_stage

_TUNE_KEYS = ("method", "top_k", "select_by", "config", "ground_truth", "ground_truth_method", "ground_truth_config")


@dataclass
class TuneSpec:
    method: str
    top_k: int = 1
    select_by: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    ground_truth: bool = False
    ground_truth_method: str = ""
    ground_truth_config: dict[str, Any] = field(default_factory=dict)


def default_method() -> str:
    """``lora`` when the tune registry provides it, else ``full``."""
    return "lora" if "lora" in registry.methods("tune") else "full"


def _check_method(method: str, where: str) -> str:
    try:
        registry.get("tune", method)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return method


def _check_tune_config(method: str, config: dict, where: str) -> None:
    """Unknown, mistyped or out-of-range method/train options fail at load time, not after the rank stage."""
    from ...engine import TrainConfig
    from ...tune import split_config

    try:
        _, train = split_config(method, config)
        TrainConfig.from_dict({k: v for k, v in train.items() if k != "progress"})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _method_default(method: str, key: str) -> Any:
    return (registry.get("tune", method).info.get("train") or {}).get(key)


def _tune_config(run, method: str, config: dict, seed: int) -> dict:
    cfg = dict(config)
    cfg["seed"] = seed
    cap = run.cfg.limits.epochs
    if cap is not None:
        default = _method_default(method, "epochs")
        cfg["epochs"] = min(int(cfg.get("epochs", default if default is not None else cap)), cap)
    return cfg


def _val_accuracy(metrics: dict) -> float | None:
    for k in ("val_val_accuracy", "val_accuracy", "best_val_accuracy"):
        if isinstance(metrics.get(k), (int, float)):
            return float(metrics[k])
    return None


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def tune_unit(run, stage: str, target, model: str, method: str, config: dict, seed: int) -> dict:
    """Tune ``model`` on ``target`` once (or read the stored result of a finished unit on resume).

    Trains on the target's recorded training part; the Delta records the split (``meta["split"]``).
    """
    from ...io import write_json
    from ...tune import tune

    unit_dir = run.out / stage / target.name / slug(label(model)) / f"seed{seed}"
    record_path = unit_dir / "unit.json"
    if run.resume and record_path.is_file():
        rec = json.loads(record_path.read_text())
        rec["resumed"] = True
        return rec
    train, test, split = run.split(target)
    cfg = _tune_config(run, method, config, seed)
    resume_unit = run.resume and unit_dir.exists()
    if unit_dir.exists() and not resume_unit:
        shutil.rmtree(unit_dir)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = tune(run.model(model), train, test, method=method, config=cfg, out_dir=unit_dir,
                   resume=resume_unit, progress=False, split=split)
        seconds = time.perf_counter() - t0
    m = res.metrics
    rec = {
        "stage": stage, "target": target.name, "model": model, "label": label(model), "method": method, "seed": seed,
        "config": cfg, "accuracy": m.get("test_accuracy"), "val_accuracy": _val_accuracy(m),
        "seconds": round(seconds, 2), "trainable_params": m.get("trainable_params"), "total_params": m.get("total_params"),
        **mem.as_dict(), "history": res.history, "metrics": m, "dir": str(unit_dir.relative_to(run.out)),
        "delta_kind": res.delta.kind,
    }
    rec = finite_json(rec)
    write_json(record_path, rec)
    return rec


def aggregate(records: list[dict]) -> dict:
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


def choose(runs: dict[str, dict], order: list[str]) -> str:
    """The candidate with the best validation accuracy (ties: the earlier in ``order``); never the test score."""
    return max(order, key=lambda m: (runs[m]["val_accuracy"] if runs[m]["val_accuracy"] is not None else -1.0,
                                     -order.index(m)))


class TuneStage(Stage):
    """Tune the top-k ranked candidates per target and pick one by validation accuracy."""

    name, order, key = "tune", 30, "tune"

    def parse(self, raw: Any, cfg: Any) -> TuneSpec:
        raw = mapping(raw, "tune")
        check_keys(raw, _TUNE_KEYS, "tune")
        metrics = cfg.section("rank") or []
        method = _check_method(string(raw.get("method", default_method()), "tune.method"), "tune.method")
        top_k = integer(raw.get("top_k", 1), "tune.top_k", optional=False)
        if top_k > len(cfg.models):
            raise ConfigError(f"tune.top_k is {top_k} but there are only {len(cfg.models)} candidate model(s)")
        select_by = string(raw.get("select_by", metrics[0] if metrics else ""), "tune.select_by")
        if select_by not in metrics:
            raise ConfigError(f"tune.select_by {select_by!r} is not one of the metrics ({', '.join(metrics)})"
                              f"{registry.did_you_mean(select_by, metrics)}")
        config = mapping(raw.get("config"), "tune.config")
        _check_tune_config(method, config, "tune.config")
        gt = boolean(raw.get("ground_truth", False), "tune.ground_truth")
        gt_method = _check_method(string(raw.get("ground_truth_method", method), "tune.ground_truth_method"),
                                  "tune.ground_truth_method")
        if "ground_truth_config" in raw:
            gt_config = mapping(raw["ground_truth_config"], "tune.ground_truth_config")
        else:
            gt_config = dict(config) if gt_method == method else {}
        _check_tune_config(gt_method, gt_config, "tune.ground_truth_config")
        return TuneSpec(method, top_k, select_by, config, gt, gt_method, gt_config)

    def dump(self, spec: TuneSpec) -> dict:
        return asdict(spec)

    def run(self, run) -> dict:
        cfg = run.cfg
        spec: TuneSpec = cfg.section("tune")
        gt = run.results.get("ground_truth", {})
        same_as_gt = (spec.ground_truth and "skipped" not in gt and spec.ground_truth_method == spec.method
                      and spec.ground_truth_config == spec.config)
        selected = {t.name: self._select(run, t) for t in cfg.targets}
        units = [(t, m, s) for t in cfg.targets for m in selected[t.name] for s in cfg.seeds]

        def one(target, model: str, seed: int) -> dict:
            if same_as_gt:  # the ground-truth stage already tuned this model with this method and config
                path = run.out / "ground_truth" / target.name / slug(label(model)) / f"seed{seed}" / "unit.json"
                if path.is_file():
                    return {**json.loads(path.read_text()), "reused_from": "ground_truth", "resumed": True}
            return tune_unit(run, "tune", target, model, spec.method, spec.config, seed)

        recs, _ = run.units("tune", units, one)
        out: dict[str, Any] = {"method": spec.method, "config": spec.config, "top_k": spec.top_k,
                               "select_by": spec.select_by, "selected": selected, "runs": {}, "chosen": {}}
        for target in cfg.targets:
            runs = {}
            for model in selected[target.name]:
                mine = [r for r in recs if r["target"] == target.name and r["model"] == model]
                runs[model] = {**aggregate(mine), "reused_from": mine[0].get("reused_from")}
            out["runs"][target.name] = runs
            best = choose(runs, selected[target.name])
            out["chosen"][target.name] = {"target": target.name, **{k: v for k, v in runs[best].items() if k != "history"}}
        return out

    @staticmethod
    def _select(run, target) -> list[str]:
        spec: TuneSpec = run.cfg.section("tune")
        ranked = run.results["rank"][target.name]["ranking"].get(spec.select_by, [])
        rest = [m for m in run.cfg.models if m not in ranked]  # unscored models go last, in config order
        return (ranked + rest)[: spec.top_k]


register_stage(TuneStage())
