"""``train.compile``: ``torch.compile`` of the model's decoder layers.

Why the layers and not the whole model: the layers are where a step's elementwise work is
(norms, rotary, SiLU, residual adds, dtype casts: about a fifth of a CPU step of the speed
job, ``benchmarks/profile_step.py``), every layer runs the same code, so one compiled graph
serves all of them, and the parts around them (embedding, the chunked LM-head loss under
checkpointing, the optimizer) stay eager, where they are already a few large kernels.

``dynamic=True`` compiles for symbolic batch and sequence sizes, so each new padded width
reuses the graph instead of recompiling. Compiled kernels are kept in torch inductor's
on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system temp directory), so
a later run of the same model and settings compiles much faster. The first steps of a run
pay the compilation (about a minute for SmolLM2 on 2 busy cores); it pays on runs long
enough for a faster step to win that back (numbers in the README's speed section).
"""

from __future__ import annotations

from torch import nn

from tunelab.errors import ConfigError
from tunelab.models.blocks import decoder_blocks


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every decoder layer of ``model`` in place (dynamic shapes); returns how many.

    Raises ConfigError when the model names no decoder layer class, so ``train.compile`` is
    never silently a no-op.
    """
    layers = decoder_blocks(model)
    if not layers:
        raise ConfigError(f"train.compile: {type(model).__name__} does not name its decoder layer class "
                          "(transformers' `_no_split_modules`), so there is nothing tunelab knows how to compile. "
                          "Set train.compile=false for this model.")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)

