"""Device and precision set-up for a run."""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from tunelab.config import RunConfig


@lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): then bf16 autocast is faster."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """Map ``train.precision`` to accelerate's mixed_precision: 'bf16', 'fp16' or 'no'.

    ``auto``: bf16 on GPUs that support it, fp16 on older GPUs (with loss scaling), bf16
    on CPUs with bf16 units, fp32 otherwise.
    """
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_units() else "no"


def make_accelerator(precision: str, strategy: str = "single", deepspeed_plugin: Any = None) -> Accelerator:
    """An Accelerator for this run's precision and distributed strategy.

    accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; runs started one after another in one process (tests, notebooks, eval after
    train) may differ, so the precision part of that state is reset first. The process
    group (PartialState) is kept, so distributed launches are unaffected.

    Several processes without a GPU: ``cpu=True`` is what makes accelerate join the launcher's process group
    (gloo): without it, each rank of a torchrun launch on a CPU machine reports a
    non-distributed state and trains alone. ``deepspeed``: ``deepspeed_plugin`` is accelerate's
    plugin for the user's JSON config (``tunelab.train.distributed.deepspeed_plugin``).
    """
    from accelerate.state import AcceleratorState

    mixed = resolve_precision(precision)
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    if strategy == "deepspeed":
        return Accelerator(mixed_precision=mixed, deepspeed_plugin=deepspeed_plugin)
    several = strategy in ("ddp", "fsdp")
    return Accelerator(mixed_precision=mixed, cpu=several and not torch.cuda.is_available())


def packing_enabled(setting: bool | str, attn_implementation: str, supports_packing: bool) -> bool:
    """``data.packing`` resolved: ``auto`` packs rows only under flash-attention's varlen kernels.

    Packed rows need a block-diagonal mask, which sends SDPA (CPU, and CUDA without flash
    kernels) down its materialised [T, T] path; length-grouped right padding with no mask
    keeps the fused causal kernel and is faster and lighter there (see data.batching).
    """
    if not supports_packing:
        return False
    if setting == "auto":
        return attn_implementation.startswith("flash_attention")
    return bool(setting)


#: ``train.compact_heap: auto`` turns the compact heap on for sequences longer than this: past
#: it glibc's leftovers grew faster than the activations (benchmarks/long_context.py), while
#: the page faults the compact heap costs shrink next to attention's work.
LONG_SEQUENCE_TOKENS = 8192


def compact_heap_wanted(setting: bool | str, memory_budget: str | None, max_length: int) -> bool:
    """``train.compact_heap`` resolved (see :mod:`tunelab.heap`): ``auto`` compacts when the run
    has a memory budget to keep, whose estimate counts live tensors only, or long sequences."""
    if setting != "auto":
        return bool(setting)
    return memory_budget is not None or max_length > LONG_SEQUENCE_TOKENS


def trains_on_compact_heap(cfg: RunConfig, device_type: str) -> bool:
    """Whether ``cfg`` trains on the compact heap on a device of ``device_type``: CPU only (a GPU's
    tensors do not come from the C heap). The trainer applies it; the estimator calibrates for it."""
    train = cfg.train
    return device_type == "cpu" and compact_heap_wanted(train.compact_heap, train.memory_budget,
                                                        cfg.data.max_length)
