"""tune: adapt a pretrained model to a target task; every method returns a Delta.

Methods here: ``linear`` (linear probe on frozen, cached features) and ``full`` (full fine-tuning).
Parameter-efficient methods (PEFT, adapters, side networks, sparse) arrive with the tune issue.
"""

from .baselines import METHODS, TuneResult, tune

__all__ = ["METHODS", "TuneResult", "tune"]
