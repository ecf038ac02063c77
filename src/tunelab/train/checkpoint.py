"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the trainable parameters (by name, whatever the method), the optimizer
and scheduler state, every RNG state, and the data position. It is written to a
temporary directory and renamed into ``checkpoints/step-N`` in one step, so a crash
during saving leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.io import atomic_dir
from tunelab.methods.base import trainable_state

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune all but the newest ``keep_last``."""
    target = Path(run_dir) / "checkpoints" / f"step-{state.step}"
    with atomic_dir(target) as tmp:
        tensors = {name: t.contiguous().cpu() for name, t in trainable_state(model).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_if_due(step: int, save_every: int | None, stop_requested: bool, save: Callable[[], None],
                      report: Callable[[str], None]) -> bool:
    """Checkpoint on schedule, or because a stop was requested; True when the loop must stop."""
    if save_every and step % save_every == 0 or stop_requested:
        save()
    if stop_requested:
        report(f"stopped at step {step}: checkpoint saved; continue with --resume")
    return stop_requested


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint into a model built the same way; returns the saved position."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in tensors if name not in params]
    expected = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing or expected:
        raise TunelabError(f"checkpoint {path} does not fit this run's model: {len(missing)} saved parameter(s) "
                           f"unknown (e.g. {missing[:2]}), {len(expected)} trainable parameter(s) not saved "
                           f"(e.g. {expected[:2]}). Resume with the same method and model config as the run "
                           "that wrote it (the run's config.yaml).")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    extra = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return TrainState(**json.loads((path / "trainer_state.json").read_text()))
