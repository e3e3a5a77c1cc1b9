"""Shared pieces of the command line: the error guard, JSON/table output, config files.

Each stage may define its own command function (``rank/command.py``, …); ``cli.py`` registers
them on the one typer app, wrapped by :func:`guard`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from .errors import TransferkitError


def guard(fn: Callable) -> Callable:
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


def emit(obj: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``obj`` as one JSON document or through ``render`` — once, on the main process."""
    from .engine.loop import is_main_process

    if not is_main_process():
        return
    if as_json:
        from .io import _json_default

        sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    else:
        render(obj)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)


def models_option(models: str) -> list[str]:
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise TransferkitError("--models needs at least one model name")
    return names


def read_config(path: Path) -> dict:
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


def _option_range(o: dict[str, Any]) -> str:
    if o.get("choices"):
        return "one of " + ", ".join(map(str, o["choices"]))
    parts = []
    if o.get("low") is not None:
        parts.append(f"{'>' if o.get('low_open') else '>='} {o['low']}")
    if o.get("high") is not None:
        parts.append(f"{'<' if o.get('high_open') else '<='} {o['high']}")
    return " and ".join(parts)


_SHOWN_INFO = ("kind", "needs", "family", "modality", "train")


def _info_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def list_methods(stage: str, as_json: bool) -> None:
    """``transferkit <stage> --list [--json]``: every registered method of ``stage`` with its paper, what
    the stage records about it, and each option's type, default, range and help (from the registry)."""
    from . import registry

    catalog = {name: registry.describe(m) for name, m in registry.methods(stage).items()}

    def render(cat: dict) -> None:
        width = max(map(len, cat), default=0) + 2
        for name, d in cat.items():
            typer.echo(f"{name:{width}s}{d['summary']} [{d['paper']}]")
            facts = "; ".join(f"{k}: {_info_text(d[k])}" for k in _SHOWN_INFO if d.get(k) not in (None, [], {}))
            if facts:
                typer.echo(f"{'':{width + 2}s}{facts}")
            for o in d["options"]:
                rng = _option_range(o)
                text = f"{o['name']}: {o['type']}, default {o['default']!r}" + (f", {rng}" if rng else "")
                typer.echo(f"{'':{width + 2}s}{text}" + (f" — {o['help']}" if o.get("help") else ""))

    emit(catalog, as_json, render)
