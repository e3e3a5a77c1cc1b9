"""Merge: combine Deltas (task vectors, LoRA adapters) of one base into one Delta, without training.

Functional API — Deltas in, Delta out (apply the result with :func:`transferkit.delta.apply`):

==========================================  ==================================================
``task_arithmetic(deltas, lam=1.0)``         Σ λ τ_t (Ilharco et al., ICLR 2023); ``negate``, ``analogy``
``ties(deltas, k=0.2, lam=None, scope="global"|"per_tensor", agg="mean"|"sum")``
                                             TIES-Merging (Yadav et al., NeurIPS 2023)
``dare(delta, p=0.9, seed=0)``               Drop And REscale (Yu et al., ICML 2024); ``dare_merge``,
                                             ``dare_linear``, ``dare_ties``
``average(deltas, weights=None)``            weighted average; ``uniform_soup``, ``greedy_soup``
                                             (Wortsman et al., ICML 2022)
``compute_fisher(model, batches, *, empirical=False)`` / ``fisher_merge(models_or_deltas, fishers)``
                                             Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022)
``merge_lora(deltas, weights, how="svd"|"cat"|"dense", rank=None)``
                                             LoRA adapters merged in ΔW space
``stream_merge(base, models, out, method)``  out-of-core merge of safetensors checkpoints, tensor
                                             by tensor, sharded output (:mod:`.streaming`)
``AnisotropicScaling`` / ``fit_atlas``       aTLAS: learned per-task, per-block coefficients
                                             (Zhang et al., NeurIPS 2024) (:mod:`.atlas`)
``fit_negation``                             aTLAS task negation: forget a task, keep controls
``robust_signature`` / ``patch``             robust weight signatures, int8 storage, BN
                                             re-estimation (Cai et al., ICML 2023) (:mod:`.signatures`)
==========================================  ==================================================

Common rules (see :mod:`transferkit.merge._common`): every input Delta must have the same ``base``
(else :class:`~transferkit.errors.ConfigError`); only the body is merged — per-task heads (``new.``
tensors) are dropped from the result and listed in ``meta["heads_dropped"]``; use
:func:`attach_head` to evaluate the merged body with one task's head; integer tensors are never
averaged; tensors a Delta lacks count as zero. ``lora``/``sparse`` Deltas are densified
(``to_dense``) by every method except :func:`merge_lora`.

The merge methods of ``transferkit merge`` are registered in :mod:`transferkit.registry` (stage
``merge``; ``registry.methods("merge")``) with typed options. Library API for running them (what the CLI
and the pipeline call):

==============================================================  ===========================================
``merge_deltas(method, deltas, options, *, weights=None)``       any registered method, options validated
                                                                 (:mod:`.run`)
``evaluate_merged(merged, deltas, tasks=None, base=None)``       held-out accuracy of merged vs individual
                                                                 on each run's recorded split (:mod:`.tasks`)
``build_spec(config, ...)`` / ``run_merge(spec, out)``           a mergekit-style YAML → a merge folder
                                                                 (:mod:`.spec`, :mod:`.run`)
==============================================================  ===========================================
"""

from ._common import MergeOptions, attach_head, heads
from .average import average, greedy_soup, uniform_soup  # noqa: I001 - import order = registry (and --list) order
from .task_arithmetic import SparseOptions, TaskArithmeticOptions, analogy, negate, task_arithmetic
from .ties import TiesConsensus, TiesOptions, ties
from .dare import DareOptions, DareTiesOptions, LargeDeltaWarning, dare, dare_linear, dare_merge, dare_ties
from .fisher import FisherOptions, compute_fisher, fisher_merge
from .lora import LoraOptions, ab_linear_error, merge_lora
from .atlas import AnisotropicScaling, few_shot, fit_atlas, fit_negation
from .signatures import Signature, compose, patch, reestimate_bn, robust_signature
from .streaming import stream_merge
from .spec import MergeSpec, build_spec, parse_options
from .run import merge_deltas, run_merge
from .tasks import evaluate_merged, task_split

__all__ = [
    "attach_head", "heads", "average", "greedy_soup", "uniform_soup", "dare", "dare_merge", "dare_linear",
    "dare_ties", "MergeOptions", "TaskArithmeticOptions", "SparseOptions", "TiesConsensus", "TiesOptions",
    "DareOptions", "DareTiesOptions", "FisherOptions", "LoraOptions", "MergeSpec", "build_spec", "parse_options",
    "merge_deltas", "run_merge", "evaluate_merged", "task_split",
    "LargeDeltaWarning", "compute_fisher", "fisher_merge", "ab_linear_error", "merge_lora", "analogy",
    "negate", "task_arithmetic", "ties",
    "stream_merge", "AnisotropicScaling", "fit_atlas", "fit_negation", "few_shot", "Signature", "robust_signature", "compose",
    "patch", "reestimate_bn",
]
