"""Pipeline stage ``distill``: distil each target's tuned winner into a named student (YAML key ``distill``).

```yaml
distill:
  student: digits-usps     # a catalogue model (or a path the zoo loads)
  method: kd               # any distill method: kd / kl_dp learn from the tuned winner of each target,
                           # nearest / weighted from the pipeline's candidate models (the source pool)
  config: {epochs: 5}      # the method's options and training options (`transferkit distill --list`)
```

One unit per (target, seed): the student trains on the target's recorded training part and is scored on its
held-out part only; the result compares it with its teacher (accuracy, parameters). Absent key: skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import ConfigError
from ...runtime import PeakMemory
from ..config import check_keys, label, mapping, string
from ..runner import finite_json
from ..stage import Stage, register_stage

_KEYS = ("student", "method", "config")


@dataclass
class DistillSpec:
    student: str
    method: str = "kd"
    config: dict[str, Any] = field(default_factory=dict)


def _unit(run, spec: DistillSpec, target, seed: int) -> dict:
    from ...distill import distill, load_net
    from ...io import write_json

    unit_dir = run.out / "distill" / target.name / f"seed{seed}"
    record = unit_dir / "unit.json"
    if run.resume and record.is_file():
        return {**json.loads(record.read_text()), "resumed": True}
    train, test, split = run.split(target)
    chosen = run.results["tune"]["chosen"][target.name]
    if spec.method in ("nearest", "weighted"):
        teachers = [load_net(run.model(m), train.classes) for m in run.cfg.models]
    else:
        teachers = [load_net(str(run.out / chosen["dir"]), train.classes, load=run.model)]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = distill(teachers, load_net(run.model(spec.student), train.classes), train, test, method=spec.method,
                      config={**spec.config, "seed": seed}, out_dir=unit_dir, split=split)
        seconds = time.perf_counter() - t0
    m = res.metrics
    rec = finite_json({
        "target": target.name, "seed": seed, "method": spec.method, "student": spec.student,
        "teacher": label(chosen["model"]), "teacher_accuracy": chosen.get("accuracy"),
        "teacher_params": chosen.get("total_params"), "accuracy": m.get("test_accuracy"),
        "student_params": m.get("student_params"), "seconds": round(seconds, 2), **mem.as_dict(),
        "metrics": {k: v for k, v in m.items() if k != "flips"}, "dir": str(unit_dir.relative_to(run.out)),
    })
    write_json(record, rec)
    return rec


class DistillStage(Stage):
    """Distil the tuned winner of each target into a named (smaller) student."""

    name, order, key = "distill", 42, "distill"

    def parse(self, raw: Any, cfg: Any) -> DistillSpec | None:
        if raw is None or raw is False:
            return None
        from ...distill._common import split_config

        raw = mapping(raw, "distill")
        check_keys(raw, _KEYS, "distill")
        if "student" not in raw:
            raise ConfigError("distill needs a student (distill.student: a model name)")
        spec = DistillSpec(string(raw["student"], "distill.student"), string(raw.get("method", "kd"), "distill.method"),
                           mapping(raw.get("config"), "distill.config"))
        try:
            split_config(spec.method, spec.config)
        except ConfigError as e:
            raise ConfigError(f"distill: {e}") from None
        return spec

    def dump(self, spec: DistillSpec | None) -> dict | None:
        return asdict(spec) if spec else None

    def run(self, run) -> dict:
        spec: DistillSpec | None = run.cfg.section("distill")
        if spec is None:
            return {"skipped": "distill is not configured"}
        if not run.results.get("tune", {}).get("chosen"):
            return {"skipped": "no tuned model to distil"}
        units = [(t, spec.student, s) for t in run.cfg.targets for s in run.cfg.seeds]
        recs, _ = run.units("distill", units, lambda target, _student, seed: _unit(run, spec, target, seed))
        out: dict[str, Any] = {"method": spec.method, "student": spec.student, "config": spec.config, "runs": {}}
        for target in run.cfg.targets:
            mine = [r for r in recs if r["target"] == target.name]
            accs = [r["accuracy"] for r in mine if r["accuracy"] is not None]
            out["runs"][target.name] = {
                "teacher": mine[0]["teacher"], "teacher_accuracy": mine[0]["teacher_accuracy"],
                "teacher_params": mine[0]["teacher_params"], "student_params": mine[0]["student_params"],
                "accuracy": sum(accs) / len(accs) if accs else None,
                "seconds": round(sum(r["seconds"] for r in mine) / len(mine), 2),
                "seeds": {str(r["seed"]): r["accuracy"] for r in mine}, "dir": mine[0]["dir"]}
        return out

    def report(self, result: dict, summary: dict, figure) -> dict | None:
        if "runs" not in result:
            return None
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs = result["runs"]
        rows = [[t, r["teacher"], _pct(r["teacher_accuracy"]), r["teacher_params"], label(result["student"]),
                 _pct(r["accuracy"]), r["student_params"], r["seconds"]] for t, r in runs.items()]
        fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(runs) + 1), 2.6))
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [r["teacher_accuracy"] or 0 for r in runs.values()], 0.4, label="teacher")
        ax.bar([x + 0.2 for x in xs], [r["accuracy"] or 0 for r in runs.values()], 0.4, label="student")
        ax.set_xticks(list(xs), list(runs))
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return {"title": f"Distillation ({result['method']})",
                "text": [f"Each target's tuned winner distilled into {label(result['student'])}; accuracy on the "
                         "target's held-out part (mean over seeds)."],
                "tables": [{"caption": "teacher vs student", "header": ["target", "teacher", "teacher acc.",
                            "teacher params", "student", "student acc.", "student params", "seconds"], "rows": rows}],
                "figures": [figure("accuracy", buf.getvalue())]}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


register_stage(DistillStage())
