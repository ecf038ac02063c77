"""One LoRA linear layer, forward + backward: PEFT's forward against tunelab's fused one.

The layer is SmolLM2's MLP up-projection (576 -> 1536, r=8, alpha=16) with a frozen bf16
base weight and fp32 adapter weights, under CPU bf16 autocast, as in a training step of the
speed job (1672 tokens: a micro-batch of 4 x 418). Both variants are real PEFT modules; the
fused one is the same module after ``tunelab.methods.lora_fused.fuse_lora_linears``.

Usage (from the repository root)::

    . .venv/bin/activate
    OMP_WAIT_POLICY=PASSIVE python benchmarks/lora_forward.py [--tokens 1672] [--repeats 30]

Prints the median milliseconds of each variant and the max |difference| of their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tunelab.methods.lora_fused import fuse_lora_linears


class UpProjection(nn.Module):
    """A module holding one linear layer for PEFT to target."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(576, 1536, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(x)


def lora_layer(fused: bool) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(UpProjection(), LoraConfig(r=8, lora_alpha=16, target_modules=["up_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # B starts at zero; give the update something to add
    if fused:
        fuse_lora_linears(model)
    return model


def median_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1672)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    x = torch.randn(args.tokens, 576, dtype=torch.bfloat16, requires_grad=True)  # as in a layer of a model
    peft_model, fused_model = lora_layer(False), lora_layer(True)
    for _ in range(2):  # interleaved, so both see the same machine state
        print(f"PEFT forward + backward: {median_ms(peft_model, x, args.repeats):.2f} ms; "
              f"fused: {median_ms(fused_model, x, args.repeats):.2f} ms")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        diff = (peft_model(x).float() - fused_model(x).float()).abs().max().item()
    print(f"max |output difference| (bf16 rounding): {diff:.3g}")


if __name__ == "__main__":
    main()
