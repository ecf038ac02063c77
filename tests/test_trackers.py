"""Experiment trackers: what metrics.jsonl holds is what TensorBoard and MLflow hold, and nothing is sent unasked."""

import sys
import types
from pathlib import Path
from typing import get_args

import pytest

from tunelab.config import TrackerName, build_config
from tunelab.errors import ConfigError
from tunelab.runs import RunDir
from tunelab.trackers import TRACKERS, TrackedMonitor, metrics_of, with_trackers
from tunelab.train import run_stage

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"


def dpo_config(model_dir, out, report_to):
    """A 3-step DPO run with an eval set: train rows, eval rows and DPO's own metrics (rewards/...)."""
    return build_config({
        "model": {"name_or_path": str(model_dir)}, "stage": "dpo", "method": {"type": "lora", "r": 4},
        "data": {"dataset_dir": str(FIXTURES), "train": ["dpo_en_demo"], "eval": ["dpo_en_demo"], "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 1, "precision": "fp32", "eval_every": 2, "report_to": report_to},
        "output_dir": str(out)})


def by_metric(rows):
    """metric -> [(step, value)] from metrics.jsonl rows, as a tracker should have received them."""
    found = {}
    for row in rows:
        for key, value in metrics_of(row).items():
            found.setdefault(key, []).append((row["step"], value))
    return found


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One run reporting to TensorBoard (event files) and MLflow (a local SQLite store)."""
    root = tmp_path_factory.mktemp("tracked")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    patch.setenv("MLFLOW_EXPERIMENT_NAME", "tracker-test")
    try:
        run_stage(dpo_config(tiny_model_dir, root / "run", ["tensorboard", "mlflow"]), progress=False)
    finally:
        patch.undo()
    return root, RunDir(root / "run")


def test_tensorboard_holds_every_logged_metric(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = tracked_run
    expected = by_metric(run.read_metrics())
    assert {"loss", "eval_loss", "rewards/margins", "lr"} <= set(expected)  # train, eval and stage metrics
    events = EventAccumulator(str(run.root / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in points]
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6)


def test_mlflow_holds_every_logged_metric(tracked_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    root, run = tracked_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracker-test")
    [logged_run] = client.search_runs([experiment.experiment_id])
    assert logged_run.info.run_name == "run" and logged_run.info.status == "FINISHED"
    assert logged_run.data.params["stage"] == "dpo" and logged_run.data.params["train.max_steps"] == "3"
    expected = by_metric(run.read_metrics())
    assert set(logged_run.data.metrics) == set(expected)
    loss = [(m.step, m.value) for m in client.get_metric_history(logged_run.info.run_id, "loss")]
    assert loss == [(step, pytest.approx(value, rel=1e-9)) for step, value in expected["loss"]]
    eval_loss = client.get_metric_history(logged_run.info.run_id, "eval_loss")
    assert [m.step for m in eval_loss] == [step for step, _ in expected["eval_loss"]]


class FakeTracker:
    def __init__(self):
        self.logged, self.closed = [], None

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def close(self, status):
        self.closed = status


class FakeMonitor:
    def __init__(self, run):
        self.run, self.rows, self.closed = run, [], False

    def log(self, row):
        self.rows.append(row)

    def write(self, text):
        self.rows.append(text)

    def close(self):
        self.closed = True


def test_rows_reach_trackers_without_step_or_non_numbers_and_failure_is_reported(tmp_path):
    tracker = FakeTracker()
    monitor = TrackedMonitor(FakeMonitor(RunDir(tmp_path)), [tracker])
    monitor.log({"step": 3, "loss": 1.5, "rewards/margins": 0.25, "note": "text", "flag": True, "nan": float("nan")})
    monitor.log({"step": 4, "epoch": 2.0})
    monitor.write("a message")  # anything else is the monitor's own
    assert tracker.logged == [(3, {"loss": 1.5, "rewards/margins": 0.25}), (4, {"epoch": 2.0})]
    assert monitor.rows[-1] == "a message"
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("boom")
        finally:
            monitor.close()
    assert tracker.closed == "failed" and monitor._monitor.closed


def test_nothing_is_sent_unless_configured_and_only_from_the_main_process(tmp_path):
    monitor = FakeMonitor(RunDir(tmp_path))
    assert with_trackers(monitor, build_config({}), enabled=True) is monitor
    assert with_trackers(monitor, build_config({"train": {"report_to": ["tensorboard"]}}), enabled=False) is monitor
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("trackio", "trackio")])
def test_wandb_and_trackio_get_the_run_name_config_and_every_row(tmp_path, monkeypatch, name, module):
    calls = []
    fake = types.ModuleType(module)
    fake.__spec__ = types.SimpleNamespace(name=module)
    run_handle = types.SimpleNamespace(log=lambda metrics, step: calls.append(("log", step, metrics)),
                                       finish=lambda exit_code=0: calls.append(("finish", exit_code)))
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or run_handle
    fake.log, fake.finish = run_handle.log, lambda: calls.append(("finish", 0))
    monkeypatch.setitem(sys.modules, module, fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda mod, *a: object() if mod == module else None)
    cfg = build_config({"train": {"report_to": [name], "lr": 0.01}})
    monitor = with_trackers(FakeMonitor(RunDir(tmp_path / "my-run")), cfg)
    monitor.log({"step": 1, "loss": 2.0})
    monitor.close()
    assert calls[0][0] == "init" and calls[0][1]["name"] == "my-run" and calls[0][1]["config"]["train.lr"] == 0.01
    assert calls[1:] == [("log", 1, {"loss": 2.0}), ("finish", 0)]


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda mod, *a: None)
    cfg = build_config({"train": {"report_to": ["wandb"]}})
    with pytest.raises(ConfigError, match=r"wandb.*pip install 'tunelab\[wandb\]'"):
        with_trackers(FakeMonitor(RunDir(tmp_path)), cfg)


def test_report_to_accepts_one_name_or_none_and_rejects_unknown_trackers():
    assert build_config({"train": {"report_to": "tensorboard"}}).train.report_to == ["tensorboard"]
    assert build_config({"train": {"report_to": "none"}}).train.report_to == []
    with pytest.raises(ConfigError, match="train.report_to"):
        build_config({"train": {"report_to": ["neptune"]}})
    assert set(TRACKERS) == set(get_args(TrackerName))
