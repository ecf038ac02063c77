"""What every PEFT-backed method shares: create, continue, save, load, merge, reference.

A PEFT method only says which ``peft.PeftConfig`` it wants (:meth:`PeftMethod.peft_config`);
this base class turns that into the :class:`~tunelab.methods.base.Method` contract:

- the adapter is written as a standard PEFT directory (``run_dir/adapter``), so
  ``peft.PeftModel.from_pretrained(base, run_dir / "adapter")`` works outside tunelab;
- ``method.init_from`` continues from the adapter of an earlier run instead of creating a
  fresh one (the saved adapter's structure -- rank, targets, virtual tokens -- wins over
  the current config, because the weights only fit that structure);
- :meth:`PeftMethod.reference` gives stages such as DPO the frozen starting model without
  a second copy in memory: the same module with its adapter switched off.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from torch import nn

from tunelab.errors import ConfigError
from tunelab.io import atomic_dir
from tunelab.methods.base import Method
from tunelab.runs import RunDir

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The one adapter name tunelab uses. PEFT's own default: ``PeftModel.from_pretrained``
#: loads under this name too, and it occurs in no transformers module path (AdaLoRA
#: mis-resizes modules on reload when the adapter name is a substring of a module path).
ADAPTER_NAME = "default"

#: What ``PeftConfig.save_pretrained`` writes; its presence identifies a PEFT adapter dir.
ADAPTER_CONFIG_FILE = "adapter_config.json"


def adapter_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its adapter."""
    return RunDir(run_dir).adapter


def require_adapter(run_dir: str | Path, purpose: str) -> Path:
    """The adapter directory of ``run_dir``, or a ConfigError that says what to pass instead."""
    path = adapter_dir(run_dir)
    if not (path / ADAPTER_CONFIG_FILE).is_file():
        raise ConfigError(f"{purpose}: {path / ADAPTER_CONFIG_FILE} does not exist, so {run_dir} holds no PEFT "
                          "adapter. Pass the output_dir of a finished run trained with a PEFT method (lora, dora, "
                          "ia3, prefix, ...); full and freeze runs keep full weights in model/ instead.")
    return path


def check_module_paths(model: nn.Module) -> None:
    """Refuse a model whose module paths contain the adapter name (PEFT would mis-load it)."""
    clash = next((name for name, _ in model.named_modules() if ADAPTER_NAME in name), None)
    if clash is not None:
        raise ConfigError(f"the base model has a module named '{clash}', which contains the PEFT adapter name "
                          f"'{ADAPTER_NAME}'; PEFT cannot save and reload adapters on such a model reliably. "
                          "Use a full or freeze method for this architecture.")


class PeftMethod(Method):
    """Base for methods implemented by PEFT; subclasses provide :meth:`peft_config`."""

    #: The ``peft.PeftType`` value this method creates; an ``init_from`` adapter must match it.
    peft_type: str = ""

    # -- what subclasses provide ------------------------------------------------------
    def peft_config(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> "PeftConfig":
        """The PEFT configuration of a fresh adapter for ``model``."""
        raise NotImplementedError

    def prepare_base(self, model: "PreTrainedModel") -> "PreTrainedModel":
        """Adjust the base before an adapter is attached for training (QLoRA: k-bit preparation)."""
        return model

    def after_create(self, model: "PeftModel", base: "PreTrainedModel",
                     tokenizer: "PreTrainedTokenizerBase") -> None:
        """Finish a freshly created adapter (text initialisation, PiSSA snapshot)."""

    # -- training ---------------------------------------------------------------------
    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """A PeftModel whose only trainable parameters are the adapter's."""
        from peft import get_peft_model

        check_module_paths(model)
        if self.cfg.init_from:
            return self.continue_from(model, Path(self.cfg.init_from))
        config = self.peft_config(model, tokenizer)
        base = self.prepare_base(model)
        try:
            peft_model = get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        except ValueError as err:  # PEFT reports unknown targets and bad combinations this way
            raise ConfigError(f"method '{self.cfg.type}': PEFT rejected the adapter configuration: {err} "
                              "Check method.target (module names such as q_proj, or 'all-linear') and the "
                              "other method.* keys.") from None
        self.after_create(peft_model, base, tokenizer)
        return peft_model

    def continue_from(self, model: "PreTrainedModel", run_dir: Path) -> nn.Module:
        """``init_from``: the adapter saved in ``run_dir``, loaded as trainable onto ``model``."""
        from peft import PeftConfig

        path = require_adapter(run_dir, "method.init_from")
        saved = PeftConfig.from_pretrained(str(path))
        saved_type = getattr(saved.peft_type, "value", saved.peft_type)
        if saved_type != self.peft_type:
            raise ConfigError(f"method.init_from: the adapter in {path} is a {saved_type} adapter, but "
                              f"method.type '{self.cfg.type}' trains {self.peft_type} adapters. Continue it with "
                              "the method it was trained with, or drop init_from.")
        return self.load(model, run_dir, trainable=True)

    @contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model as it was before training (adapter switched off), without a copy.

        Usage: ``with method.reference(model) as ref: ref_logits = ref(**batch).logits``.
        Full and freeze methods return ``None`` instead, and the caller keeps a frozen copy.
        """
        with model.disable_adapter():
            yield model

    # -- persistence ------------------------------------------------------------------
    def save(self, model: nn.Module, run_dir: Path) -> Path:
        """Write a standard PEFT adapter directory to ``run_dir/adapter`` in one atomic rename."""
        target = adapter_dir(run_dir)
        with atomic_dir(target) as tmp:
            self.write_adapter(model, tmp)
        return target

    def write_adapter(self, model: nn.Module, directory: Path) -> None:
        """Fill ``directory`` with what :meth:`load` needs; PEFT's own format by default."""
        model.save_pretrained(str(directory))

    def load(self, base: "PreTrainedModel", run_dir: Path, trainable: bool = False) -> nn.Module:
        """Attach the saved adapter to ``base`` (frozen unless ``trainable``)."""
        from peft import PeftModel

        path = require_adapter(run_dir, f"loading the '{self.cfg.type}' adapter")
        if trainable:
            return self.load_trainable(base, path)
        model = PeftModel.from_pretrained(base, str(path), adapter_name=ADAPTER_NAME, is_trainable=False)
        return model.requires_grad_(False)  # PEFT leaves prompt encoders trainable even in inference mode

    def load_trainable(self, base: "PreTrainedModel", path: Path) -> nn.Module:
        """Load the adapter in ``path`` so that training can continue from it."""
        from peft import PeftModel

        return PeftModel.from_pretrained(self.prepare_base(base), str(path), adapter_name=ADAPTER_NAME,
                                         is_trainable=True)

    def merge(self, model: nn.Module) -> "PreTrainedModel":
        """Fold the adapter into the base weights (consumes ``model``) and return a plain model."""
        if not self.mergeable:
            return super().merge(model)
        return model.merge_and_unload()

