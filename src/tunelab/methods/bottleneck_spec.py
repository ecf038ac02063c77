"""What a bottleneck adapter is, as data: its units, where they sit, and the saved form.

A *unit* is one trained adapter (one ``Bottleneck`` per site it occupies); a plain
Houlsby/Pfeiffer/parallel/MAM run has one unit, an AdapterFusion run has one per fused
adapter. The spec is written next to the weights as ``tunelab_adapter.json`` so that a
run directory can be rebuilt on a fresh base without the original config, and so that a
wrong base is refused with an explanation instead of a shape error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.config import MethodConfig

WEIGHTS_FILE = "adapter_model.safetensors"
SPEC_FILE = "tunelab_adapter.json"
FORMAT = "tunelab-bottleneck-1"

#: Sublayers an adapter can follow, in the order a decoder layer runs them.
KINDS = ("attn", "mlp")

#: type -> ((sublayer, what the adapter reads), ...). "output": sequential adapter on the
#: sublayer output (Houlsby 2019: after attention and MLP; Pfeiffer 2020: after the MLP).
#: "input": parallel adapter fed the sublayer input, added to its output (He et al. 2022).
PLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "houlsby": (("attn", "output"), ("mlp", "output")),
    "pfeiffer": (("mlp", "output"),),
    "parallel": (("mlp", "input"),),
    "mam": (("mlp", "input"),),
}

#: Adapter types AdapterFusion can combine (MAM carries a prefix, fusion is not nested).
FUSABLE = ("houlsby", "pfeiffer", "parallel")


@dataclass(frozen=True)
class UnitSpec:
    name: str
    type: str
    placement: tuple[tuple[str, str], ...]
    reduction_factor: int
    non_linearity: str
    scaling: float
    source: str | None = None  # run directory it was loaded from (AdapterFusion)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.placement]

    def reads(self, kind: str) -> str:
        return dict(self.placement)[kind]


def unit_from_config(cfg: "MethodConfig") -> UnitSpec:
    """The single unit a fresh Houlsby/Pfeiffer/parallel/MAM run trains."""
    return UnitSpec(name="adapter", type=cfg.type, placement=PLACEMENTS[cfg.type],
                    reduction_factor=cfg.reduction_factor, non_linearity=cfg.non_linearity, scaling=cfg.scaling)


@dataclass(frozen=True)
class AdapterSpec:
    type: str
    hidden_size: int
    num_layers: int
    units: tuple[UnitSpec, ...]
    fusion: bool
    drop_layers: int
    drop_at: str
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # method config, for the record

    def to_json(self, modules: dict[str, str], base_class: str) -> dict[str, Any]:
        data = asdict(self)
        data.update(format=FORMAT, base_model_class=base_class, modules=modules)
        return data

    def check_base(self, hidden_size: int, num_layers: int, base_class: str, where: str) -> None:
        """Refuse a base the adapter was not trained on, before any shape error can happen."""
        if (hidden_size, num_layers) != (self.hidden_size, self.num_layers):
            raise ConfigError(
                f"{where} was trained on a base with hidden size {self.hidden_size} and {self.num_layers} decoder "
                f"layers, but this base ({base_class}) has hidden size {hidden_size} and {num_layers} layers. Load "
                "the base model the adapter was trained on (model.name_or_path in the run's config.yaml).")


def build_spec(cfg: "MethodConfig", units: tuple[UnitSpec, ...], hidden_size: int, num_layers: int,
               fusion: bool) -> AdapterSpec:
    """A spec for a run about to train; validates what depends on the base's size."""
    if cfg.drop_layers >= num_layers:
        raise ConfigError(f"method.drop_layers = {cfg.drop_layers} would drop the adapters of every layer of this "
                          f"{num_layers}-layer model, leaving nothing to train. Use a value below {num_layers}.")
    for unit in units:
        if hidden_size // unit.reduction_factor < 1:
            raise ConfigError(f"method.reduction_factor = {unit.reduction_factor} is larger than the hidden size "
                              f"{hidden_size}, so the bottleneck would have no width. Use at most {hidden_size}.")
    return AdapterSpec(type=cfg.type, hidden_size=hidden_size, num_layers=num_layers, units=units, fusion=fusion,
                       drop_layers=cfg.drop_layers, drop_at=cfg.drop_at, config=cfg.model_dump(mode="json"))


def _spec_from_json(data: dict[str, Any], where: Path) -> AdapterSpec:
    if data.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a tunelab bottleneck adapter (format {data.get('format')!r}, expected "
                          f"{FORMAT!r}). Pass the run directory of a bottleneck-adapter run.")
    try:
        units = tuple(UnitSpec(**{**unit, "placement": tuple(tuple(site) for site in unit["placement"])})
                      for unit in data["units"])
        return AdapterSpec(type=data["type"], hidden_size=data["hidden_size"], num_layers=data["num_layers"],
                           units=units, fusion=data["fusion"], drop_layers=data["drop_layers"],
                           drop_at=data["drop_at"], config=data.get("config", {}))
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{where}: field {err} is missing or malformed. The file was edited or truncated; "
                          "restore it or retrain the adapter.") from None


@dataclass(frozen=True)
class SavedAdapter:
    path: Path
    spec: AdapterSpec
    weights: dict[str, torch.Tensor]


def read_saved(adapter_dir: Path, expected: tuple[str, ...]) -> SavedAdapter:
    """Read ``tunelab_adapter.json`` + weights from ``adapter_dir``; its type must be in ``expected``."""
    from safetensors.torch import load_file

    spec_file, weights_file = adapter_dir / SPEC_FILE, adapter_dir / WEIGHTS_FILE
    for file in (spec_file, weights_file):
        if not file.is_file():
            raise ConfigError(f"{file} is missing, so {adapter_dir.parent} holds no bottleneck adapter. Pass the "
                              f"run directory of a finished {'/'.join(expected)} run.")
    try:
        data = json.loads(spec_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{spec_file}, line {err.lineno}: not valid JSON ({err.msg}). Restore the file or "
                          "retrain the adapter.") from None
    spec = _spec_from_json(data, spec_file)
    if spec.type not in expected:
        raise ConfigError(f"{spec_file}: the adapter is of type '{spec.type}', but '{'/'.join(expected)}' is "
                          f"needed here. Set method.type: {spec.type} or pass a run of the right type.")
    return SavedAdapter(path=adapter_dir, spec=spec, weights=load_file(str(weights_file)))
