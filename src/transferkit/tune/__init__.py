"""tune: adapt a pretrained model to a target task; every method returns a Delta.

>>> from transferkit.tune import tune, METHODS
>>> res = tune(model, train, test, method="lora", config={"r": 8, "epochs": 2}, out_dir="runs/lora")  # doctest: +SKIP

Methods (``METHODS`` holds each one's paper, options and training defaults):

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
from .registry import METHODS, split_config

__all__ = ["METHODS", "TuneResult", "tune", "split_config", "peft_base", "load_peft", "rebuild"]


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
