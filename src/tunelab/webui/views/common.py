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
#: The class of form fields, and the page's style: fields (check boxes too) wrap rather than shrink.
FIELD_CLASS = "tl-field"
CSS = f".{FIELD_CLASS} {{ min-width: 220px !important; }}"
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
