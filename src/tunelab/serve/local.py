"""``tunelab serve`` as a child process on a free loopback port, for benchmarks and checks.

Why a child process: what ``benchmarks/serve_*.py`` and ``scripts/serve_acceptance.py``
measure (latency under concurrent clients, the server's own RSS, its exit on SIGTERM) must
be the real command, not an app inside the measuring process. The server listens on
127.0.0.1 only and is always stopped by :meth:`LocalServer.stop` (also on errors).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Sequence

from tunelab.errors import TunelabError
from tunelab.memory import proc_kib_field_bytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """One ``tunelab serve`` process: start it, read its RSS and log, stop it."""

    def __init__(self, runs: Sequence[str], api_key: str | None = None, options: Sequence[str] = ()):
        exe = shutil.which("tunelab")
        if exe is None:
            raise TunelabError("the `tunelab` command is not on PATH; activate the environment tunelab is installed "
                               "in.")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.command = [exe, "serve", *runs, "--host", "127.0.0.1", "--port", str(self.port), *options]
        if api_key is not None:
            self.command += ["--api-key", api_key]
        self.log: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.process: subprocess.Popen[Any] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 900) -> float:
        """Start the server and wait for ``/health``; returns the seconds that took."""
        import httpx

        shown = [part if part != self.api_key else "***" for part in self.command]
        print(f"starting: {' '.join(shown)}", file=sys.stderr, flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while time.time() - started < timeout:
            if self.process.poll() is not None:
                raise TunelabError(f"the server exited with code {self.process.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.time() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TunelabError(f"the server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()

    def rss_mb(self) -> float:
        """The server's resident set size now, in MiB (Linux)."""
        assert self.process is not None
        rss = proc_kib_field_bytes(f"/proc/{self.process.pid}/status", "VmRSS")
        if rss is None:
            raise TunelabError("the server's RSS cannot be read (it has exited, or this is not Linux).")
        return rss / 2 ** 20

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far (user + system, all threads; Linux): unlike wall
        time, it does not count the time other processes on a shared machine took."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 60) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code (None if it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "LocalServer":
        """``with LocalServer(...) as server: server.start()`` -- the block always ends with the server stopped."""
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.log.close()
