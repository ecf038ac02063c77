"""``tunelab train --nproc-per-node N``: the same command re-launched under torchrun.

So a user need not know torchrun: the CLI checks the config once (no process is started for
a setting that cannot work), then runs itself as N workers on this machine and forwards
Ctrl-C/SIGTERM to them, so they checkpoint together and stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any


def torchrun_command(nproc_per_node: int, argv: list[str]) -> list[str]:
    """The command that runs this ``tunelab`` invocation (``argv``, without the launcher flag)
    under torchrun on this machine: ``--standalone`` picks a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "tunelab.cli", *argv]


def strip_launcher_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` / ``--nproc-per-node=N`` (the relaunched workers
    must not relaunch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def relaunch(nproc_per_node: int, argv: list[str]) -> int:
    """Run ``tunelab argv`` under torchrun with ``nproc_per_node`` processes and wait for it.

    torchrun runs in its own session, so a Ctrl-C in the terminal reaches this process only,
    which passes one SIGTERM on; torchrun passes it to every worker, and they checkpoint
    together and stop (torchrun allows them 30 s before it kills them). Returns torchrun's
    exit status."""
    child = subprocess.Popen(torchrun_command(nproc_per_node, strip_launcher_flag(argv)), start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
