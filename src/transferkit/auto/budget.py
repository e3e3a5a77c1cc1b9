"""Budgets of the ``auto`` search: wall-clock (``90s``, ``10m``, ``1h30m``) or training epochs (``40ep``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import short

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_CLOCK = re.compile(r"(\d+(?:\.\d+)?)([smh])")
_EPOCHS = re.compile(r"(\d+(?:\.\d+)?)\s*(?:ep|epochs?)")
MAX_SECONDS = 30 * 24 * 3600.0
MAX_EPOCHS = 1_000_000.0


@dataclass(frozen=True)
class Budget:
    """``kind`` is ``"seconds"`` (wall-clock, the ranking included) or ``"epochs"`` (training epochs summed
    over every arm; the same budget gives the same search on any machine)."""

    kind: str
    amount: float

    def __str__(self) -> str:
        return f"{self.amount:g} epochs" if self.kind == "epochs" else f"{self.amount:g} s"


def parse_budget(text: str | int | float | Budget) -> Budget:
    """``"10m"`` → 600 s, ``"1h30m"`` → 5400 s, ``"90s"``, ``"40ep"`` / ``"40 epochs"``; a bare number is
    seconds. One-line ConfigError otherwise."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"budget must be a duration like 10m or 1h, or epochs like 40ep; got {short(text)}")
    raw = str(text).strip().lower()
    if m := _EPOCHS.fullmatch(raw):
        budget = Budget("epochs", float(m.group(1)))
        limit = MAX_EPOCHS
    else:
        try:
            seconds = float(raw)
        except ValueError:
            parts = _CLOCK.findall(raw)
            if not parts or "".join(a + u for a, u in parts) != raw.replace(" ", ""):
                raise ConfigError(f"budget {short(text)} is not a duration like 90s, 10m, 1h30m or epochs like "
                                  f"40ep") from None
            seconds = sum(float(a) * _UNITS[u] for a, u in parts)
        budget = Budget("seconds", seconds)
        limit = MAX_SECONDS
    if not 0 < budget.amount <= limit:
        raise ConfigError(f"budget {short(text)} must be above 0 and at most {limit:g} {budget.kind}")
    return budget
