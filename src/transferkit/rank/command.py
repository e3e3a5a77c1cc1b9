"""``transferkit rank``: the command-line face of :mod:`transferkit.rank`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import SEED_MAX, check_out, emit, list_methods, models_option, table, trust_option
from ..errors import TransferkitError


def rank(
    data: Optional[str] = typer.Option(None, "--data", help="Target dataset name or path (required)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated candidate models (one model with "
                                         "--layers; required)."),
    metrics: str = typer.Option("logme,linear_probe", help="Comma-separated metrics, 'all' (every per-model metric), "
                                "the set-level rankers etran/ncti, or 'auto' (rank aggregation)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Rank these taps (layers) of the one model, "
                                         "comma-separated, or 'auto' (evenly spaced blocks + penultimate)."),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", help="Also select an ensemble of K models "
                                           "(OSBORN; MS-LEEP/E-LEEP when the models have source heads)."),
    ground_truth: Optional[str] = typer.Option(None, "--ground-truth", help="Measure each candidate (linear probe "
                                               "or fine-tuning with a small lr grid; cached) and report tau_w, rel@1, "
                                               "regret per metric: linear | finetune."),
    test_size: float = typer.Option(0.3, "--test-size", help="Held-out fraction for --ground-truth."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs for --ground-truth finetune."),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="Comma-separated lr grid for --ground-truth finetune."),
    limit: Optional[int] = typer.Option(None, help="At most this many target samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="At most this many samples per class."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    out: Optional[Path] = typer.Option(None, help="Write ranking.json and ranking.csv (and rank.json) into this directory."),
    show_list: bool = typer.Option(False, "--list", help="List the metrics and rankers with their options and exit."),
    trust_remote_code: bool = trust_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Rank candidate source models (or layers) for a target without fine-tuning them.

    Example: transferkit rank --data vader:movies --models all-minilm-l6-v2,paraphrase-minilm-l3-v2 --metrics all --json

    Example: transferkit rank --data opencv-digits --per-class 30 --models mobilenet-v2,digits-mnist,digits-usps --metrics auto,etran --ground-truth linear --ensemble 2 --out runs/rank

    Example: transferkit rank --data sklearn-digits --models mobilenet-v2 --layers auto --ground-truth linear
    """
    from .runner import rank_models

    if show_list:
        list_methods("rank", as_json)
        return
    if not data or not models:
        raise TransferkitError("rank needs --data and --models (or --list)")
    gt = ground_truth.strip().lower() if ground_truth else None
    if gt is not None and gt not in ("linear", "finetune"):
        raise TransferkitError(f"unknown --ground-truth {ground_truth!r}; use linear or finetune")
    if (epochs is not None or lrs) and gt != "finetune":
        raise TransferkitError("--epochs and --lrs only apply to --ground-truth finetune")
    if epochs is not None and epochs < 1:
        raise TransferkitError(f"--epochs must be >= 1, got {epochs}")
    if not 0 < test_size < 1:
        raise TransferkitError(f"--test-size must be strictly between 0 and 1, got {test_size}")
    grid = _floats(lrs, "--lrs") if lrs else None
    names = models_option(models)
    if layers is not None and not layers.strip():
        raise TransferkitError("--layers needs at least one layer name, or 'auto'")
    if out is not None:  # before any work: a bad --out is found now, not after the ranking
        check_out(out, names=RANK_FILES, inputs=(data, *names))
    from ..zoo import remote_code

    with remote_code(trust_remote_code):
        result = rank_models(data, names, metrics, limit=limit, per_class=per_class, seed=seed, out_dir=out,
                             layers=layers, ensemble=ensemble, ground_truth=gt, test_size=test_size,
                             gt_config={"epochs": epochs} if epochs is not None else None, gt_lrs=grid)
    if out is not None:
        from ..io import mark

        mark(out, "rank")
    emit(result, as_json, render_rank)
    if out and not as_json:
        typer.echo(f"wrote {out / 'ranking.json'} and {out / 'ranking.csv'}")


RANK_FILES = ("ranking.json", "ranking.csv", "rank.json", "split.json")


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TransferkitError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise TransferkitError(f"{what} must be positive numbers, got {text!r}")
    return vals


def metric_names(metrics: str) -> list[str]:
    """Expand a --metrics value into the metric names that will be shown (validated)."""
    from .runner import parse_metrics

    return parse_metrics(metrics)[0]


def _fmt(v) -> str | float:
    return "—" if v is None else v


def render_rank(result: dict) -> None:
    metrics = result["metrics"]
    measured = (result.get("ground_truth") or {}).get("accuracy", {})
    lead = "auto" if "auto" in metrics else metrics[0]
    order = list(result["ranking"].get(lead, [])) + [m for m in result["models"] if m not in result["ranking"].get(lead, [])]
    kind = "layer" if result.get("candidates") == "layers" else "model"
    cols = [kind] + metrics + (["measured acc"] if measured else [])
    rows = [[m] + [_fmt(result["scores"][m].get(k)) for k in metrics] + ([_fmt(measured.get(m))] if measured else [])
            for m in order]
    what = f"layers of {result['model']}" if result.get("candidates") == "layers" else "models"
    table(f"transferability of {what} on {result['data']} (n={result['n']}; higher = better; sorted by {lead})", cols, rows)
    for metric in metrics:
        typer.echo(f"{metric}: " + " > ".join(result["ranking"][metric]))
    agree = result.get("agreement")
    if agree and len(metrics) > 1:
        tau = agree["kendall_tau"]
        table("agreement between metric rankings (Kendall tau)", ["metric"] + metrics + ["mean"],
              [[a] + [("1" if a == b else _fmt(tau[a].get(b))) for b in metrics] + [_fmt(agree["mean"].get(a))]
               for a in metrics])
    ev = result.get("evaluation")
    if ev:
        gt = result["ground_truth"]
        table(f"how good was each ranking (ground truth: {gt['protocol']}, n_test={gt['n_test']})",
              ["metric", "weighted tau", "pearson", "rel@1", "regret", "picked"],
              [[k, _fmt(v.get("weighted_tau")), _fmt(v.get("pearson")), _fmt(v.get("rel@1")), _fmt(v.get("regret")),
                v.get("selected")] for k, v in ev.items()])
    ens = result.get("ensemble")
    if ens:
        for method, r in ens["methods"].items():
            acc = f", measured accuracy {r['accuracy']:.4f}" if "accuracy" in r else ""
            typer.echo(f"ensemble k={ens['k']} by {method}: {', '.join(r['selected'])}{acc}")
        if "best" in ens:
            typer.echo(f"best measured {ens['k']}-ensemble: {', '.join(ens['best']['members'])} "
                       f"(accuracy {ens['best']['accuracy']:.4f})")
    for note in result.get("notes", []):
        typer.echo(f"note: {note}", err=True)
