"""``transferkit adapt``: the command-line face of :mod:`transferkit.adapt` (parse → library → emit).

The method options (``--config`` YAML/JSON) are typed and range-checked before any data or model is loaded;
bad input is a one-line ``error: …`` and exit code 2, with nothing written. The target is split once by
:func:`~transferkit.data.split.make_split` (stratified, ``--seed``, ``--test-size``), recorded in
``OUT/split.json``; ``--label-map FILE`` maps the source's classes onto the target's. Its training part is used without labels (a semi-supervised method: with k labels per
class of it, whose item ids are printed), its held-out part is what test-time methods adapt on, and its
labels only score the predictions. ``--list [--json]`` comes from the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ..clitools import SEED_MAX, check_out, emit, list_methods, read_config
from ..errors import TransferkitError
from ._common import STAGE


def adapt(
    source: Optional[str] = typer.Option(None, "--source", help="Labelled source dataset (name or path)."),
    target: Optional[str] = typer.Option(None, "--target", help="Target dataset (name or path); its labels, if "
                                         "any, only score the held-out part."),
    model: Optional[str] = typer.Option(None, "--model", help="Source model name or path."),
    method: str = typer.Option("dann", help="Method name; `transferkit adapt --list` shows them with their papers and "
                               "options."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON file of the method's options."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help="YAML/JSON mapping source class → target "
                                             "class, for a source over other classes; unmapped source classes "
                                             "are dropped."),
    limit: Optional[int] = typer.Option(None, min=2, help="At most this many items of each dataset (stratified)."),
    test_size: float = typer.Option(0.3, "--test-size", help="Held-out fraction of the target, in (0, 1)."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Seeds the sub-sampling, the target split and training."),
    out: Path = typer.Option(Path("runs/adapt"), help="Run folder."),
    show_list: bool = typer.Option(False, "--list", help="List the methods, scorers and their options and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Adapt a source model to an unlabelled target; writes metrics, predictions, the model and split.json.

    Example: transferkit adapt --source mnist --target opencv-digits --model digits-usps --method tent --out runs/a1
    """
    if show_list:
        list_methods(STAGE, as_json)
        return
    from ..data import load_dataset
    from ..data.split import make_split
    from ..zoo import load_model
    from .run import ADAPT_FILES, adapt as run_adapt, check_method

    if not 0 < test_size < 1:
        raise TransferkitError(f"--test-size must be a fraction in (0, 1), got {test_size}")
    options = read_config(config) if config else {}
    lmap = read_config(label_map) if label_map else None
    parsed = check_method(method).parse(options)  # every option checked before any data or model is loaded
    semi = hasattr(parsed, "labelled_per_class")
    if not source or not target or not model:
        raise TransferkitError("adapt needs --source, --target and --model (or --list)")
    check_out(out, names=ADAPT_FILES, inputs=(source, target, model, config, label_map))  # before any work
    src = load_dataset(source, limit=limit, seed=seed)
    train, test, split = make_split(target, limit=limit, sample_seed=seed, seed=seed, test_size=test_size)
    if train.labelled.any() and not semi:
        typer.echo(f"note: the target {target} has labels; they are not used for adaptation, only to score the "
                   f"{len(test)} held-out items", err=True)
    res = run_adapt(load_model(model), src, train, test, method=method, options=options, seed=seed, out_dir=out,
                    split=split, label_map=lmap)
    if semi:  # positions in the training part → ids of the loaded target (as split.json's test_ids)
        ids = np.setdiff1d(np.arange(split.n), split.test_ids)[res.metrics["target_labels_used"]].tolist()
        typer.echo(f"note: {len(ids)} target labels used for training ({parsed.labelled_per_class} per class, "
                   f"from the training part), item ids {ids} of {target}; the {len(test)} held-out items' labels "
                   "only score", err=True)
    emit(res.metrics | {"out": str(out)}, as_json, lambda d: [typer.echo(f"{k}: {v}") for k, v in d.items()])


__all__ = ["adapt"]
