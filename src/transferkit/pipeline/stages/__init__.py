"""The pipeline stages, one module each; :func:`load_all` imports every module here (each registers its stage)."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every stage module of this package, so each one's ``register_stage`` call runs."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
