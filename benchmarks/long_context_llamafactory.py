"""LLaMA-Factory on the long-context job of ``long_context.py``, for a side-by-side table.

The job per length L, as close to tunelab's as LLaMA-Factory's options allow: SmolLM2-135M-Instruct
(the same local checkpoint), LoRA r=8/alpha=16/dropout 0 on all linear layers, stage pt on one
document of exactly L tokens with its end-of-text token (``long_context.write_document``), one
sequence per step, ``--steps`` steps, bf16 autocast on the CPU (``bf16`` with ``use_cpu``), and
LLaMA-Factory's own defaults otherwise: gradient checkpointing on, SDPA, the base weights in the
checkpoint's dtype (fp32; tunelab holds a frozen base in bf16), an unchunked loss. Its packing
cuts blocks of ``cutoff_len - 1`` tokens, so ``cutoff_len`` is L + 1; the script checks in its
log that each step saw exactly L tokens.

Past SmolLM2's 8,192 trained positions LLaMA-Factory stretches the RoPE linearly by
``ceil(L / 8192)`` (its ``rope_scaling: linear``). In 0.9.5 with transformers 5.x that option
fails while the model loads (it sets ``max_position_embeddings`` to a float, and replacing
``rope_scaling`` drops the checkpoint's ``rope_theta``), so the script gives it a model directory
whose config already carries that scaling, its other files linked to the original.

Peak RSS of the training process from ``os.wait4`` (:func:`tunelab.estimate.measure.run_child`);
tokens/s = ``num_input_tokens_seen / train_runtime`` from LLaMA-Factory's log (its trainer's
wall time: the steps, their first-shape kernel compilation included, not the model load).

LLaMA-Factory is not a dependency of tunelab: install it into a virtual environment of its own,
CPU torch first so that nothing pulls a CUDA build, and pass its ``llamafactory-cli``::

    python3.11 -m venv /tmp/lf-venv
    /tmp/lf-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/lf-constraints.txt
    /tmp/lf-venv/bin/pip install llamafactory==0.9.5 --constraint /tmp/lf-constraints.txt
    # PyPI's torchvision/torchaudio wheels here are CUDA builds that fail to import beside CPU
    # torch; LLaMA-Factory's text training needs neither (it imports torchaudio, so keep the
    # package and drop its compiled extensions):
    /tmp/lf-venv/bin/pip uninstall -y torchvision
    rm /tmp/lf-venv/lib/python3.11/site-packages/torchaudio/lib/*.so

    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/long_context_llamafactory.py --cli /tmp/lf-venv/bin/llamafactory-cli \\
        [--lengths 2048 8192 16384] [--steps 1]

Table: tokens per sequence, peak RSS, tokens/s, wall time; to
benchmarks/results/long_context_llamafactory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import ModelConfig
from tunelab.estimate.measure import run_child
from tunelab.io import write_json, write_text
from tunelab.models.loader import load_tokenizer, model_directory

from long_context import TRAINED_POSITIONS, write_document
from speed import RESULTS  # benchmarks/ is on sys.path when this runs as a script

#: LLaMA-Factory's environment: no hub, no trackers, no refusal of the installed transformers.
LF_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
          "TOKENIZERS_PARALLELISM": "false"}
_METRIC = re.compile(r"'(train_runtime|num_input_tokens_seen|train_loss)': '?([\d.]+)'?")


def model_for(length: int, scratch: Path) -> Path:
    """SmolLM2's directory, or beyond its trained positions a copy of its config with linear RoPE
    scaling by ceil(length / 8192) (what LLaMA-Factory's rope_scaling sets) and links to the rest."""
    source = Path(model_directory(ModelConfig(name_or_path="smollm2-135m-instruct")))
    factor = math.ceil(length / TRAINED_POSITIONS)
    if factor == 1:
        return source
    target = scratch / f"model-rope-x{factor}"
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json" and not (target / item.name).exists():
            (target / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "linear", "factor": float(factor)}
    config["max_position_embeddings"] = config["max_position_embeddings"] * factor
    (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return target


def job(length: int, steps: int, model: Path, data_dir: Path, output_dir: Path) -> dict[str, Any]:
    return {"model_name_or_path": str(model), "stage": "pt", "do_train": True, "finetuning_type": "lora",
            "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all",
            "dataset": "doc", "dataset_dir": str(data_dir), "cutoff_len": length + 1, "packing": True,
            "overwrite_cache": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
            "max_steps": steps, "learning_rate": 2.0e-4, "lr_scheduler_type": "constant", "bf16": True,
            "use_cpu": True, "dataloader_num_workers": 0, "include_num_input_tokens_seen": True,
            "logging_steps": 1, "save_strategy": "no", "report_to": "none", "plot_loss": False,
            "output_dir": str(output_dir), "overwrite_output_dir": True}


def measure(cli: str, length: int, steps: int, scratch: Path) -> dict[str, Any]:
    data_dir = scratch / f"data{length}"
    data_dir.mkdir()
    write_document(data_dir / "doc.jsonl", length * steps, load_tokenizer(ModelConfig()))
    (data_dir / "dataset_info.json").write_text(json.dumps(
        {"doc": {"file_name": "doc.jsonl", "columns": {"prompt": "text"}}}), encoding="utf-8")
    config = scratch / f"len{length}.yaml"
    config.write_text(yaml.safe_dump(job(length, steps, model_for(length, scratch), data_dir,
                                         scratch / f"out{length}")), encoding="utf-8")
    log = scratch / f"len{length}.log"
    code, peak, wall = run_child([cli, "train", str(config)], log, env={**os.environ, **LF_ENV})
    text = log.read_text(encoding="utf-8", errors="replace")
    row: dict[str, Any] = {"length": length, "exit_code": code, "wall_s": round(wall, 1),
                           "loadavg_after": os.getloadavg()[0]}
    metrics = dict(_METRIC.findall(text))
    if code != 0 or "train_runtime" not in metrics:
        row["failed"] = text[-800:]
        return row
    seen = int(float(metrics["num_input_tokens_seen"]))
    if seen != length * steps:
        raise SystemExit(f"LLaMA-Factory saw {seen} tokens, not {steps} x {length}: its packing changed")
    runtime = float(metrics["train_runtime"])
    row.update(measured_peak_bytes=peak, train_runtime_s=runtime, tokens_per_s=seen / runtime,
               loss=float(metrics["train_loss"]))
    return row


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = ["# Long context: LLaMA-Factory on the same job", "",
             f"Measured with `{command}`: LoRA r8 all-linear, stage pt, one sequence of exactly L tokens per "
             "step, bf16 autocast on CPU, LLaMA-Factory's defaults otherwise (gradient checkpointing, SDPA, fp32 "
             "base weights, unchunked loss); linear RoPE scaling by ceil(L / 8192) beyond 8,192 positions. Peak "
             "RSS of the training process (os.wait4); tokens/s from its own train_runtime.", "",
             "| tokens/sequence | measured peak | tokens/s | wall | load after |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "measured_peak_bytes" not in r:
            lines.append(f"| {r['length']} | failed (exit {r['exit_code']}) | | {r['wall_s']:.0f} s | |")
            continue
        lines.append(f"| {r['length']} | {r['measured_peak_bytes'] / 2**30:.2f} GiB | {r['tokens_per_s']:.0f} | "
                     f"{r['wall_s']:.0f} s | {r['loadavg_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cli", required=True, help="LLaMA-Factory's llamafactory-cli (in its own venv)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    if not os.access(args.cli, os.X_OK):
        parser.error(f"--cli {args.cli}: no executable there; install LLaMA-Factory into a venv of its own as "
                     "this script's docstring shows and pass its bin/llamafactory-cli")
    command = "python benchmarks/long_context_llamafactory.py " + " ".join(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-lf-long-") as scratch:
        for length in sorted(args.lengths):
            started = time.perf_counter()
            row = measure(args.cli, length, args.steps, Path(scratch))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "failed"}),
                  f"({time.perf_counter() - started:.0f}s)", flush=True)
            write_json(RESULTS / "long_context_llamafactory.json", {"command": command, "rows": rows})
            write_text(RESULTS / "long_context_llamafactory.md", markdown(rows, command))
            if "failed" in row:
                print(row["failed"], flush=True)
                break
    print(markdown(rows, command))


if __name__ == "__main__":
    main(sys.argv[1:])
