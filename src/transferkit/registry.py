"""One registry for every method of every stage.

A method registers once, where it lives, with its stage, name, paper, a one-line summary and a typed
options dataclass::

    @dataclass
    class TiesOptions:
        k: float = option(0.2, low=0.0, high=1.0, help="fraction of entries kept per task vector")

    @register("merge", "ties", paper="Yadav et al. TIES-Merging, NeurIPS 2023", summary="…",
              options=TiesOptions)
    def ties(deltas, *, k=0.2): ...

Everything else derives from the registry: ``transferkit <stage> --list``, option validation at every
entry (CLI, Python, PIPELINE.yaml), the pipeline's YAML checks and the README's method table.

Options are validated by :func:`parse_options`: each field's type annotation (``int``, ``float``,
``bool``, ``str``, ``list[str]``, ``X | None``) is enforced without coercion surprises (the string
``"false"`` is not a bool, ``"eight"`` is not an int, ``1.5`` is not an int), ranges and choices come
from :func:`option`, and an unknown key gets a did-you-mean. Every failure is a one-line
:class:`~transferkit.errors.ConfigError`.

A stage's methods are registered when its package is imported; :func:`methods` imports
``transferkit.<stage>`` first, so ``methods("tune")`` is complete without the caller importing anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import ConfigError

__all__ = ["Method", "register", "methods", "get", "option", "parse_options", "describe", "did_you_mean",
           "options_of"]

_MAX_SHOWN = 80  # longest value an error message repeats


@dataclass(frozen=True)
class Method:
    """A registered method.

    stage : the stage it belongs to (``rank``, ``tune``, ``merge``, …).
    name : its registry key.
    fn : the function (or class) that runs it.
    paper : the citation.
    summary : one line, what ``--list`` prints.
    options : a dataclass of its typed options (None: it has none).
    info : stage-specific facts (a tune method's modality and training defaults, a metric's inputs, …).
    """

    stage: str
    name: str
    fn: Callable[..., Any]
    paper: str
    summary: str
    options: type | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> str:
        return getattr(self.fn, "__module__", "")

    def defaults(self) -> dict[str, Any]:
        """The options' defaults as a dict."""
        return {} if self.options is None else dataclasses.asdict(self.options())

    def parse(self, values: Mapping[str, Any] | None, where: str | None = None) -> Any:
        """Validated options (an instance of ``self.options``) from a mapping."""
        return parse_options(self.options, values, where or f"{self.stage} method {self.name!r}")

    def __str__(self) -> str:
        return f"{self.summary} [{self.paper}]" if self.paper else self.summary


_REGISTRY: dict[str, dict[str, Method]] = {}


def register(stage: str, name: str, *, paper: str, summary: str, options: type | None = None,
             fn: Callable | None = None, **info: Any) -> Callable:
    """Register a method; use as a decorator, or call with ``fn=`` to register an existing function.

    Registering the same (stage, name) twice is a programming error (``ValueError``).
    """
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"options of {stage}/{name} must be a dataclass")

    def deco(f: Callable) -> Callable:
        table = _REGISTRY.setdefault(stage, {})
        if name in table:
            raise ValueError(f"{stage} method {name!r} registered twice")
        table[name] = Method(stage, name, f, paper, summary, options, dict(info))
        return f

    return deco(fn) if fn is not None else deco


def _load(stage: str) -> None:
    try:
        importlib.import_module(f"transferkit.{stage}")
    except ModuleNotFoundError as exc:  # a stage registered from outside the package (a plugin, a test)
        if exc.name != f"transferkit.{stage}":
            raise


def import_methods(package: str, path, first: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Import a stage package's method modules so each registers its methods where it lives: ``first`` in
    that order (it is the listing order), then every other public module of ``path`` except ``skip``, by name."""
    import pkgutil

    rest = sorted(m.name for m in pkgutil.iter_modules(path)
                  if not m.name.startswith("_") and m.name not in first and m.name not in skip)
    for name in (*first, *rest):
        importlib.import_module(f"{package}.{name}")


def methods(stage: str) -> dict[str, Method]:
    """Every registered method of ``stage``, in registration order."""
    _load(stage)
    return dict(_REGISTRY.get(stage, {}))


def did_you_mean(word: Any, choices) -> str:
    if not isinstance(word, (str, int, float)):  # a list or mapping is not a misspelt name (and may be huge)
        return ""
    close = difflib.get_close_matches(str(word)[:_MAX_SHOWN], [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _bounded_repr():
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 4, 6
    r.maxstring, r.maxother, r.maxlong = _MAX_SHOWN, _MAX_SHOWN, _MAX_SHOWN
    return r


_REPR = _bounded_repr()


def short(value: Any) -> str:
    """A bounded ``repr`` for error messages: at most ``_MAX_SHOWN`` characters, and bounded work however large
    (or alias-shared) the value is."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001  (a value whose repr fails)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "…"




def get(stage: str, name: Any) -> Method:
    """The method ``name`` of ``stage``; an unknown name is a one-line ConfigError with a did-you-mean."""
    table = methods(stage)
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {stage} method {short(name)}{did_you_mean(name, table)}; "
                          f"available: {', '.join(table)}")
    return table[name]


def option(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           help: str = "") -> Any:
    """A dataclass field with a range (``low``/``high``, closed unless ``*_open``), choices and help."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices,
            "help": help}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return tp, False


_TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
               str: ("a string", "strings"), dict: ("a mapping", "mappings")}


def _type_name(tp: Any, plural: bool = False) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0], plural=True)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in typing.get_args(tp))
    names = _TYPE_NAMES.get(tp)
    return names[plural] if names else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, what: str) -> Any:
    """``value`` as type ``tp`` (no lossy or surprising conversions); ConfigError otherwise."""
    inner, optional = _split_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{what} must not be null")
    bad = ConfigError(f"{what} must be {_type_name(inner)}{' or null' if optional else ''}, got {short(value)}")
    if inner is Any:
        return value
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        for alt in typing.get_args(inner):
            try:
                return _coerce(alt, value, what)
            except ConfigError:
                continue
        raise bad
    if inner is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad
    if isinstance(value, (bool, np.bool_)):
        raise bad
    if inner is int:
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise bad
    if inner is float:
        if isinstance(value, (int, float, np.integer, np.floating)):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{what} must be a finite number, got {short(value)}")
            return float(value)
        raise bad
    if inner is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(inner) is list:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(inner)
        return [_coerce(item, v, f"{what}[{i}]") for i, v in enumerate(value)]
    if inner is dict or typing.get_origin(inner) is dict:
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    return value


def _check_range(f: dataclasses.Field, value: Any, what: str) -> None:
    meta = f.metadata
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for v in items:
            if v not in choices:
                raise ConfigError(f"{what} must be one of {', '.join(map(str, choices))}, got {short(v)}"
                                  f"{did_you_mean(v, choices)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if meta.get('low_open') else '>='} {low}"
        hi = "" if high is None else f"{'<' if meta.get('high_open') else '<='} {high}"
        raise ConfigError(f"{what} must be {' and '.join(x for x in (lo, hi) if x)}, got {short(value)}")


def parse_options(cls: type | None, values: Mapping[str, Any] | None, where: str) -> Any:
    """An instance of the options dataclass ``cls`` from ``values``, every field checked.

    Unknown keys, wrong types and out-of-range values raise one-line ConfigErrors naming ``where``.
    ``cls=None`` means the method takes no options (any key is unknown).
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"options of {where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    for key in values:
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"unknown option {short(key)} for {where}{did_you_mean(key, fields)} (known: {known})")
    hints = _hints(cls) if cls is not None else {}
    kwargs = {}
    for key, value in values.items():
        what = f"option {key} of {where}"
        v = _coerce(hints[key], value, what)
        _check_range(fields[key], v, what)
        kwargs[key] = v
    try:
        return cls(**kwargs) if cls is not None else None
    except (TypeError, ValueError) as exc:  # a dataclass's own cross-field check
        raise ConfigError(f"{where}: {exc}") from None


def options_of(method: Method) -> list[dict[str, Any]]:
    """Each option's name, type, default, range/choices and help (for ``--list --json`` and docs)."""
    if method.options is None:
        return []
    hints = _hints(method.options)
    out = []
    for f in dataclasses.fields(method.options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        inner, optional = _split_optional(hints[f.name])
        row = {"name": f.name, "type": _type_name(inner) + (" or null" if optional else ""), "default": default}
        row.update({k: v for k, v in f.metadata.items() if not (v is None or v is False or v == "")})
        out.append(row)
    return out


def describe(method: Method) -> dict[str, Any]:
    """A JSON-able description of a method."""
    return {"name": method.name, "stage": method.stage, "summary": method.summary, "paper": method.paper,
            "module": method.module, "options": options_of(method),
            **{k: v for k, v in method.info.items() if _jsonable(v)}}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))
