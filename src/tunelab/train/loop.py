"""The batch loop: one loop for every method and every batch-based stage (pt, sft, rm, dpo, kto).

Built on ``accelerate`` so the same code runs on CPU, one GPU, or under
``accelerate launch``/``torchrun`` (DDP, FSDP2, DeepSpeed: :mod:`tunelab.train.distributed`;
each rank runs its share of a step's micro-batches). The run around it (run
directory, resume, stop, checkpoints, logging, save) is :class:`RunTrainer`'s; this module
owns what makes a step fast and exact: token-level loss normalisation across
micro-batches (the stage's :class:`Objective` sums its loss over units, the step divides
by the total), and splitting micro-batches on out-of-memory errors.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.data.batching import PadWidth, collate_examples
from tunelab.data.pipeline import example_lengths
from tunelab.errors import TunelabError
from tunelab.memory import peak_memory_bytes
from tunelab.train.batches import MicroBatches
from tunelab.train.distributed import gradient_sync, norm_value
from tunelab.train.lifecycle import RunTrainer, StepOutput, TrainResult
from tunelab.train.objectives import Objective
from tunelab.train.stream_batches import StreamBatches
from tunelab.train.runtime import packing_enabled


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in ``parts`` nearly equal contiguous pieces (no empty piece)."""
    size = math.ceil(len(indices) / parts)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Trainer(RunTrainer):
    """A batch-stage run: the stage's objective over micro-batches of tokenized examples."""

    loop = "batch"

    def batch_order(self) -> MicroBatches | StreamBatches:
        cfg = self.cfg
        if cfg.data.streaming:  # from here on self.data.train indexes the examples of the step being read
            order = StreamBatches(self.data.train, cfg.train.batch_size, keep=cfg.train.grad_accum)
            self.data.train = order.examples
            return order
        return MicroBatches(example_lengths(self.data.train), cfg.train.batch_size, cfg.train.seed,
                            cfg.data.group_by_length)

    def attach(self, model: nn.Module) -> None:
        """The stage's objective (a reward model's value head joins ``model`` here), and the batch layout."""
        assert self.stage.objective is not None  # StageSpec guarantees it for batch stages
        self.objective: Objective = self.stage.objective(self.cfg, self.method, model, self.tokenizer)
        attention = getattr(model.config, "_attn_implementation", "")
        self.packing = packing_enabled(self.cfg.data.packing, str(attention), self.method.supports_packing)
        self.pad_width = PadWidth(self.cfg.data.pad_to_multiple_of, self.cfg.data.max_length)
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
        scale = self.accelerator.num_processes / units  # DDP and FSDP average gradients over processes
        loss_sum, sums = 0.0, {}
        for i, batch in enumerate(batches):
            with gradient_sync(self.model, sync=i == len(batches) - 1):
                with self.accelerator.autocast():
                    loss, metrics = self.objective.loss(self.model, batch)
                self.accelerator.backward(loss * scale)
            loss_sum += float(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        grad_norm = None
        if self.cfg.train.max_grad_norm is not None:
            grad_norm = norm_value(self.accelerator.clip_grad_norm_(
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

    def _step_fitting_memory(self, groups: list[list[int]]) -> dict[str, float]:
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
                self.say(f"out of memory: splitting each micro-batch into {self.micro_batch_split} (about "
                         f"{max(1, self.cfg.train.batch_size // self.micro_batch_split)} examples each, "
                         f"{self.cfg.train.grad_accum * self.micro_batch_split} accumulation steps); the global "
                         "batch is unchanged")

    # -- the step --------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """``train.grad_accum`` micro-batches, one optimizer step."""
        groups = [self.next_batch() for _ in range(self.cfg.train.grad_accum)]
        lengths = self.stream.lengths  # the batch order's, read once (a view's column, or measured)
        tokens = sum(int(lengths[i]) for group in groups for i in group)
        row = self._step_fitting_memory(groups)
        return StepOutput(tokens, {"epoch": self.epoch_progress, **row,
                                   "peak_memory_bytes": peak_memory_bytes(self.device)})

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.data.eval:
            return {}
        self.model.eval()
        loss_sum, units, sums = 0.0, 0, {}
        bs = self.cfg.train.batch_size
        lengths = example_lengths(self.data.eval)
        order = sorted(range(len(self.data.eval)), key=lambda i: lengths[i])
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
        return self.objective.eval_summary(result)

    def baseline_metrics(self) -> dict[str, float]:
        """With ``train.eval_base``: eval metrics of the base model (the method switched off), as ``base_*``."""
        if not self.cfg.train.eval_base:
            return {}
        switched_off = self.method.reference(self.accelerator.unwrap_model(self.model))
        if switched_off is None and self.state.step > 0:
            raise TunelabError("the base model cannot be evaluated after full or freeze fine-tuning has changed "
                               "its weights; set train.eval_base before the first step.")
        with switched_off if switched_off is not None else nullcontext():
            return {f"base_{k}": v for k, v in self.evaluate().items()}

    def announce(self) -> list[str]:
        stats = self.data.stats
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        # A stream is tokenized as it is read: at the start nothing has been counted yet.
        counts = ("" if self.cfg.data.streaming else
                  f"{stats.get('truncated', 0)} truncated, {stats.get('dropped', 0)} dropped, "
                  f"{stats.get('skipped', 0)} skipped; ")
        return [f"method {self.method.name}: {self.trainable_params:,} trainable of {self.total_params:,} "
                f"parameters ({share:.3f}%)",
                f"data: {'streamed' if self.cfg.data.streaming else len(self.data.train)} train / "
                f"{len(self.data.eval)} eval examples; {counts}{self.total_steps} steps"]

    def save_outputs(self, model: nn.Module) -> None:
        self.objective.save(model, self.run_dir.root)


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train one batch-stage run described by ``cfg``; see :class:`Trainer`."""
    return Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()
