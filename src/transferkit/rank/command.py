"""``transferkit rank``: the command-line face of :mod:`transferkit.rank`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import emit, models_option, table
from ..errors import TransferkitError


def rank(
    data: str = typer.Option(..., "--data", help="Target dataset name or path."),
    models: str = typer.Option(..., "--models", help="Comma-separated candidate models."),
    metrics: str = typer.Option("logme,linear_probe", help="Comma-separated metrics, or 'all'."),
    limit: Optional[int] = typer.Option(None, help="At most this many target samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="At most this many samples per class."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Write rank.json into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rank candidate source models for a target without fine-tuning them.

    Example: transferkit rank --data vader:movies --models all-minilm-l6-v2,paraphrase-minilm-l3-v2 --json
    """
    from .runner import rank_models

    result = rank_models(data, models_option(models), metric_names(metrics), limit=limit, per_class=per_class,
                         seed=seed, out_dir=out)
    emit(result, as_json, render_rank)


def metric_names(metrics: str) -> list[str]:
    from . import METRICS

    names = list(METRICS) if metrics.strip() == "all" else [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise TransferkitError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METRICS)}")
    return names


def render_rank(result: dict) -> None:
    metrics = result["metrics"]
    rows = [[m] + [result["scores"][m].get(name) for name in metrics] for m in result["models"]]
    rows = [[r[0]] + ["—" if v is None else v for v in r[1:]] for r in rows]
    table(f"transferability on {result['data']} (higher = better)", ["model"] + metrics, rows)
    for metric in metrics:
        typer.echo(f"{metric}: " + " > ".join(result["ranking"][metric]))
    for note in result.get("notes", []):
        typer.echo(f"note: {note}", err=True)
