"""What the web UI and the JSON API do with runs: one set of functions behind both.

The whole state of a run is its directory (read through :class:`tunelab.runs.RunDir`)
plus, while it waits, its entry in the on-disk queue (:mod:`tunelab.webui.queue`). The
service keeps nothing else, so any number of UI processes, started and killed at any
time, see the same runs.

Statuses: ``queued`` (waiting in the queue), then what ``status.json`` says (running,
finished, failed, stopped). A launched run that has not written its status yet reads as
running; a run with neither status nor queue entry never got as far as its first status
write: failed when its console output says why, else stopped (cancelled while queued).
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, build_config
from tunelab.errors import TunelabError
from tunelab.runs import RunDir, list_runs
from tunelab.webui.queue import RunQueue

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOG_TAIL_LINES = 80


class UnknownRun(TunelabError):
    """No run of that id in the runs directory (the API answers 404)."""


class RunStateError(TunelabError):
    """The run is not in a state that allows the request (the API answers 409)."""


@dataclass
class RunView:
    """One run as the UI and the API show it."""

    id: str
    status: str
    step: int = 0
    total_steps: int | None = None
    started_at: str | None = None
    updated_at: str | None = None
    error: str | None = None
    queue_position: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest value of every metric

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latest_values(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every key across ``rows`` (train and eval rows log different keys)."""
    latest: dict[str, Any] = {}
    for row in rows:
        latest.update(row)
    return latest


def _last_lines(text: str, count: int) -> str:
    return "\n".join(text.splitlines()[-count:])


class RunService:
    """The runs of one runs directory: list, start, stop, resume, read."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).resolve()
        self.queue = RunQueue(self.runs_dir)
        self._metrics_cache: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}

    # -- reading ------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> RunDir:
        """The run ``run_id``; ids are plain names, so a request can never reach outside the runs directory."""
        run = RunDir(self.runs_dir / run_id)
        if not _RUN_ID.match(run_id) or not run.is_run():
            raise UnknownRun(f"there is no run '{run_id}' in {self.runs_dir}. Runs there: "
                             f"{', '.join(r.name for r in list_runs(self.runs_dir)) or 'none'}.")
        return run

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Every row of the run's metrics.jsonl (re-read only when the file changed)."""
        run = self.run_dir(run_id)
        try:
            stat = run.metrics.stat()
        except FileNotFoundError:
            return []
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._metrics_cache.get(run.metrics)
        if cached is None or cached[0] != key:
            cached = (key, run.read_metrics())
            self._metrics_cache[run.metrics] = cached
        return cached[1]

    def view(self, run_id: str) -> RunView:
        run = self.run_dir(run_id)
        entry = self.queue.find(run_id)
        try:
            status = run.read_status()
        except TunelabError as err:  # a damaged status.json: show this run as failed, and the others still
            return RunView(run_id, "failed", error=str(err))
        latest = latest_values(self.metrics(run_id))
        step, total = (status.step, status.total_steps) if status is not None else (0, None)
        if entry is not None and not entry.launched:
            return RunView(run_id, "queued", step, total, queue_position=self.queue.position(run_id), metrics=latest)
        if entry is not None and entry.alive and (status is None or status.status != "running"):
            # launched, but the new process has not written its first status yet
            return RunView(run_id, "running", step, total, metrics=latest)
        if status is not None:
            return RunView(run_id, status.status, step, total, status.started_at, status.updated_at, status.error,
                           metrics=latest)
        console = self.console_tail(run_id, 5).strip()
        return RunView(run_id, "failed" if console else "stopped", error=console or None, metrics=latest)

    def list(self) -> list[RunView]:
        """Every run, newest first (queued runs too: their directory holds their config)."""
        runs = list_runs(self.runs_dir)
        runs.sort(key=lambda run: run.config.stat().st_mtime, reverse=True)
        return [self.view(run.name) for run in runs]

    def log_tail(self, run_id: str, lines: int = _LOG_TAIL_LINES) -> str:
        return _last_lines(self.run_dir(run_id).read_log(), lines)

    def console_tail(self, run_id: str, lines: int = _LOG_TAIL_LINES) -> str:
        """The end of the process's console output (errors raised before the run could log them)."""
        path = self.queue.console_log(run_id)
        return _last_lines(path.read_text(encoding="utf-8", errors="replace"), lines) if path.is_file() else ""

    def config_text(self, run_id: str) -> str:
        return self.run_dir(run_id).config.read_text(encoding="utf-8")

    def finished(self) -> list[str]:
        """Runs with trained weights to chat with, evaluate or export."""
        return [view.id for view in self.list() if view.status == "finished"]

    # -- changing -----------------------------------------------------------------------
    def submit(self, tree: dict[str, Any], name: str | None = None) -> str:
        """Validate a config, give it a run directory under the runs dir, and queue it; returns the run id.

        An invalid config raises the :class:`~tunelab.errors.ConfigError` that ``tunelab
        train`` prints for the same YAML. The run's ``output_dir`` is always the new
        directory: the UI only shows runs inside its runs directory.
        """
        cfg = build_config(tree, source="config")
        run = self._new_run_dir(name or self._default_name(tree, cfg))
        cfg.output_dir = str(run.root)
        run.write_config(cfg)
        self._enqueue(run.name, resume=False)
        return run.name

    def stop(self, run_id: str) -> RunView:
        """Cancel a queued run, or ask a running one to checkpoint and stop (SIGTERM)."""
        run = self.run_dir(run_id)
        if self.queue.cancel(run_id):
            return self.view(run_id)
        entry = self.queue.find(run_id)
        status = run.read_status()
        pid = status.pid if status is not None and status.status == "running" else None
        pid = pid or (entry.pid if entry is not None and entry.alive else None)
        if pid is None:
            raise RunStateError(f"run '{run_id}' is {self.view(run_id).status}, not queued or running; there is "
                                "nothing to stop.")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended between the check and the signal
        return self.view(run_id)

    def resume(self, run_id: str) -> RunView:
        """Queue a stopped or failed run again: from its latest checkpoint when it has one."""
        view = self.view(run_id)
        if view.status not in ("stopped", "failed"):
            raise RunStateError(f"run '{run_id}' is {view.status}; only stopped or failed runs can be resumed.")
        self._enqueue(run_id, resume=self.run_dir(run_id).latest_checkpoint() is not None)
        return self.view(run_id)

    def reattach(self) -> None:
        """After a UI (re)start: make sure queued runs have a worker to start them."""
        if self.queue.entries():
            self.queue.ensure_worker()

    # -- helpers ------------------------------------------------------------------------
    def _enqueue(self, run_id: str, resume: bool) -> None:
        self.queue.put(run_id, resume)
        self.queue.ensure_worker()

    def _default_name(self, tree: dict[str, Any], cfg: RunConfig) -> str:
        """The given output_dir's last part, else ``<stage>-<method>-<time>``."""
        given = Path(str(tree.get("output_dir") or "")).name
        if given:
            return given
        return f"{cfg.stage}-{cfg.method.type}-{datetime.now():%Y%m%d-%H%M%S}"

    def _new_run_dir(self, name: str) -> RunDir:
        if not _RUN_ID.match(name):
            raise TunelabError(f"run name '{name}' is not usable as a directory name: use letters, digits, '.', "
                               "'_' and '-' (at most 100 characters), starting with a letter or digit.")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        for suffix in range(1, 1000):
            candidate = self.runs_dir / (name if suffix == 1 else f"{name}-{suffix}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return RunDir(candidate)
        raise TunelabError(f"{self.runs_dir} already holds runs named {name} to {name}-999; choose another name.")

