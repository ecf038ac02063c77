"""One run lifecycle for every trainer; each trainer supplies only its step.

:class:`RunTrainer` owns everything a run does around the maths, so the batch loop
(:class:`tunelab.train.loop.Trainer`) and the rollout loops (PPO, GRPO) behave the same:

1. ``check_config`` (the trainer's own checks), then :func:`check_run_dir`: nothing is
   loaded and nothing is written before the config and the run directory are known good
   (a refused ``--resume``, ``--overwrite`` or output_dir leaves the directory as it was);
2. :func:`prepare_run_dir`: a replaced run put aside, temporaries of interrupted saves
   removed, the run directory, its ``config.yaml`` (written here only) and ``status.json``
   ("running", with this pid);
3. set-up: accelerator, seed, method, base model, data, step count, the method applied,
   gradient checkpointing, the trainer's ``attach`` (objective, value head, reward,
   reference...), optimizer, scheduler;
4. ``run``: resume from the latest checkpoint, then steps until ``total_steps`` with
   logging (``metrics.jsonl``, ``train.log``, ``status.json``), periodic evaluation,
   checkpoints on schedule, and a clean stop (checkpoint, then exit) on SIGINT/SIGTERM;
5. final evaluation and save: the tokenizer, the trainer's ``save_outputs``, the method's
   weights (each file atomically); status "finished" (or "stopped"; "failed" with the
   error on any exception).

Under ``accelerate launch``/``torchrun`` every process runs the lifecycle; only the main
process writes into the run directory (:mod:`tunelab.train.distributed`: strategies, rank
shares of each step's micro-batches, the stop flag agreed by all ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.data.pipeline import DataBundle, build_data, example_lengths
from tunelab.data.streaming import open_stream
from tunelab.errors import ConfigError, TunelabError
from tunelab.heap import TRAINING_MMAP_THRESHOLD, compact_heap
from tunelab.memory import peak_memory_bytes
from tunelab.methods.base import Method, count_parameters, get_method
from tunelab.models.loader import load_base, load_tokenizer, training_dtype
from tunelab.io import atomic_files
from tunelab.runs import TOKENIZER_STAGING, RunDir
from tunelab.train.batches import MicroBatches, total_steps
from tunelab.train.checkpoint import TrainState, checkpoint_if_due, load_checkpoint, save_checkpoint
from tunelab.train.compile import compile_decoder_layers
from tunelab.trackers import with_trackers
from tunelab.train.monitor import Monitor
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.distributed import (agree, check_distributed, check_world_for_data, deepspeed_plugin,
                                       gather_for_save, is_sharded, wrap_model)
from tunelab.train.runtime import make_accelerator, trains_on_compact_heap
from tunelab.train.stages import get_stage
from tunelab.train.stream_batches import StreamBatches, check_streaming

if TYPE_CHECKING:
    from tunelab.estimate.budget import BudgetChoice
    from accelerate import Accelerator

    from tunelab.train.stages.base import StageSpec


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    interrupted: bool
    trainable_params: int
    total_params: int
    tokens_per_s: float
    peak_memory_bytes: int
    wall_s: float
    last_metrics: dict[str, Any] = field(default_factory=dict)
    #: Mean training loss over the steps this invocation ran, each weighted by its tokens (what
    #: the run learned on the whole; ``final_loss`` is one step's, and noisy).
    mean_loss: float | None = None
    #: What ``train.memory_budget`` resolved to (None without a budget): predicted vs measured peak.
    budget: BudgetChoice | None = None


@dataclass
class StepOutput:
    """What one training step reports: tokens it put through the model, and its metrics.

    The lifecycle adds ``step``, ``lr`` and ``tokens_per_s`` to ``row`` when it logs it.
    """

    tokens: int
    row: dict[str, Any]


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: What ``--allow-config-change`` lets a resumed run change: how long and how fast it trains, what
#: it logs, evaluates and keeps, and memory/speed settings that compute the same steps. Every other
#: key (model, method, stage, training data, lengths, batch shape, precision, ...) decides what the
#: checkpoint's weights and optimizer state mean, so a change of it is refused even with the flag.
RESUMABLE_KEYS = frozenset({
    "train.lr", "train.max_steps", "train.epochs",
    "train.log_every", "train.save_every", "train.keep_last", "train.eval_every", "train.eval_base",
    "train.report_to", "data.eval", "data.num_workers", "data.cache_dir",
    "train.gradient_checkpointing", "train.loss_chunk_size", "train.auto_batch_size", "train.compile",
})
#: Keys never compared: the run directory is the one being resumed, however its path is spelled.
_UNCOMPARED = frozenset({"output_dir"})
_ABSENT = "(absent)"

#: One changed key of a resumed run's config: (dotted key, saved value, new value).
ConfigChange = tuple[str, Any, Any]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """The keys whose values differ between two configs, in the order of the config's sections."""
    before, after = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    keys = [*before, *(key for key in after if key not in before)]
    return [(key, before.get(key, _ABSENT), after.get(key, _ABSENT)) for key in keys
            if key not in _UNCOMPARED and before.get(key, _ABSENT) != after.get(key, _ABSENT)]


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def _diff_lines(changes: list[ConfigChange]) -> str:
    return "\n".join(f"  {key}: {_show(old)} -> {_show(new)}" for key, old, new in changes)


@dataclass(frozen=True)
class RunDirPlan:
    """What :func:`prepare_run_dir` will do, decided by :func:`check_run_dir` before any write."""

    resume: bool = False
    #: An existing run to put aside first: renamed to NAME.replaced-<time> ("move") or deleted ("discard").
    replace: Literal["move", "discard"] | None = None
    #: Resume only: the keys ``--allow-config-change`` let change (``config.yaml`` is rewritten).
    config_changes: tuple[ConfigChange, ...] = ()


def _check_writable(root: Path) -> None:
    """``output_dir`` is, or can become, a directory this process writes into."""
    if root.exists() and not root.is_dir():
        raise TunelabError(f"output_dir {root} is a file, not a directory. Set output_dir to a directory path (it "
                           "is created when missing).")
    existing = next(path for path in (root, *root.parents) if path.exists())
    if not existing.is_dir():
        raise TunelabError(f"output_dir {root} cannot be created: {existing} is a file. Set output_dir to a path "
                           "under a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TunelabError(f"output_dir {root} is not writable: this user may not write into {existing} (its "
                           "permissions, or a read-only file system). Set output_dir to a directory you can write "
                           "to.")


def _check_not_in_use(run: RunDir) -> None:
    status = run.read_status()
    if status is not None and status.status == "running" and status.pid != os.getpid():
        raise TunelabError(f"output_dir {run.root} belongs to a run that is training now (pid {status.pid} on "
                           f"{status.host or 'this host'}, step {status.step}): a second run there would mix their "
                           "files. Wait until it ends, or stop it (Ctrl-C or SIGTERM: it saves a checkpoint) and "
                           "then pass --resume.")


def _check_resume(run: RunDir, cfg: RunConfig, allow_config_change: bool) -> tuple[ConfigChange, ...]:
    """The run in ``run`` can continue under ``cfg``; returns the changes the user allowed."""
    if not run.is_run():
        raise TunelabError(f"--resume: {run.root} holds no run to continue ({run.config} is missing). Leave out "
                           "--resume to start a run there, or set output_dir to the run you meant.")
    if run.latest_checkpoint() is None:
        raise TunelabError(f"--resume: {run.checkpoints} holds no checkpoint to resume from. Run without --resume "
                           "and with --overwrite to start over (the old run is moved aside), and set "
                           "train.save_every so checkpoints are written.")
    changes = config_changes(run.read_config(), cfg)
    if not changes:
        return ()
    own = f"`tunelab train {run.config} --resume`"
    fixed = [key for key, _, _ in changes if key not in RESUMABLE_KEYS]
    head = f"--resume: this config differs from the one {run.root} was trained with ({run.config}):\n" \
           f"{_diff_lines(changes)}\n"
    if fixed:
        raise ConfigError(f"{head}{', '.join(fixed)} change{'s' if len(fixed) == 1 else ''} what is trained, so the "
                          "checkpoint cannot continue under the new value (even --allow-config-change only allows "
                          f"{', '.join(sorted(RESUMABLE_KEYS))}). Resume with the run's own config ({own}), or "
                          "start a new run: another output_dir, or --overwrite (the old run is moved aside).")
    if not allow_config_change:
        raise ConfigError(f"{head}Pass --allow-config-change to continue with the new value(s), or resume with the "
                          f"run's own config: {own}.")
    return tuple(changes)


def check_run_dir(run: RunDir, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                  discard: bool = False, force: bool = False, allow_config_change: bool = False) -> RunDirPlan:
    """Decide whether a run may start in ``run`` and how; raise the reason when it may not.

    Reads only: nothing is written (and no model is loaded) before every rule here has
    passed, so a refused start leaves the directory byte for byte as it was. Every rule
    about whether a run may start in a directory belongs here:

    - ``output_dir`` is, or can become, a writable directory, and no live process trains in it;
    - ``resume``: it holds a run with a checkpoint, and the config differs from the run's
      own only in :data:`RESUMABLE_KEYS`, and only with ``allow_config_change``;
    - a directory that is not a run (no ``config.yaml``/``status.json``) but holds files is
      someone's own: refused unless ``force``;
    - a run with checkpoints or trained weights is refused unless ``overwrite``, which puts
      it aside whole (renamed; deleted with ``discard``) so nothing of it mixes with the new run.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite starts a new one there: pass "
                          "one of them.")
    if discard and not overwrite:
        raise ConfigError("--discard goes with --overwrite: it deletes the previous run instead of moving it aside.")
    _check_writable(run.root)
    _check_not_in_use(run)
    if resume:
        return RunDirPlan(resume=True, config_changes=_check_resume(run, cfg, allow_config_change))
    if not (run.is_run() or run.status.exists()):
        found = run.contents()
        if found and not force:
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise TunelabError(f"output_dir {run.root} is not a tunelab run but holds files ("
                               f"{', '.join(path.name for path in found[:5])}{more}); a run would write its "
                               "config.yaml, tokenizer files and weights among them. Set output_dir to a new or "
                               "empty directory, or pass --force to write the run there anyway (files of the same "
                               "names are replaced).")
        return RunDirPlan()
    if overwrite:
        return RunDirPlan(replace="discard" if discard else "move")
    leftovers = [path.name for path in run.trained_outputs()]
    if leftovers:
        raise TunelabError(f"output_dir {run.root} already holds a run ({', '.join(leftovers)}). Pass --resume to "
                           "continue it, --overwrite to start over there (the old run is moved aside to "
                           f"{run.name}.replaced-<time>), or set output_dir to a new directory.")
    return RunDirPlan()


def prepare_run_dir(run: RunDir, cfg: RunConfig, plan: RunDirPlan) -> list[str]:
    """Make the run directory ready as :func:`check_run_dir` planned; return what was done, for the user.

    Puts a replaced run aside, removes temporaries of interrupted saves, writes the
    resolved config (at a fresh start, or on a resume whose changes were allowed) and a
    "running" status; a fresh start also clears the progress record (metrics, log, plot)
    a previous start left there, so the files describe this run only.
    """
    notes = []
    try:
        if plan.replace is not None:
            moved = run.move_aside()
            if plan.replace == "discard":
                shutil.rmtree(moved)
                notes.append(f"--overwrite --discard: deleted the previous run in {run.root}")
            else:
                notes.append(f"--overwrite: moved the previous run to {moved} (delete it when you no longer "
                             "need it)")
        run.root.mkdir(parents=True, exist_ok=True)
        cleaned = run.clean_temporaries()
        if cleaned:
            notes.append(f"removed {len(cleaned)} temporary file(s) of an interrupted save: "
                         f"{', '.join(str(path.relative_to(run.root)) for path in cleaned)}")
        if not plan.resume:
            for path in (run.metrics, run.log, run.loss_plot):
                path.unlink(missing_ok=True)
        if not plan.resume or plan.config_changes:
            run.write_config(cfg)
        if plan.config_changes:
            notes.append(f"--allow-config-change: resuming with\n{_diff_lines(list(plan.config_changes))}")
        run.write_status(status="running", step=0, total_steps=None, error=None)
    except OSError as err:
        raise TunelabError(f"output_dir {run.root} cannot be written: {err.strerror or err} "
                           f"({err.filename or run.root}). Set output_dir to a directory you can write to (or "
                           "free disk space).") from None
    return notes


def enable_gradient_checkpointing(model: nn.Module, method: Method) -> None:
    if not method.supports_gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing does not work with method '{method.name}' (its virtual "
                          "tokens are passed as cached keys/values, which checkpointing discards). Set "
                          "train.gradient_checkpointing=false for this method.")
    # transformers renamed it activation_checkpointing_enable (the old name warns, and goes in v6)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: keep a grad path into checkpointed blocks


def load_training_base(cfg: RunConfig, accelerator: "Accelerator", method: Method) -> nn.Module:
    """The base model in the dtype this run trains with (see ``training_dtype``)."""
    dtype = training_dtype(cfg.model.dtype, accelerator.mixed_precision, method.trains_base_weights)
    return load_base(cfg.model, accelerator.device, dtype)[0]


def _describe(err: BaseException) -> str:
    if isinstance(err, TunelabError):
        return str(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class RunTrainer:
    """The lifecycle of one run (module docstring); subclasses implement the hooks below.

    Required: ``batch_order`` (which examples a step reads), ``attach`` (what the stage adds
    to the model before the optimizer is built) and ``step`` (one optimizer step, or one
    rollout-and-update step). Optional: ``check_config``, ``updates_per_step``,
    ``announce``, ``baseline_metrics``, ``evaluate``, ``save_outputs``.

    Attributes a step uses: ``cfg``, ``stage``, ``accelerator``, ``device``, ``method``,
    ``tokenizer``, ``data``, ``model`` (prepared by accelerate), ``optimizer``,
    ``scheduler``, ``state`` (``TrainState``: step and data position), ``total_steps``,
    ``run_dir`` (a :class:`RunDir`), :meth:`next_batch` and :meth:`say`.
    """

    #: "batch" (optimizer steps over micro-batches of a dataset) or "rollout" (samples, then updates).
    loop: ClassVar[Literal["batch", "rollout"]]

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, discard: bool = False,
                 force: bool = False, allow_config_change: bool = False, progress: bool = True,
                 budget: BudgetChoice | None = None):
        """``resume``, ``overwrite``, ``discard``, ``force``, ``allow_config_change``: how the run
        may treat what ``cfg.output_dir`` already holds (:func:`check_run_dir`)."""
        self.stage: "StageSpec" = get_stage(cfg.stage)
        if not isinstance(self, self.stage.trainer):
            raise ConfigError(f"stage '{cfg.stage}' is trained by {self.stage.trainer.__name__}, not "
                              f"{type(self).__name__}: start it with `tunelab train` (tunelab.train.run_stage), "
                              "which picks the stage's own loop.")
        self.check_config(cfg)
        self.strategy = check_distributed(cfg)
        if cfg.data.streaming:
            check_streaming(cfg)
        if cfg.train.memory_budget is not None and budget is None:
            raise ConfigError("train.memory_budget is resolved by `tunelab train` (and the web UI, which runs it); "
                              "from Python, call tunelab.estimate.budget.fit_memory_budget(cfg) and pass its "
                              "config and choice (budget=) to run_stage, or remove train.memory_budget.")
        self.budget = budget  # what train.memory_budget resolved to (tunelab.estimate.budget), or None
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.run_dir = RunDir(cfg.output_dir)
        self.plan = check_run_dir(self.run_dir, cfg, resume=resume, overwrite=overwrite, discard=discard,
                                  force=force, allow_config_change=allow_config_change)
        self.accelerator = make_accelerator(cfg.train.precision, self.strategy,
                                            deepspeed_plugin(cfg) if self.strategy == "deepspeed" else None)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.rank, self.processes = self.accelerator.process_index, self.accelerator.num_processes
        heap_note = self._compact_heap()
        self.accelerator.wait_for_everyone()  # every process has checked before the main one writes
        if self.is_main:
            for note in [*prepare_run_dir(self.run_dir, cfg, self.plan), *(self.budget.lines() if self.budget else []),
                         *heap_note]:
                self.say(note)
        with self._recording_failure():
            self._setup()

    def _compact_heap(self) -> list[str]:
        """Apply ``train.compact_heap`` before anything large is allocated (it stays for the rest of
        the process: glibc has one setting per process); the note to log, if any."""
        if not trains_on_compact_heap(self.cfg, self.device.type):
            return []
        if not compact_heap():
            return ["compact heap: not available (the C library is not glibc); resident memory may exceed "
                    "the live tensors"]
        return [f"compact heap: freed blocks of {TRAINING_MMAP_THRESHOLD // 2**20} MiB or more go back to the "
                "system (train.compact_heap; steps are slower, memory follows the live tensors)"]

    def _setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.method = get_method(cfg.method)
        # The data before the model: a bad record, or a launch the data cannot feed, is reported
        # without waiting for the model to load.
        self.tokenizer = load_tokenizer(cfg.model)
        self.data: DataBundle = (open_stream if cfg.data.streaming else build_data)(cfg, self.tokenizer)
        self.stream = self.batch_order()
        check_world_for_data(self.stream.per_epoch, cfg, self.processes)
        base = load_training_base(cfg, self.accelerator, self.method)
        self.total_steps = total_steps(cfg, self.stream.per_epoch, self.processes)
        optimizer_steps = self.total_steps * self.updates_per_step()
        self.method.configure_schedule(optimizer_steps)
        model = self.method.apply(base, self.tokenizer)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model, self.method)
        if cfg.train.compile:
            compile_decoder_layers(model)
        self.attach(model)
        # DDP and FSDP2 are applied here, not by accelerate (tunelab.train.distributed says why);
        # FSDP2 replaces the parameters, so the optimizer is built after it.
        wrapped = wrap_model(model, self.strategy, self.device, self.accelerator.mixed_precision)
        optimizer = build_optimizer(self.method.param_groups(model, cfg.train), cfg.train, say=self.say)
        self.scheduler = build_scheduler(optimizer, cfg.train, optimizer_steps)
        if self.strategy in ("ddp", "fsdp"):
            self.model, self.optimizer = wrapped, self.accelerator.prepare_optimizer(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.trainable_params, self.total_params = count_parameters(self.model)
        self.state = TrainState()
        self._status(total_steps=self.total_steps)

    # -- hooks ----------------------------------------------------------------------------
    @staticmethod
    def check_config(cfg: RunConfig) -> None:
        """Refuse settings this loop cannot honour; runs before anything is loaded or written."""

    def batch_order(self) -> MicroBatches:
        """The deterministic order in which steps read ``self.data.train``."""
        raise NotImplementedError

    def updates_per_step(self) -> int:
        """Optimizer updates per step (rollout loops update several times per rollout)."""
        return 1

    def attach(self, model: nn.Module) -> None:
        """Add what the stage needs to the method-applied ``model`` before the optimizer is built."""
        raise NotImplementedError

    def step(self) -> StepOutput:
        """One training step: read batches with :meth:`next_batch`, update, report."""
        raise NotImplementedError

    def announce(self) -> list[str]:
        """Lines printed (and logged) when training starts."""
        return []

    def baseline_metrics(self) -> dict[str, float]:
        """Metrics logged at step 0 of a fresh run (the base model's eval loss)."""
        return {}

    def evaluate(self) -> dict[str, float]:
        """Eval metrics (``eval_*``), every ``train.eval_every`` steps and at the end; {} for none."""
        return {}

    def save_outputs(self, model: nn.Module) -> None:
        """Write what the stage adds to the run directory, before the method's weights are saved."""

    # -- helpers for steps -----------------------------------------------------------------
    def next_batch(self) -> list[int]:
        """Indices of this rank's next batch of ``self.data.train``; advances the data position in ``state``.

        Each call reads one batch per rank from the one order and keeps the rank's own, so the
        position (and a checkpoint of it) is the same on every rank."""
        batches = [next(self._batches) for _ in range(self.processes)]
        epoch, index, _ = batches[-1]
        indices = batches[self.rank][2]
        self.state.epoch, self.state.batch_in_epoch = epoch, index + 1
        if isinstance(self.stream, StreamBatches):  # a stream's position is its own (JSON in the checkpoint)
            self.state.stream = self.stream.state_dict()
        return indices

    def say(self, text: str) -> None:
        """A message for the user: on the terminal (above the progress bar) and in ``train.log``
        (the main process only: the other ranks would repeat it)."""
        if not self.is_main:
            return
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.write(text)
            return
        print(text, file=sys.stderr)  # during set-up, before the bar exists
        self.run_dir.append_log(text)

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional (for the metrics row)."""
        return round(self.state.epoch + self.state.batch_in_epoch / self.stream.per_epoch, 4)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with self._recording_failure():
            return self._run()

    def _run(self) -> TrainResult:
        t = self.cfg.train
        self._resume_if_asked()
        self._monitor = monitor = with_trackers(Monitor(self.run_dir, self.total_steps, self.state.step,
                                                        enabled=self.is_main, progress=self.progress),
                                                self.cfg, enabled=self.is_main)
        try:
            notes = self.method.notes(self.accelerator.unwrap_model(self.model))  # e.g. AdapterDrop's dropped layers
            for line in [*notes, *self.announce()] if self.is_main else []:
                monitor.write(line)
            baseline = self.baseline_metrics() if self.state.step == 0 else {}
            if baseline:
                monitor.log({"step": 0, **baseline})
            self._batches = self.stream.iterate(self.state.epoch, self.state.batch_in_epoch)
            self._status(step=self.state.step, total_steps=self.total_steps)
            started = time.perf_counter()
            window_start, window_tokens, total_tokens = started, 0, 0
            loss_tokens, weighted_loss = 0, 0.0
            last: dict[str, Any] = {}
            interrupted = False
            with StopFlag() as stop:
                while self.state.step < self.total_steps:
                    out = self._agree(self.step())
                    self.state.step += 1
                    self.state.tokens_seen += out.tokens
                    window_tokens += out.tokens
                    total_tokens += out.tokens
                    if "loss" in out.row:
                        loss_tokens += out.tokens
                        weighted_loss += float(out.row["loss"]) * out.tokens
                    monitor.advance()
                    step = self.state.step
                    if step % t.log_every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        last = {"step": step, **out.row, "lr": self.scheduler.get_last_lr()[0],
                                "tokens_per_s": window_tokens / max(now - window_start, 1e-9)}
                        window_start, window_tokens = now, 0
                        monitor.log(last)
                        self._status(step=step)
                    if t.eval_every and step % t.eval_every == 0 and step != self.total_steps:
                        self._log_eval(monitor)
                    if checkpoint_if_due(step, t.save_every, self._stop_agreed(stop.requested), self._checkpoint,
                                         monitor.write):
                        interrupted = True
                        break
            wall = time.perf_counter() - started
            final_eval = {} if interrupted else self._log_eval(monitor)
            if not interrupted:
                self.save()
            if self.budget is not None:
                monitor.write(self.budget.report(peak_memory_bytes(self.device)))
        finally:
            monitor.close()
        self._status(status="stopped" if interrupted else "finished", step=self.state.step)
        self.accelerator.wait_for_everyone()  # no rank exits (and has the launcher end the rest) before that
        return TrainResult(
            run_dir=self.run_dir.root, steps=self.state.step, final_loss=last.get("loss"),
            eval_loss=final_eval.get("eval_loss"), interrupted=interrupted,
            trainable_params=self.trainable_params, total_params=self.total_params,
            tokens_per_s=total_tokens / max(wall, 1e-9), peak_memory_bytes=peak_memory_bytes(self.device),
            wall_s=wall, last_metrics={**baseline, **last, **final_eval},
            mean_loss=weighted_loss / loss_tokens if loss_tokens else None, budget=self.budget)

    def _agree(self, out: StepOutput) -> StepOutput:
        """A step's report for the whole launch, in one all-reduce: the tokens of all ranks and the
        metrics' mean over the ranks. A single process gets its own back."""
        if self.processes == 1:
            return out
        keys = [k for k, v in out.row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summed = agree([float(out.tokens), *(float(out.row[k]) for k in keys)], self.device)
        return StepOutput(int(summed[0]), {**out.row, **{k: v / self.processes for k, v in zip(keys, summed[1:])}})

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether any rank was asked to stop (a signal reaches one process, or the launcher's
        group): then every rank checkpoints the same step together and stops."""
        return requested if self.processes == 1 else agree([float(requested)], self.device)[0] > 0

    def _log_eval(self, monitor: Monitor) -> dict[str, float]:
        result = self.evaluate()
        if result:
            monitor.log({"step": self.state.step, **result})
        return result

    def _resume_if_asked(self) -> None:
        if not self.resume:
            return
        latest = self.run_dir.latest_checkpoint()  # check_run_dir made sure there is one
        new_peaks = list(self.scheduler.base_lrs)
        self.state = load_checkpoint(latest, self.accelerator.unwrap_model(self.model), self.optimizer,
                                     self.scheduler)
        if isinstance(self.stream, StreamBatches):
            self.stream.load_state_dict(self.state.stream)
        if self.plan.config_changes:
            self._reschedule(new_peaks)

    def _reschedule(self, peaks: list[float]) -> None:
        """After a resume with allowed changes (``train.lr``, the run's length): the restored
        optimizer and scheduler hold the old peak rates and the old schedule's current rate;
        put the new peaks in and the new schedule's rate at the restored step."""
        self.scheduler.base_lrs = peaks
        for group, peak, factor in zip(self.optimizer.param_groups, peaks, self.scheduler.lr_lambdas):
            group["initial_lr"] = peak
            group["lr"] = peak * factor(self.scheduler.last_epoch)

    def _checkpoint(self) -> None:
        """Every rank takes part (FSDP gathers the shards); the main process writes."""
        self.accelerator.wait_for_everyone()
        save_checkpoint(self.run_dir.root, self.accelerator.unwrap_model(self.model), self.optimizer,
                        self.scheduler, self.state, self.cfg.train.keep_last, write=self.is_main)
        self.accelerator.wait_for_everyone()

    def save(self) -> None:
        """Write the stage's outputs, the trained method and the tokenizer into the run directory."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if is_sharded(model):
            gather_for_save(model, self.is_main)
        if not self.is_main:
            return
        with atomic_files(self.run_dir.tokenizer, TOKENIZER_STAGING) as staging:
            self.tokenizer.save_pretrained(str(staging))
        self.save_outputs(model)
        self.method.save(model, self.run_dir.root)

    # -- status ------------------------------------------------------------------------------
    def _status(self, **fields: Any) -> None:
        if self.is_main:
            self.run_dir.write_status(**fields)

    @contextmanager
    def _recording_failure(self) -> Iterator[None]:
        """On any exception, record it in ``status.json`` and ``train.log``, then let it propagate."""
        try:
            yield
        except KeyboardInterrupt:
            self._finish_with_error("stopped", "aborted by a second interrupt; --resume continues from the last "
                                               "checkpoint")
            raise
        except BaseException as err:
            self._finish_with_error("failed", _describe(err))
            raise

    def _finish_with_error(self, status: str, message: str) -> None:
        if not self.is_main:
            return
        self.run_dir.append_log(f"{status}: {message}")
        self.run_dir.write_status(status=status, error=message)


class RolloutTrainer(RunTrainer):
    """A stage whose step samples from the policy (PPO, GRPO): a step reads a batch of prompts.

    Subclasses say how many prompts a step samples for; the order is the batch loop's
    deterministic one without length grouping, so resume restarts at the same prompts."""

    loop = "rollout"

    def prompts_per_step(self) -> int:
        raise NotImplementedError

    def batch_order(self) -> MicroBatches:
        return MicroBatches(example_lengths(self.data.train), self.prompts_per_step(),
                            self.cfg.train.seed, group_by_length=False)
