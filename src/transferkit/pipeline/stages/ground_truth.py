"""Pipeline stage ``ground_truth``: tune every candidate on every target and measure how well each metric's
ranking predicted the measured accuracies (τ_w, rel@k). Configured by the ``tune`` key's
``ground_truth*`` options; budgeted by ``limits.time``."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ...errors import TransferkitError
from ..stage import Stage, register_stage
from . import tune as _tune


class GroundTruthStage(Stage):
    """Fine-tune every candidate: the measured accuracies each ranking is judged against."""

    name, order = "ground_truth", 20

    def run(self, run) -> dict:
        from ...rank import evaluate as ev

        cfg = run.cfg
        spec = cfg.section("tune")
        metrics = cfg.section("rank")
        if not spec.ground_truth:
            return {"skipped": "tune.ground_truth is false"}
        units = [(t, m, s) for t in cfg.targets for m in cfg.models for s in cfg.seeds]
        recs, skipped = run.units("ground_truth", units,
                                  lambda t, m, s: _tune.tune_unit(run, "ground_truth", t, m, spec.ground_truth_method,
                                                                  spec.ground_truth_config, s), budget=True)
        rank = run.results["rank"]
        out: dict[str, Any] = {"method": spec.ground_truth_method, "config": spec.ground_truth_config,
                               "runs": {}, "accuracy": {}, "evaluation": {}, "skipped_units": skipped}
        for target in cfg.targets:
            runs = {}
            for model in cfg.models:
                mine = [r for r in recs if r["target"] == target.name and r["model"] == model]
                if mine:
                    runs[model] = _tune.aggregate(mine)
            accs = {m: r["accuracy"] for m, r in runs.items() if r["accuracy"] is not None}
            out["runs"][target.name] = runs
            out["accuracy"][target.name] = accs
            evaluation = {}
            for metric in metrics:
                scores = {m: s[metric] for m, s in rank[target.name]["scores"].items()
                          if m in accs and s.get(metric) is not None and math.isfinite(s[metric])}
                accs_m = {m: accs[m] for m in scores}
                try:
                    with warnings.catch_warnings():  # constant accuracies/scores: correlations are NaN, said once here
                        warnings.simplefilter("ignore")
                        evaluation[metric] = {**ev.evaluate_scores(scores, accs_m, ks=(1, 3) if len(scores) >= 3 else (1,)),
                                              "n_models": len(scores)}
                except TransferkitError as e:
                    evaluation[metric] = {"error": str(e), "n_models": len(scores)}
            out["evaluation"][target.name] = evaluation
        return out


register_stage(GroundTruthStage())
