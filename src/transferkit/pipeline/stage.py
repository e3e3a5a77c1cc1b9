"""The Stage protocol: what one stage of ``transferkit run`` provides, and how it registers.

A stage is one module that defines a :class:`Stage` subclass and calls :func:`register_stage` with an
instance. The runner knows nothing else about it:

- ``name`` — its folder in the run directory, its key in ``state.json`` and ``summary.json``;
- ``order`` — where it runs (rank 10, ground_truth 20, tune 30, merge 40, report 100);
- ``key`` — the top-level PIPELINE.yaml key it owns (None: it takes no configuration);
- ``parse(raw, cfg)`` — validate that key's value (``raw`` is None when the key is absent) into a spec,
  one-line :class:`~transferkit.errors.ConfigError` on bad input; ``cfg`` holds the core keys and the
  specs of the stages before it. ``dump(spec)`` gives the YAML-able form back;
- ``run(run)`` — do the work and return a JSON-able result (``{"skipped": why}`` when it does nothing).
  Units of work go through :meth:`transferkit.pipeline.runner.Run.units`, which shows progress with an
  ETA, honours ``limits.time`` and, on ``--resume``, reuses every unit a killed run finished;
- ``report(result, summary, figure)`` — its section of ``report.html``: a dict with ``title``, ``text``
  (paragraphs), ``headline`` (sentences shown at the top of the report), ``tables`` (``{"caption", "header", "rows"}``) and ``figures`` (the values
  ``figure(name, png_bytes)`` returns: the PNG is also saved under ``report/``), or None. The built-in
  stages return None: their sections are part of the report template.

The runner stores each result as ``<stage>/result.json``, records finished stages in ``state.json``
(resume skips them) and puts every result under its stage's name in ``summary.json``.
"""

from __future__ import annotations

from typing import Any, Callable

from .. import registry

__all__ = ["Stage", "register_stage", "stages", "STAGE"]

STAGE = "pipeline"  # the registry's stage name for pipeline stages


class Stage:
    """Base class of a pipeline stage (see the module docstring)."""

    name: str = ""
    order: float = 50.0
    key: str | None = None
    summary: str = ""

    def parse(self, raw: Any, cfg: Any) -> Any:
        return None

    def dump(self, spec: Any) -> Any:
        return spec

    def run(self, run: Any) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, result: dict[str, Any], summary: dict[str, Any],
               figure: Callable[[str, bytes | None], str | None]) -> dict[str, Any] | None:
        return None


def register_stage(stage: Stage) -> Stage:
    """Register a stage instance in the method registry (stage ``pipeline``)."""
    if not stage.name:
        raise ValueError("a stage needs a name")
    registry.register(STAGE, stage.name, paper="", summary=stage.summary or type(stage).__doc__ or stage.name,
                      fn=stage, order=stage.order, key=stage.key)
    return stage


def stages() -> list[Stage]:
    """Every registered stage, in run order."""
    return sorted((m.fn for m in registry.methods(STAGE).values()), key=lambda s: s.order)
