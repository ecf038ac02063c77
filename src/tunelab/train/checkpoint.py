"""Training checkpoints: everything needed to continue a run exactly where it stopped, and
nothing that can run code when it is read.

A checkpoint ``checkpoints/step-N/`` holds four files:

- ``trainable.safetensors``: the trainable parameters by name (whatever the method);
- ``state.safetensors``: every tensor of the optimizer and scheduler state and the torch
  (and CUDA) RNG states, which are uint8 tensors;
- ``state.json``: the rest of those states (numbers, strings, lists, nested dicts, the
  Python and NumPy RNG states), each tensor replaced by ``{"__tensor__": NAME}``;
- ``trainer_state.json``: the data position (:class:`TrainState`).

Why not ``torch.save``: it pickles, and unpickling a file can run any code in it. A run
directory is something people copy, share and download, so reading one must never execute
anything: safetensors and JSON readers build tensors and plain values only. A checkpoint of
the old pickle format (``state.pt``) is refused with a message, never unpickled.

Under several processes every rank takes part and the main process writes: the RNG states hold
each rank's torch generator, and under FSDP2 the shards are gathered into whole tensors and the
optimizer state is keyed by parameter name (``state.json``'s ``optimizer_keys``), restored into
shards on resume by torch's ``set_optimizer_state_dict``. ``torch.distributed.checkpoint`` is
not used: its reader unpickles a metadata file (see :mod:`tunelab.train.distributed`).

A checkpoint is written to a temporary directory and renamed into place in one step, and
pruned ones are renamed away before they are deleted, so at every instant a directory named
``step-N`` is complete. A failed write (a full disk, a read-only directory) removes its
temporary directory and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import TunelabError
from tunelab.io import atomic_dir
from tunelab.runs import RunDir
from tunelab.train.distributed import (full_optimizer_state, full_trainable_state, is_sharded, load_full_optimizer,
                                       load_full_trainable, per_rank, rank_and_world)

TRAINABLE_FILE = "trainable.safetensors"
STATE_TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
POSITION_FILE = "trainer_state.json"
#: The pickle written by tunelab before checkpoints were made safe to read; never loaded.
LEGACY_STATE_FILE = "state.pt"
#: ``state.json``'s ``format``: bumped when the layout changes, so an old reader refuses a new file.
FORMAT = "tunelab-checkpoint/2"

#: ``state.json``'s ``optimizer_keys``: the optimizer state keyed by parameter position (torch's own
#: ``state_dict``) or by parameter name (FSDP's gathered state); a checkpoint without it is by position.
_POSITIONS, _NAMES = "positions", "names"

# How state.json spells what JSON has no type for; a dict with exactly one of these keys is one.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, and the next micro-batch to read (``stream``: a
    ``data.streaming`` run's position in its stream, JSON, None otherwise)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    stream: dict[str, Any] | None = None


class _Unreadable(Exception):
    """A checkpoint file that does not hold what tunelab writes (truncated, edited, crafted)."""


# ------------------------------------------------------------------ state trees <-> JSON + tensors

class _TensorStore:
    """The tensors of a state tree, each stored once under its path in the tree.

    safetensors refuses tensors that share memory (bitsandbytes optimizers reuse one
    quantization map across parameters): the same tensor object is stored once and
    referenced twice; a different view of memory already stored is copied.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}
        self._storages: set[int] = set()
        self._seen: list[torch.Tensor] = []  # alive, so no later tensor reuses an id in _names

    def add(self, tensor: torch.Tensor, where: str) -> str:
        if id(tensor) in self._names:
            return self._names[id(tensor)]
        stored = tensor.detach().cpu()
        pointer = stored.untyped_storage().data_ptr()
        if pointer in self._storages:
            stored = stored.clone()
        self._storages.add(stored.untyped_storage().data_ptr())
        if where in self.tensors:  # keys with dots can spell one path twice
            where = f"{where}#{len(self.tensors)}"
        self.tensors[where] = stored.contiguous()
        self._names[id(tensor)] = where
        self._seen.append(tensor)
        return where


def _encode(value: Any, store: _TensorStore, where: str) -> Any:
    """``value`` as JSON, tensors moved into ``store``; tuples and non-string keys kept exactly."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return {_TENSOR: store.add(value, where)}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, store, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, store, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and
                                                                next(iter(value)) in (_TENSOR, _TUPLE, _ITEMS))
        if plain:
            return {k: _encode(v, store, f"{where}.{k}") for k, v in value.items()}
        return {_ITEMS: [[_encode(k, store, where), _encode(v, store, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where} is a {type(value).__name__}; a checkpoint stores tensors, numbers, "
                    "strings, lists, tuples and dicts only.")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`; anything but what it writes raises :class:`_Unreadable`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key == _TENSOR:
            if not isinstance(inner, str) or inner not in tensors:
                raise _Unreadable(f"it refers to a tensor {inner!r} that {STATE_TENSORS_FILE} does not hold")
            return tensors[inner]
        if key == _TUPLE and isinstance(inner, list):
            return tuple(_decode(v, tensors) for v in inner)
        if key == _ITEMS and isinstance(inner, list):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
                raise _Unreadable(f"a {_ITEMS} entry is not a list of [key, value] pairs")
            try:
                return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
            except TypeError as err:  # a key that cannot be a dict key (list, dict)
                raise _Unreadable(str(err)) from None
    return {k: _decode(v, tensors) for k, v in value.items()}


# ------------------------------------------------------------------------------------- RNG

def _rng_state(torch_per_rank: list[torch.Tensor]) -> dict[str, Any]:
    """The RNG states to restore; ``torch_per_rank``: every rank's torch generator (dropout masks
    differ by rank once their batches differ in shape), the main process's also under ``torch``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "torch_per_rank": torch_per_rank,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["kind"], np.asarray(saved["key"], dtype=np.uint32), saved["pos"],
                         saved["has_gauss"], saved["gauss"]))
    rank, world = rank_and_world()
    ranks = state.get("torch_per_rank")  # absent in checkpoints of older tunelab versions
    # resumed with another number of processes: every rank starts from the main process's state
    torch.set_rng_state(ranks[rank] if isinstance(ranks, list) and len(ranks) == world else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- save

_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "Free disk space (or move output_dir to a larger disk)"),
    errno.EDQUOT: ("the disk quota is exceeded", "Free space within your quota"),
    errno.EACCES: ("the directory is not writable", "Make the run directory writable"),
    errno.EPERM: ("the directory is not writable", "Make the run directory writable"),
    errno.EROFS: ("the file system is read-only", "Move output_dir to a writable file system"),
}


def _write_failure(target: Path, err: OSError, previous: Path | None) -> TunelabError:
    reason, fix = _WRITE_FAILURES.get(err.errno, ("writing failed", "Fix the cause"))
    kept = (f"the previous checkpoint {previous} is intact" if previous is not None
            else "the run had no earlier checkpoint")
    then = "continue with `tunelab train CONFIG --resume`" if previous is not None else "start the run again"
    return TunelabError(f"could not write checkpoint {target}: {reason} ({err.strerror or err}). Training stopped; "
                        f"the partial checkpoint was removed and {kept}. {fix}, then {then}.")


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    keep_last: int, *, write: bool = True) -> Path | None:
    """Write ``checkpoints/step-N`` atomically and prune all but the newest ``keep_last``.

    Under FSDP every rank calls it (the shards are gathered into whole tensors, and the
    optimizer state is keyed by parameter name, not position) and only ``write`` writes;
    the files have the same layout either way, so nothing in them needs a pickle."""
    sharded = is_sharded(model)
    trainable = full_trainable_state(model)
    optimizer_state = full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    torch_per_rank = per_rank(torch.get_rng_state())
    if not write:
        return None
    run = RunDir(run_dir)
    target = run.checkpoint(state.step)
    previous = run.latest_checkpoint()
    store = _TensorStore()
    tree = {"format": FORMAT, "optimizer_keys": _NAMES if sharded else _POSITIONS,
            "optimizer": _encode(optimizer_state, store, "optimizer"),
            "scheduler": _encode(scheduler.state_dict(), store, "scheduler"),
            "rng": _encode(_rng_state(torch_per_rank), store, "rng")}
    trainable = {name: t.contiguous() for name, t in trainable.items()}
    try:
        with atomic_dir(target) as tmp:
            save_file(trainable, str(tmp / TRAINABLE_FILE))
            save_file(store.tensors, str(tmp / STATE_TENSORS_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(tree), encoding="utf-8")
            (tmp / POSITION_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    except OSError as err:
        raise _write_failure(target, err, previous) from None
    _prune(run, keep_last)
    return target


def _prune(run: RunDir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, each renamed away first: a crash
    mid-delete leaves a hidden temporary directory, never a half-deleted ``step-N``."""
    for old in run.list_checkpoints()[:-keep_last]:
        doomed = old.with_name(f".{old.name}.pruned.tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.replace(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


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
    return RunDir(run_dir).list_checkpoints()


# ------------------------------------------------------------------------------------- load

def _refuse_legacy(path: Path) -> None:
    if (path / LEGACY_STATE_FILE).exists() and not (path / STATE_FILE).exists():
        raise TunelabError(
            f"checkpoint {path} was written by an older tunelab: its optimizer, scheduler and RNG state are in "
            f"{LEGACY_STATE_FILE}, a Python pickle, and tunelab no longer reads pickles because loading one can run "
            "any code it contains. It was not opened. Start the run over (`tunelab train CONFIG --overwrite`, or a "
            "new output_dir); if you wrote this checkpoint yourself, you can instead finish the run with the "
            "tunelab version that wrote it.")


def _damaged(path: Path, file: str, why: object) -> TunelabError:
    return TunelabError(f"checkpoint file {path / file} cannot be used: {why}. The checkpoint is damaged (truncated, "
                        f"edited or not written by tunelab). Delete {path} to resume from the checkpoint before it, "
                        "or start the run over with --overwrite.")


def _read_tensors(path: Path, file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / file))
    except FileNotFoundError:
        raise _damaged(path, file, "the file is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _damaged(path, file, err) from None


def _read_json(path: Path, file: str) -> Any:
    try:
        return json.loads((path / file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, file, "the file is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _damaged(path, file, err) from None


def _read_state(path: Path) -> dict[str, Any]:
    """The optimizer, scheduler and RNG states of a checkpoint, as plain values and tensors."""
    tensors = _read_tensors(path, STATE_TENSORS_FILE)
    tree = _read_json(path, STATE_FILE)
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        found = tree.get("format") if isinstance(tree, dict) else None
        raise _damaged(path, STATE_FILE, f"its format is {found!r}, this tunelab reads {FORMAT!r} (a checkpoint "
                                         "written by a newer tunelab needs that version)")
    keys = tree.get("optimizer_keys", _POSITIONS)
    if keys not in (_POSITIONS, _NAMES):
        raise _damaged(path, STATE_FILE, f"its optimizer_keys is {keys!r}, not {_POSITIONS!r} or {_NAMES!r}")
    try:
        state = {key: _decode(tree[key], tensors) for key in ("optimizer", "scheduler", "rng")}
    except KeyError as err:
        raise _damaged(path, STATE_FILE, f"it has no {err}") from None
    except (_Unreadable, RecursionError) as err:
        raise _damaged(path, STATE_FILE, err) from None
    state["optimizer_keys"] = keys
    return state


def _read_position(path: Path) -> TrainState:
    saved = _read_json(path, POSITION_FILE)
    names = {f.name for f in fields(TrainState)} - {"stream"}
    if not (isinstance(saved, dict) and saved.keys() - {"stream"} == names
            and all(type(saved[name]) is int and saved[name] >= 0 for name in names)
            and isinstance(saved.get("stream"), (dict, type(None)))):
        raise _damaged(path, POSITION_FILE, f"it must hold the non-negative integers {sorted(names)} (and "
                                            "'stream', an object or null)")
    return TrainState(**saved)


def _check_fit(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    unknown = [name for name in tensors if name not in params]
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    reshaped = [f"{name} {tuple(t.shape)} vs {tuple(params[name].shape)}" for name, t in tensors.items()
                if name in params and t.shape != params[name].shape]
    problems = [f"{len(found)} {what} (e.g. {', '.join(found[:2])})" for found, what in (
        (unknown, "saved parameter(s) this model does not have"), (missing, "trainable parameter(s) not saved"),
        (reshaped, "parameter(s) of another shape, saved vs now")) if found]
    if problems:
        raise TunelabError(f"checkpoint {path} does not fit this run's model: {'; '.join(problems)}. Resume with the "
                           "same method and model config as the run that wrote it (the run's config.yaml), or start "
                           "over with --overwrite.")


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint into a model built the same way; returns the saved position.

    Every file is read and checked before anything is restored, so a damaged checkpoint
    leaves the model, optimizer and RNGs untouched.
    """
    path = Path(path)
    _refuse_legacy(path)
    tensors = _read_tensors(path, TRAINABLE_FILE)
    state = _read_state(path)
    position = _read_position(path)
    params = dict(model.named_parameters())
    _check_fit(path, tensors, params)
    sharded = is_sharded(model)
    if (state["optimizer_keys"] == _NAMES) != sharded:
        written, now = ("train.distributed=fsdp", "without it") if not sharded else ("without FSDP", "under FSDP")
        raise TunelabError(f"checkpoint {path} was written {written} and this run trains {now}: the optimizer state "
                           "is laid out differently. Resume with the launch and train.distributed the run was "
                           "trained with (its config.yaml), or start over with --overwrite.")
    try:
        load_full_trainable(model, tensors)
        if sharded:
            load_full_optimizer(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise TunelabError(f"the optimizer or scheduler state in {path} does not fit this run ({err}). Resume with "
                           "the same method, train.optimizer and scheduler settings as the run that wrote it (the "
                           "run's config.yaml), or start over with --overwrite.") from None
    try:
        _set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise _damaged(path, STATE_FILE, f"its RNG state cannot be restored ({err})") from None
    return position
