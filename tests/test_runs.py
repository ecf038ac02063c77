"""The run-directory contract: paths, status liveness, tolerant metrics, run listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tunelab.config import RunConfig
from tunelab.errors import ConfigError, TunelabError
from tunelab.runs import RunDir, list_runs


def test_paths_are_named_once(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.root == tmp_path
    assert run.config == tmp_path / "config.yaml" and run.status == tmp_path / "status.json"
    assert run.metrics == tmp_path / "metrics.jsonl" and run.log == tmp_path / "train.log"
    assert run.checkpoint(7) == tmp_path / "checkpoints" / "step-7"
    assert (run.adapter, run.model, run.loss_plot) == (tmp_path / "adapter", tmp_path / "model", tmp_path / "loss.png")
    with pytest.raises(AttributeError):
        run.root = tmp_path  # frozen: a RunDir can be shared and hashed
    assert {RunDir(tmp_path), RunDir(str(tmp_path))} == {run}


def test_config_round_trip_and_missing_config(tmp_path):
    run = RunDir(tmp_path / "r")
    assert not run.is_run()
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        run.read_config()
    cfg = RunConfig(stage="dpo", output_dir=str(run.root))
    run.write_config(cfg)
    assert run.is_run() and run.read_config() == cfg


def test_running_status_of_a_dead_process_reads_failed(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_status() is None
    written = run.write_status(status="running", step=0, total_steps=10)
    assert written.pid is not None and written.started_at is not None
    assert run.read_status().status == "running"  # this process is alive
    run.write_status(step=3)
    status = run.read_status()
    assert (status.status, status.step, status.total_steps, status.started_at) == ("running", 3, 10,
                                                                                     written.started_at)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(pid=dead.pid)
    status = run.read_status()
    assert status.status == "failed" and str(dead.pid) in status.error
    assert json.loads(run.status.read_text())["status"] == "running"  # reading never rewrites the file
    restarted = run.write_status(status="running")  # a new process takes over a crashed run (--resume)
    assert restarted.pid == os.getpid() and run.read_status().status == "running" and restarted.error is None


def test_unreaped_child_is_not_alive(tmp_path):
    run = RunDir(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    run.write_status(status="running", pid=child.pid)
    for _ in range(100):  # it exits but stays a zombie until waited for
        if run.read_status().status == "failed":
            break
        time.sleep(0.05)
    assert run.read_status().status == "failed"
    child.wait()


def test_finished_status_keeps_its_fields_and_rejects_unknown_ones(tmp_path):
    run = RunDir(tmp_path)
    run.write_status(status="running", total_steps=4)
    run.write_status(status="finished", step=4)
    status = run.read_status()
    assert (status.status, status.step, status.error) == ("finished", 4, None)
    with pytest.raises(ValueError, match="unknown status field"):
        run.write_status(steps=4)
    with pytest.raises(ValueError, match="status must be one of"):
        run.write_status(status="done")
    run.status.write_text("{not json")
    with pytest.raises(TunelabError, match="status.json cannot be read"):
        run.read_status()


def test_metrics_tolerate_a_half_written_last_line(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    run.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    run.truncate_metrics(1)
    assert run.metrics.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_checkpoints_in_step_order_ignoring_unfinished_saves(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for name in ("step-10", "step-9", ".step-11.tmp", "step-x"):
        (run.checkpoints / name).mkdir(parents=True)
    assert [p.name for p in run.list_checkpoints()] == ["step-9", "step-10"]
    assert run.latest_checkpoint() == run.checkpoint(10)


def test_list_runs_finds_only_run_directories(tmp_path):
    assert list_runs(tmp_path / "absent") == []
    for name in ("b", "a"):
        RunDir(tmp_path / name).write_config(RunConfig(output_dir=str(tmp_path / name)))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert [run.name for run in list_runs(tmp_path)] == ["a", "b"]


def test_log_lines_are_appended(tmp_path):
    run = RunDir(tmp_path / "new")
    assert run.read_log() == ""
    run.append_log("first")
    run.append_log("second\n")
    assert run.read_log() == "first\nsecond\n"
