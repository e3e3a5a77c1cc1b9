"""Pipeline stage ``adapt``: adapt a model from a labelled source to each target (YAML key ``adapt``).

::

    adapt:
      method: tent                      # any adapt method (transferkit adapt --list)
      sources: {opencv-digits: mnist}   # target name → labelled source dataset
      options: {batch_size: 100}        # the method's options
      label_maps:                       # target name → {source class: target class}, where they differ
        finefood: {positive: great, negative: other}

The model is the one the tune stage chose for the target, else the first candidate; the target's recorded
split is used as every stage uses it: its training part without labels, its held-out part adapted on
(test-time methods) and scored. Sources are sub-sampled like the targets (``limits``). One unit per target
with a source and seed; targets without a source are listed as skipped.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import ConfigError
from ..config import _check_target_data, check_keys, label, mapping, slug, string
from ..runner import finite_json
from ..stage import Stage, register_stage

_KEYS = ("method", "sources", "options", "label_maps")


@dataclass
class AdaptSpec:
    method: str
    sources: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    label_maps: dict[str, dict[str, str]] = field(default_factory=dict)


class AdaptStage(Stage):
    """Adapt each target's model from its labelled source (DANN or test-time adaptation)."""

    name, order, key = "adapt", 35, "adapt"

    def parse(self, raw: Any, cfg: Any) -> AdaptSpec | None:
        if raw is None or raw is False:
            return None
        from ... import registry
        from ...adapt import check_method

        raw = mapping(raw, "adapt")
        check_keys(raw, _KEYS, "adapt")
        try:
            method = check_method(string(raw.get("method", "dann"), "adapt.method"))
            options = mapping(raw.get("options"), "adapt.options")
            method.parse(options, f"adapt method {method.name!r} (adapt.options)")
        except ConfigError as e:
            raise ConfigError(f"adapt: {e}") from None
        sources = mapping(raw.get("sources"), "adapt.sources")
        if not sources:
            raise ConfigError("adapt.sources is empty: map each target to its labelled source, e.g. "
                              "sources: {opencv-digits: mnist}")
        names = [t.name for t in cfg.targets]
        for name, spec in sources.items():
            if name not in names:
                raise ConfigError(f"adapt.sources: {name!r} is not a target{registry.did_you_mean(name, names)} "
                                  f"(targets: {', '.join(names)})")
            _check_target_data(string(spec, f"adapt.sources.{name}"), f"adapt.sources.{name}")
        maps = mapping(raw.get("label_maps"), "adapt.label_maps")
        for name, lm in maps.items():
            if name not in sources:
                raise ConfigError(f"adapt.label_maps: {name!r} is not a target with a source"
                                  f"{registry.did_you_mean(name, list(sources))}")
            if not mapping(lm, f"adapt.label_maps.{name}"):
                raise ConfigError(f"adapt.label_maps.{name} is empty: map source classes to target classes")
        return AdaptSpec(method.name, {k: str(v).strip() for k, v in sources.items()}, options,
                         {k: {str(a): str(b) for a, b in v.items()} for k, v in maps.items()})

    def dump(self, spec: AdaptSpec | None) -> dict | None:
        return asdict(spec) if spec else None

    def run(self, run) -> dict:
        spec: AdaptSpec | None = run.cfg.section("adapt")
        if spec is None:
            return {"skipped": "adapt is not configured"}
        chosen = (run.results.get("tune") or {}).get("chosen") or {}
        targets = [t for t in run.cfg.targets if t.name in spec.sources]
        units = [(t, (chosen.get(t.name) or {}).get("model") or run.cfg.models[0], s)
                 for t in targets for s in run.cfg.seeds]

        def one(target, model: str, seed: int) -> dict:
            return self._unit(run, spec, target, model, seed)

        recs, _ = run.units("adapt", units, one)
        return {"method": spec.method, "options": spec.options, "runs": recs,
                "skipped_targets": [t.name for t in run.cfg.targets if t.name not in spec.sources]}

    @staticmethod
    def _unit(run, spec: AdaptSpec, target, model: str, seed: int) -> dict:
        from ...adapt import adapt
        from ...data import load_dataset
        from ...io import write_json

        unit_dir = run.out / "adapt" / target.name / slug(label(model)) / f"seed{seed}"
        record_path = unit_dir / "unit.json"
        if run.resume and record_path.is_file():
            return {**json.loads(record_path.read_text()), "resumed": True}
        if unit_dir.exists():
            shutil.rmtree(unit_dir)
        train, test, split = run.split(target)
        lim = run.cfg.limits
        source = load_dataset(spec.sources[target.name], limit=target.limit or lim.samples,
                              per_class=target.per_class or lim.per_class, seed=seed)
        res = adapt(run.model(model), source, train, test, method=spec.method, options=spec.options, seed=seed,
                    out_dir=unit_dir, split=split, label_map=spec.label_maps.get(target.name))
        m = res.metrics
        rec = finite_json({"target": target.name, "source": spec.sources[target.name], "model": model,
                           "method": spec.method, "seed": seed, "accuracy": m.get("accuracy"),
                           "source_only_accuracy": m.get("source_only_accuracy"), "seconds": m["seconds"],
                           "dir": str(unit_dir.relative_to(run.out))})
        write_json(record_path, rec)
        return rec

    def report(self, result: dict, summary: dict, figure) -> dict | None:
        if "skipped" in result or not result.get("runs"):
            return None
        runs = result["runs"]
        rows = [[r["target"], r["source"], label(r["model"]), r["seed"], _pct(r.get("source_only_accuracy")),
                 _pct(r["accuracy"]), r["seconds"]] for r in runs]
        return {"title": f"Domain adaptation ({result['method']})",
                "text": [f"Each target's model adapted from its labelled source with {result['method']}; accuracy "
                         "on the target's held-out part (its labels are used for nothing else)."],
                "tables": [{"caption": "held-out target accuracy (%)",
                            "header": ["target", "source", "model", "seed", "source only", result["method"], "s"],
                            "rows": rows}],
                "figures": [figure("accuracy", _plot(runs, result["method"]))]}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _plot(runs: list[dict], method: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['source']}→{r['target']}" + (f" s{r['seed']}" if len({x['seed'] for x in runs}) > 1 else "")
             for r in runs]
    xs = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(runs) + 1), 3))
    if any(r.get("source_only_accuracy") is not None for r in runs):
        ax.bar([x - 0.2 for x in xs], [100 * (r.get("source_only_accuracy") or 0) for r in runs], 0.4,
               label="source only")
    ax.bar([x + 0.2 for x in xs], [100 * (r["accuracy"] or 0) for r in runs], 0.4, label=method)
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


register_stage(AdaptStage())
