"""Pipeline stage ``rank``: every metric on every target's training split (YAML key ``metrics``)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ...errors import ConfigError
from ...registry import did_you_mean as _did_you_mean
from ..config import label, slug, string_list
from ..stage import Stage, register_stage


class RankStage(Stage):
    """Score every candidate on every target with the transferability metrics."""

    name, order, key = "rank", 10, "metrics"

    def parse(self, raw: Any, cfg: Any) -> list[str]:
        from ...rank import METRICS, resolve_metrics

        names = string_list(raw if raw is not None else ["logme"], "metrics")
        for n in names:
            if n != "all" and n not in METRICS:
                raise ConfigError(f"unknown metric {n!r} in metrics{_did_you_mean(n, METRICS)} "
                                  f"(known: {', '.join(sorted(METRICS))}, all)")
        return resolve_metrics(names)

    def dump(self, spec: list[str]) -> list[str]:
        return list(spec)

    def run(self, run) -> dict:
        from ...io import write_json
        from ...rank.runner import rank_models

        cfg = run.cfg
        metrics = cfg.section("rank")
        units = [(t, m) for t in cfg.targets for m in cfg.models]

        def one(target, model: str) -> dict:
            path = run.out / "rank" / target.name / f"{slug(label(model))}.json"
            if run.resume and path.is_file():
                return {**json.loads(path.read_text()), "resumed": True}
            train, _ = run.data(target)
            spec = run.model(model) if model in cfg.model_options else model
            res = rank_models(train, [spec], metrics, seed=cfg.seeds[0], progress=False)
            name = res["models"][0]
            rec = {"target": target.name, "model": model, "n": res["n"], "classes": res["classes"], "data": res["data"],
                   "scores": res["scores"][name], "notes": res.get("notes", []),
                   "seconds": {"features": res["seconds"]["features"].get(name),
                               "metrics": res["seconds"].get("metrics", {})}}
            write_json(path, rec)
            return rec

        recs, _ = run.units("rank", units, one)
        out: dict[str, Any] = {}
        for target in cfg.targets:
            mine = [r for r in recs if r["target"] == target.name]
            train, test = run.data(target)
            scores = {r["model"]: r["scores"] for r in mine}
            ranking = {}
            for metric in metrics:
                ok = {m: s[metric] for m, s in scores.items() if s.get(metric) is not None and math.isfinite(s[metric])}
                ranking[metric] = sorted(ok, key=lambda m: (-ok[m], m))
            out[target.name] = {
                "data": str(target.data) if isinstance(target.data, (str, os.PathLike)) else target.data.name,
                "n_train": len(train), "n_test": len(test), "classes": list(train.classes),
                "models": list(cfg.models), "metrics": list(metrics), "scores": scores, "ranking": ranking,
                "notes": [n for r in mine for n in r["notes"]],
                "seconds": {r["model"]: r["seconds"] for r in mine},
            }
        return out


register_stage(RankStage())
