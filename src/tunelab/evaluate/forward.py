"""Forward passes shared by the scoring tasks (perplexity, multiple choice).

Both run the model the way the training loop does (same batch layout from
``data.batching.collate``, same precision from ``train.precision``), so a loss measured
here is the loss the trainer would report on the same examples.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Sequence

import torch
from torch import nn

from tunelab.data.batching import collate
from tunelab.data.records import Example
from tunelab.inference import LoadedRun
from tunelab.train.runtime import resolve_precision

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_autocast(loaded: LoadedRun) -> AbstractContextManager[Any]:
    """The mixed-precision context the trainer uses for this run's ``train.precision``."""
    precision = resolve_precision(loaded.cfg.train.precision)
    if precision not in _AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(model_device(loaded.model).type, dtype=_AUTOCAST_DTYPES[precision])


def padded_batch(examples: Sequence[Example], loaded: LoadedRun) -> dict[str, torch.Tensor]:
    """Right-padded training-layout batch on the model's device.

    Padded rather than packed: prompt-learning methods cannot run packed rows, and the
    padded layout gives the same per-token losses for every method.
    """
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate(examples, pad if pad is not None else 0, packing=False)
    device = model_device(loaded.model)
    return {key: value.to(device) for key, value in batch.items()}


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start:start + size] for start in range(0, len(items), size)]
