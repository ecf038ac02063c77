"""Freeze-tuning: train the last N decoder layers (plus named modules), freeze the rest.

Upper layers are the most task-specific, so training only them keeps most of the
memory savings of an adapter while still producing a plain model. The decoder-layer
list is found without knowing the architecture: it is the longest ``nn.ModuleList``
(``model.model.layers`` in Llama, ``transformer.h`` in GPT-2, ...).

``trainable_modules`` are module-name patterns matched against whole dotted components
of module paths, with shell wildcards: ``norm`` matches ``model.norm`` but not
``model.layers.0.input_layernorm``; ``*norm`` matches every norm; ``self_attn.q_proj``
matches that projection in every layer. Training ``lm_head`` of a model with tied
embeddings also trains the input embeddings (they are one tensor).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.methods.base import register
from tunelab.methods.full import Full


class FreezeConfig(MethodConfig):
    """Which parts of the base train."""

    trainable_layers: int = Field(2, ge=0, description="Train the last N decoder layers.")
    trainable_modules: list[str] = Field(default_factory=list, description="Also train modules matching these name "
                                                                           "patterns (e.g. norm, lm_head, '*norm').")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of the model: its stack of decoder blocks."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise ConfigError(f"method.type 'freeze': {type(model).__name__} has no list of decoder layers "
                          "(nn.ModuleList) to choose trainable layers from. Use method.type: full or an adapter.")
    return max(lists, key=lambda item: len(item[1]))


def matches(pattern: str, module_name: str) -> bool:
    """Whether ``pattern`` equals a run of consecutive dotted components of ``module_name``."""
    wanted, parts = pattern.split("."), module_name.split(".")
    return any(all(fnmatchcase(part, want) for part, want in zip(parts[i:i + len(wanted)], wanted))
               for i in range(len(parts) - len(wanted) + 1))


def pattern_modules(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """Every module matched by one of ``patterns``; a pattern that matches nothing is an error."""
    named = [(name, module) for name, module in model.named_modules() if name]
    found: list[nn.Module] = []
    for pattern in patterns:
        hits = [module for name, module in named if matches(pattern, name)]
        if not hits:
            examples = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, _ in named})[:12])
            raise ConfigError(f"method.trainable_modules: pattern '{pattern}' matches no module of "
                              f"{type(model).__name__}. Module names include: {examples}. Patterns match whole "
                              "dotted name parts (wildcards allowed, e.g. '*norm').")
        found.extend(hits)
    return found


@register("freeze")
class Freeze(Full):
    """Last ``trainable_layers`` decoder layers + ``trainable_modules`` train; the rest is frozen."""

    config_class = FreezeConfig
    cfg: FreezeConfig

    def select_trainable(self, model: nn.Module) -> None:
        count = self.cfg.trainable_layers
        name, layers = decoder_layers(model)
        if count > len(layers):
            raise ConfigError(f"method.trainable_layers is {count}, but the model has only {len(layers)} decoder "
                              f"layers ({name}). Set trainable_layers to at most {len(layers)}, or use "
                              "method.type: full to train everything.")
        chosen = list(layers[len(layers) - count:]) + pattern_modules(model, self.cfg.trainable_modules)
        if not chosen:
            raise ConfigError("method.type 'freeze' with trainable_layers: 0 and no trainable_modules trains "
                              "nothing. Set trainable_layers > 0 or list trainable_modules (e.g. [lm_head]).")
        model.requires_grad_(False)
        for module in chosen:
            module.requires_grad_(True)
