"""Pipeline stage ``merge``: per base model tuned on ≥ 2 targets, merge its task deltas (YAML key ``merge``).

Any method of the merge registry; its options are checked by the method's typed options. Each task is
scored on the held-out part its delta recorded, with its own head; normalized accuracy = merged ÷
individual.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ... import registry
from ...errors import ConfigError
from ..config import check_keys, label, mapping, slug, string
from ..stage import Stage, register_stage

_MERGE_KEYS = ("method", "options")


@dataclass
class MergeSpec:
    method: str = "ties"
    options: dict[str, Any] = field(default_factory=dict)


class MergeStage(Stage):
    """Merge the per-target deltas of each base model tuned on two or more targets."""

    name, order, key = "merge", 40, "merge"

    def parse(self, raw: Any, cfg: Any) -> MergeSpec | None:
        if raw is None or raw is False:
            return None
        if isinstance(raw, str):
            raw = {"method": raw}
        from ...merge import parse_options
        from ...merge.spec import get_method

        raw = mapping(raw, "merge")
        check_keys(raw, _MERGE_KEYS, "merge")
        method = get_method(string(raw.get("method", "ties"), "merge.method"))
        if method.info.get("n_models") is not None or method.info.get("heads") == "averaged":
            usable = [n for n, m in registry.methods("merge").items()
                      if m.info.get("n_models") is None and m.info.get("heads") != "averaged"]
            raise ConfigError(f"merge method {method.name!r} does not merge the deltas of several targets "
                              f"(it is a `transferkit merge` method: {method.summary}); the pipeline takes "
                              f"{', '.join(usable)}")
        options = mapping(raw.get("options"), "merge.options")
        parse_options(method.name, options, f"merge method {method.name!r} (merge.options)")
        return MergeSpec(method.name, options)

    def dump(self, spec: MergeSpec | None) -> dict | None:
        return asdict(spec) if spec else None

    def run(self, run) -> dict:
        cfg = run.cfg
        spec: MergeSpec | None = cfg.section("merge")
        if spec is None:
            return {"skipped": "merge is not configured"}
        tuned = run.results["tune"]["runs"]
        by_base: dict[str, list[str]] = {}
        for target in cfg.targets:
            for model in tuned.get(target.name, {}):
                by_base.setdefault(model, []).append(target.name)
        groups = {b: ts for b, ts in by_base.items() if len(ts) >= 2}
        # why (not) merged, in words: a merge combines deltas of one base model tuned on several targets
        single = {b: ts[0] for b, ts in by_base.items() if len(ts) == 1}
        info = {"method": spec.method, "options": spec.options,
                "tuned": {t.name: [label(m) for m in tuned.get(t.name, {})] for t in cfg.targets},
                "not_merged": [f"{label(b)} (tuned on {t} only)" for b, t in single.items()]}
        if not groups:
            if len(cfg.targets) < 2:
                why = "there is one target; a merge needs the deltas of one base model tuned on 2 or more targets"
            else:
                picks = "; ".join(f"{t}: {', '.join(ms) or 'none'}" for t, ms in info["tuned"].items())
                why = (f"no base model was tuned on 2 or more targets (tuned per target: {picks}), so there are no "
                       "deltas of one base to merge; a larger tune.top_k tunes more candidates per target")
            return {"skipped": why, **info}
        recs, _ = run.units("merge", [(b,) for b in groups], lambda b: _merge_group(run, spec, b, groups[b]))
        out = {**info, "groups": recs}
        norm = [t["normalized"] for g in recs for t in g.get("tasks", []) if t.get("normalized") is not None]
        out["mean_normalized"] = sum(norm) / len(norm) if norm else None
        return out


def _merge_group(run, spec: MergeSpec, base: str, target_names: list[str]) -> dict:
    from ...delta import Delta
    from ...io import write_json
    from ...merge import evaluate_merged, merge_deltas

    cfg = run.cfg
    gdir = run.out / "merge" / slug(label(base))
    if run.resume and (gdir / "group.json").is_file():
        return {**json.loads((gdir / "group.json").read_text()), "resumed": True}
    seed = cfg.seeds[0]
    runs = run.results["tune"]["runs"]
    deltas = [Delta.load(run.out / runs[t][base]["dir"] / "delta") for t in target_names]
    rec: dict[str, Any] = {"base": base, "label": label(base), "targets": target_names, "method": spec.method,
                           "tasks": []}
    if any(d.meta.get("requires") == "peft" for d in deltas):
        rec["skipped"] = f"{deltas[0].meta.get('method')} deltas are not mergeable (they need PEFT to load)"
        return rec
    kind = registry.get("merge", spec.method).info.get("delta_kind")
    if kind and any(d.kind != kind for d in deltas):
        rec["skipped"] = f"{spec.method} merges {kind} deltas; these are {', '.join(sorted({d.kind for d in deltas}))}"
        return rec
    t0 = time.perf_counter()
    targets = {t.name: t for t in cfg.targets}
    data = [run.split(targets[name]) for name in target_names]
    zm = run.model(base)
    merged = merge_deltas(spec.method, deltas, spec.options, train_sets=[d[0] for d in data], base=zm)
    merged.save(gdir / "delta")
    # every task on the held-out part its tune run recorded; merged and individual scored the same way
    ev = evaluate_merged(merged, deltas, base=zm, test_sets=[d[1] for d in data], names=target_names)
    for name, row in zip(target_names, ev["tasks"]):
        rec["tasks"].append({"target": name, "individual": row["individual"], "merged": row["merged"],
                             "normalized": row["normalized"], "tuned": runs[name][base]["seeds"][str(seed)]["accuracy"]})
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(gdir / "group.json", rec)
    return rec


register_stage(MergeStage())
