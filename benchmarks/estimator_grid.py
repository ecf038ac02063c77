"""Check ``tunelab estimate`` against measured peaks over a grid of real SmolLM2 runs.

Each grid point is one ``tunelab estimate --measure``: the estimate of a 3-step run and
that run trained in a child process (``python -m tunelab.cli train``), whose peak
resident set size is read with ``os.wait4``. The table (config, predicted, measured,
error %) goes to benchmarks/results/estimator_grid.md and the raw numbers to
estimator_grid.json.

``--fit`` searches the :class:`tunelab.estimate.Calibration` constants that minimise the
largest absolute error over the measured points (``--fit heap``: only those of the C heap),
re-evaluating the formula only (nothing is retrained), and prints them; copy them into
``Calibration``'s defaults. ``--reuse`` skips the measurements and uses the stored peaks.

``--heap compact`` measures the same points with ``train.compact_heap=true`` (the C heap a
memory-budgeted run gets, :mod:`tunelab.heap`) into estimator_grid-compact.{md,json}, and its
``--fit`` searches only the heap constants of :data:`tunelab.estimate.formula.COMPACT_HEAP_CALIBRATION`
(what glibc's heap keeps beyond the live tensors), the others fixed at ``Calibration``'s.

Usage (from the repository root; 6-25 s per 3-step point and about 2 min per 50-step point on
2 shared cores)::

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/estimator_grid.py [--only lora] [--fit [heap]] [--reuse] [--heap compact]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from tunelab.config import load_config
from tunelab.estimate import Calibration, error_pct, estimate, parse_target
from tunelab.estimate.formula import default_calibration
from tunelab.estimate.measure import MEASURE_STEPS, measure_run, steps_override
from tunelab.io import write_json, write_text

from speed import RESULTS, write_job_config  # benchmarks/ is on sys.path when this runs as a script

TOLERANCE_PCT = 10.0

#: (method, max_length, batch size, gradient checkpointing, packing, optimizer steps). Prefix
#: tuning cannot use gradient checkpointing (its prefixes travel as cached keys/values). The
#: two 50-step runs (the whole epoch) show what grows over a run (oneDNN's kernel cache); the
#: 24-step packed runs meet a new micro-batch width at almost every step, as the small
#: micro-batches of a memory budget's split do.
Point = tuple[str, int, int, bool, bool, int]
GRID: list[Point] = [
    *[("lora", length, batch, gc, True, MEASURE_STEPS)
      for length, batch, gc in itertools.product((128, 512), (1, 4), (False, True))],
    ("lora", 512, 4, False, False, MEASURE_STEPS),
    ("full", 512, 4, False, True, MEASURE_STEPS), ("full", 512, 4, True, True, MEASURE_STEPS),
    ("full", 128, 1, False, True, MEASURE_STEPS),
    ("freeze", 512, 4, False, True, MEASURE_STEPS), ("freeze", 128, 4, True, True, MEASURE_STEPS),
    ("prefix", 512, 4, False, True, MEASURE_STEPS), ("prefix", 128, 1, False, True, MEASURE_STEPS),
    ("ia3", 512, 4, False, True, MEASURE_STEPS), ("ia3", 512, 1, True, True, MEASURE_STEPS),
    ("lora", 512, 4, False, False, 50), ("lora", 512, 4, True, False, 50), ("lora", 512, 2, False, True, 24),
    ("qlora", 512, 4, False, True, MEASURE_STEPS), ("qlora", 256, 2, True, True, MEASURE_STEPS),
]
#: Held out: measured and reported, never used by ``--fit`` (checks that the fit generalises).
HOLDOUT: list[Point] = [
    (method, length, batch, gc, packing, MEASURE_STEPS) for method, length, batch, gc, packing in (
        ("dora", 512, 4, False, True), ("lora", 128, 4, False, False), ("full", 128, 4, True, True),
        ("ia3", 128, 4, False, True), ("prompt", 512, 4, False, True), ("houlsby", 512, 4, False, True),
        ("freeze", 512, 1, False, True), ("prefix", 256, 2, False, True), ("qlora", 128, 4, False, True))
] + [("ia3", 256, 2, False, True, 24)]


def name(point: Point) -> str:
    method, length, batch, gc, packing, steps = point
    long = f" {steps} steps" if steps != MEASURE_STEPS else ""
    return f"{method} len{length} bs{batch}{' gc' if gc else ''}{'' if packing else ' padded'}{long}"


def overrides(point: Point, compact: bool) -> list[str]:
    method, length, batch, gc, packing, _ = point
    return [f"method.type={method}", f"data.max_length={length}", f"train.batch_size={batch}",
            f"train.gradient_checkpointing={str(gc).lower()}", f"data.packing={str(packing).lower()}",
            f"train.compact_heap={str(compact).lower()}"]


def predict(base: Path, point: Point, compact: bool):
    cfg = load_config(base, [*overrides(point, compact), steps_override(point[-1])])
    return estimate(cfg, parse_target("cpu"))


def run_grid(base: Path, points: list[Point], previous: dict[str, Any], raw_file: Path, compact: bool
             ) -> dict[str, Any]:
    """Measure ``points``; each measurement is stored at once, so an interrupted grid keeps them."""
    rows = dict(previous)
    for point in points:
        started = time.perf_counter()
        measured = measure_run(str(base), overrides(point, compact), point[-1], "cpu")
        rows[name(point)] = {"overrides": overrides(point, compact), "measured_peak_bytes": measured.peak_bytes,
                             "wall_s": round(measured.wall_s, 1), "tokens_per_s": measured.tokens_per_s,
                             "loadavg": os.getloadavg()[0], "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        stored = json.loads(raw_file.read_text(encoding="utf-8")) if raw_file.is_file() else {}
        write_json(raw_file, {**stored, "measured": rows})
        print(f"{name(point)}: measured {measured.peak_bytes / 2**30:.2f} GiB "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    return rows


def evaluate(rows: dict[str, Any], points: list, calibration: Calibration) -> list[dict[str, Any]]:
    """Predicted vs measured for every measured point under ``calibration``."""
    table = []
    for point in points:
        row = rows.get(name(point))
        if row is None:
            continue
        result = _estimates[name(point)].evaluate(calibration)
        table.append({"config": name(point) + ("" if "measured_at" in row else " (*)"),
                      "predicted": result.total, "measured": row["measured_peak_bytes"],
                      "error_pct": error_pct(result.total, row["measured_peak_bytes"]),
                      "breakdown": result.terms})
    return table


#: Estimates by grid point name, built once; ``fit`` re-evaluates only their formula.
_estimates: dict[str, Any] = {}


def fit(rows: dict[str, Any], points: list, heap_only: bool) -> Calibration:
    """Grid search of the calibration constants: smallest worst absolute error, then smallest mean.

    The backward transient is at least half a layer's activations (the gradients of the
    layer being differentiated exist next to its saved inputs), so 0 is not offered even
    where the LM-head term hides it on SmolLM2.

    The quantization slack and the unfused-LoRA allocator extra only move quantized runs, so
    they are searched second, with the other constants fixed (a joint search would multiply
    the grid by their sizes for nothing). ``heap_only`` searches just the constants of what
    the C heap keeps (allocator slack, kernel cache per shape, the two quantization ones) and
    keeps ``Calibration``'s others: the compact heap's fit, or glibc's on a new machine.
    """
    float_points = [p for p in points if p[0] != "qlora"]
    best, best_score = Calibration(), (float("inf"), float("inf"))
    for candidate in (_heap_candidates() if heap_only else _float_candidates()):
        best, best_score = _better(rows, float_points, candidate, best, best_score)
    floats, best_score = best, (float("inf"), float("inf"))
    for slack, unfused in itertools.product((0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
                                            (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)):
        candidate = dataclasses.replace(floats, quantization_slack_factor=slack, unfused_allocator_extra=unfused)
        best, best_score = _better(rows, points, candidate, best, best_score)
    print(f"best calibration: {best} (worst error {best_score[0]:.1f}%, mean {best_score[1]:.1f}%)")
    return best


def _float_candidates() -> Iterator[Calibration]:
    for loss, backward, runtime, cache, allocator, files, reorder in itertools.product(
            (12.0, 14.0, 16.0, 18.0), (0.5,), range(0, 140, 20), range(20, 70, 10),
            (1.1, 1.2, 1.3, 1.4, 1.5), (0.85, 0.9, 0.95), (0.0, 0.25, 0.5, 0.75, 1.0)):
        yield Calibration(loss, backward, runtime * 2**20, cache * 2**20, allocator, files, reorder)


def _heap_candidates() -> Iterator[Calibration]:
    """The heap's constants: what it keeps beyond the live tensors, from nothing up."""
    for cache, allocator in itertools.product(range(0, 70, 5), (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5)):
        yield dataclasses.replace(Calibration(), kernel_cache_bytes_per_shape=cache * 2**20, allocator_factor=allocator)


def _better(rows: dict[str, Any], points: list, candidate: Calibration, best: Calibration,
            best_score: tuple[float, float]) -> tuple[Calibration, tuple[float, float]]:
    """``candidate`` and its score if it beats ``best`` on ``points`` (worst |error|, then mean)."""
    errors = [abs(r["error_pct"]) for r in evaluate(rows, points, candidate)]
    score = (round(max(errors), 1), sum(errors) / len(errors))
    return (candidate, score) if score < best_score else (best, best_score)


def markdown(table: list[dict[str, Any]], holdout: list[dict[str, Any]], calibration: Calibration,
             compact: bool) -> str:
    heap = ("on the compact C heap (`train.compact_heap=true`, a memory-budgeted run's)" if compact
            else "on glibc's default heap")
    flag = " --heap compact" if compact else ""
    lines = [f"# Estimator grid: predicted vs measured peak memory, {heap}", "",
             f"SmolLM2-135M-Instruct, {MEASURE_STEPS} optimizer steps per run unless named, "
             "benchmarks/data/alpaca_bench.json, "
             "CPU (peak RSS of the training process via os.wait4), bf16 autocast.",
             f"Measured with `HF_HUB_OFFLINE=1 python benchmarks/estimator_grid.py{flag}` (every point, 6-14 min "
             "on 2 quiet cores, over an hour at load 10-15); the calibration was fitted on the first table only "
             f"(`--reuse --fit{flag}`). (*): measured by an earlier invocation of this script and not again since "
             "(the .json file beside this table has each point's `measured_at` and load average). "
             f"Calibration: `{calibration}`.", "",
             "| config | predicted | measured | error % |", "|---|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['config']} | {row['predicted'] / 2**30:.2f} GiB | {row['measured'] / 2**30:.2f} GiB | "
                     f"{row['error_pct']:+.1f} |")
    lines += ["", _verdict(table)]
    if holdout:
        lines += ["", "Held out (never used to fit the calibration):", "",
                  "| config | predicted | measured | error % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['config']} | {r['predicted'] / 2**30:.2f} GiB | {r['measured'] / 2**30:.2f} GiB | "
                  f"{r['error_pct']:+.1f} |" for r in holdout]
        lines += ["", _verdict(holdout)]
    return "\n".join(lines) + "\n"


def _verdict(table: list[dict[str, Any]]) -> str:
    worst = max((abs(r["error_pct"]) for r in table), default=0.0)
    inside = sum(abs(r["error_pct"]) <= TOLERANCE_PCT for r in table)
    return f"{inside} of {len(table)} within +-{TOLERANCE_PCT:.0f}%; worst |error| {worst:.1f}%."


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="measure only points whose name contains one of these texts")
    parser.add_argument("--holdout-only", action="store_true", help="measure only the held-out points")
    parser.add_argument("--fit", nargs="?", const="all", choices=("all", "heap"),
                        help="search calibration constants after measuring: all of them, or the C heap's only "
                             "(always the heap's with --heap compact)")
    parser.add_argument("--reuse", action="store_true", help="do not measure; use the stored peaks")
    parser.add_argument("--heap", choices=("glibc", "compact"), default="glibc",
                        help="the C heap of the runs: glibc's default, or train.compact_heap (a budgeted run's)")
    args = parser.parse_args(argv)
    compact = args.heap == "compact"
    stem = "estimator_grid-compact" if compact else "estimator_grid"
    selected = HOLDOUT if args.holdout_only else GRID + HOLDOUT
    to_measure = [] if args.reuse else [p for p in selected
                                        if not args.only or any(text in name(p) for text in args.only)]
    raw_file = RESULTS / f"{stem}.json"
    previous = json.loads(raw_file.read_text(encoding="utf-8"))["measured"] if raw_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="tunelab-grid-") as scratch:
        base = write_job_config(Path(scratch))
        rows = run_grid(base, to_measure, previous, raw_file, compact)
        for point in GRID + HOLDOUT:
            if name(point) in rows:
                _estimates[name(point)] = predict(base, point, compact)
    calibration = fit(rows, GRID, compact or args.fit == "heap") if args.fit else default_calibration(compact)
    table, holdout = evaluate(rows, GRID, calibration), evaluate(rows, HOLDOUT, calibration)
    write_json(raw_file, {"measured": rows, "calibration": dataclasses.asdict(calibration), "table": table,
                          "holdout": holdout})
    write_text(RESULTS / f"{stem}.md", markdown(table, holdout, calibration, compact))
    print(markdown(table, holdout, calibration, compact))


if __name__ == "__main__":
    main(sys.argv[1:])
