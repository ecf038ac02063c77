"""Curves of every metric runs log, several runs overlaid: one panel per metric.

Metrics are whatever keys the rows of ``metrics.jsonl`` carry (loss, eval_loss, lr,
tokens_per_s, memory, and each stage's own: rewards/margins, reward_mean, kl, ...), so a
new stage's metrics are drawn without a change here. Train rows and eval rows log
different keys at different steps; each key is drawn from the rows that have it.
"""

from __future__ import annotations

import math
from typing import Any

#: Row keys that are coordinates or bookkeeping, not curves.
NOT_CURVES = {"step", "epoch"}
#: Drawn first, in this order, when present; other metrics follow alphabetically.
FIRST = ("loss", "eval_loss", "base_eval_loss", "lr", "tokens_per_s")


def curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Metric name -> [(step, value)] for every numeric key of ``rows``."""
    found: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                found.setdefault(key, []).append((step, value))
    return found


def metric_order(names: set[str]) -> list[str]:
    return [name for name in FIRST if name in names] + sorted(names - set(FIRST))


def summary(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per metric: name, points logged, last step, last value."""
    found = curves(rows)
    return [[name, len(found[name]), found[name][-1][0], round(found[name][-1][1], 6)]
            for name in metric_order(set(found))]


def figure(series: dict[str, list[dict[str, Any]]], columns: int = 3) -> Any:
    """A matplotlib figure: one panel per metric, one line per run (``series``: run id -> rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_run = {run: curves(rows) for run, rows in series.items()}
    names = metric_order({name for found in per_run.values() for name in found})
    if not names:
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
        ax.axis("off")
        return fig
    columns = min(columns, len(names))
    rows_n = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 2.8 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for run, found in per_run.items():
            if name in found:
                steps, values = zip(*found[name])
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2,
                        label=run)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if len(series) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
