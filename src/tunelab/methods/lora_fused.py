"""A faster training forward for PEFT's plain LoRA linear layers.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. The scaling multiplies,
and the sum adds, full-width ``[tokens, out_features]`` tensors, and under autocast PEFT
first casts the input to the adapter's fp32 dtype, which autocast casts straight back to
bf16 for the matmul. On CPU those elementwise passes cost about as much as the base matmul
itself (``benchmarks/lora_forward.py``: one SmolLM2 MLP projection, 1672 tokens, bf16
autocast, forward + backward: 9.1-10.8 ms PEFT's way, 6.3-7.6 ms fused).

The same function is computed here as ``addmm(base(x), (lora_A(dropout(x)) * scaling),
lora_B^T)``: the scaling is applied to the rank-r activations (r numbers per token, not
``out_features``), and the update is accumulated into the base output by the matmul. The
result is equal up to 16-bit rounding. Anything this fast path does not cover (DoRA and
other variants, a merged or disabled adapter, several active adapters, a LoRA bias, mixed
adapter batches, a 16-bit input to fp32 adapters outside autocast) goes to PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` with the fused forward; everything else (state dict, merge,
    save) is PEFT's, so a swapped module behaves like the original everywhere else."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter(x)
        if adapter is None or args or kwargs:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        update = self.lora_A[adapter](self.lora_dropout[adapter](x)) * self.scaling[adapter]
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), update.reshape(-1, update.shape[-1]),
                            self.lora_B[adapter].weight.t())
        return fused.view(result.shape)

    def _plain_adapter(self, x: torch.Tensor) -> str | None:
        """The one active vanilla LoRA adapter this call can fuse, or None."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None:
            return None
        adapter = active[0]
        if x.dtype != self.lora_A[adapter].weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return None  # PEFT casts the input to the adapter's dtype; keep its path for that
        return adapter


def fuse_lora_linears(model: nn.Module) -> int:
    """Give every plain PEFT LoRA ``Linear`` in ``model`` the fused forward; returns how many.

    Only modules of exactly PEFT's ``Linear`` class are switched (not quantized or other
    subclasses, which have forwards of their own).
    """
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
