"""The tune stage's side of the one method registry (:mod:`transferkit.registry`).

Each tune method registers where it lives (``baselines.py``, ``peft_methods.py``, …) with::

    register("tune", name, paper=..., summary=..., options=<typed options dataclass>, fn=<runner>,
             family="baseline" | "peft" | "native", modality=["image", "text"], train={TrainConfig defaults})

``registry.methods("tune")`` lists them all; ``registry.describe(m)`` is the JSON-able entry that
``transferkit tune --list --json`` prints, every option with its type, default and range.

A ``config`` passed to :func:`transferkit.tune.tune` mixes both kinds of keys: the method's options
(rank, bottleneck, …; also accepted nested under ``config["options"]``) and
:class:`~transferkit.engine.TrainConfig` options (epochs, lr, …). :func:`split_config` separates and
validates them: a wrong type, a value out of range or an unknown key is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .. import registry
from ..errors import ConfigError

__all__ = ["STAGE", "PEFT_TRAIN", "split_config", "train_defaults"]

STAGE = "tune"

# the training defaults most parameter-efficient methods start from (each sets its own lr)
PEFT_TRAIN = {"epochs": 3, "batch_size": 16, "weight_decay": 0.01, "scheduler": "linear", "warmup_ratio": 0.1}


def train_defaults(method: str) -> dict[str, Any]:
    """The :class:`~transferkit.engine.TrainConfig` defaults of ``method`` (a copy)."""
    return dict(registry.get(STAGE, method).info.get("train", {}))


def split_config(method: str, config: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """``(options, train)`` of ``config`` for ``method``, both typed and checked.

    ``options`` is an instance of the method's options dataclass (None for a method without options;
    ``dataclasses.asdict`` gives the dict); ``train`` the dict of :class:`~transferkit.engine.TrainConfig`
    options: the method's training defaults under the given values, checked and converted by TrainConfig
    (``TrainConfig.from_dict(train)`` builds it). Unknown keys (with a did-you-mean), wrong types and
    values out of range raise a one-line :class:`ConfigError`.
    """
    from ..engine import TrainConfig

    m = registry.get(STAGE, method)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"the config of tune method {method!r} must be a mapping, got {type(config).__name__}")
    config = dict(config)
    nested = config.pop("options", None)
    nested = {} if nested is None else nested
    if not isinstance(nested, Mapping):
        raise ConfigError(f"tune option 'options' must be a mapping, got {type(nested).__name__}")
    option_keys = [f.name for f in dataclasses.fields(m.options)] if m.options is not None else []
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    opts, train = dict(nested), {}
    for key, value in config.items():
        if key in option_keys:
            if key in nested:
                raise ConfigError(f"tune method {method!r}: option {key!r} given twice (top level and under 'options')")
            opts[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            raise _unknown(key, method, option_keys, train_keys)
    for key in nested:
        if key in train_keys and key not in option_keys:
            raise ConfigError(f"{key!r} is a train option of tune method {method!r}: give it at the top level of "
                              f"the config, not under 'options'")
        if key not in option_keys:
            raise _unknown(key, method, option_keys, [])
    options = registry.parse_options(m.options, opts, f"tune method {method!r}")
    train = {**m.info.get("train", {}), **train}
    checked = TrainConfig.from_dict(train).to_dict()  # typed and range-checked by TrainConfig
    return options, {k: checked[k] for k in train}


def _unknown(key: Any, method: str, option_keys: list[str], train_keys: list[str]) -> ConfigError:
    hint = registry.did_you_mean(key, [*option_keys, *train_keys])
    known = ", ".join(option_keys) or "none"
    train = "; or a train option: epochs, lr, batch_size, …" if train_keys else ""
    return ConfigError(f"unknown option {str(key)[:80]!r} for tune method {method!r}{hint} "
                       f"(method options: {known}{train})")
