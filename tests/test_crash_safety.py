"""SIGKILL a training run at chosen points; after each kill, every finished file loads and
`--resume` ends at the weights of a run that was never interrupted.

The kills are exact, not timed: the run is started through a small launcher that wraps
``os.replace`` (the step that publishes every atomic write) and SIGKILLs its own process just
before or just after the rename of a given name. A SIGKILL cannot be caught, so nothing in
tunelab can clean up: the files are what a power cut or the OOM killer would leave.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.runs import RunDir

runner = CliRunner()

LAUNCHER = '''
import os
import signal
import sys

when, name = sys.argv[1], sys.argv[2]
rename = os.replace


def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(os.fspath(dst)) == name
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
from tunelab.cli import app

app(sys.argv[3:], prog_name="tunelab")
'''

STEPS = 4
#: (before|after the rename, name renamed): where a run is killed.
KILL_POINTS = {
    "writing checkpoint 2": ("before", "step-2"),  # every file in the temporary directory, not yet renamed
    "pruning checkpoint 1": ("after", ".step-1.pruned.tmp"),  # between steps 3 and 4, mid-delete
    "final save": ("before", "adapter"),  # all steps and checkpoints done, the adapter not yet in place
    "saving the tokenizer": ("after", "tokenizer.json"),  # the final save's first files in place, the rest staged
}


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """A config writer for one tiny LoRA job (dropout on, so resuming must restore the RNG)."""
    root = tmp_path_factory.mktemp("crash")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer, " * (i + 1)}) + "\n"
                            for i in range(8)))

    def write(out: Path) -> Path:
        config = out.parent / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_model_dir)},
            "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train": [str(data)], "max_length": 48},
            "train": {"precision": "fp32", "lr": 1e-2, "batch_size": 2, "max_steps": STEPS, "save_every": 1,
                      "keep_last": 2, "log_every": 1},
            "output_dir": str(out)}))
        return config
    return write


@pytest.fixture(scope="module")
def one_thread():
    """The killed runs use one thread; the in-process runs must sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("full") / "run"
    result = runner.invoke(app, ["train", str(job(out)), "--quiet"])
    assert result.exit_code == 0, result.output
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def kill_at(config: Path, when: str, name: str) -> None:
    launcher = config.parent / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(launcher), when, name, "train", str(config), "--quiet"],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"the run was not killed at {when} {name}:\n{done.stderr[-3000:]}"


def assert_finished_files_load(run: Path) -> None:
    """Every file a reader could open is complete: no half-written checkpoint, line or adapter."""
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == STEPS
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        load_file(str(checkpoint / "trainable.safetensors"))
        load_file(str(checkpoint / "state.safetensors"))
        assert json.loads((checkpoint / "state.json").read_text())["format"].startswith("tunelab-checkpoint/")
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == int(checkpoint.name[5:])
    if (run / "adapter").exists():
        load_file(str(run / "adapter" / "adapter_model.safetensors"))
        json.loads((run / "adapter" / "adapter_config.json").read_text())
    for file in RunDir(run).tokenizer_files():  # each one whole, whether or not the others are there yet
        if file.suffix == ".json":
            json.loads(file.read_text())


@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda p: p.replace(" ", "-"))
def test_a_killed_run_leaves_loadable_files_and_resumes_to_the_same_weights(job, uninterrupted, tmp_path, point):
    run = tmp_path / "run"
    config = job(run)
    kill_at(config, *KILL_POINTS[point])
    assert_finished_files_load(run)
    assert RunDir(run).stale_temporaries(), "each kill point interrupts an atomic write"

    result = runner.invoke(app, ["train", str(config), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert_finished_files_load(run)
    assert RunDir(run).stale_temporaries() == []  # the killed run's temporaries were removed at the start
    assert AutoTokenizer.from_pretrained(run)("Answer, Answer")["input_ids"]
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    steps = [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert steps == list(range(1, STEPS + 1))
