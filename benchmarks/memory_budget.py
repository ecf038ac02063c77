"""``train.memory_budget`` on real runs: does every run stay under its budget?

Each point is the benchmark job of ``speed.py`` (SmolLM2-135M-Instruct, alpaca-style data,
bf16 autocast on CPU) with a method, a max length, a micro-batch size and a budget. The
budget is resolved in this process exactly as ``tunelab train`` resolves it
(:func:`tunelab.estimate.budget.fit_memory_budget`: the settings it picks and their predicted
peak), then the run trains ``--steps`` optimizer steps in a child process (``python -m
tunelab.cli train``, which resolves the budget again, before loading the model) whose peak
RSS comes from ``os.wait4``. The child's train.log must name the same settings. A budgeted
run gets the compact C heap (``train.compact_heap: auto``, :mod:`tunelab.heap`), so its
resident memory follows the live tensors the estimate counts. Then the setting ranked just
faster than the choice, which the budget turned down, trains the same steps on the same heap
with its settings given explicitly: its peak shows whether it would have fitted, its tokens/s
whether the ranking holds.

Tables: budget, chosen settings, predicted peak, measured peak, whether the measured peak is
under the budget, and the tokens/s of the steps after the first; the same for each turned-down
setting; to benchmarks/results/memory_budget.{md,json}.

Usage (from the repository root)::

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/memory_budget.py [--dry-run] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, load_config
from tunelab.estimate.measure import measurement_overrides, run_child
from tunelab.estimate.budget import fit_memory_budget, with_settings
from tunelab.io import write_json, write_text
from tunelab.runs import RunDir

from speed import RESULTS, write_job_config  # benchmarks/ is on sys.path when this runs as a script

#: (method, max_length, micro-batch size, budget)
GRID: list[tuple[str, int, int, str]] = [
    ("lora", 512, 8, "2.5GiB"), ("lora", 512, 8, "1.5GiB"), ("lora", 256, 4, "1.4GiB"),
    ("lora", 1024, 4, "1.6GiB"), ("dora", 512, 4, "2GiB"), ("ia3", 512, 8, "1.5GiB"),
    ("full", 512, 4, "3.5GiB"), ("prefix", 512, 4, "1.8GiB"), ("qlora", 512, 4, "2.5GiB"),
]


def job(method: str, length: int) -> list[str]:
    return [f"method.type={method}", f"data.max_length={length}", "data.packing=true"]


def overrides(method: str, length: int, batch: int, budget: str) -> list[str]:
    return [*job(method, length), f"train.batch_size={batch}", f"train.memory_budget={budget}"]


def run_point(base: Path, point: tuple[str, int, int, str], steps: int, scratch: Path, dry: bool
              ) -> dict[str, Any]:
    method, length, batch, budget = point
    extra = overrides(*point)
    cfg = load_config(base, [*extra, f"train.max_steps={steps}"])
    _, choice = fit_memory_budget(cfg)
    assert choice is not None
    row: dict[str, Any] = {"method": method, "max_length": length, "batch_size": batch, "budget": budget,
                           "budget_bytes": choice.budget_bytes, "choice": choice.lines()[0],
                           "predicted_peak_bytes": choice.predicted_peak_bytes}
    if choice.next_faster is not None:
        settings, predicted = choice.next_faster
        row["next_faster"] = {"settings": settings.describe(batch, cfg.train.grad_accum),
                              "predicted_peak_bytes": predicted}
    if dry:
        return row
    name = f"{method}-{length}-{batch}-{budget}"
    run = train_child(base, extra, steps, scratch / name, scratch)
    log = run.pop("log")
    row.update(run, same_choice_in_run=row["choice"] in log, under_budget=under(run, choice.budget_bytes))
    if choice.next_faster is not None:
        explicit = [*job(method, length), *setting_overrides(with_settings(cfg, choice.next_faster[0])),
                    "train.compact_heap=true"]
        faster = train_child(base, explicit, steps, scratch / f"{name}-next-faster", scratch)
        faster.pop("log")
        row["next_faster"].update(faster, under_budget=under(faster, choice.budget_bytes))
    return row


def under(run: dict[str, Any], budget_bytes: int) -> bool:
    return run["exit_code"] == 0 and run["measured_peak_bytes"] <= budget_bytes


def setting_overrides(cfg: RunConfig) -> list[str]:
    """The memory settings of ``cfg`` as explicit overrides (a budget's choice without the budget)."""
    t = cfg.train
    return [f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}",
            f"train.loss_chunk_size={t.loss_chunk_size}", f"train.batch_size={t.batch_size}",
            f"train.grad_accum={t.grad_accum}"]


def train_child(base: Path, extra: list[str], steps: int, run_dir: Path, scratch: Path) -> dict[str, Any]:
    """Train ``steps`` steps in a child process: exit code, peak RSS, tokens/s after the first step, its log."""
    command = [sys.executable, "-m", "tunelab.cli", "train", str(base), *extra,
               *measurement_overrides(steps, str(run_dir)), "--quiet", "--overwrite"]
    code, peak, wall = run_child(command, scratch / "train.log")
    log = (run_dir / "train.log").read_text(encoding="utf-8") if (run_dir / "train.log").is_file() else ""
    later_steps = [r["tokens_per_s"] for r in RunDir(run_dir).read_metrics() if "loss" in r][1:]
    return {"exit_code": code, "measured_peak_bytes": peak, "wall_s": round(wall, 1), "loadavg": os.getloadavg()[0],
            "tokens_per_s": statistics.median(later_steps) if later_steps else None, "log": log}


def markdown(rows: list[dict[str, Any]], command: str, steps: int) -> str:
    lines = ["# train.memory_budget: predicted vs measured vs budget", "",
             f"Measured with `{command}`: the speed job (SmolLM2-135M-Instruct, alpaca-style data, packed, bf16 "
             f"autocast on CPU, compact C heap), {steps} optimizer steps per run; peak RSS of the training process "
             "(os.wait4); tokens/s: median of the steps after the first. Load average (1 min) after each run on "
             "a shared 2-core machine.", "",
             "| method | max len | batch | budget | chosen settings | predicted | measured | under budget "
             "| tokens/s | load |",
             "|---|---:|---:|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        settings = r["choice"].split(": ", 1)[1].split("; predicted")[0]
        lines.append(f"| {r['method']} | {r['max_length']} | {r['batch_size']} | {r['budget']} "
                     f"({r['budget_bytes'] / 2**30:.2f} GiB) | {settings} | {_measured(r)} |")
    lines += ["", "The setting ranked just faster than each choice, which the budget rejected (predicted above "
              "90% of the budget), trained anyway with the same steps and heap:", "",
              "| method | max len | batch | budget | next faster setting | predicted | measured | under budget "
              "| tokens/s | load |", "|---|---:|---:|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        faster = r.get("next_faster")
        if faster is None:
            continue
        lines.append(f"| {r['method']} | {r['max_length']} | {r['batch_size']} | {r['budget']} | "
                     f"{faster['settings']} | {_measured(faster)} |")
    return "\n".join(lines) + "\n"


def _measured(r: dict[str, Any]) -> str:
    """The predicted ... load cells of one run."""
    measured = f"{r['measured_peak_bytes'] / 2**30:.2f} GiB" if r.get("measured_peak_bytes") else "-"
    under = {True: "yes", False: "NO"}.get(r.get("under_budget"), "-")
    load = f"{r['loadavg']:.1f}" if "loadavg" in r else "-"
    speed = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
    return f"{r['predicted_peak_bytes'] / 2**30:.2f} GiB | {measured} | {under} | {speed} | {load}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="enough for the optimizer's states and the "
                        "C heap's later growth (the dynamic heap jumped at step 3)")
    parser.add_argument("--dry-run", action="store_true", help="resolve the budgets only; train nothing")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/memory_budget.py", *argv])
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-budget-") as scratch:
        base = write_job_config(Path(scratch))
        for point in GRID:
            row = run_point(base, point, args.steps, Path(scratch), args.dry_run)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.dry_run:
                write_json(RESULTS / "memory_budget.json", {"command": command, "rows": rows})
                write_text(RESULTS / "memory_budget.md", markdown(rows, command, args.steps))
    print(markdown(rows, command, args.steps))


if __name__ == "__main__":
    main(sys.argv[1:])
