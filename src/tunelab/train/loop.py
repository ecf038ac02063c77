"""The training loop: one loop for every method and every batch-based stage.

Built on ``accelerate`` so the same code runs on CPU, one GPU, or under
``accelerate launch``/``torchrun`` (DDP, FSDP, DeepSpeed). The loop owns what makes runs
fast and exact: token-level loss normalisation across micro-batches, deterministic data
order (so a resumed run sees the same batches), atomic checkpoints, and a clean stop
with a checkpoint on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from tunelab.config import RunConfig, save_config
from tunelab.data.batching import PadWidth, collate_examples, plan_batches
from tunelab.data.pipeline import DataBundle, build_data, example_length
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods.base import Method, count_parameters, get_method
from tunelab.models.loader import load_base, training_dtype
from tunelab.train.checkpoint import (TrainState, checkpoint_if_due, list_checkpoints, load_checkpoint,
                                     save_checkpoint)
from tunelab.train.monitor import Monitor, peak_memory_bytes
from tunelab.train.objectives import Objective, build_objective
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.runtime import make_accelerator, packing_enabled

if TYPE_CHECKING:
    from accelerate import Accelerator


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


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a directory that holds another run's results."""
    if resume or overwrite or not run_dir.exists():
        return
    leftovers = [name for name in ("checkpoints", "adapter", "model") if (run_dir / name).exists()]
    if leftovers:
        raise TunelabError(f"output_dir {run_dir} already holds a run ({', '.join(leftovers)}). Pass --resume to "
                           "continue it, --overwrite to start over there, or set output_dir to a new directory.")


class MicroBatches:
    """Deterministic stream of micro-batches (lists of example indices) across epochs.

    The order depends only on (seed, epoch), so a resumed run reads exactly the batches
    the interrupted one would have read.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.per_epoch = math.ceil(len(lengths) / batch_size)

    def iterate(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield (epoch, index in epoch, example indices) from the given position on."""
        while True:
            plan = plan_batches(self.lengths, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                                group_by_length=self.group)
            for index in range(start, len(plan)):
                yield epoch, index, plan[index]
            epoch, start = epoch + 1, 0


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in ``parts`` nearly equal contiguous pieces (no empty piece)."""
    size = math.ceil(len(indices) / parts)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def total_steps(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_batches_per_epoch / cfg.train.grad_accum))


def enable_gradient_checkpointing(model: nn.Module, method: Method) -> None:
    if not method.supports_gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing does not work with method '{method.name}' (its virtual "
                          "tokens are passed as cached keys/values, which checkpointing discards). Set "
                          "train.gradient_checkpointing=false for this method.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: keep a grad path into checkpointed blocks


def load_training_base(cfg: RunConfig, accelerator: "Accelerator", method: Method) -> tuple[nn.Module, Any]:
    """The base model and tokenizer in the dtype this run trains with (see ``training_dtype``)."""
    dtype = training_dtype(cfg.model.dtype, accelerator.mixed_precision, method.trains_base_weights)
    return load_base(cfg.model, accelerator.device, dtype)


class Trainer:
    """One run: load, apply the method, train, evaluate, checkpoint, save."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.run_dir = Path(cfg.output_dir)
        check_run_dir(self.run_dir, resume, overwrite)
        self.accelerator = make_accelerator(cfg.train.precision)
        torch.manual_seed(cfg.train.seed)
        self.method = get_method(cfg.method)
        base, self.tokenizer = load_training_base(cfg, self.accelerator, self.method)
        self.data: DataBundle = build_data(cfg, self.tokenizer)
        self.stream = MicroBatches([example_length(e) for e in self.data.train], cfg.train.batch_size,
                                   cfg.train.seed, cfg.data.group_by_length)
        self.total_steps = total_steps(cfg, self.stream.per_epoch)
        self.method.configure_schedule(self.total_steps)
        self.model = self.method.apply(base, self.tokenizer)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, self.method)
        self.objective: Objective = build_objective(cfg, self.method, self.model, self.tokenizer)
        optimizer = build_optimizer(self.method.param_groups(self.model, cfg.train), cfg.train)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        attention = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", "")
        self.packing = packing_enabled(cfg.data.packing, str(attention), self.method.supports_packing)
        self.pad_width = PadWidth(cfg.data.pad_to_multiple_of, cfg.data.max_length)
        self.trainable_params, self.total_params = count_parameters(self.model)
        self.micro_batch_split = 1  # raised by train.auto_batch_size after an out-of-memory error

    # -- batches ----------------------------------------------------------------------
    def _collate(self, indices: list[int], examples: list[Any]) -> dict[str, torch.Tensor]:
        batch = collate_examples([examples[i] for i in indices], self.tokenizer.pad_token_id, self.packing,
                                 self.pad_width)
        return {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _count(self, batches: list[dict[str, torch.Tensor]]) -> int:
        local = torch.tensor(sum(self.objective.count(b) for b in batches), device=self.accelerator.device)
        return int(self.accelerator.reduce(local, reduction="sum"))

    # -- one optimizer step ------------------------------------------------------------
    def _step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Accumulate gradients over ``batches`` normalised by their total units, then update."""
        self.model.train()
        units = max(1, self._count(batches))
        scale = self.accelerator.num_processes / units  # DDP averages gradients over processes
        loss_sum, sums = 0.0, {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with self.accelerator.no_sync(self.model) if not sync else nullcontext():
                with self.accelerator.autocast():
                    loss, metrics = self.objective.loss(self.model, batch)
                self.accelerator.backward(loss * scale)
            loss_sum += float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        grad_norm = None
        if self.cfg.train.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.train.max_grad_norm))
        self.optimizer.step()
        self.method.on_optimizer_step(self.accelerator.unwrap_model(self.model), self.state.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = self.accelerator.reduce(torch.tensor([loss_sum, *sums.values()], device=self.accelerator.device),
                                         reduction="sum").tolist()  # every process's share of the step
        row = {"loss": totals[0] / units, **{k: v / units for k, v in zip(sums, totals[1:])}}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        return row

    def _step_fitting_memory(self, groups: list[list[int]], monitor: Monitor) -> dict[str, float]:
        """One optimizer step over ``groups`` (example indices per micro-batch).

        With ``train.auto_batch_size``, an out-of-memory error splits every micro-batch in
        two and retries the step: accumulation doubles and the global batch stays the same.
        Token-level normalisation makes the split step's gradient equal the unsplit one.
        """
        while True:
            parts = [part for group in groups for part in _split(group, self.micro_batch_split)]
            try:
                return self._step([self._collate(part, self.data.train) for part in parts])
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_out_of_memory(err):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.accelerator.device.type == "cuda":
                    torch.cuda.empty_cache()
                if not self.cfg.train.auto_batch_size or all(len(part) == 1 for part in parts):
                    raise TunelabError(
                        f"out of memory at step {self.state.step + 1} with micro-batches of up to "
                        f"{max(len(p) for p in parts)} examples. Set train.auto_batch_size=true to split them "
                        "automatically, or lower train.batch_size (raise train.grad_accum to keep the global "
                        "batch), data.max_length, or turn on train.gradient_checkpointing.") from err
                self.micro_batch_split *= 2
                monitor.write(f"out of memory: splitting each micro-batch into {self.micro_batch_split} (about "
                              f"{max(1, self.cfg.train.batch_size // self.micro_batch_split)} examples each, "
                              f"{self.cfg.train.grad_accum * self.micro_batch_split} accumulation steps); the "
                              "global batch is unchanged")

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.data.eval:
            return {}
        self.model.eval()
        loss_sum, units, sums = 0.0, 0, {}
        bs = self.cfg.train.batch_size
        order = sorted(range(len(self.data.eval)), key=lambda i: example_length(self.data.eval[i]))
        for start in range(0, len(order), bs):
            batch = self._collate(order[start:start + bs], self.data.eval)
            with self.accelerator.autocast():
                loss, metrics = self.objective.loss(self.model, batch)
            loss_sum += float(loss)
            units += self.objective.count(batch)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        result = {"eval_loss": loss_sum / max(units, 1)}
        result.update({f"eval_{k}": v / max(units, 1) for k, v in sums.items()})
        if self.cfg.stage in ("pt", "sft"):
            result["eval_perplexity"] = math.exp(min(result["eval_loss"], 50.0))
        return result

    def evaluate_base(self) -> dict[str, float]:
        """Eval metrics of the base model: the method switched off, or (full/freeze) before any step."""
        switched_off = self.method.reference(self.accelerator.unwrap_model(self.model))
        if switched_off is None and self.state.step > 0:
            raise TunelabError("the base model cannot be evaluated after full or freeze fine-tuning has changed "
                               "its weights; set train.eval_base before the first step.")
        with switched_off if switched_off is not None else nullcontext():
            return {f"base_{k}": v for k, v in self.evaluate().items()}

    # -- the run ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.state = TrainState()
        checkpoints = list_checkpoints(self.run_dir)
        if self.resume:
            if not checkpoints:
                raise TunelabError(f"--resume: {self.run_dir}/checkpoints holds no checkpoint to resume from. "
                                   "Run without --resume, or set train.save_every so checkpoints are written.")
            self.state = load_checkpoint(checkpoints[-1], self.accelerator.unwrap_model(self.model),
                                         self.optimizer, self.scheduler)
        is_main = self.accelerator.is_main_process
        monitor = Monitor(self.run_dir, self.total_steps, self.state.step, enabled=is_main, progress=self.progress)
        if is_main:
            self._announce(monitor)
        base_eval = self.evaluate_base() if t.eval_base and self.state.step == 0 else {}
        if base_eval:
            monitor.log({"step": 0, **base_eval})
        stream = self.stream.iterate(self.state.epoch, self.state.batch_in_epoch)
        started = time.perf_counter()
        window_start, window_tokens, total_tokens = started, 0, 0
        last: dict[str, Any] = {}
        interrupted = False
        with StopFlag() as stop:
            while self.state.step < self.total_steps:
                groups, tokens = [], 0
                for _ in range(t.grad_accum):
                    epoch, index, indices = next(stream)
                    groups.append(indices)
                    tokens += sum(example_length(self.data.train[i]) for i in indices)
                    self.state.epoch, self.state.batch_in_epoch = epoch, index + 1
                row = self._step_fitting_memory(groups, monitor)
                self.state.step += 1
                self.state.tokens_seen += tokens
                window_tokens += tokens
                total_tokens += tokens
                monitor.advance()
                step = self.state.step
                if step % t.log_every == 0 or step == self.total_steps:
                    now = time.perf_counter()
                    last = {"step": step, "epoch": round(self.state.epoch + self.state.batch_in_epoch
                                                         / self.stream.per_epoch, 4),
                            **row, "lr": self.scheduler.get_last_lr()[0],
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "peak_memory_bytes": peak_memory_bytes(self.accelerator.device)}
                    window_start, window_tokens = now, 0
                    monitor.log(last)
                if t.eval_every and step % t.eval_every == 0 and step != self.total_steps:
                    monitor.log({"step": step, **self.evaluate()})
                if checkpoint_if_due(step, t.save_every, stop.requested, self._checkpoint, monitor.write):
                    interrupted = True
                    break
        wall = time.perf_counter() - started
        final_eval = {} if interrupted else self.evaluate()
        if final_eval:
            monitor.log({"step": self.state.step, **final_eval})
        if not interrupted:
            self.save()
        monitor.close()
        return TrainResult(
            run_dir=self.run_dir, steps=self.state.step, final_loss=last.get("loss"),
            eval_loss=final_eval.get("eval_loss"), interrupted=interrupted,
            trainable_params=self.trainable_params, total_params=self.total_params,
            tokens_per_s=total_tokens / max(wall, 1e-9),
            peak_memory_bytes=peak_memory_bytes(self.accelerator.device), wall_s=wall,
            last_metrics={**base_eval, **last, **final_eval})

    def _announce(self, monitor: Monitor) -> None:
        stats = self.data.stats
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        monitor.write(f"method {self.method.name}: {self.trainable_params:,} trainable of "
                      f"{self.total_params:,} parameters ({share:.3f}%)")
        monitor.write(f"data: {len(self.data.train)} train / {len(self.data.eval)} eval examples; "
                      f"{stats.get('truncated', 0)} truncated, {stats.get('dropped', 0)} dropped, "
                      f"{stats.get('skipped', 0)} skipped; {self.total_steps} steps")

    def _checkpoint(self) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.run_dir, self.accelerator.unwrap_model(self.model), self.optimizer,
                            self.scheduler, self.state, self.cfg.train.keep_last)

    def save(self) -> None:
        """Write the trained method, tokenizer and resolved config into the run directory."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        self.method.save(model, self.run_dir)
        self.objective.save(model, self.run_dir)
        self.tokenizer.save_pretrained(self.run_dir)
        save_config(self.cfg, self.run_dir / "config.yaml")


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train one run described by ``cfg``; see :class:`Trainer`."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()
