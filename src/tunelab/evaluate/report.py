"""What an evaluation produces: metrics per model, the side-by-side table, the files.

A result file ``<out>/eval/<task>-<YYYYmmdd-HHMMSS>.json`` holds the settings, the tuned
model's metrics, and with ``--compare-base`` the base model's metrics and their
difference; per-sample outputs (generations, chosen letters) go to JSON-lines files next
to it. Everything is written atomically, so a crash never leaves a truncated result that
a later comparison would read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.io import write_json, write_jsonl
from tunelab.runs import RunDir


@dataclass
class TaskResult:
    """One model's evaluation: metrics (numbers, possibly nested by subject) and per-sample rows."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics as ``{"subjects.law.accuracy": 61.0, ...}``: one table row per number."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def deltas(tuned: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """``tuned - base`` for every real-valued metric (counts such as ``tokens`` are the same data)."""
    flat_tuned, flat_base = flatten(tuned), flatten(base)
    return {key: value - flat_base[key] for key, value in flat_tuned.items()
            if isinstance(value, float) and key in flat_base}


def output_stem(run: str, task: str) -> Path:
    """``RUN/eval/<task>-<time>`` for a run directory, ``./eval/<task>-<time>`` for a bare model name.

    A second evaluation within the same second gets a numbered suffix instead of
    overwriting the first.
    """
    folder = RunDir(run).eval_dir if RunDir(run).is_run() else Path("eval")
    stem = folder / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, number = stem, 1
    while candidate.with_suffix(".json").exists():
        number += 1
        candidate = stem.with_name(f"{stem.name}-{number}")
    return candidate


def write_outputs(stem: Path, result: dict[str, Any], tuned: TaskResult, base: TaskResult | None) -> dict[str, str]:
    """Write predictions (if any) and the result JSON; returns the paths written, by role."""
    files: dict[str, str] = {"result": str(stem.with_suffix(".json"))}
    for role, outcome in (("predictions", tuned), ("base_predictions", base)):
        if outcome is not None and outcome.rows:
            path = stem.with_name(f"{stem.name}.{role.replace('_', '.')}.jsonl")
            write_jsonl(path, outcome.rows)
            files[role] = str(path)
    write_json(files["result"], {**result, "files": files})
    return files


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else ("+" if value >= 0 else "") + _number(value)


def print_table(title: str, caption: str, tuned: dict[str, Any], base: dict[str, Any] | None) -> None:
    """The metrics as a table; with a base column, a delta column shows gains and forgetting."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, min_width=60)
    table.add_column("metric")
    if base is None:
        table.add_column("value", justify="right")
        for key, value in flatten(tuned).items():
            table.add_row(key, _number(value))
    else:
        for name in ("base", "tuned", "delta"):
            table.add_column(name, justify="right")
        flat_base, change = flatten(base), deltas(tuned, base)
        for key, value in flatten(tuned).items():
            table.add_row(key, _number(flat_base.get(key)), _number(value), _signed(change.get(key)))
    Console(width=120).print(table)
