"""Shared pieces of the command line: the error guard, JSON/table output, config files, output checks.

Each stage may define its own command function (``rank/command.py``, …); ``cli.py`` registers
them on the one typer app, wrapped by :func:`guard`. The app's group class (:class:`OneLineErrors`)
turns the command-line parser's own errors (``--epochs 1.5``, an unknown option) into the same one-line
``error: …`` with exit code 2.

Errors: bad input (:class:`~transferkit.errors.TransferkitError`, a usage error) is one ``error: …`` line
and exit code 2; anything else is one ``error: internal error: …`` line and exit code 1 (the traceback with
``TRANSFERKIT_DEBUG=1``); Ctrl-C is ``error: interrupted`` and exit code 130.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import typer
from typer.core import TyperGroup

from .errors import TransferkitError

try:  # typer (0.2x) vendors its own click: its exceptions are the ones the parser raises
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover  (a typer on the real click)
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
Exit, Abort = typer.Exit, typer.Abort

DEBUG_ENV = "TRANSFERKIT_DEBUG"
SEED_MAX = 2**32 - 1  # numpy's seed range; the seed options are checked against it by the parser


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: Any, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "…"


def fail(exc: BaseException) -> int:
    """Print the one ``error: …`` line for ``exc`` (and, with ``TRANSFERKIT_DEBUG=1``, its traceback);
    return the exit code: 2 bad input, 130 interrupted, 1 anything else."""
    if debug() and not isinstance(exc, UsageError):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        return 130
    if isinstance(exc, TransferkitError):
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 2
    if isinstance(exc, UsageError):
        msg = _one_line(exc.format_message())
        cmd = " ".join(["transferkit", *(exc.ctx.command_path.split()[1:] if exc.ctx is not None else [])])
        typer.echo(f"error: {msg} (see `{cmd} --help`)", err=True)
        return 2
    if isinstance(exc, ClickException):
        typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code or 1
    hint = "" if debug() else f" (run with {DEBUG_ENV}=1 for the traceback)"
    typer.echo(f"error: internal error: {type(exc).__name__}: {_one_line(exc, 300)}{hint}", err=True)
    return 1


def guard(fn: Callable) -> Callable:
    """Every error of a command becomes one ``error: …`` line: TransferkitError (bad input) exit code 2,
    Ctrl-C 130, anything else 1 (see :func:`fail`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (Exit, ClickException, Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  (one line, never a traceback)
            raise typer.Exit(fail(exc)) from None

    return wrapper


class OneLineErrors(TyperGroup):
    """The app's group: the parser's own errors (a bad option value, an unknown option, a missing argument)
    become the one-line ``error: …`` with exit code 2 instead of click's usage block; an exception no
    command caught becomes one line too. Holds for ``transferkit`` and ``CliRunner().invoke(app, …)``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # `transferkit` / `transferkit zoo`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except Abort:
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
            sys.exit(fail(exc))
        # without standalone mode click returns a command's value, or the code of an Exit it raised
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def check_out(out: Path | str, *, names: Iterable[str] = (), replaces: bool = False, inputs: Iterable[Any] = (),
              what: str = "--out") -> Path:
    """Check ``--out`` before any work (see :func:`transferkit.io.check_out`): not a file, writable, not an
    input, and never a folder transferkit did not write whose content the command would replace."""
    from .engine.loop import is_main_process
    from .io import check_out as _check

    if not is_main_process():  # under torchrun rank 0 may already be writing: the other ranks check the rest
        names, replaces = (), False
    return _check(out, names=names, replaces=replaces, inputs=inputs, what=what)


def emit(obj: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print ``obj`` as one strict JSON document (NaN/inf → null) or through ``render`` — once, on the
    main process."""
    from .engine.loop import is_main_process

    if not is_main_process():
        return
    if as_json:
        from .io import dumps_json

        sys.stdout.write(dumps_json(obj) + "\n")
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
    """A YAML/JSON file of options (a mapping); alias bombs and invalid YAML are one-line errors."""
    from .io import read_yaml_file

    data = read_yaml_file(path, "config file")
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


def trust_option():
    """The ``--trust-remote-code`` option: the only way to run code shipped in a model directory."""
    return typer.Option(False, "--trust-remote-code",
                        help="Run the Python code shipped in Hugging Face model directories (config.json auto_map) "
                             "for this command only. Only for models you trust; a pipeline file cannot turn this on.")
