"""The pipeline report: one self-contained ``report.html`` (jinja2 + matplotlib PNGs embedded as base64).

>>> from transferkit.report import write_report
>>> write_report(summary, "runs/demo")      # doctest: +SKIP  -> runs/demo/report.html

``summary`` is the dict :func:`transferkit.pipeline.run_pipeline` returns (and writes to
``summary.json``). Sections (each an element with a stable ``id``, which the tests check):
``overview``, ``ranking`` (per target: scores per metric with the measured accuracies, ranking
quality τ_w / rel@k, score-vs-accuracy scatter), ``chosen`` (model and method per target: accuracy,
trainable parameters, time, peak memory; every tuned run; training curves), ``merge`` (normalized
accuracy per task, or why merging did not run), ``environment``, ``reproduce`` (command + config),
``stages`` (time and memory per stage), and one ``stage-<name>`` section for every other registered
stage that returns one from its ``report`` method. The file references nothing outside itself.
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
from pathlib import Path
from typing import Any

from . import figures

__all__ = ["write_report", "render_report", "figures"]

SECTIONS = ("overview", "ranking", "chosen", "merge", "environment", "reproduce", "stages")


def _fin(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: Any, std: Any = None) -> str:
    if not _fin(x):
        return "—"
    s = f"{100 * x:.1f}%"
    return s + (f" ± {100 * std:.1f}" if _fin(std) and std > 0 else "")


def _num(x: Any, digits: int = 4) -> str:
    if not _fin(x):
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.3e}"


def _count(x: Any) -> str:
    return f"{int(x):,}" if _fin(x) else "—"


def _secs(x: Any) -> str:
    if not _fin(x):
        return "—"
    return f"{x:.1f} s" if x < 120 else f"{int(x) // 60} min {int(x) % 60:02d} s"


def _mb(x: Any) -> str:
    return f"{x:,.0f} MB" if _fin(x) else "—"


def _b64(png: bytes | None) -> str | None:
    return None if png is None else base64.b64encode(png).decode("ascii")


def _label(model: str, labels: dict[str, str]) -> str:
    return labels.get(model) or (Path(model).name if "/" in model and not model.startswith(("hf:", "timm:")) else model)


def _labels(summary: dict) -> dict[str, str]:
    labels: dict[str, str] = {}
    for stage in ("ground_truth", "tune"):
        for runs in ((summary.get(stage) or {}).get("runs") or {}).values():
            for m, r in runs.items():
                if r.get("label"):
                    labels[m] = r["label"]
    for m in (summary.get("config") or {}).get("models", []):
        labels.setdefault(m, _label(m, {}))
    return labels


def _context(summary: dict, figures_dir: Path | None) -> dict[str, Any]:
    import yaml

    labels = _labels(summary)
    rank = summary.get("rank") or {}
    gt = summary.get("ground_truth") or {}
    tune = summary.get("tune") or {}
    merge = summary.get("merge") or {}
    cfg = summary.get("config") or {}
    saved: list[str] = []

    def keep(png: bytes | None, name: str) -> str | None:
        if png is not None and figures_dir is not None:
            from ..io import atomic_path

            with atomic_path(figures_dir / name) as tmp:
                tmp.write_bytes(png)
            saved.append(name)
        return _b64(png)

    targets = []
    for tname, r in rank.items():
        metrics = r.get("metrics", [])
        gt_runs = (gt.get("runs") or {}).get(tname, {})
        tuned = (tune.get("runs") or {}).get(tname, {})
        chosen = ((tune.get("chosen") or {}).get(tname) or {}).get("model")
        if gt_runs:
            acc = {m: x["accuracy"] for m, x in gt_runs.items() if _fin(x.get("accuracy"))}
            std = {m: x.get("accuracy_std") for m, x in gt_runs.items()}
            acc_source = f"ground truth: {gt.get('method')} on every candidate"
        else:
            acc = {m: x["accuracy"] for m, x in tuned.items() if _fin(x.get("accuracy"))}
            std = {m: x.get("accuracy_std") for m, x in tuned.items()}
            acc_source = (f"tuned candidates only ({tune.get('method')}); "
                          + (gt.get("skipped") or "ground truth not measured"))
        rank_pos = {metric: {m: i + 1 for i, m in enumerate(r.get("ranking", {}).get(metric, []))} for metric in metrics}
        rows = []
        order = sorted(r.get("models", []), key=lambda m: (-(acc.get(m, -1.0)), m))
        for m in order:
            sc = r.get("scores", {}).get(m, {})
            rows.append({
                "label": _label(m, labels), "model": m, "chosen": m == chosen, "tuned": m in tuned,
                "scores": [{"value": _num(sc.get(metric)), "rank": rank_pos[metric].get(m)} for metric in metrics],
                "accuracy": _pct(acc.get(m), std.get(m)),
            })
        quality = []
        for metric in metrics:
            ev = (gt.get("evaluation") or {}).get(tname, {}).get(metric)
            if ev is None:
                continue
            quality.append({
                "metric": metric, "weighted_tau": _num(ev.get("weighted_tau"), 3), "kendall_tau": _num(ev.get("kendall_tau"), 3),
                "rel1": _num(ev.get("rel@1"), 3), "rel3": _num(ev.get("rel@3"), 3), "regret": _pct(ev.get("regret")),
                "selected": _label(ev["selected"], labels) if ev.get("selected") else "—",
                "n": ev.get("n_models"), "error": ev.get("error"),
            })
        scatter = keep(figures.scatter_png(r.get("scores", {}), acc, metrics, labels,
                                           evaluation=(gt.get("evaluation") or {}).get(tname), highlight=chosen,
                                           title=f"{tname}: predicted vs measured"), f"scatter-{tname}.png")
        targets.append({"name": tname, "data": r.get("data"), "n_train": r.get("n_train"), "n_test": r.get("n_test"),
                        "classes": len(r.get("classes", [])), "metrics": metrics, "rows": rows, "quality": quality,
                        "scatter": scatter, "acc_source": acc_source,
                        "ranking_by": tune.get("select_by"), "notes": r.get("notes", [])})

    chosen_rows, tuned_rows, curves = [], [], []
    for tname, c in (tune.get("chosen") or {}).items():
        total = c.get("total_params")
        frac = c["trainable_params"] / total if _fin(c.get("trainable_params")) and _fin(total) and total else None
        chosen_rows.append({
            "target": tname, "label": _label(c["model"], labels), "method": c.get("method"),
            "accuracy": _pct(c.get("accuracy"), c.get("accuracy_std")), "val_accuracy": _pct(c.get("val_accuracy")),
            "trainable": _count(c.get("trainable_params")), "total": _count(total),
            "fraction": f"{100 * frac:.2f}%" if frac is not None else "—",
            "seconds": _secs(c.get("seconds")), "peak": _mb(c.get("peak_rss_mb")), "delta": _mb(c.get("delta_rss_mb")),
            "gt": _pct(((gt.get("runs") or {}).get(tname, {}).get(c["model"]) or {}).get("accuracy")),
        })
    for tname, runs in (tune.get("runs") or {}).items():
        hist = {}
        for m, x in runs.items():
            tuned_rows.append({"target": tname, "label": _label(m, labels), "method": x.get("method"),
                               "accuracy": _pct(x.get("accuracy"), x.get("accuracy_std")),
                               "val_accuracy": _pct(x.get("val_accuracy")), "trainable": _count(x.get("trainable_params")),
                               "seconds": _secs(x.get("seconds")), "peak": _mb(x.get("peak_rss_mb")),
                               "seeds": len(x.get("seeds") or {}) or 1, "reused": x.get("reused_from")})
            hist[_label(m, labels)] = x.get("history") or []
        png = keep(figures.curves_png(hist, title=f"{tname}: {tune.get('method')}"), f"curves-{tname}.png")
        if png:
            curves.append({"target": tname, "png": png})

    merge_ctx: dict[str, Any] = {"skipped": merge.get("skipped") if merge else "merge did not run",
                                 "method": merge.get("method"), "options": merge.get("options") or {}, "rows": [],
                                 "mean": _num(merge.get("mean_normalized"), 3), "figure": None, "notes": []}
    for g in merge.get("groups") or []:
        if g.get("skipped"):
            merge_ctx["notes"].append(f"{g.get('label', g.get('base'))}: {g['skipped']}")
        for t in g.get("tasks", []):
            merge_ctx["rows"].append({"base": g.get("label", g.get("base")), "target": t["target"],
                                      "individual": _pct(t.get("individual")), "merged": _pct(t.get("merged")),
                                      "normalized": _num(t.get("normalized"), 3)})
    if merge.get("groups") and merge.get("not_merged"):
        merge_ctx["notes"].append("Not merged (a delta needs a partner of the same base): "
                                  + ", ".join(merge["not_merged"]) + ".")
    if merge.get("groups"):
        merge_ctx["figure"] = keep(figures.merge_png(merge["groups"]), "merge.png")

    env = summary.get("environment") or {}
    env_rows = [("python", env.get("python")), ("platform", env.get("platform")),
                ("CPU count", env.get("cpu_count")), ("CPUs usable (affinity)", env.get("affinity_cpus")),
                ("torch threads", env.get("torch_threads")), ("GPU", env.get("cuda") or "none")]
    env_rows += [(k, v or "not installed") for k, v in (env.get("packages") or {}).items()]

    stage_sections = _stage_sections(summary, keep)
    stages = [{"name": k, "status": v.get("status"), "seconds": _secs(v.get("seconds")), "peak": _mb(v.get("peak_rss_mb"))}
              for k, v in (summary.get("stages") or {}).items()]
    return {
        "title": f"transferkit report — {summary.get('name', 'pipeline')}",
        "name": summary.get("name"), "started": summary.get("started"), "seconds": _secs(summary.get("seconds")),
        "peak_rss": _mb(summary.get("peak_rss_mb")), "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "targets": targets, "chosen": chosen_rows, "tuned": tuned_rows, "curves": curves,
        "tune": {"method": tune.get("method"), "top_k": tune.get("top_k"), "select_by": tune.get("select_by"),
                 "config": tune.get("config") or {}},
        "gt": {"method": gt.get("method"), "skipped": gt.get("skipped"),
               "skipped_units": len(gt.get("skipped_units") or [])},
        "merge": merge_ctx, "env": env_rows,
        "command": summary.get("command") or "", "reproduce": summary.get("reproduce") or "",
        "config_yaml": yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True) if cfg else "",
        "stages": stages, "stage_sections": stage_sections, "figures_saved": saved,
    }


def _stage_sections(summary: dict, keep) -> list[dict[str, Any]]:
    """The sections that registered stages add (see :class:`transferkit.pipeline.Stage.report`), in run order.

    Built-in stages have their sections in the template above; any other stage brings its own."""
    from ..pipeline import stages

    out = []
    for stage in stages():
        result = summary.get(stage.name)
        if not isinstance(result, dict):
            continue
        section = stage.report(result, summary, lambda name, png, s=stage.name: keep(png, f"{s}-{name}.png"))
        if section:
            out.append({"id": f"stage-{stage.name}", "title": section.get("title", stage.name),
                        "headline": list(section.get("headline", [])),
                        "text": list(section.get("text", [])), "tables": list(section.get("tables", [])),
                        "figures": [f for f in section.get("figures", []) if f]})
    return out


def render_report(summary: dict, figures_dir: str | Path | None = None) -> str:
    """The report as an HTML string (``figures_dir``: also save each figure there as a PNG)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    ctx = _context(summary, Path(figures_dir) if figures_dir else None)
    return env.get_template("report.html").render(**ctx)


def write_report(summary: dict, out_dir: str | Path, *, figures_dir: str | Path | None = None) -> Path:
    """Write ``out_dir/report.html`` (atomically) from a pipeline summary; return its path."""
    from ..io import write_text

    path = Path(out_dir) / "report.html"
    write_text(path, render_report(summary, figures_dir))
    return path
