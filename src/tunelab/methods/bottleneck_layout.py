"""Where bottleneck adapters attach: finding decoder layers and hooking their sublayers.

No model code is copied or patched: the adapters run in forward hooks on the existing
attention and MLP modules of each decoder layer, which transformers models expose under a
handful of attribute names. A hook returns the sublayer's new output; the decoder layer
then adds its residual as usual, which is exactly where the papers put the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.bottleneck_modules import AdapterSet

#: Attribute names of the attention and MLP sublayers in HF decoder layers (Llama, Qwen2,
#: Mistral, Gemma, Phi-3 use self_attn/mlp; the rest cover other common layouts).
SUBLAYER_NAMES: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "self_attention", "attention", "attn"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}

#: Attribute of the base model that holds the :class:`AdapterSet`.
ATTRIBUTE = "tunelab_adapters"


@dataclass(frozen=True)
class DecoderLayout:
    path: str  # dotted path of the ModuleList of decoder layers, e.g. "model.layers"
    layers: nn.ModuleList
    attrs: dict[str, str]  # sublayer kind -> attribute name in each layer

    def module(self, layer: int, kind: str) -> nn.Module:
        return getattr(self.layers[layer], self.attrs[kind])

    def placement_names(self) -> dict[str, str]:
        """Module path pattern per sublayer kind, recorded in the saved adapter."""
        return {kind: f"{self.path}.{{layer}}.{attr}" for kind, attr in self.attrs.items()}


def _shared_attr(layers: nn.ModuleList, candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if all(isinstance(getattr(layer, name, None), nn.Module) for layer in layers):
            return name
    return None


def find_layout(model: nn.Module) -> DecoderLayout:
    """The first ModuleList whose every entry has an attention and an MLP sublayer."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        attrs = {kind: _shared_attr(module, names) for kind, names in SUBLAYER_NAMES.items()}
        if all(attrs.values()):
            return DecoderLayout(path=path, layers=module, attrs=attrs)  # type: ignore[arg-type]
    raise ConfigError(
        f"bottleneck adapters cannot find the decoder layers of {type(model).__name__}: no list of layers with an "
        f"attention sublayer ({'/'.join(SUBLAYER_NAMES['attn'])}) and an MLP sublayer "
        f"({'/'.join(SUBLAYER_NAMES['mlp'])}). Use a decoder model with that layout (Llama, Qwen2, Mistral, ...) or a "
        "LoRA-family method, which targets linear layers by name.")


def _sublayer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden state a sublayer was called with (positional for MLPs, keyword for attention)."""
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))


def _hook(adapters: AdapterSet, layer: int, kind: str, module: nn.Module, args: tuple[Any, ...],
          kwargs: dict[str, Any], output: Any) -> Any:
    if not adapters.active(layer, module.training):
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    adapted = adapters.adapt(layer, kind, _sublayer_input(args, kwargs), hidden)
    return (adapted, *output[1:]) if isinstance(output, tuple) else adapted


def attach(host: nn.Module, layout: DecoderLayout, adapters: AdapterSet) -> None:
    """Register ``adapters`` as a submodule of ``host`` and hook every adapted sublayer."""
    if any(isinstance(module, AdapterSet) for module in host.modules()):
        raise ConfigError(f"this {type(host).__name__} already carries bottleneck adapters. Load a fresh base "
                          "model for each adapter (or use adapter_fusion to combine trained adapters).")
    device = next(layout.layers.parameters()).device
    host.add_module(ATTRIBUTE, adapters.to(device))
    for layer in range(len(layout.layers)):
        for kind in adapters.kinds():
            layout.module(layer, kind).register_forward_hook(partial(_hook, adapters, layer, kind), with_kwargs=True)


def find_attached(model: nn.Module) -> tuple[nn.Module, AdapterSet]:
    """(the module carrying the AdapterSet, the AdapterSet), also when PEFT wraps the base."""
    for module in model.modules():
        adapters = module._modules.get(ATTRIBUTE)
        if isinstance(adapters, AdapterSet):
            return module, adapters
    raise ConfigError(f"this {type(model).__name__} carries no bottleneck adapters. Pass the model returned by "
                      "the method's apply() or load().")
