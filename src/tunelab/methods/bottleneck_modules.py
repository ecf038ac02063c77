"""Torch modules of the bottleneck adapters: the adapter itself, AdapterFusion, and the set
of all adapters attached to one model.

Nothing here touches the base model; :mod:`tunelab.methods.bottleneck_layout` decides where
the forward hooks sit and calls :meth:`AdapterSet.adapt` from them. Adapter parameters are
kept in float32 whatever the base dtype: the hook casts the hidden state to the adapter's
dtype and the result back, so a bf16 base trains fp32 adapters without a master copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.bottleneck_spec import KINDS, AdapterSpec, UnitSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """down-projection -> non-linearity -> up-projection; returns the *change* to add.

    The up-projection starts at exactly zero, so an adapted model computes bit-for-bit the
    base model's function until the first optimizer step (Houlsby et al. 2019 use a
    near-identity init; exact zero makes "starts equal to the base" testable).
    """

    def __init__(self, hidden_size: int, reduction_factor: int, non_linearity: str):
        super().__init__()
        width = hidden_size // reduction_factor  # >= 1: checked when the spec is built
        self.down = nn.Linear(hidden_size, width, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden_size, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class Fusion(nn.Module):
    """AdapterFusion attention over N adapter outputs at one site (Pfeiffer et al. 2021).

    score_n = (h Q) . (z_n K); o = sum_n softmax(score)_n (z_n V), with h the sublayer
    output and z_n = h + adapter_n. Initialisation: Q = V = identity, K = 0. Every score is
    then 0, the softmax is uniform and o is the plain average of the adapted outputs: the
    fused model starts as the mean of its adapters. K = 0 (not Q = K = 0) keeps the
    gradient of K non-zero from the first step, so the attention can leave the average.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        self.key = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        self.value = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        for layer, weight in ((self.query, nn.init.eye_), (self.key, nn.init.zeros_), (self.value, nn.init.eye_)):
            weight(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        """``hidden`` [..., H]; ``adapted`` [N, ..., H] -> fused [..., H]."""
        scores = (self.key(adapted) * self.query(hidden)).sum(-1)
        weights = torch.softmax(scores, dim=0).unsqueeze(-1)
        return (weights * self.value(adapted)).sum(0)


def _per_site(num_layers: int, kinds: list[str], build: Callable[[], nn.Module]) -> nn.ModuleDict:
    """``{layer: {kind: build()}}`` so parameter names read ``<layer>.<kind>.<param>``."""
    return nn.ModuleDict({str(layer): nn.ModuleDict({kind: build() for kind in kinds}) for layer in range(num_layers)})


class AdapterSet(nn.Module):
    """Every adapter (and fusion layer) of one model, attached to it as a submodule.

    Being a submodule means ``model.named_parameters()``, ``.to()`` and checkpoints see the
    adapters without special cases. ``enabled`` and the AdapterDrop policy are read by the
    hooks on every call, so switching them needs no hook surgery.
    """

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.units = nn.ModuleDict({
            unit.name: _per_site(spec.num_layers, unit.kinds(),
                                 lambda unit=unit: Bottleneck(spec.hidden_size, unit.reduction_factor,
                                                              unit.non_linearity))
            for unit in spec.units})
        self.fusion = (_per_site(spec.num_layers, self.kinds(), lambda: Fusion(spec.hidden_size))
                       if spec.fusion else None)

    def kinds(self) -> list[str]:
        """Sublayer kinds that carry at least one adapter, in layer order (attn before mlp)."""
        used = {kind for unit in self.spec.units for kind in unit.kinds()}
        return [kind for kind in KINDS if kind in used]

    # -- what the hooks call ----------------------------------------------------------
    def active(self, layer: int, training: bool) -> bool:
        """Whether the adapters of ``layer`` run now (enabled, and not dropped)."""
        return self.enabled and not self.dropped(layer, training)

    def dropped(self, layer: int, training: bool) -> bool:
        """AdapterDrop (Rücklé et al. 2021): adapters of the first ``drop_layers`` layers are
        skipped at train time, inference time, or both, as ``drop_at`` says."""
        if layer >= self.spec.drop_layers:
            return False
        return {"both": True, "train": training, "inference": not training}[self.spec.drop_at]

    def adapt(self, layer: int, kind: str, sub_input: torch.Tensor, sub_output: torch.Tensor) -> torch.Tensor:
        """The new output of sublayer ``kind`` of ``layer`` given its input and output."""
        deltas = [self._delta(unit, layer, kind, sub_input, sub_output)
                  for unit in self.spec.units if kind in unit.kinds()]
        if self.fusion is None:
            return sub_output + sum(deltas).to(sub_output)
        fusion = self.fusion[str(layer)][kind]
        hidden = sub_output.to(fusion.query.weight)
        fused = fusion(hidden, torch.stack([hidden + delta.to(hidden) for delta in deltas]))
        return fused.to(sub_output)

    def _delta(self, unit: UnitSpec, layer: int, kind: str, sub_input: torch.Tensor,
               sub_output: torch.Tensor) -> torch.Tensor:
        """``scaling * adapter(x)``; x is the sublayer output (sequential adapters: Houlsby,
        Pfeiffer) or its input (parallel adapters, He et al. 2022)."""
        adapter = self.units[unit.name][str(layer)][kind]
        source = sub_input if unit.reads(kind) == "input" else sub_output
        return unit.scaling * adapter(source.to(adapter.down.weight))

    # -- state ------------------------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        """Plain adapters train themselves; a fusion trains only its attention (the fused
        adapters stay frozen, as in AdapterFusion's second stage). Sites that AdapterDrop skips
        while training never get a gradient, so they stay frozen too: no optimizer state, and
        the trainable-parameter count is what actually trains."""
        self.units.requires_grad_(trainable and self.fusion is None)
        if self.fusion is not None:
            self.fusion.requires_grad_(trainable)
        for layer in self.dropped_in_training():
            for site in self.trained_sites(layer):
                site.requires_grad_(False)

    def dropped_in_training(self) -> list[int]:
        """The layers whose adapters AdapterDrop skips while training (frozen by :meth:`set_trainable`)."""
        return [layer for layer in range(self.spec.num_layers) if self.dropped(layer, training=True)]

    def trained_sites(self, layer: int) -> list[nn.Module]:
        """The modules of ``layer`` that train: a fusion's attention (its adapters stay frozen),
        else every unit's adapter."""
        groups = [self.fusion] if self.fusion is not None else list(self.units.values())
        return [sites[str(layer)] for sites in groups]

    def load_weights(self, weights: dict[str, torch.Tensor], where: str, partial: bool = False) -> None:
        """Load saved tensors; ``partial`` allows parameters absent from ``weights`` (a fresh
        fusion loads its adapters but initialises its attention)."""
        try:
            result = self.load_state_dict(weights, strict=not partial)
        except RuntimeError as err:
            raise ConfigError(f"{where}: the saved adapter weights do not fit the adapter described next to "
                              f"them ({err}). The file is damaged or was edited; retrain or restore it.") from None
        if result.unexpected_keys:
            raise ConfigError(f"{where}: unknown adapter tensors {sorted(result.unexpected_keys)[:3]}. The file was "
                              "not written by tunelab for this adapter type; retrain or restore it.")

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model (e.g. as the DPO reference) without copying it."""
        was = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = was

