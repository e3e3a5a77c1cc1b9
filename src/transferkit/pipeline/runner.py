"""The runner: walks the registered stages in order over one run folder, with resume.

It knows no stage by name. Each stage's result is stored as ``<stage>/result.json`` and listed in
``state.json`` (written atomically) when it finishes; ``--resume`` reads finished stages back and
:meth:`Run.units` reuses the finished units of an interrupted one. The data of every target is split
once (:func:`transferkit.data.split.make_split`), recorded in ``splits/<target>.json`` and reused by
every stage: nothing trains, selects or tunes on the held-out part.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..io import MARKER, check_out, finite_json, mark
from ..runtime import PeakMemory, Progress, environment, fmt_seconds, max_rss
from .config import PipelineConfig, Target, label, load_config
from .stage import stages

__all__ = ["Run", "run_pipeline", "finite_json", "output_names"]

STATE_VERSION = 1
_RUNNER_FILES = ("state.json", "summary.json", "report.html", "pipeline.yaml", "splits")  # state.json: the signature


def output_names() -> list[str]:
    """What a pipeline writes into its run folder: the runner's files and one folder per registered stage."""
    return [*_RUNNER_FILES, *(s.name for s in stages()), MARKER]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """One pipeline run: its config, folder, state file, results so far, data splits and progress."""

    def __init__(self, cfg: PipelineConfig, out: Path, resume: bool, progress: bool):
        self.cfg, self.out, self.resume = cfg, out, resume
        self.progress = Progress(progress)
        self._data: dict[str, tuple[Any, Any, Any]] = {}
        self._loaded: dict[str, Any] = {}  # target → its dataset, loaded and checked before anything is written
        self.results: dict[str, dict] = {}
        self.t0 = time.perf_counter()
        self.state: dict[str, Any] = {}
        self.command = ""

    # -- state ---------------------------------------------------------------------------------------
    def load_state(self) -> None:
        path = self.out / "state.json"
        fp = self.cfg.fingerprint()
        if self.resume and path.is_file():
            try:
                state = json.loads(path.read_text())
            except ValueError as e:
                raise ConfigError(f"cannot resume: {path} is unreadable ({e})") from None
            if state.get("config") != fp:
                raise ConfigError(f"cannot resume: {self.out} holds a run of a different pipeline config; "
                                  "use a new --out or run without --resume")
            self.state = state
        else:
            if not self.resume:
                self._clean()
            self.state = {"version": STATE_VERSION, "config": fp, "stages": {}, "elapsed_s": 0.0,
                          "started": _now()}

    def _clean(self) -> None:
        """A fresh run removes the artifacts of an earlier run in the same folder (only ours)."""
        for name in (*(s.name for s in stages()), *_RUNNER_FILES):
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def save_state(self) -> None:
        from ..io import write_json

        write_json(self.out / "state.json", self.state)

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") in ("done", "skipped")

    def elapsed(self) -> float:
        """Seconds spent on this pipeline, earlier (resumed) runs' finished stages included."""
        return float(self.state.get("elapsed_s", 0.0)) + (time.perf_counter() - self.t0)

    # -- data and models -----------------------------------------------------------------------------
    def split(self, target: Target):
        """``(train, test, Split record)`` of ``target``: made once, recorded in ``splits/<target>.json``.

        A resumed run checks that the reloaded data gives the recorded held-out items.
        """
        if target.name not in self._data:
            from ..data import Dataset, load_dataset
            from ..data.split import Split, held_out, make_split
            from ..io import write_json

            lim, seed = self.cfg.limits, self.cfg.seeds[0]
            limit, per_class = target.limit or lim.samples, target.per_class or lim.per_class
            path = self.out / "splits" / f"{target.name}.json"
            ds = self._loaded.pop(target.name, None)
            if ds is None:
                ds = load_dataset(target.data, limit=limit, per_class=per_class, seed=seed)
            if path.is_file():
                record = Split.from_dict(json.loads(path.read_text()), str(path))
                train, test = held_out(record, dataset=ds, what=f"target {target.name}")
            else:
                spec = target.data if not isinstance(target.data, Dataset) else ds
                train, test, record = make_split(spec, limit=limit, per_class=per_class, sample_seed=seed,
                                                 seed=seed, test_size=target.test_size, dataset=ds)
                write_json(path, record.to_dict())
            self._data[target.name] = (train, test, record)
        return self._data[target.name]

    def check_targets(self) -> None:
        """Load every target and run the training check (≥ 2 classes, …) before the first artifact is written."""
        from ..data import load_dataset
        from ..data.dataset import validate

        lim, seed = self.cfg.limits, self.cfg.seeds[0]
        for target in self.cfg.targets:
            if target.name in self._data or target.name in self._loaded:
                continue
            ds = load_dataset(target.data, limit=target.limit or lim.samples,
                              per_class=target.per_class or lim.per_class, seed=seed)
            validate(ds)
            self._loaded[target.name] = ds

    def data(self, target: Target):
        """``(train, test)`` of ``target`` (see :meth:`split`)."""
        train, test, _ = self.split(target)
        return train, test

    def model(self, spec: str):
        """Load candidate ``spec`` with its ``model_options``: every stage sees the same preprocessing."""
        from ..zoo import load_model

        return load_model(spec, **self.cfg.model_options.get(spec, {}))

    # -- units of work -------------------------------------------------------------------------------
    def unit_weight(self, unit: tuple) -> float:
        """Expected relative cost of a unit: the rank stage's feature-extraction time of its (target, model)
        once known, else the model's catalogue parameter count, else 1."""
        if len(unit) >= 2 and isinstance(unit[0], Target):
            secs = (((self.results.get("rank") or {}).get(unit[0].name) or {}).get("seconds") or {}).get(unit[1]) or {}
            if isinstance(secs.get("features"), (int, float)) and secs["features"] > 0:
                return float(secs["features"]) + 0.5
        model = unit[1] if len(unit) >= 2 else unit[0]
        try:
            from ..assets import catalogue

            params = catalogue().get(model, {}).get("params")
        except Exception:  # noqa: BLE001  (an estimate only)
            params = None
        return max(float(params) / 1e6, 0.2) if isinstance(params, (int, float)) else 1.0

    def units(self, stage: str, units: list[tuple], fn: Callable, *, budget: bool = False) -> tuple[list, list]:
        """Run ``fn(*unit)`` for every unit with progress/ETA; with ``budget`` stop once limits.time is spent.

        ``fn`` returns a JSON-able record; a record with ``"resumed": True`` (read back from a finished
        unit) does not count towards the ETA. Returns ``(records, skipped units)``.
        """
        durations, done_w, out, skipped = [], [], [], []
        weights = [self.unit_weight(unit) for unit in units]
        for i, unit in enumerate(units, 1):
            what = " | ".join(label(str(u)) if not isinstance(u, Target) else u.name for u in unit[:2])
            if len(unit) > 2:
                what += f" | seed {unit[-1]}"
            limit = self.cfg.limits.time
            if budget and limit is not None and self.elapsed() > limit:
                skipped.append({"unit": [u.name if isinstance(u, Target) else u for u in unit],
                                "reason": f"time limit of {limit:g} s reached"})
                continue
            eta = sum(durations) / sum(done_w) * sum(weights[i - 1:]) if durations else None
            self.progress.unit(stage, i, len(units), what, eta)
            t0 = time.perf_counter()
            rec = fn(*unit)
            if not rec.get("resumed"):
                durations.append(time.perf_counter() - t0)
                done_w.append(weights[i - 1])
            out.append(rec)
        if skipped:
            self.progress.line(f"{stage}: {len(skipped)} unit(s) skipped: time limit of {self.cfg.limits.time:g} s reached")
        return out, skipped

    # -- summary -------------------------------------------------------------------------------------
    def summary(self) -> dict:
        cfg = self.cfg
        targets = []
        for t in cfg.targets:
            train, test, record = self.split(t)
            targets.append({"name": t.name, "data": str(t.data) if isinstance(t.data, (str, os.PathLike)) else t.data.name,
                            "n_train": len(train), "n_test": len(test), "classes": len(train.classes),
                            "split": {"seed": record.seed, "test_size": record.test_size,
                                      "test_sha256": record.test_sha256}})
        return finite_json({
            "name": cfg.name,
            "out": str(self.out),
            "config": cfg.to_dict(),
            "config_source": cfg.source,
            "command": self.command,
            "reproduce": f"transferkit run {shlex.quote(str(self.out / 'pipeline.yaml'))} --out NEW_DIR",
            "environment": environment(),
            "targets": targets,
            **{s.name: self.results.get(s.name) for s in stages()},
            "stages": {k: dict(v) for k, v in self.state["stages"].items()},
            "seconds": round(self.elapsed(), 1),
            "peak_rss_mb": round(max_rss() / 2**20, 1),
            "started": self.state.get("started"),
        })


def _default_command(out: Path, cfg: PipelineConfig) -> str:
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog.startswith("transferkit"):
        return shlex.join(["transferkit", *sys.argv[1:]])
    src = cfg.source or str(out / "pipeline.yaml")
    return f"transferkit run {shlex.quote(src)} --out {shlex.quote(str(out))}"


def run_pipeline(config: str | os.PathLike | Mapping | PipelineConfig, out_dir: str | os.PathLike, *,
                 resume: bool = False, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run every registered stage into ``out_dir`` and return the summary (also written to ``summary.json``).

    The built-in stages, in order: ``rank`` (every metric on every target's training split),
    ``ground_truth`` (tune every candidate: measured accuracy, τ_w and rel@k of each metric), ``tune``
    (the top-k candidates by ``select_by`` over every seed; the final pick per target is the best
    *validation* accuracy), ``merge`` (per base model tuned on ≥ 2 targets: merge the task deltas,
    evaluate each task on its recorded held-out part with its own head, normalized accuracy = merged ÷
    individual) and ``report`` (``summary.json`` + ``report.html``). ``state.json`` records finished
    stages atomically; with ``resume=True`` they are read back instead of recomputed, and finished units
    of an interrupted stage are reused. A fresh run (``resume=False``) clears the folder's earlier
    pipeline artifacts. ``command`` is the command line shown in the report (default: ``sys.argv``
    when run through the CLI).
    """
    import yaml

    from ..io import write_json, write_text

    cfg = load_config(config)
    out = Path(out_dir).expanduser()
    inputs = [cfg.source, *cfg.models, *(t.data for t in cfg.targets)]
    check_out(out, names=output_names(), inputs=inputs)  # before any work: not a file, writable, not ours → no clash
    run = Run(cfg, out, resume, progress)
    run.check_targets()  # every target loads and can be trained on, before the first artifact
    out.mkdir(parents=True, exist_ok=True)
    mark(out, "run")
    run.load_state()
    run.command = command or run.state.get("command") or _default_command(out, cfg)
    run.state["command"] = run.command
    write_text(out / "pipeline.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.save_state()
    order = stages()
    for i, stage in enumerate(order, 1):
        name = stage.name
        result_path = out / name / "result.json"
        if resume and run.done(name) and result_path.is_file():
            run.results[name] = json.loads(result_path.read_text())
            run.progress.line(f"stage {i}/{len(order)} {name}: finished earlier, skipped (resume)")
            continue
        run.progress.line(f"stage {i}/{len(order)} {name}")
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            result = finite_json(stage.run(run))
        seconds = time.perf_counter() - t0
        status = "skipped" if "skipped" in result else "done"
        run.results[name] = result
        run.state["stages"][name] = {"status": status, "seconds": round(seconds, 2), "finished": _now(), **mem.as_dict()}
        run.state["elapsed_s"] = float(run.state.get("elapsed_s", 0.0)) + seconds
        run.t0 = time.perf_counter()
        write_json(result_path, result)
        run.save_state()
        run.progress.line(f"stage {i}/{len(order)} {name}: {status} in {fmt_seconds(seconds)}"
                          + (f" ({result['skipped']})" if status == "skipped" else ""))
    summary = run.summary()
    summary["report"] = str(out / "report.html")
    write_json(out / "summary.json", summary)
    run.progress.line(f"done in {fmt_seconds(run.elapsed())}: {out / 'report.html'}")
    return summary
