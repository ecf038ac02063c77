"""Nothing lost, nothing mixed: what `tunelab train` does with what output_dir already holds.

Every refusal is checked to happen before anything is written (the directory is compared
byte for byte and by mtime) and before the model is loaded (the loader raises if called).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import EXIT_STOPPED, app
from tunelab.config import build_config
from tunelab.methods.lora import LoraMethodConfig
from tunelab.methods.prompts import PrefixConfig
from tunelab.runs import RunDir
from tunelab.train import lifecycle
from tunelab.train.lifecycle import config_changes
from tunelab.train.monitor import Monitor

runner = CliRunner()
STEPS = 4
LR = 1e-2


@pytest.fixture(scope="module")
def write_config(tiny_model_dir, tmp_path_factory):
    """``write_config(out, **train)``: a tiny LoRA run file writing to ``out`` (constant lr, a checkpoint a step)."""
    data = tmp_path_factory.mktemp("data") / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer, " * (i + 1)}) + "\n"
                            for i in range(8)))

    def write(out: Path, **train) -> Path:
        config = out.parent / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_model_dir)},
            "method": {"type": "lora", "r": 4, "alpha": 8},
            "data": {"train": [str(data)], "max_length": 48},
            "train": {"precision": "fp32", "lr": LR, "scheduler": "constant", "batch_size": 2, "max_steps": STEPS,
                      "save_every": 1, "keep_last": 2, "log_every": 1, **train},
            "output_dir": str(out)}))
        return config
    return write


def train(config: Path, *args: str):
    return runner.invoke(app, ["train", str(config), "--quiet", *args])


def stop_after(monkeypatch, steps: int) -> None:
    """SIGTERM this process during step ``steps``: the run checkpoints that step and stops."""
    advance, calls = Monitor.advance, {"n": 0}

    def advance_then_signal(self, n=1):
        advance(self, n)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Monitor, "advance", advance_then_signal)


def refuse_model_load(patch) -> None:
    """Loading the model fails the test: a refused start must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the run directory was checked")

    patch.setattr(lifecycle, "load_training_base", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    refuse_model_load(monkeypatch)


def test_a_bad_record_is_reported_before_the_model_is_loaded(tiny_model_dir, tmp_path, no_model_load):
    """The data is read before the model loads: a broken line costs no model load."""
    data = tmp_path / "broken.jsonl"
    data.write_text(json.dumps({"instruction": "Hi?", "output": "Hello."}) + "\n{not json\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                      "data": {"train": [str(data)]}, "output_dir": str(tmp_path / "run")}))
    result = train(config)
    assert result.exit_code == 2, result.output
    assert "broken.jsonl" in result.output and "line 2" in result.output


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def steps_logged(run: Path) -> list[int]:
    return [row["step"] for row in RunDir(run).read_metrics() if "loss" in row]


@pytest.fixture(scope="module")
def stopped(write_config, tmp_path_factory):
    """A run stopped by SIGTERM during step 2 of 4: checkpoints step-1 and step-2, no adapter."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    config = write_config(out)
    with pytest.MonkeyPatch.context() as patch:
        stop_after(patch, 2)
        result = train(config)
    return out, result


@pytest.fixture
def stopped_copy(stopped, tmp_path):
    """A private copy of the stopped run (same output_dir spelling in its config as a fresh file)."""
    out = tmp_path / "run"
    shutil.copytree(stopped[0], out)
    return out


def test_sigterm_stop_exits_with_the_documented_code(stopped):
    out, result = stopped
    assert result.exit_code == EXIT_STOPPED == 3, result.output
    assert "stopped (resume with --resume): 2 steps" in result.output
    assert RunDir(out).read_status().status == "stopped"
    assert [p.name for p in RunDir(out).list_checkpoints()] == ["step-1", "step-2"]
    assert not (out / "adapter").exists()


NO_CHECKPOINT = "(checkpoints deleted)"


@pytest.mark.parametrize("change, flags, expected", [
    ("method.r=8", ["--allow-config-change"], "method.r: 4 -> 8\nmethod.r changes what is trained"),
    ("method.type=dora", ["--allow-config-change"], 'method.type: "lora" -> "dora"'),
    ("stage=pt", ["--allow-config-change"], 'stage: "sft" -> "pt"\nstage changes what is trained'),
    ("train.lr=5e-3", [], "train.lr: 0.01 -> 0.005\nPass --allow-config-change"),
    (NO_CHECKPOINT, [], "holds no checkpoint to resume from"),
], ids=["another-r", "another-method", "another-stage", "lr-without-flag", "no-checkpoint"])
def test_a_refused_resume_writes_nothing_and_loads_nothing(stopped_copy, write_config, no_model_load, change,
                                                           flags, expected):
    if change == NO_CHECKPOINT:
        shutil.rmtree(stopped_copy / "checkpoints")
    before = snapshot(stopped_copy)
    overrides = [] if change == NO_CHECKPOINT else [change]
    result = train(write_config(stopped_copy), *overrides, "--resume", *flags)
    assert result.exit_code == 2, result.output
    assert expected in result.output.replace("\n  ", "\n")  # the diff's lines, unindented
    assert snapshot(stopped_copy) == before


def test_resume_with_a_changed_lr_needs_the_flag_and_then_trains_at_the_new_rate(stopped_copy, write_config):
    config = write_config(stopped_copy, lr=5e-3)
    result = train(config, "--resume", "--allow-config-change")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((stopped_copy / "config.yaml").read_text())
    assert saved["train"]["lr"] == 5e-3
    assert "--allow-config-change: resuming with\n  train.lr: 0.01 -> 0.005" in RunDir(stopped_copy).read_log()
    rates = {row["step"]: row["lr"] for row in RunDir(stopped_copy).read_metrics() if "loss" in row}
    assert rates == {1: LR, 2: LR, 3: 5e-3, 4: 5e-3}


def test_config_changes_ignore_how_output_dir_is_spelled(tmp_path):
    old = build_config({"output_dir": str(tmp_path / "run"), "train": {"lr": 0.1}})
    new = build_config({"output_dir": "elsewhere/../run", "train": {"lr": 0.2}, "method": {"type": "lora", "r": 2}})
    assert config_changes(old, new) == [("method.r", old.method.r, 2), ("train.lr", 0.1, 0.2)]
    assert config_changes(old, old.model_copy(update={"output_dir": "x"})) == []


@pytest.mark.parametrize("kind", ["file", "under-a-file", "unwritable"])
def test_an_unusable_output_dir_fails_before_the_model_is_loaded(write_config, tmp_path, no_model_load, kind):
    if kind == "unwritable":
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no sysfs here")
        out = Path("/sys/tunelab-run-safety-test")  # sysfs: not writable for a user, mkdir EPERM even as root
    else:
        blocker = tmp_path / "taken"
        blocker.write_text("a file, not a directory\n")
        out = blocker if kind == "file" else blocker / "run"
    config = write_config(tmp_path / "run")
    result = train(config, f"output_dir={out}")
    assert result.exit_code == 2, result.output
    assert f"output_dir {out}" in result.output and "Traceback" not in result.output
    assert {"file": "is a file, not a directory", "under-a-file": f"{out.parent} is a file",
            "unwritable": "Set output_dir to a directory you can write to"}[kind] in result.output
    assert not out.exists() or out.is_file()


def test_overwrite_moves_the_old_run_aside_and_resume_sees_only_the_new_run(stopped_copy, write_config,
                                                                            monkeypatch):
    config = write_config(stopped_copy)
    old_files = snapshot(stopped_copy)
    stop_after(monkeypatch, 1)
    result = train(config, "--overwrite")
    assert result.exit_code == EXIT_STOPPED, result.output
    aside = [p for p in stopped_copy.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved the previous run to {aside[0]}" in result.output
    assert snapshot(aside[0]) == old_files  # the old run, untouched (its step-1 and step-2)
    assert [p.name for p in RunDir(stopped_copy).list_checkpoints()] == ["step-1"]
    monkeypatch.undo()

    result = train(config, "--resume")
    assert result.exit_code == 0, result.output
    assert steps_logged(stopped_copy) == [1, 2, 3, 4]  # not the old run's step-2 continued
    assert f"moved the previous run to {aside[0]}" in RunDir(stopped_copy).read_log()


def test_overwrite_discard_deletes_the_old_run(stopped_copy, write_config, monkeypatch):
    stop_after(monkeypatch, 1)
    result = train(write_config(stopped_copy), "--overwrite", "--discard")
    assert result.exit_code == EXIT_STOPPED, result.output
    assert not [p for p in stopped_copy.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert [p.name for p in RunDir(stopped_copy).list_checkpoints()] == ["step-1"]
    assert steps_logged(stopped_copy) == [1]


def test_a_directory_of_someone_elses_files_is_refused_unless_forced(write_config, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("notes.txt", "tokenizer.json", "data.csv"):
        (out / name).write_text(f"my own {name}\n")
    config = write_config(out, max_steps=1)
    before = snapshot(out)
    with monkeypatch.context() as patch:
        refuse_model_load(patch)
        result = train(config)
    assert result.exit_code == 2, result.output
    assert "is not a tunelab run but holds files (data.csv, notes.txt, tokenizer.json)" in result.output
    assert "--force" in result.output and snapshot(out) == before

    result = train(config, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "my own notes.txt\n" and (out / "adapter").is_dir()
    assert RunDir(out).read_config().train.max_steps == 1


def test_a_run_that_is_training_now_is_left_alone(stopped_copy, write_config, no_model_load):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        RunDir(stopped_copy).write_status(status="running", pid=live.pid)
        before = snapshot(stopped_copy)
        for flags in (["--resume"], ["--overwrite"]):
            result = train(write_config(stopped_copy), *flags)
            assert result.exit_code == 2, result.output
            assert f"training now (pid {live.pid}" in result.output
        assert snapshot(stopped_copy) == before
    finally:
        live.kill()
        live.wait()


def test_stale_temporaries_are_cleaned_and_only_those(tmp_path):
    run = RunDir(tmp_path)
    run.write_status(status="stopped")
    ours = [".status.json.k2j_x9ab.tmp", ".adapter.abcd1234.tmp/", ".tokenizer.zz99yy88.tmp/",
            "checkpoints/.step-3.q1w2e3r4.tmp/", "checkpoints/.step-1.pruned.tmp/", "checkpoints/.step-2.old/"]
    theirs = ["notes.txt", ".mydata.abc123.tmp", ".notes.old", "checkpoints/.other.abc123.tmp", "eval/.x.abc.tmp",
              "checkpoints/step-2/trainable.safetensors"]
    for name in ours + theirs:
        path = tmp_path / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
            (path / "part.bin").write_bytes(b"half")
        else:
            path.write_text("x")
    (run.checkpoints / ".step-5.old").mkdir()  # the only copy of step-5: the crash hit between the renames
    (run.checkpoints / ".step-5.old" / "trainer_state.json").write_text("{}")

    cleaned = {str(p.relative_to(tmp_path)) for p in run.clean_temporaries()}
    assert cleaned == {name.rstrip("/") for name in ours} | {"checkpoints/.step-5.old"}
    assert all((tmp_path / name).exists() for name in theirs)
    assert (run.checkpoint(5) / "trainer_state.json").is_file()  # restored, not deleted
    assert run.stale_temporaries() == []


def test_resume_reports_the_temporaries_it_removed(stopped_copy, write_config, monkeypatch):
    leftover = stopped_copy / "checkpoints" / ".step-3.a1b2c3d4.tmp"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"cut sho")
    stop_after(monkeypatch, 1)  # one more step is enough
    result = train(write_config(stopped_copy), "--resume")
    assert result.exit_code == EXIT_STOPPED, result.output
    assert not leftover.exists()
    assert "removed 1 temporary file(s) of an interrupted save: checkpoints/.step-3.a1b2c3d4.tmp" in \
        RunDir(stopped_copy).read_log()


def test_contradictory_flags_are_refused(stopped_copy, write_config, no_model_load):
    for flags, message in ((["--resume", "--overwrite"], "pass one of them"),
                           (["--discard"], "--discard goes with --overwrite")):
        result = train(write_config(stopped_copy), *flags)
        assert result.exit_code == 2 and message in result.output, result.output


def test_an_old_flat_config_yaml_still_reads(tmp_path):
    """Saved before per-type method configs: every type's keys in one method section."""
    old = build_config({"output_dir": str(tmp_path)}).model_dump(mode="json")
    old["method"] = {"type": "prefix", "r": 8, "alpha": 16, "dropout": 0.05, "target": "all-linear",
                     "num_virtual_tokens": 7, "prefix_projection": False, "reduction_factor": 16}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = RunDir(tmp_path).read_config()
    assert isinstance(cfg.method, PrefixConfig) and cfg.method.num_virtual_tokens == 7
    assert not isinstance(cfg.method, LoraMethodConfig)
