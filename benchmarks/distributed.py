"""Data parallelism on CPU with SmolLM2-135M-Instruct: throughput and per-rank memory.

1. Throughput: LoRA r=8 on all linear layers, SFT on benchmarks/data/alpaca_bench.json, max
   length 256, micro-batch 4, the same global batch of 8 examples per step either way:
   - 1 process x 2 threads, ``train.grad_accum: 2`` (``OMP_NUM_THREADS=2 tunelab train ...``);
   - 2 processes x 1 thread, ``train.grad_accum: 1`` (``OMP_NUM_THREADS=1 tunelab train ...
     --nproc-per-node 2``: torchrun, gloo, DDP).
   Reported: the median of the per-step tokens/s logged in ``metrics.jsonl`` (first step,
   which includes warm-up, left out), and the mean train loss (the same examples are read
   in the same steps, so it should agree to rounding).
2. Memory of full fine-tuning (fp32, AdamW) under DDP and under FSDP2, 2 processes: on each
   rank, after the last optimizer step, the bytes of the parameters, gradients (one per
   trainable parameter, as at the step's peak) and optimizer state that rank holds (an
   FSDP2 shard's local tensor; a replica's whole tensor), and the rank's peak RSS (which
   also holds activations, the code and the data).

Usage: ``python benchmarks/distributed.py [--steps 6] [--memory-steps 2]``. Prints the
tables and the load average, and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "alpaca_bench.json"
WORK = ROOT / "runs" / "bench-distributed"
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
MODEL = "smollm2-135m-instruct"


def _config(model: str, name: str, method: dict, train: dict, max_length: int) -> Path:
    tree = {"model": {"name_or_path": model}, "method": method, "stage": "sft",
            "data": {"train": [str(DATA)], "max_length": max_length},
            "train": {"lr": 2e-4, "log_every": 1, **train}, "output_dir": str(WORK / name)}
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _run(command: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    print("$", f"OMP_NUM_THREADS={threads}", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def throughput(model: str, steps: int) -> list[dict]:
    lora = {"type": "lora", "r": 8, "alpha": 16, "target": "all-linear"}
    rows = []
    for name, processes, accum in (("1proc-2threads", 1, 2), ("2procs-1thread", 2, 1)):
        config = _config(model, name, lora, {"batch_size": 4, "grad_accum": accum, "max_steps": steps}, 256)
        command = [sys.executable, "-m", "tunelab.cli", "train", str(config), "--quiet", "--overwrite"]
        _run(command + (["--nproc-per-node", str(processes)] if processes > 1 else []), 2 // processes)
        logged = [json.loads(line) for line in (WORK / name / "metrics.jsonl").read_text().splitlines()]
        logged = [row for row in logged if "loss" in row]
        rows.append({"variant": name, "processes": processes, "threads_each": 2 // processes,
                     "grad_accum": accum, "steps": len(logged),
                     "tokens_per_s": statistics.median(row["tokens_per_s"] for row in logged[1:]),
                     "mean_loss": statistics.fmean(row["loss"] for row in logged)})
    return rows


def memory(model: str, steps: int) -> list[dict]:
    rows = []
    for strategy in ("ddp", "fsdp"):
        name = f"full-{strategy}"
        config = _config(model, name, {"type": "full"}, {"batch_size": 2, "max_steps": steps, "precision": "fp32",
                                                  "distributed": strategy}, 128)
        out = WORK / f"{name}-memory"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
              "--worker", str(config), str(out)], 1)
        for rank in (0, 1):
            rows.append({"strategy": strategy, "rank": rank,
                         **json.loads((out.parent / f"{out.name}-rank{rank}.json").read_text())})
    return rows


def worker(config: str, out: str) -> None:
    """One rank of a memory run: train, and measure what this rank holds before the final save."""
    import torch
    from torch.distributed.tensor import DTensor

    from tunelab.config import load_config
    from tunelab.train.loop import Trainer

    def local_bytes(tensor: torch.Tensor) -> int:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return tensor.numel() * tensor.element_size()

    class Measured(Trainer):
        def save(self) -> None:
            params = {id(p): p for p in self.model.parameters()}.values()
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            self.measured = {
                "params_bytes": sum(local_bytes(p) for p in params),
                "grads_bytes": sum(local_bytes(p) for p in params if p.requires_grad),
                "optimizer_bytes": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                                       if torch.is_tensor(v)),
            }
            super().save()

    trainer = Measured(load_config(config, []), overwrite=True, progress=False)
    result = trainer.run()
    state = trainer.measured
    state["state_bytes"] = state["params_bytes"] + state["grads_bytes"] + state["optimizer_bytes"]
    Path(f"{out}-rank{trainer.rank}.json").write_text(json.dumps({**state, "peak_rss_bytes": result.peak_memory_bytes,
                                                                  "tokens_per_s": result.tokens_per_s}))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="another base model (a tiny one checks the script quickly)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    speed, state = throughput(args.model, args.steps), memory(args.model, args.memory_steps)
    load_after = os.getloadavg()
    print(f"\nload average (1/5/15 min): before {load_before}, after {load_after}")
    print("\n| launch | grad_accum | steps | tokens/s (median) | mean loss |\n|---|---|---|---|---|")
    for row in speed:
        print(f"| {row['processes']} process(es) x {row['threads_each']} thread(s) | {row['grad_accum']} | "
              f"{row['steps']} | {row['tokens_per_s']:.0f} | {row['mean_loss']:.4f} |")
    print("\n| full FT, fp32 | rank | params GiB | grads GiB | AdamW GiB | sum GiB | peak RSS GiB |\n"
          "|---|---|---|---|---|---|---|")
    for row in state:
        print(f"| {row['strategy']} | {row['rank']} | {_gib(row['params_bytes'])} | {_gib(row['grads_bytes'])} | "
              f"{_gib(row['optimizer_bytes'])} | {_gib(row['state_bytes'])} | {_gib(row['peak_rss_bytes'])} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"load_before": load_before, "load_after": load_after, "throughput": speed,
                                   "memory": state}, indent=2))


if __name__ == "__main__":
    main()
