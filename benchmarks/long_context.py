"""Long context: peak memory and tokens/s of SmolLM2 LoRA at 2k to 32k tokens per sequence.

The job per length L: SmolLM2-135M-Instruct, LoRA r=8/alpha=16 on all linear layers,
continued pre-training (stage pt) on blocks of exactly L tokens cut from one long document
(the benchmark's alpaca answers joined), one block per micro-batch, ``--steps`` optimizer
steps, with gradient checkpointing, the chunked LM-head loss (256 rows) and SDPA (one
unpadded row: causal attention without a mask, torch's flash kernel on CPU, memory linear
in L) and the compact C heap at every length (``train.compact_heap: true``; ``auto`` turns
it on past 8,192 tokens): glibc's own heap kept freed activations and grew 2.14 -> 5.48 GiB
from 8k to 16k tokens (``--heap glibc`` measures that heap, faster per step, into its own
table). Beyond SmolLM2's 8,192 trained positions the RoPE is stretched with
``model.rope_scaling: {type: linear, factor: L / 8192}``.

Each length runs ``python -m tunelab.cli train`` in a child process; its peak RSS comes from
``os.wait4`` (:func:`tunelab.estimate.measure.run_child`), its tokens/s from the last step in
metrics.jsonl (the first step also compiles oneDNN kernels). Lengths run in ascending order,
and the next one starts only if the memory available (MemAvailable) exceeds its predicted
peak (``tunelab estimate``) by ``--headroom`` GiB: the machine is shared.

Usage (from the repository root)::

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/long_context.py [--lengths 2048 8192 16384 32768] [--steps 2]
    HF_HUB_OFFLINE=1 python benchmarks/long_context.py --repredict   # new estimates, same measurements
    HF_HUB_OFFLINE=1 python benchmarks/long_context.py --heap glibc --lengths 2048 8192   # glibc's own heap
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import load_config
from tunelab.data.pipeline import DataBundle, build_data, example_lengths
from tunelab.estimate import estimate, parse_target
from tunelab.estimate.measure import run_child
from tunelab.io import write_json, write_text
from tunelab.memory import proc_kib_field_bytes
from tunelab.models.loader import load_tokenizer
from tunelab.runs import RunDir

from speed import DATA, RESULTS  # benchmarks/ is on sys.path when this runs as a script

#: Positions SmolLM2 was trained on (its config's max_position_embeddings).
TRAINED_POSITIONS = 8192


def job(length: int, steps: int, data: Path, output_dir: Path, heap: str) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "method": {"type": "lora", "r": 8, "alpha": 16, "target": "all-linear", "dropout": 0.0},
        "stage": "pt",
        "data": {"train": [str(data)], "max_length": length, "packing": False},
        "train": {"max_steps": steps, "batch_size": 1, "lr": 2e-4, "seed": 42, "log_every": 1,
                  "gradient_checkpointing": True, "loss_chunk_size": 256, "compact_heap": heap == "compact"},
        "output_dir": str(output_dir)}
    if length > TRAINED_POSITIONS:
        tree["model"]["rope_scaling"] = {"type": "linear", "factor": length / TRAINED_POSITIONS}
    return tree


def write_document(path: Path, tokens: int, tokenizer: Any) -> None:
    """One document (the benchmark's alpaca answers, repeated) of exactly ``tokens - 1`` tokens:
    with the eos the pt stage appends, it cuts into blocks of exactly the length, so every
    step trains a whole sequence, never a short remainder."""
    answers = [record["output"] for record in json.loads(DATA.read_text(encoding="utf-8"))]
    corpus = "\n\n".join(answers) + "\n\n"
    text = corpus * (tokens * 6 // len(corpus) + 1)  # more than enough: under 6 characters a token

    def count(chars: int) -> int:
        return len(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])

    low, high = 0, len(text)  # the longest prefix of at most tokens - 1 tokens
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(middle) <= tokens - 1 else (low, middle - 1)
    if count(low) != tokens - 1:
        raise SystemExit(f"no prefix of the document has exactly {tokens - 1} tokens (closest: {count(low)})")
    path.write_text(json.dumps({"text": text[:low]}) + "\n", encoding="utf-8")


def whole_sequences(data: DataBundle, length: int, steps: int) -> None:
    """Stop unless the run's data is ``steps`` examples of exactly ``length`` tokens."""
    lengths = [int(n) for n in example_lengths(data.train)]
    if lengths != [length] * steps:
        raise SystemExit(f"the {length}-token job's examples have {lengths} tokens, not {steps} x {length}")


def predict(length: int, steps: int, scratch: Path, heap: str) -> tuple[Path, int]:
    """Write the job's config and document; return the config and the estimate of its peak."""
    config = scratch / f"len{length}.yaml"
    data = scratch / f"doc{length}.jsonl"
    config.write_text(yaml.safe_dump(job(length, steps, data, scratch / f"run{length}", heap)), encoding="utf-8")
    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model)
    write_document(data, length * steps, tokenizer)
    tokenized = build_data(cfg, tokenizer)  # once: checked here, then estimated
    whole_sequences(tokenized, length, steps)
    return config, estimate(cfg, parse_target("cpu"), data=tokenized).peak_bytes


def measure(length: int, steps: int, scratch: Path, headroom: float, heap: str) -> dict[str, Any]:
    config, predicted = predict(length, steps, scratch, heap)
    run_dir = scratch / f"run{length}"
    available = proc_kib_field_bytes("/proc/meminfo", "MemAvailable") or 0
    row: dict[str, Any] = {"length": length, "predicted_peak_bytes": predicted, "available_bytes": available,
                           "loadavg_before": os.getloadavg()[0]}
    if available < predicted + headroom * 2**30:
        row["skipped"] = (f"{available / 2**30:.1f} GiB available, predicted peak {predicted / 2**30:.2f} GiB "
                          f"+ {headroom} GiB headroom")
        return row
    command = [sys.executable, "-m", "tunelab.cli", "train", str(config), "--quiet", "--overwrite"]
    code, peak, wall = run_child(command, scratch / f"len{length}.log")
    if code != 0:
        row["failed"] = (scratch / f"len{length}.log").read_text(encoding="utf-8", errors="replace")[-800:]
        return row
    steps_rows = [r for r in RunDir(run_dir).read_metrics() if "loss" in r]
    row.update(measured_peak_bytes=peak, wall_s=round(wall, 1), tokens_per_s=steps_rows[-1]["tokens_per_s"],
               losses=[r["loss"] for r in steps_rows], loadavg_after=os.getloadavg()[0])
    return row


def markdown(rows: list[dict[str, Any]], command: str, heap: str) -> str:
    heap_text = "compact C heap" if heap == "compact" else "glibc's own heap"
    lines = ["# Long context: SmolLM2-135M LoRA, one sequence per step", "",
             f"Measured with `{command}`; LoRA r8 all-linear, stage pt, batch 1, gradient checkpointing, "
             f"loss chunks of 256, SDPA, bf16 autocast on CPU, {heap_text}; linear RoPE scaling beyond 8,192 "
             "positions. Peak RSS of the training process (os.wait4); tokens/s of the last step. Load average (1 min) "
             "before/after each length on a shared 2-core machine.", "",
             "| tokens/sequence | predicted peak | measured peak | per 1k tokens over 2k | tokens/s | load |",
             "|---:|---:|---:|---:|---:|---|"]
    first = next((r for r in rows if "measured_peak_bytes" in r), None)
    for r in rows:
        if "measured_peak_bytes" not in r:
            lines.append(f"| {r['length']} | {r['predicted_peak_bytes'] / 2**30:.2f} GiB | "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'failed'} | | | |")
            continue
        slope = ""
        if first is not None and r is not first:
            growth = (r["measured_peak_bytes"] - first["measured_peak_bytes"]) / 2**20
            slope = f"{growth / ((r['length'] - first['length']) / 1000):.0f} MiB"
        lines.append(f"| {r['length']} | {r['predicted_peak_bytes'] / 2**30:.2f} GiB | "
                     f"{r['measured_peak_bytes'] / 2**30:.2f} GiB | {slope} | {r['tokens_per_s']:.0f} | "
                     f"{r['loadavg_before']:.1f}/{r['loadavg_after']:.1f} |")
    return "\n".join(lines) + "\n"


def results(heap: str) -> tuple[Path, Path]:
    """The json and markdown files of one heap's table."""
    stem = "long_context" if heap == "compact" else "long_context-glibc-heap"
    return RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"


def repredict(heap: str) -> None:
    """The stored measurements against the estimator as it is now (their own steps per length)."""
    raw, table = results(heap)
    stored = json.loads(raw.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="tunelab-long-") as scratch:
        for row in stored["rows"]:
            row["predicted_peak_bytes"] = predict(row["length"], len(row.get("losses") or [1]), Path(scratch),
                                                  heap)[1]
    write_json(raw, stored)
    write_text(table, markdown(stored["rows"], stored["command"].strip(), heap))
    print(markdown(stored["rows"], stored["command"].strip(), heap))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--headroom", type=float, default=3.0, help="GiB kept free for the other users")
    parser.add_argument("--keep", action="store_true", help="keep the stored rows of other lengths")
    parser.add_argument("--repredict", action="store_true",
                        help="train nothing: estimate the stored rows again (after a change to the estimator)")
    parser.add_argument("--heap", choices=("compact", "glibc"), default="compact",
                        help="train.compact_heap true (the table's runs), or false: glibc's own heap, faster "
                             "per step, into long_context-glibc-heap.md")
    args = parser.parse_args(argv)
    if args.repredict:
        return repredict(args.heap)
    raw, table = results(args.heap)
    command = "python benchmarks/long_context.py " + " ".join(argv)
    stored = json.loads(raw.read_text(encoding="utf-8")) if args.keep else {"rows": []}
    rows: list[dict[str, Any]] = [r for r in stored["rows"] if r["length"] not in args.lengths]
    with tempfile.TemporaryDirectory(prefix="tunelab-long-") as scratch:
        for length in sorted(args.lengths):
            started = time.perf_counter()
            row = measure(length, args.steps, Path(scratch), args.headroom, args.heap)
            rows.append(row)
            rows.sort(key=lambda r: r["length"])
            shown = {k: v for k, v in row.items() if k != "failed"}
            print(json.dumps(shown), f"({time.perf_counter() - started:.0f}s)", flush=True)
            write_json(raw, {"command": command, "rows": rows})
            write_text(table, markdown(rows, command.strip(), args.heap))
            if "measured_peak_bytes" not in row:
                print(row.get("failed") or row.get("skipped"), flush=True)
                break
    print(markdown(rows, command.strip(), args.heap))


if __name__ == "__main__":
    main(sys.argv[1:])
