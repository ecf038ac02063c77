"""Starting processes that outlive the web UI.

Everything long the UI starts (training runs, the queue worker, evaluations, exports,
comparisons) runs as a detached process: its own session, so a Ctrl-C or SIGKILL of the
UI server, or a closed terminal, never reaches it; output appended to a file in the runs
directory, so a restarted UI reads it back. Nothing is kept in the UI's memory that the
files do not also hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: How a child runs the ``tunelab`` command: the same interpreter and installation as the UI.
TUNELAB = (sys.executable, "-m", "tunelab.cli")


def spawn_detached(argv: list[str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_file``.

    The caller may poll the returned handle to reap the child; if the caller dies first,
    the child keeps running and is reaped by init.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines appear as they are printed
    with open(log_file, "ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True, close_fds=True)
