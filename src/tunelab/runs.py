"""The run directory: every path in it, read and written in one place.

A run directory is self-describing: every command after training (chat, predict, eval,
export, serve, the web UI) takes just its path. This module is the only place that knows
the names of the files in it, so a reader never guesses a layout and a writer never
invents one::

    RUN/
      config.yaml          resolved config, written once when the run starts
      status.json          running | finished | failed | stopped, pid, step, total_steps, times, error
      metrics.jsonl        one JSON object per logged step or evaluation (appended, fsynced)
      train.log            the run's progress lines (announcements, stops, errors)
      checkpoints/step-N/  everything needed to resume (see tunelab.train.checkpoint)
      adapter/ or model/   the trained method's weights (methods decide which)
      value_head.safetensors   reward model / PPO critic head (stages rm, ppo)
      tokenizer files      tokenizer.json, tokenizer_config.json, ...
      loss.png             train/eval loss against step
      eval/                results of `tunelab eval`

``status.json`` is what lets a reader that did not start the run (the web UI, a second
shell) tell a live run from a dead one: a "running" status whose process is gone reads
as "failed", so a run killed with SIGKILL or by a power cut never shows as running forever.

Every file of a run is written atomically (``tunelab.io``), so a crash leaves complete
files plus, at worst, temporaries named after their targets (``.adapter.<random>.tmp``,
``checkpoints/.step-4.old``, ...): :meth:`RunDir.clean_temporaries` removes exactly
those, for the targets named here, and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_open, temporary_target, write_json

if TYPE_CHECKING:
    from tunelab.config import RunConfig

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
VALUE_HEAD_FILE = "value_head.safetensors"
LOSS_PLOT_FILE = "loss.png"
EVAL_DIR = "eval"
#: Files ``tokenizer.save_pretrained(run_dir)`` may write; ``tokenizer_config.json`` always.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
#: The staging directory the tokenizer is saved into before its files are moved into the root.
TOKENIZER_STAGING = "tokenizer"
#: Names in a run's root that are written atomically, so may leave temporaries after a crash.
_ATOMIC_TARGETS = frozenset({CONFIG_FILE, STATUS_FILE, METRICS_FILE, ADAPTER_DIR, MODEL_DIR, VALUE_HEAD_FILE,
                             LOSS_PLOT_FILE, TOKENIZER_STAGING, *TOKENIZER_FILES})
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")

RunState = Literal["running", "finished", "failed", "stopped"]
RUN_STATES: tuple[RunState, ...] = ("running", "finished", "failed", "stopped")


def _now() -> str:
    """ISO 8601 UTC with seconds: sortable as text and readable in a browser."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and has not exited (a zombie has exited)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:  # an exited child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class RunStatus:
    """The content of ``status.json`` as a reader should see it (liveness already applied)."""

    status: RunState
    pid: int | None = None
    step: int = 0
    total_steps: int | None = None
    started_at: str | None = None
    updated_at: str | None = None
    error: str | None = None
    host: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory, and the reads and writes of its small files.

    Frozen and cheap: build one wherever a path is at hand (``RunDir(cfg.output_dir)``).
    Large artefacts (checkpoints, method weights, the tokenizer) are written by their own
    modules into the paths named here.
    """

    root: Path = field()

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- paths --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def value_head(self) -> Path:
        return self.root / VALUE_HEAD_FILE

    @property
    def tokenizer(self) -> Path:
        """The directory ``AutoTokenizer.from_pretrained`` reads: the run's root."""
        return self.root

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present in the run."""
        return [self.root / name for name in TOKENIZER_FILES if (self.root / name).is_file()]

    def trained_outputs(self) -> list[Path]:
        """What a run leaves that another run must not mix with: checkpoints and trained weights."""
        return [path for path in (self.checkpoints, self.adapter, self.model) if path.exists()]

    def contents(self) -> list[Path]:
        """What the directory holds, by name, besides tunelab's temporaries ([] when it does not exist)."""
        if not self.root.is_dir():
            return []
        return sorted(path for path in self.root.iterdir() if temporary_target(path.name) is None)

    # -- leftovers of interrupted writes and replaced runs --------------------------------
    def stale_temporaries(self) -> list[Path]:
        """Temporaries that an interrupted atomic write of this run left: in the root, those of
        the files named above; in ``checkpoints/``, those of ``step-N`` (written, replaced or
        pruned). Anything else, a user's file included, is never listed."""
        found = []
        for folder, owned in ((self.root, _ATOMIC_TARGETS.__contains__),
                              (self.checkpoints, lambda target: _CHECKPOINT_NAME.match(target) is not None)):
            if folder.is_dir():
                found += [path for path in folder.iterdir()
                          if (temp := temporary_target(path.name)) is not None and owned(temp[0])]
        return sorted(found)

    def clean_temporaries(self) -> list[Path]:
        """Remove :meth:`stale_temporaries` (call only while no process writes this run); return them.

        A parked ``.NAME.old`` whose ``NAME`` is missing is the only copy left (the crash
        came between moving the old copy aside and renaming the new one in): it is renamed
        back instead of deleted.
        """
        cleaned = self.stale_temporaries()
        for path in cleaned:
            target, parked = temporary_target(path.name)
            if parked and not (path.parent / target).exists():
                os.replace(path, path.parent / target)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return cleaned

    def move_aside(self) -> Path:
        """Rename the whole directory to ``NAME.replaced-<UTC time>`` beside it; return the new path.

        What ``--overwrite`` does to a previous run: nothing of it is deleted, and nothing of
        it (checkpoints above all) can mix with the new run's files.
        """
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target, n = self.root.with_name(f"{self.name}.replaced-{stamp}"), 1
        while target.exists():
            n += 1
            target = self.root.with_name(f"{self.name}.replaced-{stamp}-{n}")
        os.rename(self.root, target)
        return target

    # -- config -------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A run directory is one with a ``config.yaml`` (written before training starts)."""
        return self.config.is_file()

    def read_config(self) -> "RunConfig":
        """The resolved config the run was started with (also one saved by an older tunelab)."""
        from tunelab.config import load_saved_config

        if not self.is_run():
            raise ConfigError(f"{self.root} is not a tunelab run directory: {self.config} is missing. Pass the "
                              "output_dir of a `tunelab train` run.")
        return load_saved_config(self.config)

    def write_config(self, cfg: "RunConfig") -> None:
        """Write the resolved config (atomically); a run does this once, when it starts."""
        from tunelab.config import save_config

        save_config(cfg, self.config)

    # -- status -------------------------------------------------------------------------
    def _raw_status(self) -> dict[str, Any]:
        try:
            data = json.loads(self.status.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as err:
            raise TunelabError(f"{self.status} cannot be read ({err}). It is written atomically by tunelab, so it "
                               "was edited by hand or by another program: delete it and the run reads as "
                               "unknown.") from None
        return data if isinstance(data, dict) else {}

    def read_status(self) -> RunStatus | None:
        """The run's status, or None when it has none (not started, or made by an older tunelab).

        "running" is only believed while its process lives (on this host; a run started
        on another host is trusted as written): otherwise it reads as "failed".
        """
        raw = self._raw_status()
        if not raw:
            return None
        known = {k: raw.get(k) for k in RunStatus.__dataclass_fields__ if k in raw}
        if known.get("status") not in RUN_STATES:
            known["status"] = "failed"
            known["error"] = known.get("error") or f"{self.status} holds an unknown status {raw.get('status')!r}"
        status = RunStatus(**known)
        on_this_host = status.host in (None, socket.gethostname())
        if status.status == "running" and on_this_host and not (status.pid and pid_alive(status.pid)):
            return RunStatus(**{**status.to_dict(), "status": "failed",
                                "error": status.error or f"process {status.pid} ended without reporting (killed?)"})
        return status

    def write_status(self, **fields: Any) -> RunStatus:
        """Merge ``fields`` into ``status.json`` (atomically) and stamp ``updated_at``.

        Starting a run (``status="running"``) records this process's pid and host and a
        fresh ``started_at`` unless given; every other field keeps its previous value.
        """
        unknown = set(fields) - set(RunStatus.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown status field(s): {sorted(unknown)}")
        if "status" in fields and fields["status"] not in RUN_STATES:
            raise ValueError(f"status must be one of {RUN_STATES}, not {fields['status']!r}")
        data = self._raw_status()
        starting = data.get("status") != "running" or data.get("pid") != os.getpid()
        if fields.get("status") == "running" and starting:  # not a repeat of this process's own start
            data.update(pid=os.getpid(), host=socket.gethostname(), started_at=_now(), error=None)
        data.update(fields)
        data["updated_at"] = _now()
        write_json(self.status, data)
        return RunStatus(**{k: data.get(k) for k in RunStatus.__dataclass_fields__ if k in data})

    # -- metrics and log ----------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of ``metrics.jsonl``; a line cut short by a crash (the last one) is skipped."""
        try:
            text = self.metrics.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows past ``after_step``: a resumed run's file then reads as one run."""
        kept = [row for row in self.read_metrics() if row.get("step", 0) <= after_step]
        with atomic_open(self.metrics) as handle:
            for row in kept:
                handle.write(json.dumps(row) + "\n")

    def append_log(self, line: str) -> None:
        """Append one progress line to ``train.log`` (flushed: a reader tails it live)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(line.rstrip("\n") + "\n")

    def read_log(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # -- checkpoints --------------------------------------------------------------------
    def list_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary directories of an unfinished save are ignored)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None


def list_runs(runs_dir: str | os.PathLike) -> list[RunDir]:
    """The run directories directly inside ``runs_dir``, by name (an absent folder has none)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [RunDir(path) for path in sorted(root.iterdir()) if path.is_dir() and RunDir(path).is_run()]
