"""``transferkit merge``: the command-line face of :mod:`transferkit.merge` (parse → library → emit).

Two forms::

    transferkit merge CONFIG.yaml --out DIR [--evaluate D1,D2] [--json]
    transferkit merge --method ties --base B --models A,C --out DIR [--param k=0.2 --param lambda=1.0]

The YAML (mergekit-style) and the short form become one validated spec
(:func:`transferkit.merge.spec.build_spec`); :func:`transferkit.merge.run.run_merge` merges and writes
``DIR`` (a Delta in ``DIR/delta/``, or safetensors shards for checkpoints, plus ``DIR/merge.json``);
per-layer values are explained in :mod:`transferkit.merge.layers`. The methods and their typed options
come from the registry: ``transferkit merge --list [--json]``.

``--evaluate D1,D2,…`` (or ``data:`` per model with a top-level ``evaluate:`` list, or ``evaluate: true``
for each run's recorded data) scores the merged body with each model's head next to the individual
fine-tune, on exactly the held-out items that model's tune run recorded (``meta["split"]``), never on its
training items; a dataset that is not the run's recorded data, or a run that records no split, is a
one-line error (exit 2). ``normalized`` = merged ÷ individual. Fisher merges estimate each Fisher on the
recorded training part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import SEED_MAX, check_out, emit, list_methods, read_config, table
from ..errors import ConfigError
from .run import MERGE_FILES, run_merge
from .spec import build_spec


def merge(
    config: Optional[Path] = typer.Argument(None, help="mergekit-style YAML (merge_method, base_model, models, "
                                                        "parameters). Omit it to use --method/--models."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (merged Delta or shards + merge.json)."),
    method: Optional[str] = typer.Option(None, "--method", help="Merge method (see --list); overrides the YAML."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: zoo name/path (Deltas) or checkpoint."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated run folders or checkpoints."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated per-model weights."),
    param: list[str] = typer.Option([], "--param", help="KEY=VALUE option of the method (repeatable), e.g. k=0.2."),
    evaluate: Optional[str] = typer.Option(None, "--evaluate", help="Comma-separated datasets, one per model: each "
                                           "run's recorded data, scored on its recorded held-out part."),
    limit: Optional[int] = typer.Option(None, help="Fisher data of runs that record no split: at most this many."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Fisher data of runs that record no split: "
                                            "per class."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Fisher data of runs that record no split: the seed `transferkit tune` used."),
    show_list: bool = typer.Option(False, "--list", help="List the merge methods and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Merge fine-tunes (task vectors) of one base: TIES, DARE, task arithmetic, Fisher, soups, LoRA.

    Example: transferkit merge --method ties --base all-minilm-l6-v2 --models runs/a,runs/b --out runs/merged
    """
    if show_list:
        list_methods("merge", as_json)
        return
    if out is None:
        raise ConfigError("merge needs --out DIR")
    spec = build_spec(read_config(config) if config is not None else None, method=method, base=base, models=models,
                      weights=weights, params=param, evaluate=evaluate)
    # before any work: never a file, an input (a run folder) or a folder transferkit did not write
    check_out(out, names=MERGE_FILES, replaces=True, inputs=[config, spec.base, *(e.model for e in spec.models)])
    report = run_merge(spec, out, limit=limit, per_class=per_class, seed=seed,
                       progress=lambda line: typer.echo(line, err=True))
    emit(report, as_json, render_merge)


def render_merge(report: dict) -> None:
    ev = report.get("evaluation")
    if ev:
        rows = [[Path(t["model"]).name, t["data"], t["n"], t["merged"], t["individual"], t["normalized"]]
                for t in ev["tasks"]]
        rows.append(["average", "", "", ev["merged_avg"], ev["individual_avg"], ev["normalized_avg"]])
        table(f"merged ({report['method']}) vs individual fine-tunes (held-out accuracy)",
              ["model", "data", "n", "merged", "individual", "normalized"], rows)
    for w in report.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"{report['method']}: {report['n_models']} models → {report['out']} ({report['output']['format']})")


__all__ = ["merge", "render_merge"]
