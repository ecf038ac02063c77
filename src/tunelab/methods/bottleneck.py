"""Bottleneck adapters, natively: Houlsby, Pfeiffer, parallel, MAM, AdapterFusion, AdapterDrop.

AdapterHub's ``adapters`` package pins transformers 4.x, so these are implemented from the
papers with forward hooks on the base model's own attention and MLP modules (no model code
is copied). The pieces:

- :mod:`bottleneck_spec` — what an adapter is as data, and its saved form;
- :mod:`bottleneck_modules` — the torch modules (adapter, fusion attention, AdapterSet);
- :mod:`bottleneck_layout` — finding decoder layers and installing the hooks;
- this module — the registered methods (apply / save / load / reference).

Saved layout (``run_dir/adapter``): ``adapter_model.safetensors`` (every adapter tensor,
including the frozen fused adapters of an AdapterFusion run, so the run directory is
self-contained) and ``tunelab_adapter.json`` (type, units and their placement, base hidden
size and layer count, the method config). MAM adds ``prefix/``, a PEFT prefix-tuning
adapter, kept in a subdirectory so the run is never mistaken for a plain PEFT adapter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.io import atomic_dir, write_json
from tunelab.methods.base import Method, register
from tunelab.methods.bottleneck_layout import DecoderLayout, attach, find_attached, find_layout
from tunelab.methods.bottleneck_modules import AdapterSet
from tunelab.methods.bottleneck_spec import (FUSABLE, SPEC_FILE, WEIGHTS_FILE, AdapterSpec, SavedAdapter, build_spec,
                                             read_saved, unit_from_config)
from tunelab.methods.prompts import PrefixConfig, start_virtual_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: MAM: subdirectory of the adapter directory holding the PEFT prefix-tuning part.
PREFIX_DIR = "prefix"


class AdapterDropConfig(MethodConfig):
    """AdapterDrop (Ruckle et al. 2021): no adapters in the lowest layers, for speed."""

    drop_layers: int = Field(0, ge=0, description="AdapterDrop: skip adapters in the first N layers.")
    drop_at: Literal["train", "inference", "both"] = Field("both", description="When AdapterDrop skips them.")


class BottleneckConfig(AdapterDropConfig):
    """The shape of one bottleneck adapter."""

    reduction_factor: int = Field(16, gt=0, description="Adapter bottleneck = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Activation between the "
                                                                                       "down and up projection.")
    scaling: float = Field(1.0, description="Factor on the adapter's output.")


class MixAndMatchConfig(BottleneckConfig, PrefixConfig):
    """MAM: a parallel adapter plus a prefix (a table by default: He et al. 2022 keep it small)."""

    prefix_projection: bool = Field(False, description="Produce the prefix through an MLP (prefix-tuning's "
                                                       "reparameterisation); false = train the table directly.")


class FusionConfig(AdapterDropConfig):
    """AdapterFusion: the trained adapters to combine."""

    fusion_adapters: list[str] = Field(default_factory=list, description="adapter_fusion: run dirs of trained "
                                                                          "adapters.")


def _base_size(model: nn.Module, layout: DecoderLayout) -> tuple[int, int]:
    return model.config.hidden_size, len(layout.layers)


@register("houlsby", "pfeiffer", "parallel")
class BottleneckAdapter(Method):
    """Houlsby (after attention and MLP), Pfeiffer (after the MLP) or parallel (beside the
    MLP, scaled) bottleneck adapters; ``method.type`` picks the placement."""

    config_class: type[MethodConfig] = BottleneckConfig
    cfg: BottleneckConfig
    mergeable = False
    merge_refusal = ("bottleneck adapters apply a non-linearity between their down- and up-projection, so they "
                     "cannot be folded into the base model's linear weights.")

    # -- training ---------------------------------------------------------------------
    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """Freeze the base and attach fresh adapters (or continue those of ``method.init_from``)."""
        if self.cfg.init_from is not None:
            return self._restore(model, Path(self.cfg.init_from), trainable=True, resume=True)
        layout = find_layout(model)
        spec, weights = self._fresh(*_base_size(model, layout))
        return self._build(model, layout, spec, weights, saved_dir=None, trainable=True)

    def _fresh(self, hidden: int, layers: int) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
        """Spec and initial tensors of a new run (none: the modules initialise themselves)."""
        return build_spec(self.cfg, (unit_from_config(self.cfg),), hidden, layers, fusion=False), {}

    def _check_resumable(self, saved: SavedAdapter) -> None:
        """``init_from`` continues training, so the adapter's function must stay the same."""
        unit = saved.spec.units[0]
        have = {"reduction_factor": unit.reduction_factor, "non_linearity": unit.non_linearity,
                "scaling": unit.scaling, **self._extra_structure(saved.spec.config)}
        want = {key: getattr(self.cfg, key) for key in have}
        _refuse_mismatch(saved.path, have, want)

    def _extra_structure(self, saved_config: dict[str, Any]) -> dict[str, Any]:
        """Further config keys that must match to continue from a saved adapter."""
        return {}

    def _restore(self, base: nn.Module, run_dir: Path, trainable: bool, resume: bool) -> nn.Module:
        """Attach a saved adapter; ``resume`` (init_from) takes AdapterDrop settings from this run."""
        saved = read_saved(run_dir / self.save_subdir, (self.cfg.type,))
        layout = find_layout(base)
        hidden, layers = _base_size(base, layout)
        saved.spec.check_base(hidden, layers, type(base).__name__, f"the adapter in {saved.path}")
        spec = saved.spec
        if resume:
            self._check_resumable(saved)
            spec = build_spec(self.cfg, saved.spec.units, hidden, layers, saved.spec.fusion)
        return self._build(base, layout, spec, saved.weights, saved.path, trainable)

    def _build(self, base: nn.Module, layout: DecoderLayout, spec: AdapterSpec, weights: dict[str, torch.Tensor],
               saved_dir: Path | None, trainable: bool) -> nn.Module:
        """Freeze ``base``, hook the adapters in, wrap (MAM), then set what trains. A fresh
        run (no ``saved_dir``) may load only some tensors (AdapterFusion's fused adapters)."""
        base.requires_grad_(False)
        adapters = AdapterSet(spec)
        adapters.load_weights(weights, str(saved_dir or "fresh adapter"), partial=saved_dir is None)
        attach(base, layout, adapters)
        outer = self._wrap(base, saved_dir, trainable)
        adapters.set_trainable(trainable)  # after the wrap: PEFT freezes every child of the base it wraps
        return outer

    def _wrap(self, model: nn.Module, saved_dir: Path | None, trainable: bool) -> nn.Module:
        """The model handed back to the caller; MAM wraps the base in PEFT prefix-tuning."""
        return model

    def notes(self, model: nn.Module) -> list[str]:
        """AdapterDrop's effect: how many layers run without adapters, when, and that their
        adapters are frozen (a trainable count alone does not say why it is smaller)."""
        _, adapters = find_attached(model)
        return adapter_drop_notes(adapters)

    @contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run ``model`` as its frozen base (DPO/KTO/PPO reference) without a second copy."""
        _, adapters = find_attached(model)
        with adapters.disabled(), self._others_disabled(model):
            yield model

    def _others_disabled(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Disable parts beyond the bottleneck adapters (MAM's prefix)."""
        return nullcontext()

    # -- persistence ------------------------------------------------------------------
    def save(self, model: nn.Module, run_dir: Path) -> Path:
        """Write weights + ``tunelab_adapter.json`` to ``run_dir/adapter`` in one atomic rename."""
        from safetensors.torch import save_file

        host, adapters = find_attached(model)
        layout = find_layout(host)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in adapters.state_dict().items()}
        target = Path(run_dir) / self.save_subdir
        with atomic_dir(target) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            write_json(tmp / SPEC_FILE, adapters.spec.to_json(layout.placement_names(), type(host).__name__))
            self._save_extra(model, tmp)
        return target

    def _save_extra(self, model: nn.Module, adapter_dir: Path) -> None:
        """Write parts beyond the bottleneck adapters (MAM's prefix)."""

    def load(self, base: "PreTrainedModel", run_dir: Path, trainable: bool = False) -> nn.Module:
        """Rebuild the saved adapters on a fresh ``base``; the base stays frozen."""
        return self._restore(base, Path(run_dir), trainable, resume=False)


#: How each ``drop_at`` reads in :func:`adapter_drop_notes`.
_DROPPED_WHEN = {"both": "in training and at inference", "train": "in training only (they run at inference)",
                 "inference": "at inference only (they train)"}


def adapter_drop_notes(adapters: AdapterSet) -> list[str]:
    """One line naming the layers AdapterDrop skips and when; none without AdapterDrop."""
    spec = adapters.spec
    if spec.drop_layers == 0:
        return []
    frozen = sum(p.numel() for layer in adapters.dropped_in_training()
                 for site in adapters.trained_sites(layer) for p in site.parameters())
    line = (f"AdapterDrop: no adapters in layers 0-{spec.drop_layers - 1} ({spec.drop_layers} of {spec.num_layers}) "
            f"{_DROPPED_WHEN[spec.drop_at]}")
    return [line + (f"; their {frozen:,} parameters are frozen and not counted as trainable" if frozen else "")]


def _refuse_mismatch(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    diffs = [f"{key} {have[key]!r} (this run: {want[key]!r})" for key in have if have[key] != want[key]]
    if diffs:
        raise ConfigError(f"method.init_from: the adapter in {path} was trained with {', '.join(diffs)}. Set the "
                          "same values in the method section to continue training it.")


@register("mam")
class MixAndMatch(BottleneckAdapter):
    """MAM adapter (He et al. 2022): PEFT prefix-tuning on attention plus a native parallel
    adapter beside the MLP. The prefix starts at the base's key/values of
    ``method.prompt_init_text`` (a neutral text by default; null: PEFT's random table), so
    unlike the other types a fresh MAM model equals the prefix-only model, not the bare
    base. The hooks sit on the base model inside the PEFT wrapper, so both parts run in
    every forward."""

    config_class = MixAndMatchConfig
    cfg: MixAndMatchConfig
    supports_gradient_checkpointing = False  # PEFT refuses prefix-tuning on a checkpointing model
    supports_packing = False  # the PEFT prefix turns transformers' packed-sequence detection off

    def apply(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> nn.Module:
        """The fresh or continued adapters; a fresh prefix may start from ``prompt_init_text``."""
        wrapped = super().apply(model, tokenizer)
        if self.cfg.init_from is None:
            start_virtual_tokens(wrapped, tokenizer, self.cfg)
        return wrapped

    def _extra_structure(self, saved_config: dict[str, Any]) -> dict[str, Any]:
        return {"num_virtual_tokens": saved_config.get("num_virtual_tokens")}

    def _wrap(self, model: nn.Module, saved_dir: Path | None, trainable: bool) -> nn.Module:
        from peft import PeftModel, PrefixTuningConfig, get_peft_model

        if saved_dir is not None:
            # PEFT refuses is_trainable for prompt learning, yet leaves the loaded prefix trainable; set it here.
            # The loaded model runs in PEFT's inference mode, which reads the saved prefix table directly, so a
            # continued run (init_from) trains that table (with prefix_projection: the projected prefix).
            wrapped = PeftModel.from_pretrained(model, str(saved_dir / PREFIX_DIR))
            wrapped.prompt_encoder.requires_grad_(trainable)
            return wrapped
        prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.cfg.num_virtual_tokens,
                                    prefix_projection=self.cfg.prefix_projection,
                                    encoder_hidden_size=self.cfg.encoder_hidden_size or model.config.hidden_size)
        return get_peft_model(model, prefix)

    def _others_disabled(self, model: nn.Module) -> AbstractContextManager[Any]:
        return model.disable_adapter()

    def _save_extra(self, model: nn.Module, adapter_dir: Path) -> None:
        model.save_pretrained(str(adapter_dir / PREFIX_DIR))


@register("adapter_fusion")
class AdapterFusion(BottleneckAdapter):
    """AdapterFusion (Pfeiffer et al. 2021): freeze adapters trained in the runs listed in
    ``method.fusion_adapters`` and learn, per layer and sublayer, an attention that mixes
    their outputs. Only the fusion parameters train; it starts as the plain average of the
    adapters (see :class:`~tunelab.methods.bottleneck_modules.Fusion`). AdapterDrop settings
    of the fusion run apply; those saved with the fused adapters are ignored."""

    config_class = FusionConfig
    cfg: FusionConfig  # type: ignore[assignment]

    def _fresh(self, hidden: int, layers: int) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
        runs = self.cfg.fusion_adapters
        if len(runs) < 2:
            raise ConfigError(f"method.fusion_adapters lists {len(runs)} run(s); adapter_fusion combines at least "
                              "two trained adapters. List the run directories of two or more houlsby, pfeiffer or "
                              "parallel runs on this base.")
        units, weights = [], {}
        for index, run in enumerate(runs):
            saved = read_saved(Path(run) / self.save_subdir, FUSABLE)
            saved.spec.check_base(hidden, layers, "the base model", f"method.fusion_adapters[{index}] ({run})")
            name = f"adapter{index}"
            units.append(replace(saved.spec.units[0], name=name, source=str(run)))
            weights.update({key.replace("units.adapter.", f"units.{name}.", 1): value
                            for key, value in saved.weights.items()})
        return build_spec(self.cfg, tuple(units), hidden, layers, fusion=True), weights

    def _check_resumable(self, saved: SavedAdapter) -> None:
        sources = [unit.source for unit in saved.spec.units]
        if self.cfg.fusion_adapters and [str(run) for run in self.cfg.fusion_adapters] != sources:
            raise ConfigError(f"method.init_from: the fusion in {saved.path} combines {sources}, but "
                              f"method.fusion_adapters lists {self.cfg.fusion_adapters}. Leave fusion_adapters "
                              "empty to continue the saved fusion, or drop init_from to fuse a new set.")
