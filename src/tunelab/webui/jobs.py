"""Jobs: ``tunelab eval | predict | export | compare`` launched from the UI, outliving it.

Each job is a directory ``runs/.jobs/<id>/`` holding ``job.json`` (the command, when, the
pid), ``job.log`` (its output) and, once it has ended, ``result.json`` (exit code). The
job runs under a small wrapper process (``python -m tunelab.webui.jobs JOBDIR``) that
waits for the command and records its exit code, so a UI started later still tells a
finished job from a failed one. Unlike training runs, jobs start at once: they are short
next to training, and a user waiting for an evaluation should not wait for the queue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.runs import pid_alive
from tunelab.webui.launch import TUNELAB, spawn_detached
from tunelab.webui.queue import now_iso

JOBS_DIR = ".jobs"
JOB_FILE, LOG_FILE, RESULT_FILE = "job.json", "job.log", "result.json"


@dataclass
class JobView:
    id: str
    command: str  # eval, predict, export, compare
    argv: list[str]
    status: str  # running, finished, failed
    created_at: str
    returncode: int | None
    outputs: dict[str, str]  # what the job writes, by kind (out file or directory)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobService:
    """The jobs of one runs directory."""

    def __init__(self, runs_dir: str | Path):
        self.dir = Path(runs_dir).resolve() / JOBS_DIR

    def start(self, argv: list[str], outputs: dict[str, str] | None = None) -> str:
        """Launch ``tunelab ARGV...`` detached; returns the job id."""
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}-{argv[0]}"  # sorts by time
        job_dir = self.dir / job_id
        job_dir.mkdir(parents=True)
        write_json(job_dir / JOB_FILE, {"argv": argv, "created_at": now_iso(), "outputs": outputs or {}})
        child = spawn_detached([sys.executable, "-m", "tunelab.webui.jobs", str(job_dir)], job_dir / LOG_FILE)
        data = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        write_json(job_dir / JOB_FILE, {**data, "pid": child.pid})
        return job_id

    def job_dir(self, job_id: str) -> Path:
        path = self.dir / job_id
        if "/" in job_id or job_id.startswith(".") or not (path / JOB_FILE).is_file():
            raise TunelabError(f"there is no job '{job_id}' in {self.dir}.")
        return path

    def view(self, job_id: str) -> JobView:
        path = self.job_dir(job_id)
        job = json.loads((path / JOB_FILE).read_text(encoding="utf-8"))
        result = path / RESULT_FILE
        returncode = json.loads(result.read_text(encoding="utf-8"))["returncode"] if result.is_file() else None
        if returncode is not None:
            status = "finished" if returncode == 0 else "failed"
        else:  # no pid yet: start() is between spawning and recording it
            status = "running" if job.get("pid") is None or pid_alive(job["pid"]) else "failed"
        return JobView(job_id, job["argv"][0], job["argv"], status, job["created_at"], returncode,
                       job.get("outputs", {}))

    def list(self, command: str | None = None) -> list[JobView]:
        """Jobs newest first, optionally only those of one command."""
        names = sorted((p.name for p in self.dir.iterdir() if (p / JOB_FILE).is_file()), reverse=True) \
            if self.dir.is_dir() else []
        views = [self.view(name) for name in names]
        return [v for v in views if command is None or v.command == command]

    def log_tail(self, job_id: str, lines: int = 60) -> str:
        log = self.job_dir(job_id) / LOG_FILE
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, job_id: str) -> JobView:
        """SIGTERM the job's process group (the wrapper and the command it runs)."""
        view = self.view(job_id)
        pid = json.loads((self.job_dir(job_id) / JOB_FILE).read_text(encoding="utf-8")).get("pid")
        if view.status == "running" and pid:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return self.view(job_id)


def _run(job_dir: Path) -> None:
    """The wrapper: run the job's command (output goes to the inherited log) and record its exit code."""
    argv = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))["argv"]
    print("$ tunelab " + " ".join(argv), flush=True)
    returncode = subprocess.call([*TUNELAB, *argv])
    write_json(job_dir / RESULT_FILE, {"returncode": returncode, "finished_at": now_iso()})


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
