"""The frozen reference policy of DPO, KTO and PPO: the model as it was before training.

Adapter methods (LoRA family, prompt learning, bottleneck adapters) already hold it: the
same module with the adapter switched off (``method.reference(model)``). Using that costs
no memory at all, which is what lets preference training and PPO run with ONE copy of the
base weights. Only methods that change the base weights themselves (full, freeze) need a
frozen deep copy, made once before training starts, optionally kept on the CPU.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from tunelab.methods.base import Method

T = TypeVar("T")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without dropout inside the block and restore its mode afterwards.

    The reference is a fixed distribution: its log-probs must not change from one call to
    the next because of a dropout mask.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _frozen_copy(model: nn.Module, on_cpu: bool) -> nn.Module:
    copied = copy.deepcopy(model)
    if on_cpu:
        copied.to("cpu")
    return copied.requires_grad_(False).eval()


class ReferenceModel:
    """Computes things with the reference policy: ``reference.run(fn, batch)``.

    ``fn(model, batch)`` runs under ``no_grad``; the batch is moved to the reference's
    device and the result back to the batch's, so a CPU-resident copy (``ref_on_cpu``)
    works with a policy on the GPU.
    """

    def __init__(self, method: Method, model: nn.Module, on_cpu: bool = False):
        self._method, self._model = method, model
        reference = getattr(method, "reference", None)
        self.copy: nn.Module | None = None
        if reference is None or reference(model) is None:
            self.copy = _frozen_copy(model, on_cpu)

    @contextmanager
    def _active(self) -> Iterator[nn.Module]:
        if self.copy is not None:
            yield self.copy
            return
        with self._method.reference(self._model) as ref, eval_mode(ref):  # type: ignore[attr-defined]
            yield ref

    @torch.no_grad()
    def run(self, fn: Callable[[nn.Module, dict[str, Any]], T], batch: dict[str, Any]) -> T:
        with self._active() as ref:
            device = next(ref.parameters()).device
            home = next((v.device for v in batch.values() if torch.is_tensor(v)), device)
            moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            result = fn(ref, moved)
        return _to_device(result, home)


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value
