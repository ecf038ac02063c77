"""The model's repeated decoder blocks, as the units that compilation and sharding work on."""

from __future__ import annotations

from torch import nn


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: modules of the classes transformers never splits across
    devices (``_no_split_modules``), found through any wrapper (PEFT, adapters).

    Why this rule and not "the longest ModuleList" (``methods.freeze``, which needs the
    indexable stack): it names the block class itself, so both a compiled graph and an FSDP
    unit cover exactly one block, whatever container holds the blocks.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]
