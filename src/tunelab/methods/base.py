"""The method contract and registry.

A *method* turns a loaded base model into a trainable one (LoRA, prefix-tuning, a
bottleneck adapter, full fine-tuning...). Each family lives in one module, declares the
config class of its ``method:`` keys there (:attr:`Method.config_class`) and registers its
names here; adding a method is one file plus one ``@register`` line (and its import in
``methods/__init__.py``), with no edit of :mod:`tunelab.config`.

Where things are saved, relative to a run directory:

- ``adapter/``  adapter weights + config (PEFT format for PEFT methods; safetensors + json
  for native ones)
- ``model/``    full weights (full and freeze fine-tuning)

Checkpoints do not go through :meth:`Method.save`: the training loop stores every
``requires_grad`` parameter by name, which is all a resumed run needs for any method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
from torch import nn

from tunelab.config import MethodConfig, registered_methods
from tunelab.errors import ConfigError
from tunelab.runs import ADAPTER_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.config import TrainConfig


class Method:
    """Base class; subclasses override what differs."""

    name: str = ""
    #: The keys of ``method:`` for this method's types (declared next to the method); the
    #: registry below is how :mod:`tunelab.config` finds it for ``method.type``.
    config_class: type[MethodConfig] = MethodConfig
    #: Whether :meth:`merge` can fold the method into plain base weights.
    mergeable: bool = False
    #: Why not, for the error message when export is refused.
    merge_refusal: str = ""
    #: Whether gradient checkpointing works with this method.
    supports_gradient_checkpointing: bool = True
    #: Whether padding-free packed batches work (PEFT prompt learning ignores position ids).
    supports_packing: bool = True
    #: Whether base-model weights train (full, freeze). Those keep fp32 master weights; a
    #: frozen base is loaded in the autocast dtype (see ``models.loader.training_dtype``).
    trains_base_weights: bool = False
    #: Where :meth:`save` writes inside the run directory.
    save_subdir: str = ADAPTER_DIR

    def __init__(self, cfg: "MethodConfig"):
        self.cfg = cfg

    # -- training ---------------------------------------------------------------------
    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """Return the trainable model; only the method's parameters have requires_grad."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, train: "TrainConfig") -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group learning rates (LoRA+)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": train.lr, "weight_decay": train.weight_decay}]

    def configure_schedule(self, total_steps: int) -> None:
        """Called before :meth:`apply` with the run's optimizer steps (AdaLoRA needs them)."""

    def on_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Hook after ``optimizer.step()`` and before ``zero_grad`` (AdaLoRA rank allocation)."""

    def notes(self, model: nn.Module) -> list[str]:
        """Lines for the user when training starts, about what :meth:`apply` did to ``model``
        that the config alone does not show (AdapterDrop: which layers carry no adapter).
        The run prints them beside the trainable-parameter count."""
        return []

    def reference(self, model: nn.Module) -> "ContextManager[nn.Module] | None":
        """A context in which ``model`` computes like the frozen base (adapters off), or None.

        None means the method changes the base weights themselves (full, freeze): a stage
        that needs a reference model must then keep a frozen copy.
        """
        return None

    # -- persistence ------------------------------------------------------------------
    def save(self, model: nn.Module, run_dir: Path) -> Path:
        """Write the trained weights under ``run_dir / save_subdir`` atomically; return that path."""
        raise NotImplementedError

    def load(self, base: "PreTrainedModel", run_dir: Path, trainable: bool = False) -> nn.Module:
        """Attach what :meth:`save` wrote in ``run_dir`` to a freshly loaded base model."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> "PreTrainedModel":
        """Fold the method into the base weights and return a plain transformers model."""
        raise ConfigError(f"method '{self.name}' cannot be merged into the base weights: {self.merge_refusal} "
                          "Serve or chat with the run directory instead; the adapter is attached at load time.")


METHODS: dict[str, type[Method]] = {}


def register(*names: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make the class available as ``method.type: <name>`` for each name."""

    def decorate(cls: type[Method]) -> type[Method]:
        for name in names:
            if name in METHODS:
                raise RuntimeError(f"method name '{name}' registered twice")
            METHODS[name] = cls
        return cls

    return decorate


def get_method(cfg: "MethodConfig") -> Method:
    """Instantiate the registered method for ``cfg.type``."""
    methods = registered_methods()  # every family registered (imported by name on first use)
    try:
        cls = methods[cfg.type]
    except KeyError:
        known = ", ".join(sorted(methods))
        raise ConfigError(f"method.type '{cfg.type}' is not available. Known methods: {known}.") from None
    method = cls(cfg)
    method.name = cfg.type
    return method


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name: what a checkpoint needs to resume any method."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "quant_state") or p.dtype == torch.uint8:  # bitsandbytes packs 2 weights per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
