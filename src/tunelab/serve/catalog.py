"""Which models a server offers, decided from the run directories before any weight is loaded.

Every run served together must be trained on the same base model: the server keeps that
base in memory once and attaches each PEFT adapter to it under its own adapter name, so
each run, and the bare base, is one model id of the same module. Runs that are not PEFT
adapters (full or freeze fine-tuning, native bottleneck adapters), and PEFT adapters of a
different PEFT type than the first one (PEFT cannot mix types on one module), are loaded
as separate models and cost their own memory.

A single argument that is not a run directory but a base model (the embedded name, a
Hugging Face directory, a .gguf file or a hub id) serves that model alone, prompted with its
tokenizer's own chat template.

Model ids are what ``/v1/models`` lists and what a client sends back as ``model``: a run's
directory name, and for the base the name a user would type (a hub base keeps its whole
``org/name`` id, as other OpenAI-compatible servers name hub models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import DEFAULT_MODEL, DataConfig, ModelConfig, RunConfig
from tunelab.errors import ConfigError
from tunelab.methods.base import get_method
from tunelab.methods.peft_common import ADAPTER_CONFIG_FILE, PeftMethod, adapter_dir
from tunelab.models.hub import is_hub_id
from tunelab.models.loader import resolve_source, with_granted_remote_code
from tunelab.runs import RunDir

#: ModelConfig keys that change how the shared base is loaded (not which weights it has).
_LOADING_KEYS = ("dtype", "quantization", "quant_type", "double_quant", "compute_dtype", "attn_implementation")


@dataclass(frozen=True)
class ServedRun:
    """One run directory and how it is served."""

    id: str
    path: Path
    cfg: RunConfig
    #: The PEFT adapter directory when the run shares the base module; None: loaded separately.
    adapter: Path | None


@dataclass
class ServePlan:
    base: ModelConfig  # how the shared base is loaded: the first run's model section
    base_id: str
    runs: list[ServedRun]
    notes: list[str] = field(default_factory=list)  # printed at startup: renamed ids, separate loads

    @property
    def shared(self) -> list[ServedRun]:
        return [run for run in self.runs if run.adapter is not None]

    @property
    def separate(self) -> list[ServedRun]:
        return [run for run in self.runs if run.adapter is None]

    def base_config(self) -> RunConfig:
        """How the bare base is prompted: with the first run's template, so base and adapters see
        the same text; with the tokenizer's own when the base is served alone."""
        data = DataConfig(template=self.runs[0].cfg.data.template) if self.runs else DataConfig()
        return RunConfig(model=self.base, data=data)


def base_model_id(model: ModelConfig) -> str:
    """The id clients use for the bare base: the embedded name, the hub id whole (``org/name``: its
    last part alone can name another organisation's model), or the directory / file name."""
    if model.name_or_path == DEFAULT_MODEL or is_hub_id(model.name_or_path):
        return model.name_or_path
    path = Path(model.name_or_path)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _weights_key(model: ModelConfig) -> str:
    """Identifies the base weights regardless of how a path to them was spelt (a hub id: its
    snapshot at ``model.revision``, so two revisions are two bases)."""
    return str(Path(resolve_source(model.name_or_path, model.gguf_file, model.revision).label).resolve())


def _spelt(model: ModelConfig) -> str:
    """The base as its config names it, with the revision when one is set."""
    return f"'{model.name_or_path}'" + (f" (revision '{model.revision}')" if model.revision else "")


def _peft_type(run_dir: Path, cfg: RunConfig) -> str | None:
    """The PEFT type of the run's adapter, or None when the run keeps no PEFT adapter."""
    method = get_method(cfg.method)
    config = adapter_dir(run_dir) / ADAPTER_CONFIG_FILE
    if not isinstance(method, PeftMethod) or not config.is_file():
        return None
    return str(json.loads(config.read_text(encoding="utf-8")).get("peft_type"))


def _unique_id(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    suffix = 2
    while f"{name}-{suffix}" in taken:
        suffix += 1
    return f"{name}-{suffix}"


def _read_runs(runs: list[str]) -> list[tuple[Path, RunConfig]]:
    """Each distinct run directory with its config, in the order given."""
    if not runs:
        raise ConfigError("tunelab serve needs at least one run directory (the output_dir of a finished "
                          "`tunelab train`); its base model is served too.")
    seen: dict[Path, RunConfig] = {}
    for run in runs:
        if not RunDir(run).is_run():
            raise ConfigError(f"{run} is not a tunelab run directory: {RunDir(run).config} is missing. Pass "
                              "the output_dir of a finished `tunelab train` run (its base model is served "
                              "automatically), or a single base model (embedded name, Hugging Face directory, "
                              ".gguf file or hub id) to serve it alone.")
        path = Path(run).resolve()
        if path not in seen:
            cfg = RunDir(path).read_config()
            cfg.model = with_granted_remote_code(cfg.model)  # never the run's own choice
            seen[path] = cfg
    return list(seen.items())


def _check_same_base(runs: list[tuple[Path, RunConfig]], notes: list[str]) -> None:
    """All runs must be trained on the first run's base; loading options may differ (noted)."""
    first_path, first = runs[0]
    want = _weights_key(first.model)
    for path, cfg in runs[1:]:
        if _weights_key(cfg.model) != want:
            raise ConfigError(f"runs served together must share one base model, but {path} was trained on "
                              f"{_spelt(cfg.model)} and {first_path} on {_spelt(first.model)}. Start one `tunelab "
                              "serve` per base model (on different ports).")
        differing = [f"model.{key}={getattr(cfg.model, key)!r}" for key in _LOADING_KEYS
                     if getattr(cfg.model, key) != getattr(first.model, key)]
        if differing:
            notes.append(f"{path.name} was trained with {', '.join(differing)}; it is served on the base loaded "
                         f"as in {first_path.name}.")


def _bare_model(argument: str) -> ModelConfig | None:
    """``argument`` as a base model to serve alone, or None when it names no model."""
    try:
        resolve_source(argument)
    except ConfigError:
        return None
    return with_granted_remote_code(ModelConfig(name_or_path=argument))


def plan(runs: list[str]) -> ServePlan:
    """Decide ids and placement for ``runs`` (paths of run directories, or one base model) and their base."""
    if len(runs) == 1 and not RunDir(runs[0]).is_run() and (bare := _bare_model(runs[0])) is not None:
        return ServePlan(bare, base_model_id(bare), [])
    read = _read_runs(runs)
    notes: list[str] = []
    _check_same_base(read, notes)
    base = read[0][1].model
    base_id = base_model_id(base)
    taken = {base_id}
    served: list[ServedRun] = []
    shared_type: str | None = None
    for path, cfg in read:
        run_id = _unique_id(path.name, taken)
        taken.add(run_id)
        if run_id != path.name:
            notes.append(f"model id '{path.name}' is taken (by the base or another run), so {path} is served as "
                         f"'{run_id}'.")
        peft_type = _peft_type(path, cfg)
        shared_type = shared_type or peft_type
        if peft_type is not None and peft_type == shared_type:
            served.append(ServedRun(run_id, path, cfg, adapter_dir(path)))
            continue
        why = (f"its {peft_type} adapter cannot share a module with {shared_type} adapters" if peft_type
               else f"method '{cfg.method.type}' is not a PEFT adapter")
        notes.append(f"'{run_id}' is loaded as a separate model ({why}); it costs its own memory.")
        served.append(ServedRun(run_id, path, cfg, None))
    return ServePlan(base, base_id, served, notes)
