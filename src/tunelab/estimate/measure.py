"""Measure a run's real peak memory: a few training steps in a child process.

Why a subprocess: the peak resident set size of a process only ever grows, so measuring
inside the estimating process would include whatever it had loaded before (and the
estimator itself imports the whole stack). A fresh ``python -m tunelab.cli train`` with
``train.max_steps`` and a temporary ``output_dir`` is exactly the user's run, cut short;
``os.wait4`` returns the peak RSS of that child alone. On CUDA the child's own
``torch.cuda.max_memory_allocated`` (logged in metrics.jsonl) is the measured value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.memory import maxrss_bytes
from tunelab.runs import RunDir

#: Environment defaults for the child. libgomp's default busy-waiting makes every
#: elementwise op 10-70x slower when the cores are shared with other processes
#: (measured on the 2-core CI machine); passive waiting costs nothing when they are not.
CHILD_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    wall_s: float
    steps: int
    tokens_per_s: float | None
    final_loss: float | None


#: Optimizer steps of a measurement run: step 1 creates the optimizer states, so the
#: later steps run with everything a long run holds.
MEASURE_STEPS = 3


def steps_override(steps: int) -> str:
    return f"train.max_steps={steps}"


def measurement_overrides(steps: int, output_dir: str) -> list[str]:
    """Overrides that turn a run into a short measurement run (no checkpoints, scratch output)."""
    return [steps_override(steps), f"output_dir={output_dir}", "train.save_every=null"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHILD_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def _last_metrics(run_dir: Path) -> dict:
    train_rows = [row for row in RunDir(run_dir).read_metrics() if "loss" in row]
    return train_rows[-1] if train_rows else {}


#: Runs the command given in argv[2:] and writes its exit status and peak RSS (KiB) as
#: JSON to argv[1]. Why a launcher: Linux folds the memory image a process had before
#: ``exec`` into its ``ru_maxrss``, and a child forked straight from this process starts
#: as a copy of it (torch and everything the estimator loaded), so small runs would
#: report this process's size. Forked from the launcher, a ~10 MB interpreter, the
#: grandchild's peak is its own.
_LAUNCHER = ("import json, os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "with open(sys.argv[1], 'w') as out:\n"
             "    json.dump({'code': os.waitstatus_to_exitcode(status), 'maxrss': usage.ru_maxrss}, out)\n")


def run_child(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, int, float]:
    """Run ``command`` with its output in ``log``; return (exit code, its peak RSS in bytes, wall seconds)."""
    started = time.perf_counter()
    report = log.with_name(log.name + ".rusage.json")
    with open(log, "w", encoding="utf-8") as handle:
        launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *command], stdout=handle,
                                  stderr=subprocess.STDOUT, env=child_env() if env is None else env)
    if launcher.returncode != 0 or not report.is_file():
        return launcher.returncode or 1, 0, time.perf_counter() - started
    usage = json.loads(report.read_text(encoding="utf-8"))
    return usage["code"], maxrss_bytes(usage["maxrss"]), time.perf_counter() - started


def measure_run(config: str, overrides: list[str], steps: int, device: str) -> Measurement:
    """Train ``steps`` steps of the run in a child process and return its peak memory."""
    with tempfile.TemporaryDirectory(prefix="tunelab-measure-") as scratch:
        run_dir = Path(scratch) / "run"
        command = [sys.executable, "-m", "tunelab.cli", "train", config, *overrides,
                   *measurement_overrides(steps, str(run_dir)), "--quiet", "--overwrite"]
        code, peak_rss, wall = run_child(command, Path(scratch) / "train.log")
        if code != 0:
            tail = (Path(scratch) / "train.log").read_text(encoding="utf-8", errors="replace")[-1500:]
            raise TunelabError(f"--measure: the {steps}-step training run failed (exit {code}); the estimate above "
                               f"is unverified. Its output ended with:\n{tail}")
        last = _last_metrics(run_dir)
    peak = int(last.get("peak_memory_bytes", 0)) if device == "cuda" else peak_rss
    return Measurement(peak_bytes=peak, wall_s=wall, steps=steps, tokens_per_s=last.get("tokens_per_s"),
                       final_loss=last.get("loss"))
