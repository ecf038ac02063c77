"""Full fine-tuning: every weight of the base model trains.

The result is a complete model, saved as a transformers directory (safetensors) under
``run_dir/model``; "merging" is a no-op because there is nothing separate to fold in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from torch import nn

from tunelab.errors import ConfigError
from tunelab.io import atomic_dir
from tunelab.methods.base import Method, register
from tunelab.models.loader import damaged_weights
from tunelab.runs import MODEL_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def require_float_weights(model: nn.Module, method: str) -> None:
    """Weights stored in 4/8 bits cannot take gradient updates; say so before training starts."""
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) \
            or getattr(model, "is_loaded_in_8bit", False):
        raise ConfigError(f"method.type '{method}' updates the base weights, but the base was loaded quantized "
                          "(model.quantization), and quantized weights cannot be trained. Set "
                          "model.quantization: none, or use method.type: qlora to train an adapter on a 4-bit base.")


@register("full")
class Full(Method):
    """All parameters trainable."""

    mergeable = True
    trains_base_weights = True
    save_subdir = MODEL_DIR

    def select_trainable(self, model: nn.Module) -> None:
        """Set ``requires_grad`` for training; full fine-tuning trains everything."""
        model.requires_grad_(True)

    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """The model itself, trainable as :meth:`select_trainable` says (from ``init_from`` if set)."""
        require_float_weights(model, self.cfg.type)
        if self.cfg.init_from:
            return self.load(model, Path(self.cfg.init_from), trainable=True)
        self.select_trainable(model)
        return model

    def reference(self, model: nn.Module) -> None:
        """No adapter to switch off: the caller keeps a frozen copy as the reference model."""
        return None

    def save(self, model: nn.Module, run_dir: Path) -> Path:
        """The whole model as a transformers directory, replaced in one rename."""
        target = Path(run_dir) / self.save_subdir
        with atomic_dir(target) as tmp:
            model.save_pretrained(str(tmp))
        return target

    def load(self, base: "PreTrainedModel", run_dir: Path, trainable: bool = False) -> nn.Module:
        """The saved weights, in ``base``'s class, dtype, attention kernel and device.

        ``base`` itself only provides those settings: its weights are replaced wholesale.
        """
        path = Path(run_dir) / self.save_subdir
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}/config.json does not exist, so {run_dir} holds no full model. Pass the "
                              f"output_dir of a finished '{self.cfg.type}' run (method.init_from or the run to "
                              "load); adapter methods keep their weights in adapter/ instead.")
        try:
            model = type(base).from_pretrained(str(path), dtype=base.dtype,
                                               attn_implementation=base.config._attn_implementation)
        except SafetensorError as err:
            raise damaged_weights(path, err, fix=f"Restore {path} from a copy of the run, or train the run "
                                                 "again.") from None
        model.to(base.device)
        if trainable:
            self.select_trainable(model)
        else:
            model.requires_grad_(False)
        return model

    def merge(self, model: nn.Module) -> "PreTrainedModel":
        """Already a plain model."""
        return model
