"""``transferkit auto``: the command-line face of :mod:`transferkit.auto`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import SEED_MAX, check_out, emit, models_option, table, trust_option
from ..errors import TransferkitError
from .search import DEFAULT_METHODS

AUTO_FILES = ("auto.json", "trace.png", "split.json", "study.db", "arms", "oracle.json")


def auto(
    data: Optional[str] = typer.Option(None, "--data", help="Target dataset name or path (required)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated candidate models (required)."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help="Comma-separated tune methods to search."),
    budget: str = typer.Option("10m", help="Wall-clock (90s, 10m, 1h30m; the ranking included) or training "
                               "epochs summed over the arms (40ep: the same search on any machine)."),
    epochs: int = typer.Option(9, help="Epochs an arm trains if it is never pruned."),
    eta: int = typer.Option(3, help="Successive-halving factor: rungs at 1, eta, eta², … epochs; the top 1/eta "
                            "of the arms at a rung continue."),
    lr_factors: str = typer.Option("1,0.3333333333,3", "--lr-factors", help="Each method's lr grid: its default "
                                   "lr times these factors."),
    prior: str = typer.Option("logme", help="Transferability metric whose ranking orders the arms."),
    select_by: Optional[str] = typer.Option(None, "--select-by", help="Judge the rungs and the winner with this "
                                            "label-free scorer (entropy, snd, transfer_score, mixval, mano) on the "
                                            "validation items, labels unread, instead of validation accuracy."),
    limit: Optional[int] = typer.Option(None, help="At most this many target samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class"),
    test_size: float = typer.Option(0.3, "--test-size", help="Held-out fraction, scored once for the winner."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX),
    out: Path = typer.Option(Path("runs/auto"), help="Run folder (study.db, split.json, the winner's arm)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed search from its study."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna database URL shared by several workers "
                                          "(default: OUT/study.db)."),
    join: bool = typer.Option(False, "--join", help="Join the search another worker started on --storage."),
    with_oracle: bool = typer.Option(False, "--oracle", help="Also train every arm to the end and say how close "
                                     "the winner came to the best test accuracy, at what share of the compute."),
    trust_remote_code: bool = trust_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Which model and which method for this target, within a budget — and how sure that is.

    Example: transferkit auto --data opencv-digits --per-class 60 --models digits-mnist,digits-usps,mobilenet-v2 --budget 5m --out runs/auto

    Example: transferkit auto --data vader:movies --models all-minilm-l6-v2,paraphrase-minilm-l3-v2 --methods lora,linear --budget 30ep --oracle --json
    """
    from ..zoo import remote_code
    from .oracle import compare, oracle
    from .search import search

    if not data or not models:
        raise TransferkitError("auto needs --data and --models")
    if not 0 < test_size < 1:
        raise TransferkitError(f"--test-size must be strictly between 0 and 1, got {test_size}")
    names = models_option(models)
    check_out(out, names=AUTO_FILES, inputs=(data, *names))  # before any work
    say = (lambda line: typer.echo(line, err=True))
    common = dict(methods=methods, epochs=epochs, lr_factors=lr_factors, limit=limit, per_class=per_class,
                  test_size=test_size, seed=seed)
    with remote_code(trust_remote_code):
        res = search(data, names, budget=budget, eta=eta, prior=prior, out=out, resume=resume, storage=storage,
                     join=join, progress=say, select_by=select_by, **common)
        if with_oracle and res.get("winner"):
            res["oracle"] = compare(res, oracle(data, names, progress=say, **common))
            from ..io import write_json

            write_json(out / "oracle.json", res["oracle"])
    from ..io import mark

    mark(out, "auto")
    emit(res, as_json, render_auto)


def render_auto(res: dict) -> None:
    metric = res["select_by"]["metric"]
    rows = [[a["name"], a["state"], f"{a['epochs']:g}", "" if a["val_score"] is None else a["val_score"],
             a["seconds"]] for a in res["arms"]]
    table("auto: arms in start order", ["arm", "state", "epochs", f"val {metric}", "seconds"], rows)
    w = res.get("winner")
    if w:
        typer.echo(f"winner: {w['name']} — validation {metric} {w['val_score']:.4f}, test {w['test_accuracy']:.4f} "
                   f"± {w['test_se']:.4f} (n = {w['n_test']}); budget {res['budget']['spent']:g} of "
                   f"{res['budget']['given']:g} {'epochs' if res['budget']['kind'] == 'epochs' else 's'}")
    if res.get("oracle"):
        typer.echo(res["oracle"]["headline"])
    if res.get("note"):
        typer.echo(res["note"])


__all__ = ["auto"]
