"""``transferkit tune``: the command-line face of :mod:`transferkit.tune` (parse → library → emit).

The method options (``--config`` YAML/JSON, mixed with train options) are typed and range-checked
before any data or model is loaded; a bad value is a one-line ``error: …`` and exit code 2. The
train/test split is :func:`~transferkit.data.split.make_split` of ``--data`` (stratified, ``--seed``),
recorded in the run folder's ``split.json`` and the Delta's ``meta["split"]``. Training writes a checkpoint
every :data:`CHECKPOINT_EVERY` steps (and at the end) into ``OUT/checkpoints``, so any killed run can be
continued with ``--resume``; ``--resume`` without a checkpoint says so in one line and starts from scratch. ``--list [--json]``
comes from the registry: every method with its paper and every option with its type, default and range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import SEED_MAX, check_out, emit, list_methods, read_config, trust_option
from ..errors import TransferkitError
from .registry import STAGE

# what a tune run writes into its folder (a folder transferkit did not write keeps any other file)
TUNE_FILES = ("split.json", "delta", "metrics.json", "history.json", "curve.png", "checkpoints", "phase1")

# training steps between checkpoints (and one at the end) unless the config sets checkpoint_every
CHECKPOINT_EVERY = 50


def tune(
    data: Optional[str] = typer.Option(None, "--data", help="Target dataset name or path (required)."),
    model: Optional[str] = typer.Option(None, "--model", help="Source model name or path (required)."),
    method: str = typer.Option("linear", help="Method name; `transferkit tune --list` shows them all with their "
                               "papers and options."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of method options (r, bottleneck, …) and "
                                          "training options (epochs, lr, …)."),
    epochs: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    limit: Optional[int] = typer.Option(None, help="At most this many samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Seeds the sub-sampling, the train/test split and training."),
    out: Path = typer.Option(Path("runs/tune"), help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last checkpoint (written "
                                "every 50 steps and at the end; `checkpoint_every` in --config changes it, null "
                                "turns it off)."),
    show_list: bool = typer.Option(False, "--list", help="List the methods and their options and exit."),
    trust_remote_code: bool = trust_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Adapt a source model to a target; writes the Delta, metrics, training curve and split.json.

    Example: transferkit tune --data opencv-digits --model digits-mnist --method full --epochs 1 --out runs/t1
    """
    if show_list:
        list_methods(STAGE, as_json)
        return
    from ..data.split import make_split
    from ..zoo import load_model, remote_code
    from .baselines import tune as run_tune
    from .registry import split_config

    options = read_config(config) if config else {}
    options.update({k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None})
    options.setdefault("seed", seed)
    # checkpoints by default, so that a run killed without --resume can still be resumed
    options.setdefault("checkpoint_every", CHECKPOINT_EVERY)
    split_config(method, options)  # every option checked before any data or model is loaded
    if not data or not model:
        raise TransferkitError("tune needs --data and --model (or --list)")
    check_out(out, names=TUNE_FILES, inputs=(data, model, config))  # before any work
    train_ds, test_ds, split = make_split(data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed)
    if resume:
        _say_if_fresh(out)
    with remote_code(trust_remote_code):
        source = load_model(model)
    res = run_tune(source, train_ds, test_ds, method=method, config=options, out_dir=out, resume=resume,
                   split=split)
    from ..io import mark

    mark(out, "tune")
    emit(res.metrics | {"out": str(out)}, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


def _say_if_fresh(out: Path) -> None:
    """One line on stderr when ``--resume`` finds nothing to resume from (the run starts from scratch)."""
    from ..engine import is_main_process, latest_checkpoint

    if is_main_process() and latest_checkpoint(out / "checkpoints") is None:
        typer.echo(f"resume: no checkpoint in {out}, starting from scratch", err=True)


__all__ = ["tune"]
