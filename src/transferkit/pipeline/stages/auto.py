"""Pipeline stage ``auto``: per target, which model and which method within a budget (YAML key ``auto``).

Runs :func:`transferkit.auto.search` on each target's recorded split with the pipeline's models and
``model_options``; with ``oracle: true`` it also trains every arm to the end (small targets only) and says
how close the winner came. YAML::

    auto:
      models: [digits-mnist, mobilenet-v2]   # default: the pipeline's models
      methods: [linear, lora, full]   # default: linear, bitfit, lora, full
      budget: 5m                      # or 30ep
      epochs: 3                       # per arm, if never pruned
      eta: 3
      lr_factors: [1, 0.333, 3]
      prior: logme                    # any per-model metric, learned, or none
      select_by: entropy              # judge arms with a label-free scorer (default: validation accuracy)
      oracle: false
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import ConfigError
from ..config import boolean, check_keys, integer, mapping, slug, string, string_list
from ..stage import Stage, register_stage

_KEYS = ("models", "methods", "budget", "epochs", "eta", "lr_factors", "prior", "select_by", "oracle")


@dataclass
class AutoSpec:
    models: list[str] = field(default_factory=list)  # a subset of the pipeline's models (default: all)
    methods: list[str] = field(default_factory=lambda: ["linear", "bitfit", "lora", "full"])
    budget: str = "10m"
    epochs: int = 9
    eta: int = 3
    lr_factors: list[float] = field(default_factory=lambda: [1.0, 1 / 3, 3.0])
    prior: str = "logme"
    select_by: str | None = None  # a label-free scorer instead of validation accuracy
    oracle: bool = False


class AutoStage(Stage):
    """Search model × method × lr per target within a budget (successive halving, ranking as the prior)."""

    name, order, key = "auto", 25, "auto"

    def parse(self, raw: Any, cfg: Any) -> AutoSpec | None:
        if raw is None or raw is False:
            return None
        from ...auto.budget import parse_budget
        from ...auto.search import _lr_factors, _methods, _select_by

        raw = {} if raw is True else mapping(raw, "auto")
        check_keys(raw, _KEYS, "auto")
        spec = AutoSpec()
        if "models" in raw:
            spec.models = string_list(raw["models"], "auto.models")
            unknown = [m for m in spec.models if m not in cfg.models]
            if unknown:
                raise ConfigError(f"auto.models: {unknown[0]!r} is not one of the pipeline's models "
                                  f"({', '.join(cfg.models)})")
        if "methods" in raw:
            spec.methods = string_list(raw["methods"], "auto.methods")
        if raw.get("select_by") is not None:
            spec.select_by = string(raw["select_by"], "auto.select_by")
        try:
            _methods(spec.methods)
            if "budget" in raw:
                spec.budget = str(raw["budget"])
            parse_budget(spec.budget)
            if "lr_factors" in raw:
                spec.lr_factors = _lr_factors(raw["lr_factors"])
            _select_by(spec.select_by, spec.methods)
        except ConfigError as e:
            raise ConfigError(f"auto: {e}") from None
        spec.epochs = integer(raw.get("epochs", spec.epochs), "auto.epochs", optional=False)
        spec.eta = integer(raw.get("eta", spec.eta), "auto.eta", minimum=2, optional=False)
        spec.prior = string(raw.get("prior", spec.prior), "auto.prior")
        spec.oracle = boolean(raw.get("oracle", spec.oracle), "auto.oracle")
        return spec

    def dump(self, spec: AutoSpec | None) -> dict | None:
        if not spec:
            return None
        # select_by only when set, so configs without it keep their fingerprint
        return {k: v for k, v in asdict(spec).items() if k != "select_by" or v is not None}

    def run(self, run) -> dict:
        spec: AutoSpec | None = run.cfg.section("auto")
        if spec is None:
            return {"skipped": "auto is not configured"}
        recs, skipped = run.units("auto", [(t,) for t in run.cfg.targets], lambda t: _search(run, spec, t),
                                  budget=True)
        return {"spec": asdict(spec), "targets": recs, "skipped_units": skipped}

    def report(self, result: dict, summary: dict, figure) -> dict | None:
        if not result.get("targets"):
            return None
        text, tables, figures, headline = [], [], [], []
        for rec in result["targets"]:
            w = rec.get("winner")
            if not w:
                text.append(f"{rec['target']}: no winner ({rec.get('note', 'nothing trained')}).")
                continue
            sel = rec.get("select_by") or {"metric": "accuracy", "higher_is_better": True}  # older results
            metric = sel["metric"]
            line = (f"{rec['target']}: auto chose {w['name']} — validation {metric} {_score(w):.3f} (predicted), "
                    f"test {w['test_accuracy']:.3f} ± {w['test_se']:.3f} (measured, n = {w['n_test']}); budget "
                    f"{rec['budget']['spent']:g} of {rec['budget']['given']:g} "
                    f"{'epochs' if rec['budget']['kind'] == 'epochs' else 's'}.")
            if rec.get("oracle"):
                headline.append(f"{rec['target']}: {rec['oracle']['headline']} (the oracle: every arm of this "
                                f"search — {len(rec['arms'])} arms — trained to the end).")
            text.append(line)
            best_val: dict[str, float] = {}
            pick = max if sel["higher_is_better"] else min
            for a in rec["arms"]:
                if _score(a) is not None:
                    best_val[a["model"]] = pick(best_val.get(a["model"], _score(a)), _score(a))
            prior = rec["prior"]
            tables.append({"caption": f"{rec['target']}: the prior ({prior['metric']}) against what the search "
                                      f"measured (best validation {metric} of the model's arms)",
                           "header": ["prior rank", "model", prior["metric"], f"best validation {metric}"],
                           "rows": [[i + 1, m, _fmt(prior["scores"].get(m)), _fmt(best_val.get(m))]
                                    for i, m in enumerate(prior["order"])]})
            tables.append({"caption": f"{rec['target']}: arms in start order",
                           "header": ["arm", "state", "epochs", f"validation {metric}", "seconds"],
                           "rows": [[a["name"], a["state"], f"{a['epochs']:g}", _fmt(_score(a)),
                                     f"{a['seconds']:.1f}"] for a in rec["arms"]]})
            png = run_png(rec)
            if png:
                figures.append(figure(f"auto-{slug(rec['target'])}.png", png))
        return {"title": "Auto: model × method within a budget", "headline": headline, "text": text, "tables": tables,
                "figures": [f for f in figures if f]}


def _score(a: dict) -> float | None:
    return a.get("val_score", a.get("val_accuracy"))  # results written before select_by have no val_score


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def run_png(rec: dict) -> bytes | None:
    from ...auto.figures import plot_trace

    return plot_trace(rec["arms"], (rec.get("winner") or {}).get("arm"),
                      (rec.get("select_by") or {}).get("metric", "accuracy"))


def _search(run, spec: AutoSpec, target) -> dict:
    from ...auto.oracle import compare, oracle
    from ...auto.search import search
    from ...io import write_json

    out = run.out / "auto" / slug(target.name)
    if run.resume and (out / "result.json").is_file():
        return {**json.loads((out / "result.json").read_text()), "resumed": True}
    split = run.split(target)
    cfg = run.cfg
    common = dict(methods=spec.methods, epochs=spec.epochs, lr_factors=spec.lr_factors, seed=cfg.seeds[0],
                  model_options=cfg.model_options, split=split)
    models = spec.models or list(cfg.models)
    res = search(target.name, models, budget=spec.budget, eta=spec.eta, prior=spec.prior, out=out,
                 resume=run.resume and (out / "study.db").is_file(), progress=run.progress.line,
                 select_by=spec.select_by, **common)
    if spec.oracle and res.get("winner"):
        res["oracle"] = compare(res, oracle(target.name, models, progress=run.progress.line, **common))
    rec = {"target": target.name, **res}
    write_json(out / "result.json", rec)
    return rec


register_stage(AutoStage())
