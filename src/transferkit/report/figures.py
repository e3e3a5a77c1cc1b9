"""Matplotlib figures of the pipeline report, returned as PNG bytes (embedded in the HTML as base64).

Every function takes plain pieces of the pipeline summary and returns ``bytes`` (or ``None`` when
there is nothing to plot), so figures can also be saved on their own.
"""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["scatter_png", "curves_png", "merge_png"]

_DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def scatter_png(scores: dict[str, dict[str, float | None]], accuracy: dict[str, float], metrics: list[str],
                labels: dict[str, str], *, evaluation: dict[str, dict] | None = None,
                highlight: str | None = None, title: str = "") -> bytes | None:
    """One panel per metric: transferability score (x) vs measured accuracy (y), one point per model.

    ``scores[model][metric]``; ``accuracy[model]``; ``evaluation[metric]`` may carry ``weighted_tau``
    and ``rel@1`` shown in the panel title; ``highlight`` (the chosen model) is drawn in red.
    """
    if not accuracy or not metrics:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        pts = [(scores[m][metric], accuracy[m], m) for m in accuracy
               if m in scores and _finite(scores[m].get(metric)) and _finite(accuracy[m])]
        for x, y, m in pts:
            chosen = m == highlight
            ax.scatter([x], [y], s=46 if chosen else 28, color="tab:red" if chosen else "tab:blue", zorder=3)
            ax.annotate(labels.get(m, m), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ev = (evaluation or {}).get(metric) or {}
        sub = []
        if _finite(ev.get("weighted_tau")):
            sub.append(f"τ_w={ev['weighted_tau']:.2f}")
        if _finite(ev.get("rel@1")):
            sub.append(f"rel@1={ev['rel@1']:.2f}")
        ax.set_title(f"{metric}" + (f"  ({', '.join(sub)})" if sub else ""), fontsize=9)
        ax.set_xlabel(f"{metric} score (higher = predicted better)", fontsize=8)
        ax.set_ylabel("measured test accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="both", style="plain", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no scored models", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def curves_png(histories: dict[str, list[dict]], *, title: str = "") -> bytes | None:
    """Training loss and validation accuracy against the optimizer step, one line per tuned model."""
    histories = {k: h for k, h in histories.items() if h}
    if not histories:
        return None
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    for name, hist in histories.items():
        loss = [(h["step"], h.get("loss", h.get("train_loss"))) for h in hist
                if "step" in h and _finite(h.get("loss", h.get("train_loss")))]
        acc = [(h["step"], h["val_accuracy"]) for h in hist if "step" in h and _finite(h.get("val_accuracy"))]
        if loss:
            ax_l.plot(*zip(*loss), marker="." if len(loss) < 30 else None, label=name)
        if acc:
            ax_a.plot(*zip(*acc), marker="o", label=name)
    ax_l.set_title("training loss", fontsize=9)
    ax_a.set_title("validation accuracy", fontsize=9)
    for ax in (ax_l, ax_a):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def merge_png(groups: list[dict]) -> bytes | None:
    """Individual fine-tune vs merged accuracy per task (one group of bars per base model × task)."""
    rows = [(f"{g.get('label', g['base'])}\n{t['target']}", t["individual"], t["merged"])
            for g in groups for t in g.get("tasks", []) if _finite(t.get("individual")) and _finite(t.get("merged"))]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 1.5), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="individual fine-tune")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="merged")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], fontsize=7)
    ax.set_ylabel("test accuracy", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)
