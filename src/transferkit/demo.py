"""``transferkit demo``: rank a real image zoo on a real target and check the ranking.

Default: the seven real image models of the catalogue (MobileNetV2, EfficientNet-Lite0/1/2 on
ImageNet; the MNIST, USPS and SVHN digit CNNs) ranked on OpenCV's handwritten digits. Each
candidate's transferability is scored on the training split; the ground truth is each
candidate's *measured* accuracy on the held-out split after training a linear head on its frozen
features (the linear-probe transfer). The demo reports weighted Kendall τ and rel@1 of every
metric against that measurement. The pipeline issue grows this into rank → tune → merge → report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "opencv-digits"
DEFAULT_MODELS = ["mobilenet-v2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                  "digits-mnist", "digits-usps", "digits-svhn"]
DEFAULT_METRICS = ["logme", "linear_probe"]


def run_demo(out: str | Path, *, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    from .data import load_dataset, train_test_split
    from .io import write_json
    from .rank import evaluate as ev
    from .rank.runner import rank_models
    from .tune import tune
    from .zoo import load_model

    out = Path(out)
    t0 = time.perf_counter()
    ds = load_dataset(DEFAULT_TARGET, per_class=20 if quick else 60, seed=0)
    train, test = train_test_split(ds, test_size=0.3, seed=0)
    ranked = rank_models(train, DEFAULT_MODELS, DEFAULT_METRICS, out_dir=out, progress=progress)
    measured = {}
    for name in DEFAULT_MODELS:
        res = tune(load_model(name), train, test, method="linear", config={"epochs": 30}, progress=False)
        measured[name] = res.metrics["test_accuracy"]
    evaluation = {}
    for metric in DEFAULT_METRICS:
        scores = {m: ranked["scores"][m][metric] for m in DEFAULT_MODELS if ranked["scores"][m][metric] is not None}
        evaluation[metric] = {"weighted_tau": ev.weighted_tau(scores, measured), "rel@1": ev.rel_at_k(scores, measured, 1)}
    summary = {
        "target": DEFAULT_TARGET, "n_train": len(train), "n_test": len(test), "rank": ranked,
        "measured_accuracy": measured, "evaluation": evaluation,
        "seconds": round(time.perf_counter() - t0, 1), "out": str(out),
    }
    _scatter(ranked, measured, out / "rank_vs_measured.png")
    write_json(out / "summary.json", summary)
    return summary


def _scatter(ranked: dict, measured: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    metrics = ranked["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        pts = [(ranked["scores"][m][metric], measured[m], m) for m in measured if ranked["scores"][m][metric] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7)
        ax.set_xlabel(f"{metric} score")
        ax.set_ylabel("measured accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
