"""What a run reports while it trains: a progress bar, ``metrics.jsonl``, ``train.log`` and ``loss.png``.

``metrics.jsonl`` gets one JSON object per logged step or evaluation; each line is flushed
and fsynced as it is written, so a crash loses at most the line being written. A resumed
run drops lines past the checkpoint it resumes from, so the file reads as one run.
``train.log`` gets every message the run prints and one line per logged row, so a reader
that did not start the run (the web UI, ``tail -f``) sees what the terminal saw.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tqdm.auto import tqdm

from tunelab.io import atomic_open
from tunelab.runs import RunDir

#: Metrics shown beside the progress bar and in the log line of a row, when the row has them.
SHOWN = ("loss", "eval_loss", "lr", "tokens_per_s")


class Monitor:
    def __init__(self, run: RunDir, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True):
        """``enabled``: this process writes files (the main one); ``progress``: show the bar."""
        self.run = run
        self.total_steps = total_steps
        self._handle = None
        if enabled:
            run.truncate_metrics(start_step)
            self._handle = open(run.metrics, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not (enabled and progress), file=sys.stderr)

    def log(self, row: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        shown = {k: row[k] for k in SHOWN if k in row}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.run.append_log(f"step {row.get('step', '?')}/{self.total_steps} "
                            + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def write(self, text: str) -> None:
        """A message for the user: on the terminal (above the bar) and in ``train.log``."""
        self.bar.write(text, file=sys.stderr)
        if self._handle is not None:
            self.run.append_log(text)

    def close(self) -> None:
        self.bar.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            skipped = plot_metrics(self.run)
            if skipped:
                print(skipped, file=sys.stderr)
                self.run.append_log(skipped)


#: Why a plot was not drawn: matplotlib is an optional extra (``tunelab[plot]``), not needed to train.
NO_MATPLOTLIB = "matplotlib is not installed (pip install 'tunelab[plot]')"


def pyplot() -> Any | None:
    """matplotlib's pyplot, drawing to files only (the Agg backend), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(run: RunDir) -> str | None:
    """Draw train (and eval) loss against step into the run's ``loss.png``; a one-line notice if it cannot."""
    rows = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    plt = pyplot()
    if plt is None:
        return f"note: {run.loss_plot.name} skipped: {NO_MATPLOTLIB}; metrics.jsonl has the numbers"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(run.loss_plot, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return None
