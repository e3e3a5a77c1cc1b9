"""tune: adapt a pretrained model to a target task; every method returns a Delta.

>>> from transferkit.tune import tune
>>> res = tune(model, train, test, method="lora", config={"r": 8, "epochs": 2}, out_dir="runs/lora")  # doctest: +SKIP

Each method registers where it lives in the one method registry (``registry.methods("tune")``,
``transferkit tune --list``: paper, typed options with ranges, training defaults):

- baselines (:mod:`.baselines`): ``linear`` (probe on cached features), ``full``;
- via Hugging Face PEFT (:mod:`.peft_methods`): ``lora`` (rsLoRA/DoRA flags), ``ia3``, ``prefix``,
  ``prompt`` — saved in PEFT's format under ``out_dir/peft/``;
- native: ``bitfit`` (:mod:`.bitfit`); the unified view's ``adapter`` (sequential),
  ``parallel-adapter``, ``scaled-parallel-adapter`` and ``mam`` (:mod:`.adapters`); side networks
  ``unipt``, ``sherl``, ``r2`` (:mod:`.side`); LT-SFT ``sparse`` (:mod:`.sparse`); ``scalearn``,
  ``scalearn-uniform``, ``scalearn++``, ``scalearn-uniform++``, ``adapterfusion``, ``shared-adapter``
  (:mod:`.scalearn`); ``translora`` (:mod:`.translora`).
"""

from ._common import TuneResult
from .baselines import tune
from .registry import split_config, train_defaults

# each module registers its methods on import (registration order = the listing's order); PEFT and
# transformers are only imported inside the functions that need them
from . import peft_methods, bitfit, adapters, side, sparse, scalearn, translora  # noqa: E402,F401  isort: skip

__all__ = ["TuneResult", "tune", "split_config", "train_defaults", "peft_base", "load_peft", "rebuild"]


def peft_base(*args, **kwargs):
    """See :func:`transferkit.tune.peft_methods.peft_base`."""
    from .peft_methods import peft_base as f

    return f(*args, **kwargs)


def load_peft(*args, **kwargs):
    """See :func:`transferkit.tune.peft_methods.load_peft`."""
    from .peft_methods import load_peft as f

    return f(*args, **kwargs)


def rebuild(*args, **kwargs):
    """See :func:`transferkit.tune.adapters.rebuild`."""
    from .adapters import rebuild as f

    return f(*args, **kwargs)
