"""The search trace of ``auto``: every arm's validation curve over epochs, where it stopped, and the winner."""

from __future__ import annotations

from typing import Any

from ..report.figures import _plt, _png

_MARK = {"pruned": "x", "budget": "s", "complete": "o"}  # "no budget" arms never trained: not drawn


def plot_trace(rows: list[dict[str, Any]], winner: int | None, metric: str = "accuracy") -> bytes | None:
    """PNG: the validation ``metric`` (accuracy, or the ``select_by`` scorer) vs epochs per arm (one colour per model; x = pruned at a rung, square =
    stopped by the budget, circle = finished); the winner is drawn thick. None when no arm trained."""
    trained = [r for r in rows if r["curve"]]
    if not trained:
        return None
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in trained:
        xs, ys = zip(*r["curve"])
        win = r["arm"] == winner
        ax.plot(xs, ys, color=colours[r["model"]], lw=2.6 if win else 0.9, alpha=1.0 if win else 0.6,
                zorder=3 if win else 2)
        ax.scatter([xs[-1]], [ys[-1]], marker=_MARK.get(r["state"], "."), color=colours[r["model"]], s=40 if win else 18,
                   zorder=4)
    for m in models:
        ax.plot([], [], color=colours[m], label=m)
    ax.set_xscale("log", base=3)
    ax.set_xlabel("epochs trained (log scale; rungs at 1, η, η², …)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("auto: search trace (x pruned, ■ budget, ● finished; thick = winner)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)
