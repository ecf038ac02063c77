"""Experiment trackers: every metric row a run logs, also sent where ``train.report_to`` says.

One small interface (:class:`Tracker`: ``log(metrics, step)``, ``close(status)``) and one
class per tracker; :func:`with_trackers` wraps the run's :class:`~tunelab.train.monitor.Monitor`
so that each row written to ``metrics.jsonl`` (train, eval, and each stage's own keys) also
goes to the trackers, from the main process only. Nothing is sent anywhere unless
``train.report_to`` names a tracker, and each tracker's package is imported only then
(optional extras: ``pip install 'tunelab[tensorboard]'``, ``[mlflow]``, ``[wandb]``,
``[trackio]``).

Where data goes is each tracker's own configuration, so a user's existing set-up works
unchanged: TensorBoard writes event files to ``RUN/tensorboard/`` (``tensorboard --logdir
runs`` shows every run); MLflow logs to ``MLFLOW_TRACKING_URI`` (experiment
``MLFLOW_EXPERIMENT_NAME``, default "tunelab"); W&B and Trackio to their project
(``WANDB_PROJECT`` / ``TRACKIO_PROJECT``, default "tunelab"). The tracker's run is named
after the run directory and gets the resolved config.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.runs import RunDir

#: Row keys that are not metrics: the step is the x axis.
_NOT_METRICS = {"step"}
_DEFAULT_PROJECT = "tunelab"


class Tracker(Protocol):
    """Where metrics go besides ``metrics.jsonl``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at optimizer step ``step``."""

    def close(self, status: str) -> None:
        """Flush and end the tracker's run; ``status``: finished, stopped or failed."""


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, without the step (bools and text are not metrics)."""
    return {key: float(value) for key, value in row.items()
            if key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def _flat_config(cfg: "RunConfig") -> dict[str, Any]:
    """``{"train.lr": 0.0002, ...}``: the resolved config as trackers show hyper-parameters."""
    flat: dict[str, Any] = {}
    for section, value in cfg.model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"{section}.{key}": item for key, item in value.items()})
        else:
            flat[section] = value
    return flat


class TensorBoardTracker:
    def __init__(self, cfg: "RunConfig", run: "RunDir"):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.root / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat_config(cfg).items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    _STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, cfg: "RunConfig", run: "RunDir"):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default store
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", _DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in _flat_config(cfg).items()]  # MLflow's value limit
        self.client.log_batch(self.run_id, params=params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self._STATUS.get(status, "FINISHED"))


class WandbTracker:
    def __init__(self, cfg: "RunConfig", run: "RunDir"):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", _DEFAULT_PROJECT), name=run.name,
                              dir=str(run.root), config=_flat_config(cfg))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class TrackioTracker:
    def __init__(self, cfg: "RunConfig", run: "RunDir"):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", _DEFAULT_PROJECT), name=run.name,
                     config=_flat_config(cfg))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.trackio.finish()


#: name -> (package to import, extra that installs it, class). Names match config.TrackerName.
TRACKERS: dict[str, tuple[str, str, Callable[["RunConfig", "RunDir"], Tracker]]] = {
    "tensorboard": ("tensorboard", "tensorboard", TensorBoardTracker),
    "mlflow": ("mlflow", "mlflow", MlflowTracker),
    "wandb": ("wandb", "wandb", WandbTracker),
    "trackio": ("trackio", "trackio", TrackioTracker),
}


def open_trackers(cfg: "RunConfig", run: "RunDir") -> list[Tracker]:
    """The trackers ``cfg.train.report_to`` names, started; a missing package is a clear error first."""
    names = list(dict.fromkeys(cfg.train.report_to))
    missing = [name for name in names if importlib.util.find_spec(TRACKERS[name][0]) is None]
    if missing:
        extras = ",".join(TRACKERS[name][1] for name in missing)
        raise ConfigError(f"train.report_to names {', '.join(missing)}, which is not installed. Install it with "
                          f"pip install 'tunelab[{extras}]', or remove it from train.report_to.")
    return [TRACKERS[name][2](cfg, run) for name in names]


class TrackedMonitor:
    """A Monitor whose logged rows also reach the trackers; everything else is the Monitor's own."""

    def __init__(self, monitor: Any, trackers: list[Tracker]):
        self._monitor = monitor
        self._trackers = trackers

    def log(self, row: dict[str, Any]) -> None:
        self._monitor.log(row)
        metrics = metrics_of(row)
        if metrics:
            for tracker in self._trackers:
                tracker.log(metrics, int(row.get("step", 0)))

    def close(self) -> None:
        """Close the monitor, then the trackers (with the run's outcome, read from the exception in flight)."""
        error = sys.exc_info()[1]
        status = "finished" if error is None else "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            self._monitor.close()
        finally:
            for tracker in self._trackers:
                tracker.close(status)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)


def with_trackers(monitor: Any, cfg: "RunConfig", enabled: bool = True) -> Any:
    """``monitor``, also reporting to ``cfg.train.report_to`` when ``enabled`` (the main process)."""
    if not enabled or not cfg.train.report_to:
        return monitor
    return TrackedMonitor(monitor, open_trackers(cfg, monitor.run))
