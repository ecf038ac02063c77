"""The transformers backend: one base module carrying every PEFT adapter of the plan.

The first adapter is loaded with ``PeftModel.from_pretrained`` and the others with
``load_adapter``, each under its own name; a request selects its adapter with
``set_adapter`` and the bare base runs inside ``disable_adapter()``. Only the engine's
worker thread generates, so switching adapters is safe.

Two ways to generate: :meth:`TransformersBackend.lane` gives a model id a continuously
batched :class:`~tunelab.serve.batching.DecodeBatch`; models it cannot serve (prompt
learning, whose virtual tokens are not in the weights) go through
:meth:`TransformersBackend.run`, i.e. :func:`tunelab.inference.complete`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tunelab.data.templates import get_template
from tunelab.errors import TunelabError
from tunelab.inference import Completion, GenerationRow, LoadedRun, complete, load_run, wrap_run
from tunelab.methods.base import get_method
from tunelab.models.loader import load_base, pick_device
from tunelab.serve.batching import DecodeBatch, steppable
from tunelab.serve.catalog import ServePlan, ServedRun
from tunelab.serve.engine import ServedModel
from tunelab.heap import release_freed_memory

#: Prefix of PEFT adapter names. Names have a fixed width so that none is a substring of
#: another, and are checked against the base's module paths, which must not contain them
#: (PEFT mis-resizes AdaLoRA modules on load when they do).
_ADAPTER_PREFIX = "tunelab_served_"


def context_length(model: nn.Module) -> int | None:
    """How many positions the model accepts (prompt + answer), when its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def adapter_names(base: nn.Module, count: int) -> list[str]:
    names = [f"{_ADAPTER_PREFIX}{i:04d}" for i in range(count)]
    clash = next((module for module, _ in base.named_modules() if _ADAPTER_PREFIX in module), None)
    if clash is not None:
        raise TunelabError(f"the base model has a module named '{clash}', which contains the adapter name prefix "
                           f"'{_ADAPTER_PREFIX}'; PEFT cannot serve adapters under such names reliably.")
    return names


@contextmanager
def _adapter(model: Any, name: str) -> Iterator[None]:
    model.set_adapter(name, inference_mode=True)
    yield


def _attach_adapters(base: nn.Module, runs: list[ServedRun]) -> tuple[nn.Module, list[str]]:
    """The base with every run's adapter loaded under a name of its own (the base itself if none)."""
    from peft import PeftModel

    names = adapter_names(base, len(runs))
    model: Any = base
    for index, (run, name) in enumerate(zip(runs, names)):
        if index == 0:
            model = PeftModel.from_pretrained(base, str(run.adapter), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(run.adapter), adapter_name=name, is_trainable=False)
    model.eval()
    return model, names


class TransformersBackend:
    """Generates with the model's forward pass: continuously batched, or through ``generate``."""

    def __init__(self, models: dict[str, ServedModel]):
        self.models = models

    @classmethod
    def load(cls, plan: ServePlan, device: torch.device | None = None) -> "TransformersBackend":
        device = device or pick_device()
        base, base_tokenizer = load_base(plan.base, device)
        model, names = _attach_adapters(base, plan.shared)
        models: dict[str, ServedModel] = {}

        def add(model_id: str, run: LoadedRun, parent: str | None,
                activate: Callable[[], AbstractContextManager[Any]]) -> None:
            models[model_id] = ServedModel(model_id, run, run.source, parent, context_length(run.model), activate)

        adapter_of = {served.id: name for served, name in zip(plan.shared, names)}
        for served in plan.runs:
            if served.id in adapter_of:
                run = wrap_run(model, served.path, served.cfg, get_method(served.cfg.method))
                add(served.id, run, plan.base_id, lambda name=adapter_of[served.id]: _adapter(model, name))
            else:
                add(served.id, load_run(served.path, device), plan.base_id, nullcontext)
        base_cfg = plan.base_config()
        base_run = LoadedRun(model, base_tokenizer, get_template(base_cfg.data.template, base_tokenizer), base_cfg,
                             None, plan.base.name_or_path)
        add(plan.base_id, base_run, None, model.disable_adapter if names else nullcontext)
        return cls(models)

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        with model.activate():
            return complete(model.run, rows)

    def release_memory(self) -> None:
        """Hand the memory of finished batches back to the system (the engine calls this when idle)."""
        release_freed_memory()

    def lane(self, model: ServedModel) -> DecodeBatch | None:
        """A continuous batch for ``model``, or None when only :meth:`run` generates it correctly."""
        return DecodeBatch(model) if steppable(model.run.model) else None
