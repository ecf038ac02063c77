"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any, Callable

import torch

from tunelab.config import TrainConfig
from tunelab.errors import TunelabError

#: Paged optimizers -> the same optimizer without paging. Paging keeps the optimizer state in
#: CUDA unified memory so the driver can evict it to host RAM under memory pressure; without
#: CUDA there is nothing to page, and bitsandbytes itself falls back with only a warning.
UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_32bit"}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig,
                    say: Callable[[str], None] = _stderr) -> torch.optim.Optimizer:
    """AdamW (optionally 8-bit or paged through bitsandbytes) or SGD over the method's groups.

    ``say`` gets one line naming the optimizer and its peak learning rate (and how
    ``train.lr: auto`` chose it), plus a notice when a paged optimizer runs unpaged.
    """
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TunelabError("the method left no trainable parameters: nothing to optimise. Check method.type "
                           "and its targets (method.target, method.trainable_layers).")
    name = _effective_optimizer(cfg.optimizer, groups[0]["params"][0].device, say)
    say(f"optimizer {name}, peak lr {cfg.lr:g}" + (" (train.lr auto: the default of this method family and stage, "
                                                   "tunelab.method_defaults)" if cfg.lr_is_auto else ""))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"train.optimizer={cfg.optimizer} needs bitsandbytes. Install it with: "
                           "pip install 'tunelab[quant]', or use train.optimizer=adamw.")
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_32bit": bnb.optim.AdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def _effective_optimizer(name: str, device: torch.device, say: Callable[[str], None]) -> str:
    """``name``, or its unpaged twin (with a notice) where the parameters are not on a CUDA device."""
    if name not in UNPAGED or device.type == "cuda":
        return name
    say(f"notice: train.optimizer={name} pages its state through CUDA unified memory, which {device.type} does "
        f"not have; this run uses {UNPAGED[name]} instead (the same updates, state kept in ordinary memory, "
        "nothing paged out).")
    return UNPAGED[name]


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.scheduler))
