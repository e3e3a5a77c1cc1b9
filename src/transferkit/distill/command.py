"""``transferkit distill``: the command-line face of :mod:`transferkit.distill` (parse → library → emit).

Method options (``--config`` YAML/JSON, mixed with train options) are typed and range-checked before any data
or model is loaded; a bad value is a one-line ``error: …`` and exit code 2. The train/test split is
:func:`~transferkit.data.split.make_split` of ``--data`` (stratified, ``--seed``), recorded in ``split.json``
and the student Delta's ``meta["split"]``; test accuracy is measured on the held-out part only. The run folder
is written whole or not at all (a temporary folder renamed into place), so a failed run leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..clitools import SEED_MAX, check_out, emit, list_methods, read_config
from ..errors import TransferkitError
from ._common import DISTILL_FILES, STAGE


def distill(
    data: Optional[str] = typer.Option(None, "--data", help="Target dataset name or path (required)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Comma-separated teachers: catalogue models or "
                                          "`transferkit tune` run folders (for nearest/weighted: the source pool)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student: a catalogue model (kd, nearest, weighted "
                                          "give it a new head), or for kl_dp a model that predicts the data's "
                                          "classes."),
    method: str = typer.Option("kd", help="Method name; `transferkit distill --list` shows them with papers and "
                               "options."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of method options (temperature, alpha, …) and "
                                          "training options (epochs, lr, …)."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help="kd: YAML/JSON mapping teacher class → "
                                             "data class, for a teacher over other classes (the label_map option)."),
    epochs: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, help="At most this many samples (stratified)."),
    per_class: Optional[int] = typer.Option(None, "--per-class"),
    known_classes: Optional[str] = typer.Option(None, "--known-classes", help="ncd: comma-separated labelled "
                                                "classes (a strict subset; the others are novel, their labels "
                                                "hidden)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Seeds the sub-sampling, the split and training."),
    out: Path = typer.Option(Path("runs/distill"), help="Run folder."),
    show_list: bool = typer.Option(False, "--list", help="List the methods and their options and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Distil teacher(s) into a student; writes the student Delta, metrics, history and split.json.

    Example: transferkit distill --data sklearn-digits --teacher runs/t1 --student digits-usps --method kd --out runs/d1
    """
    if show_list:
        list_methods(STAGE, as_json)
        return
    from ..data.split import make_split
    from ..io import atomic_path, mark
    from . import distill as run_distill
    from ._common import split_config

    options = read_config(config) if config else {}
    options.update({k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None})
    if label_map is not None:
        options["label_map"] = read_config(label_map)
    options.setdefault("seed", seed)
    if known_classes is not None:
        options["known_classes"] = [c.strip() for c in known_classes.split(",") if c.strip()]
    split_config(method, options)  # every option checked before any data or model is loaded
    if not data or not teacher or not student:
        raise TransferkitError("distill needs --data, --teacher and --student (or --list)")
    teachers = [t.strip() for t in teacher.split(",") if t.strip()]
    if not teachers:
        raise TransferkitError("--teacher needs at least one model")
    check_out(out, names=DISTILL_FILES, replaces=True,  # before any work
              inputs=(data, *teachers, student, config, label_map))
    train, test, split = make_split(data, limit=limit, per_class=per_class, sample_seed=seed, seed=seed)
    with atomic_path(out) as tmp:
        res = run_distill(teachers, student, train, test, method=method, config=options, out_dir=tmp, split=split)
    mark(out, "distill")
    shown = {k: v for k, v in res.metrics.items() if k != "flips"} if not as_json else res.metrics
    emit(shown | {"out": str(out)}, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


__all__ = ["distill"]
