"""What a run reports while it trains: a progress bar, ``metrics.jsonl`` and ``loss.png``.

``metrics.jsonl`` gets one JSON object per logged step or evaluation; each line is flushed
and fsynced as it is written, so a crash loses at most the line being written. A resumed
run drops lines past the checkpoint it resumes from, so the file reads as one run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tunelab.io import atomic_open


def proc_kib_field_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a Linux /proc file (``/proc/meminfo``, ``/proc/self/status``)
    in bytes, or None where the file or the field does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes: kilobytes on Linux, bytes on macOS."""
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM, which starts afresh in a new program. ``ru_maxrss`` survives ``exec``, so
    a run started from a large process (a notebook, a test runner) would report that
    process's size.
    """
    peak = proc_kib_field_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated bytes on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    file = Path(run_dir) / "metrics.jsonl"
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True):
        """``enabled``: this process writes files (the main one); ``progress``: show the bar."""
        self.run_dir = Path(run_dir)
        self.file = self.run_dir / "metrics.jsonl"
        self._handle = None
        if enabled:
            self._truncate_after(start_step)
            self._handle = open(self.file, "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not (enabled and progress), file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        kept = [row for row in read_metrics(self.run_dir) if row.get("step", 0) <= step]
        with atomic_open(self.file) as handle:
            for row in kept:
                handle.write(json.dumps(row) + "\n")

    def log(self, row: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        shown = {k: row[k] for k in ("loss", "eval_loss", "lr", "tokens_per_s") if k in row}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            plot_metrics(self.run_dir)


def plot_metrics(run_dir: Path) -> Path | None:
    """Draw train (and eval) loss against step into ``loss.png``."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    target = Path(run_dir) / "loss.png"
    with atomic_open(target, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return target
