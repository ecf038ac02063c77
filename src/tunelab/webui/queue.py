"""The run queue: training runs wait on disk and start one at a time.

Layout under the runs directory::

    runs/.queue/
      <time_ns>-<run id>.json   one entry per waiting or launched run: {"id", "resume", "queued_at",
                                 and once launched "pid", "launched_at"}
      console/<run id>.log      stdout and stderr of the run's process
      worker.lock               held (flock) by the one worker draining this queue
      worker.log                the worker's own output

Why a separate worker process rather than a thread of the UI server: a queued run must
start even while no UI is running (the browser closed, the server killed or restarted).
The UI starts a worker whenever it enqueues (``python -m tunelab.webui.queue RUNS_DIR``,
detached); a second worker finds the lock taken and exits at once. The worker launches
``tunelab train RUN/config.yaml`` detached, waits until that process has ended, removes
the entry, and launches the next; with nothing left it exits. Entries are ordered by their
file name, so the queue order survives restarts.

The run itself writes its progress to its ``train.log`` (a fresh start clears that file,
and every message is written there already), so the process's console output goes to a
file of its own: it holds what the run could not log itself, such as an error raised
before the run directory was set up, or a crash's traceback.

Exiting without losing an entry: the worker releases its lock when it sees the queue
empty, then looks once more; an entry written meanwhile is taken either by this worker
(it re-takes the lock) or by the worker its writer started (which got the lock).
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from tunelab.io import write_json
from tunelab.runs import RunDir, pid_alive
from tunelab.webui.launch import TUNELAB, spawn_detached

QUEUE_DIR = ".queue"
_POLL_S = 0.5


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Entry:
    """One queued (or launched, still running) training run."""

    path: Path
    id: str
    resume: bool
    queued_at: str
    pid: int | None = None

    @property
    def launched(self) -> bool:
        return self.pid is not None

    @property
    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)


class RunQueue:
    """The on-disk queue of one runs directory."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).resolve()
        self.dir = self.runs_dir / QUEUE_DIR
        self.lock_path = self.dir / "worker.lock"
        self.worker_log = self.dir / "worker.log"

    def console_log(self, run_id: str) -> Path:
        """Where the console output of the run's process goes."""
        return self.dir / "console" / f"{run_id}.log"

    # -- entries ------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every entry, oldest first; a file that cannot be read (being replaced) is skipped."""
        found = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            found.append(Entry(path, str(data["id"]), bool(data.get("resume")), str(data.get("queued_at", "")),
                               data.get("pid")))
        return found

    def find(self, run_id: str) -> Entry | None:
        """The run's waiting or running entry; one whose process has ended (not yet removed) is history."""
        return next((entry for entry in self.entries() if entry.id == run_id and (not entry.launched or entry.alive)),
                    None)

    def put(self, run_id: str, resume: bool = False) -> Entry:
        """Append a run; the caller then starts a worker (:meth:`ensure_worker`)."""
        path = self.dir / f"{time.time_ns():020d}-{run_id}.json"
        data = {"id": run_id, "resume": resume, "queued_at": now_iso()}
        write_json(path, data)
        return Entry(path, run_id, resume, data["queued_at"])

    def cancel(self, run_id: str) -> bool:
        """Remove a run that has not been launched; False when there is none waiting."""
        entry = self.find(run_id)
        if entry is None or entry.launched:
            return False
        entry.path.unlink(missing_ok=True)
        return True

    def position(self, run_id: str) -> int | None:
        """1 for the next run to start, 2 for the one after, ...; None when not waiting."""
        waiting = [entry.id for entry in self.entries() if not entry.launched]
        return waiting.index(run_id) + 1 if run_id in waiting else None

    # -- the worker ---------------------------------------------------------------------
    def ensure_worker(self) -> None:
        """Start a worker for this queue (it exits at once when one is already draining it)."""
        spawn_detached([sys.executable, "-m", "tunelab.webui.queue", str(self.runs_dir)], self.worker_log)

    def _try_lock(self, handle: IO[Any]) -> bool:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _launch(self, entry: Entry) -> Any:
        run = RunDir(self.runs_dir / entry.id)
        argv = [*TUNELAB, "train", str(run.config), "--quiet", *(["--resume"] if entry.resume else [])]
        child = spawn_detached(argv, self.console_log(entry.id), cwd=Path.cwd())
        write_json(entry.path, {"id": entry.id, "resume": entry.resume, "queued_at": entry.queued_at,
                                "pid": child.pid, "launched_at": now_iso()})
        return child

    def step(self) -> Any | None:
        """Drop entries whose process has ended; launch the oldest waiting run when none is running.

        Returns the launched child process (for the caller to reap), or None.
        """
        entries = self.entries()
        for entry in entries:
            if entry.launched and not entry.alive:
                entry.path.unlink(missing_ok=True)
        if any(entry.launched and entry.alive for entry in entries):
            return None
        waiting = [entry for entry in entries if not entry.launched]
        if not waiting:
            return None
        if not RunDir(self.runs_dir / waiting[0].id).is_run():  # its directory was deleted meanwhile
            waiting[0].path.unlink(missing_ok=True)
            return None
        return self._launch(waiting[0])

    def work(self, poll_s: float = _POLL_S) -> None:
        """Drain the queue (the body of the worker process); return when it is empty."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            if not self._try_lock(lock):
                return
            children = []
            while True:
                children = [child for child in children if child.poll() is None]  # reap ended runs
                if (child := self.step()) is not None:
                    children.append(child)
                if not self.entries():
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    if not self.entries() or not self._try_lock(lock):
                        return
                time.sleep(poll_s)


if __name__ == "__main__":  # the worker process
    RunQueue(sys.argv[1]).work()
