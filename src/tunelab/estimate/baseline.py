"""The framework baseline: what Python + torch + transformers + PEFT + accelerate occupy.

Why measured, not assumed: import footprints change with every library release (torch
alone is 150-250 MB resident depending on build), and the estimate is compared with the
peak resident set size of a real run. The measurement runs in a fresh interpreter
(``python -m tunelab.estimate.baseline``) that imports exactly what ``tunelab train``
imports and builds the accelerator, then reports its peak resident set size (VmHWM).
The result is cached per interpreter and library versions, so it is paid once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.models.loader import cache_root
from tunelab.memory import peak_rss_bytes

_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "tokenizers")


def _cache_file() -> Path:
    versions = "-".join(f"{name}{metadata.version(name)}" for name in _LIBRARIES)
    key = f"py{sys.version_info.major}.{sys.version_info.minor}-{versions}".replace("+", "_")
    return cache_root() / "estimate" / f"framework-{key}.json"


def measure_framework_bytes() -> int:
    """Run the import-only interpreter and return its peak resident set size."""
    result = subprocess.run([sys.executable, "-m", "tunelab.estimate.baseline"], capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise TunelabError("measuring the framework baseline failed (python -m tunelab.estimate.baseline): "
                           f"{result.stderr.strip()[-400:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def framework_bytes() -> int:
    """The cached framework baseline of this environment, measured on first use."""
    file = _cache_file()
    if file.is_file():
        return int(json.loads(file.read_text(encoding="utf-8"))["peak_rss_bytes"])
    value = measure_framework_bytes()
    write_json(file, {"peak_rss_bytes": value})
    return value


def _report() -> None:
    """Import what the trainer imports, build its accelerator, print the peak RSS as JSON."""
    import peft  # noqa: F401

    from tunelab.train.loop import Trainer  # noqa: F401  (torch, transformers, accelerate, tunelab)
    from tunelab.train.runtime import make_accelerator

    make_accelerator("auto")
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    _report()
