"""Driving the web UI from Python, as the browser tests and ``scripts/webui_screenshots.py`` do.

A :class:`UIServer` is ``tunelab webui`` in its own process (started and killed like a
user's); the helpers act on a playwright ``Page`` the way a person would (key presses,
clicks on options), because Gradio reacts to user input events, not to values set by
script. Nothing here imports playwright: callers bring their own browser.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

#: Seconds to wait for the server, a run or an answer: generous, shared machines are often loaded.
WAIT_S = 600


class UIServer:
    """``tunelab webui`` on a free local port, with its output in ``workdir/webui.log``."""

    def __init__(self, workdir: Path, runs_dir: Path):
        self.workdir, self.runs_dir = Path(workdir), Path(runs_dir)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until its API answers."""
        with open(self.workdir / "webui.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelab.cli", "webui", "--runs-dir", str(self.runs_dir), "--port",
                 str(self.port)], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + WAIT_S
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "api/runs", timeout=5).read()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("tunelab webui exited: " + (self.workdir / "webui.log").read_text()[-2000:])
                time.sleep(0.5)
        raise RuntimeError(f"tunelab webui did not answer within {WAIT_S} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a terminal is closed or the UI process dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``condition`` until it returns something true, and return that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def type_into(page: Any, elem_id: str, value: str) -> None:
    """Type into a text or number field with key presses (Gradio's input events follow keys, not ``fill``)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill("")
    box.press_sequentially(value)


def choose(page: Any, elem_id: str, value: str) -> None:
    """Pick ``value`` in a dropdown (or add it to a multi-select) by clicking its option."""
    box = page.locator(f"#{elem_id} input[role=combobox]")
    box.click()
    box.fill(value)
    options = box.get_attribute("aria-controls")  # this dropdown's own list (others may be in the page too)
    page.locator(f"[id='{options}'] [role=option][aria-label={json.dumps(value)}]").click()


def metric_points(page: Any, metric: str = "loss") -> int:
    """How many points of ``metric`` the Runs view's table says the chosen run logged (0 before the first)."""
    match = re.search(rf"(?m)^\s*{re.escape(metric)}\s+(\d+)", page.locator("#runs-metrics").inner_text())
    return int(match.group(1)) if match else 0


def words(text: str) -> str:
    """Text with its whitespace normalised, as a page shows it."""
    return " ".join(text.split())
