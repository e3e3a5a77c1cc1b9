"""``transferkit run PIPELINE.yaml``: rank → ground truth → tune top-k → merge → report, in one run folder.

A package: :mod:`.config` (YAML → :class:`PipelineConfig`), :mod:`.stage` (the Stage protocol),
:mod:`.runner` (walks the registered stages with resume) and one module per stage in :mod:`.stages`.
A new stage is one module that registers a :class:`Stage`; the runner, the report and the CLI need no edit.

>>> from transferkit.pipeline import load_config, run_pipeline, DEFAULT_PIPELINE
>>> cfg = load_config("examples/pipeline.yaml")           # doctest: +SKIP  (validated; ConfigError on bad input)
>>> summary = run_pipeline(cfg, "runs/text")               # doctest: +SKIP
>>> summary = run_pipeline(cfg, "runs/text", resume=True)  # doctest: +SKIP  (finished stages are not redone)

The YAML (every key but ``targets`` and ``models`` is optional; see ``docs/pipeline.md``)::

    name: text-sentiment
    targets:                      # dataset specs (built-in names, CSV/JSONL/parquet/npz paths, image folders)
      - vader:movies
      - {data: vader:amazon, name: amazon, limit: 400, per_class: 200, test_size: 0.3}
    models: [all-minilm-l6-v2, paraphrase-minilm-l3-v2]   # catalogue names, HF dirs, hf:ID, timm:NAME
    model_options: {all-minilm-l6-v2: {max_length: 64}}    # load_model options, used by every stage
    metrics: [logme, linear_probe]                         # or "all"
    tune:
      method: lora                # any transferkit.tune method
      top_k: 1                    # candidates tuned per target, best-ranked first
      select_by: logme            # metric whose ranking picks them (default: the first metric)
      config: {epochs: 2, r: 8}   # method options + TrainConfig options
      ground_truth: true          # also tune every candidate: measured accuracy → τ_w, rel@1
      ground_truth_method: linear # default: the tune method (and its config)
      ground_truth_config: {}
    merge: {method: ties, options: {k: 0.2}}   # merges per-target deltas of one base (≥ 2 targets)
    seeds: [0]                    # tune runs repeat per seed (mean ± std); seeds[0] samples and splits the data
    limits: {samples: 400, per_class: null, epochs: 3, time: 600}

Run folder: ``state.json`` (finished stages, written atomically), ``pipeline.yaml`` (the resolved
config), ``splits/<target>.json`` (each target's one recorded train/test split), one folder per stage (``rank/``, ``ground_truth/``, ``tune/``, ``merge/``, ``report/``),
``summary.json`` and ``report.html``. Every unit of work (one model on one target for one seed) is
stored when it finishes, so a resumed run also skips the finished units of an interrupted stage.
Features come from transferkit's shared cache (``TRANSFERKIT_CACHE``), so rank and linear probes
extract each (model, data) pair once across stages and runs.
"""

from __future__ import annotations

from .config import (DEFAULT_PIPELINE, DEMO_MODELS, DEMO_TARGETS, Limits, PipelineConfig, Target, default_pipeline,
                     load_config)
from .runner import Run, run_pipeline
from .stage import Stage, register_stage, stages
from .stages import load_all
load_all()  # every module in pipeline/stages registers its stage: a new stage is one module

from .stages.merge import MergeSpec
from .stages.tune import TuneSpec, default_method

__all__ = ["PipelineConfig", "Target", "TuneSpec", "MergeSpec", "Limits", "Run", "Stage", "register_stage", "stages",
           "load_config", "run_pipeline", "default_pipeline", "default_method", "DEFAULT_PIPELINE", "DEMO_MODELS",
           "DEMO_TARGETS"]
