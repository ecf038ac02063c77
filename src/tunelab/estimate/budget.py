"""``train.memory_budget``: the memory settings that fit the budget, chosen before the model loads.

The run's own data and model skeleton go through the memory estimator
(:mod:`tunelab.estimate`) once; every candidate setting is then one evaluation of its
formula (a different micro-batch split re-plans the micro-batches from the same tokenized
data). The levers, all of which leave the trained result unchanged up to rounding:

- ``train.gradient_checkpointing``: decoder layers keep only their input and recompute
  the rest in backward (methods that pass virtual tokens as cached keys/values cannot);
- ``train.loss_chunk_size``: rows of the LM head and its loss computed at once;
- a micro-batch split ``k``: ``batch_size / k`` examples per micro-batch and ``grad_accum x
  k`` micro-batches per step, so the global batch, and with token-level normalisation the
  gradient, stay the same.

Of the settings whose predicted peak fits (with :data:`ESTIMATE_MARGIN` of the budget kept
for the estimate's error), the one with the smallest predicted step time
(:func:`relative_step_time`) wins. If none fits, a ConfigError names the lightest
setting's predicted peak, its largest terms, and what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tunelab.config import RunConfig, parse_size
from tunelab.errors import ConfigError
from tunelab.memory import proc_kib_field_bytes

AUTO = "auto"
#: Share of the available memory that ``memory_budget: auto`` grants the run: on CPU the
#: kernel's ``MemAvailable`` (free memory plus what it can reclaim from caches), on CUDA the
#: device's free memory. The rest is headroom for the other processes of a shared machine.
AUTO_SHARE = 0.8
#: Loss chunk sizes tried below the run's own ``train.loss_chunk_size`` (0 = unchunked).
SMALLER_CHUNKS = (256, 64, 16)
#: Share of the budget kept free for the estimator's error: a setting fits when its predicted
#: peak is at most (1 - margin) x the budget (benchmarks/estimator_grid.py --heap compact: 32 of
#: 33 runs within +-10%; benchmarks/memory_budget.py: -10.7% to +7.3%).
ESTIMATE_MARGIN = 0.10
#: The ranking below was measured with benchmarks/memory_budget.py (2026-11-30: each choice
#: against the setting ranked just faster, 6 steps each, on the compact C heap a budgeted run
#: gets). Extra step time of gradient checkpointing: the forward pass runs twice (a third of a
#: step's FLOPs, 2N of 6N per token), and on the compact heap every recomputed activation faults
#: its pages in again: LoRA at 8 x 512 tokens ran 120 tokens/s checkpointed against 207 split
#: into micro-batches of 2 with loss chunks of 16.
RECOMPUTE_COST = 0.6
#: Extra step time per extra micro-batch of a step: one more pass of Python and kernel launches
#: through the model and smaller matmuls (LoRA and DoRA split 1 x 4 beat checkpointing by 7-26%)...
SPLIT_COST = 0.05
#: ... plus, per share of the model's parameters trained, one more accumulation into every
#: gradient and weight-gradient matmuls over fewer rows: full fine-tuning split 1 x 4 ran 109
#: tokens/s against 142 checkpointed.
SPLIT_COST_FULL_MODEL = 0.2
#: Extra step time of the smaller loss chunk sizes (more, smaller LM-head matmuls; 256 rows
#: costs nothing measurable): prefix tuning at 4 x 1 with chunks of 16 ran 236 tokens/s, at
#: 2 x 2 with chunks of 256, 291.
CHUNK_COSTS = {64: 0.04, 16: 0.25}


@dataclass(frozen=True)
class MemorySettings:
    """One candidate: the settings the budget may change."""

    gradient_checkpointing: bool
    loss_chunk_size: int
    micro_batch_split: int

    def describe(self, batch_size: int, grad_accum: int) -> str:
        chunk = f"loss chunks of {self.loss_chunk_size} tokens" if self.loss_chunk_size else "unchunked loss"
        return (f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, {chunk}, "
                f"micro-batches of {batch_size // self.micro_batch_split} x {grad_accum * self.micro_batch_split} "
                "per step")


@dataclass(frozen=True)
class BudgetChoice:
    """What the budget resolved to, for the run's log and its end-of-run report."""

    budget: str
    budget_bytes: int
    settings: MemorySettings
    predicted_peak_bytes: int
    phase: str
    original: RunConfig  # the settings as the user gave them (for the log line)
    #: the setting ranked just faster than the chosen one and its predicted peak, which did not fit
    next_faster: tuple[MemorySettings, int] | None = None

    def lines(self) -> list[str]:
        t = self.original.train
        share = f" ({AUTO_SHARE:.0%} of the available memory)" if self.budget == AUTO else ""
        chosen = (f"memory budget {self.budget}{share} = {gib(self.budget_bytes)}: "
                  f"{self.settings.describe(t.batch_size, t.grad_accum)}; predicted peak "
                  f"{gib(self.predicted_peak_bytes)} (at the {self.phase})")
        if self.next_faster is None:
            return [chosen]
        settings, peak = self.next_faster
        return [chosen, f"memory budget: the next faster setting ({settings.describe(t.batch_size, t.grad_accum)}) "
                        f"is predicted at {gib(peak)}, over the {gib(self.budget_bytes * (1 - ESTIMATE_MARGIN))} "
                        f"the budget allows after its {ESTIMATE_MARGIN:.0%} margin"]

    def report(self, measured_bytes: int) -> str:
        error = 100.0 * (self.predicted_peak_bytes - measured_bytes) / max(measured_bytes, 1)
        verdict = "within" if measured_bytes <= self.budget_bytes else "OVER"
        return (f"peak memory: measured {gib(measured_bytes)}, predicted {gib(self.predicted_peak_bytes)} "
                f"({error:+.1f}%), {verdict} the budget of {gib(self.budget_bytes)}")


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def chunk_sizes(own: int) -> list[int]:
    """The run's own loss chunk size, then the smaller ones (lighter, marginally slower)."""
    return [own, *(c for c in SMALLER_CHUNKS if own == 0 or c < own)]


def relative_step_time(settings: MemorySettings, trainable_share: float) -> float:
    """Predicted step time relative to the run's own settings (1.0) when ``trainable_share`` of the
    model's parameters train; see the cost constants."""
    split = SPLIT_COST + SPLIT_COST_FULL_MODEL * trainable_share
    return ((1 + RECOMPUTE_COST * settings.gradient_checkpointing)
            * (1 + split * (settings.micro_batch_split - 1)) * (1 + CHUNK_COSTS.get(settings.loss_chunk_size, 0.0)))


def candidates(cfg: RunConfig, checkpointing_allowed: bool, trainable_share: float) -> list[MemorySettings]:
    """Every setting the budget may pick, fastest first (the run's own settings first among equals)."""
    splits = [k for k in range(1, cfg.train.batch_size + 1) if cfg.train.batch_size % k == 0]
    every = [MemorySettings(gc, chunk, k) for gc in ((False, True) if checkpointing_allowed else (False,))
             for chunk in chunk_sizes(cfg.train.loss_chunk_size) for k in splits]
    return sorted(every, key=lambda settings: relative_step_time(settings, trainable_share))


def with_settings(cfg: RunConfig, settings: MemorySettings) -> RunConfig:
    """``cfg`` with ``settings`` applied (a copy; the micro-batch split moves examples into accumulation)."""
    train = cfg.train.model_copy(update={
        "gradient_checkpointing": settings.gradient_checkpointing, "loss_chunk_size": settings.loss_chunk_size,
        "batch_size": cfg.train.batch_size // settings.micro_batch_split,
        "grad_accum": cfg.train.grad_accum * settings.micro_batch_split})
    return cfg.model_copy(update={"train": train})


def _check_stage(cfg: RunConfig) -> None:
    from tunelab.train.stages import get_stage

    if cfg.data.streaming:
        raise ConfigError("train.memory_budget plans the micro-batches from the whole tokenized dataset, which "
                          "data.streaming never holds. Remove one of the two (`tunelab estimate` on a "
                          "non-streaming sample of the data shows the settings that fit).")
    if get_stage(cfg.stage).trainer.loop != "batch":
        raise ConfigError(f"train.memory_budget covers the batch stages (pt, sft, rm, dpo, kto); stage "
                          f"'{cfg.stage}' samples rollouts, whose memory the estimator does not model. Remove "
                          "train.memory_budget and set train.gradient_checkpointing / train.batch_size yourself.")


def fit_memory_budget(cfg: RunConfig, *, framework: int | None = None) -> tuple[RunConfig, BudgetChoice | None]:
    """``cfg`` with the fastest memory settings whose predicted peak fits ``train.memory_budget``.

    Without a budget, ``cfg`` comes back unchanged and no choice. ``framework`` overrides
    the measured framework baseline (tests pass 0). Raises ConfigError when nothing fits.
    ``tunelab train`` calls it before the trainer exists (the estimator sits above the run
    lifecycle) and hands the choice to the run, which logs it and reports it at the end.
    """
    if cfg.train.memory_budget is None:
        return cfg, None
    _check_stage(cfg)
    from tunelab.data.pipeline import build_data
    from tunelab.estimate.core import estimate, parse_target
    from tunelab.estimate.workload import plan
    from tunelab.methods.base import get_method
    from tunelab.models.loader import load_tokenizer, pick_device

    device = pick_device()
    limit = budget_bytes(cfg.train.memory_budget, device)
    data = build_data(cfg, load_tokenizer(cfg.model))
    base = estimate(cfg, parse_target(device.type), framework=framework, data=data)
    plans: dict[int, Any] = {}
    lightest: tuple[int, MemorySettings, Any] | None = None
    rejected: tuple[MemorySettings, int] | None = None
    share = base.facts.trainable_params / max(base.facts.total_params, 1)
    for settings in candidates(cfg, get_method(cfg.method).supports_gradient_checkpointing, share):
        trial = with_settings(cfg, settings)
        if settings.micro_batch_split not in plans:
            plans[settings.micro_batch_split] = plan(trial, data, base.workload.packed)
        result = dataclasses.replace(base, config=trial, workload=plans[settings.micro_batch_split]).breakdown
        if result.total <= limit * (1 - ESTIMATE_MARGIN):
            return trial, BudgetChoice(cfg.train.memory_budget, limit, settings, result.total, result.phase, cfg,
                                       rejected)
        rejected = (settings, result.total)
        if lightest is None or result.total < lightest[0]:
            lightest = (result.total, settings, result)
    assert lightest is not None  # there is always at least the user's own setting
    raise _does_not_fit(cfg, limit, *lightest)


def budget_bytes(text: str, device: Any) -> int:
    """The budget in bytes on ``device`` (a torch.device); ``auto`` reads the memory available now."""
    if text != AUTO:
        return parse_size(text)
    import torch

    available = (int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda"
                 else proc_kib_field_bytes("/proc/meminfo", "MemAvailable"))
    if available is None:
        raise ConfigError("train.memory_budget: auto needs the available memory, which this system does not report "
                          "(/proc/meminfo); give a size such as 8GB instead.")
    return int(available * AUTO_SHARE)


def _does_not_fit(cfg: RunConfig, limit: int, peak: int, settings: MemorySettings, result: Any) -> ConfigError:
    terms = sorted(((v, k) for k, v in result.terms.items() if v), reverse=True)[:3]
    largest = ", ".join(f"{name} {gib(value)}" for value, name in terms)
    t = cfg.train
    return ConfigError(
        f"train.memory_budget {cfg.train.memory_budget} ({gib(limit)}) cannot be met: the lightest setting "
        f"({settings.describe(t.batch_size, t.grad_accum)}) is predicted to peak at {gib(peak)} at the "
        f"{result.phase} (largest terms: {largest}); the budget keeps {ESTIMATE_MARGIN:.0%} for the estimate's "
        f"error. Raise train.memory_budget to at least {gib(peak / (1 - ESTIMATE_MARGIN))}, or "
        "need less: a shorter data.max_length, a method that trains fewer weights (lora, qlora), "
        "model.quantization: 4bit, or train.optimizer: adamw_8bit. `tunelab estimate` shows every term.")
