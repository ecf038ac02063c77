"""What every view shares: the services, and how a user error is shown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.webui.chat import ChatService
from tunelab.webui.jobs import JobService
from tunelab.webui.service import RunService

#: Seconds between refreshes of live views (run status, curves, logs, jobs).
REFRESH_S = 2.0
#: The classes of form fields and of logs, and the page's style: fields (check boxes too) wrap rather than
#: shrink; logs keep the columns of the tables commands print.
FIELD_CLASS = "tl-field"
LOG_CLASS = "tl-log"
CSS = f".{FIELD_CLASS} {{ min-width: 220px !important; }} .{LOG_CLASS} textarea {{ font-family: monospace; }}"
#: Lines of a log tail: as many as its box shows, so the newest line is always in view.
LOG_LINES = 24
#: Lines a code box shows before it scrolls.
CODE_LINES = 30


@dataclass
class Services:
    """The services of one runs directory, shared by the views and the API, and the CLI the jobs run."""

    runs: RunService
    jobs: JobService
    chat: ChatService
    cli: Any  # the ``tunelab`` typer app: the Evaluate, Export and Compare forms are built from its options

    @classmethod
    def open(cls, runs_dir: str | Path, cli: Any) -> "Services":
        return cls(RunService(runs_dir), JobService(runs_dir), ChatService(runs_dir), cli)


def failure(err: Exception) -> str:
    """A user error as the views show it (the same paragraph the CLI prints)."""
    return f"**error:** {err}"
