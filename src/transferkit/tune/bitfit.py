"""BitFit: train only the bias terms of the backbone plus the new head (Ben Zaken et al., ACL 2022).

Hugging Face PEFT has no BitFit tuner, so this is native: every backbone parameter whose name ends
in ``bias`` is trainable (or a subset: ``bias_terms=["query", "intermediate"]`` keeps the biases
whose module path contains one of the given names — the paper's query + FFN-intermediate variant),
everything else is frozen and provably untouched (frozen parameters never enter the optimizer).

The Delta is kind ``full`` and holds only bias differences plus the ``new.head.*`` tensors
(``from_states`` keeps changed tensors only), so :func:`transferkit.delta.apply` on the base gives
the tuned model.

>>> res = tune(model, train, test, method="bitfit", config={"lr": 1e-3})   # doctest: +SKIP
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import registry
from ..delta import from_states
from ..errors import ConfigError
from ..registry import option
from ..zoo.base import Classifier
from ._common import Fitted, count_trainable, fit_and_evaluate
from .registry import PEFT_TRAIN, STAGE

__all__ = ["BitFitOptions", "bias_names", "mark_bias_trainable", "run"]


@dataclass
class BitFitOptions:
    bias_terms: str | list[str] = option("all", help="'all', or module names whose biases train "
                                         "(e.g. [query, intermediate])")


def bias_names(module: nn.Module, bias_terms: Any = "all") -> list[str]:
    """Names of the bias parameters of ``module`` selected by ``bias_terms`` (``"all"`` or names)."""
    names = [n for n, _ in module.named_parameters() if n == "bias" or n.endswith(".bias")]
    if bias_terms in (None, "all"):
        return names
    if isinstance(bias_terms, str):
        bias_terms = [bias_terms]
    if not isinstance(bias_terms, (list, tuple)) or not all(isinstance(t, str) for t in bias_terms):
        raise ConfigError(f"bitfit option bias_terms must be 'all' or a list of module names, got {bias_terms!r}")
    chosen = [n for n in names if any(t in n.split(".") or f".{t}." in f".{n}" for t in bias_terms)]
    if not chosen:
        raise ConfigError(f"bitfit bias_terms {bias_terms} match no bias parameter")
    return chosen


def mark_bias_trainable(clf: Classifier, bias_terms: Any = "all") -> list[str]:
    """Freeze ``clf`` except the selected backbone biases and the head; return the trainable names."""
    chosen = set("backbone." + n for n in bias_names(clf.backbone, bias_terms))
    if not chosen:
        raise ConfigError("the backbone has no bias parameter: BitFit has nothing to train")
    for name, p in clf.named_parameters():
        p.requires_grad_(name in chosen or name.startswith("head."))
    return sorted(chosen)


def run(model, fit, val, test, *, n_classes, options, cfg, out_dir, resume, init_seed, **_) -> Fitted:
    clf = Classifier(copy.deepcopy(model.backbone), model.feature_dim, n_classes, init_seed)
    base = {"backbone." + k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    chosen = mark_bias_trainable(clf, options.get("bias_terms", "all"))
    trainable = count_trainable(clf)
    result, test_metrics = fit_and_evaluate(clf, model, fit, val, test, cfg, out_dir, resume)
    tuned = {"backbone." + k: v for k, v in clf.backbone.state_dict().items()}
    tuned.update({"head." + k: v for k, v in clf.head.state_dict().items()})
    delta = from_states(base, tuned, base_name=model.name, meta={"bias_terms": chosen})
    head = sum(p.numel() for p in clf.head.parameters())
    return Fitted(delta, result.metrics, result.history, test_metrics, trainable, clf,
                  {"added_params": head, "head_params": head, "bias_params": trainable - head})


registry.register(
    STAGE, "bitfit", fn=run, options=BitFitOptions, family="native", modality=["image", "text"],
    train={**PEFT_TRAIN, "lr": 5e-3, "weight_decay": 0.0},
    summary="BitFit: only the bias terms of the backbone (+ new head) are trained.",
    paper="Ben Zaken, Ravfogel, Goldberg. BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based "
          "Masked Language-models, ACL 2022 (arXiv:2106.10199)")
