"""From ``cfg.data`` to tokenized train and eval examples.

:func:`build_data` prepares (or finds) the run's tokenized cache (:mod:`tunelab.data.cache`:
sources read by ``datasets`` -> records (:mod:`tunelab.data.formats`) -> mixing, sampling and
the eval split (:mod:`tunelab.data.selection`) -> templates + tokenize, in parallel) and returns
memory-mapped views of it (:class:`tunelab.data.views.ExampleView`) that index like lists of
examples. Counts of skipped, truncated and dropped examples come with it for the trainer to
report. :func:`load_records` is the small in-memory path evaluation uses for one file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig, RunConfig
from tunelab.data.cache import prepare
from tunelab.data.columns import example_length, example_lengths
from tunelab.data.formats import to_records
from tunelab.data.records import Example, PairExample, PromptExample, Record, UnpairedExample
from tunelab.data.selection import mix, split_eval
from tunelab.data.sources import DatasetRegistry
from tunelab.data.templates import ChatTemplate, get_template
from tunelab.data.views import ExampleView
from tunelab.errors import ConfigError

TokenizedExample = Example | PairExample | UnpairedExample | PromptExample

__all__ = ["DataBundle", "TokenizedExample", "build_data", "example_length", "example_lengths", "load_records",
           "split_eval"]


@dataclass
class DataBundle:
    """The examples a run trains and evaluates on (memory-mapped views, or lists), its template and counts."""

    train: Sequence[TokenizedExample] | Iterable[TokenizedExample]  # an ExampleStream with data.streaming
    eval: Sequence[TokenizedExample]
    template: ChatTemplate
    stats: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None


def load_records(names: list[str], cfg: DataConfig, seed: int, stats: dict[str, Any],
                 weights: list[float] | None = None, stage: str = "sft") -> list[Record]:
    """Read, convert and mix the named datasets; per-dataset ``max_samples`` like LLaMA-Factory.

    PPO only needs prompts, so its records may come without answers.
    """
    registry = DatasetRegistry(cfg.dataset_dir)
    parts = []
    for name in names:
        spec = registry.resolve(name)
        records, conversion = to_records(spec.rows(), spec, cfg.on_error, require_answer=stage not in ("ppo", "grpo"))
        stats["skipped"] = stats.get("skipped", 0) + conversion.skipped
        if cfg.max_samples is not None:
            records = records[:cfg.max_samples]
        parts.append(records)
    return mix(parts, weights, seed)


def build_data(cfg: RunConfig, tokenizer: Any, progress: bool = False) -> DataBundle:
    """Tokenized train and eval examples for ``cfg.stage``, from the cache (built on the first call)."""
    data = cfg.data
    if not data.train:
        raise ConfigError("data.train is empty: name at least one dataset (a name from "
                          f"{data.dataset_dir}/dataset_info.json or a file path).")
    if data.streaming:
        raise ConfigError("data.streaming=true is read through tunelab.data.streaming.open_stream (examples "
                          "tokenized on the fly, without a cache), which only `tunelab train` reads; this command "
                          "reads prepared data. Set data.streaming=false for it.")
    template = get_template(data.template, tokenizer, system=data.system)
    prepared = prepare(cfg, tokenizer, template, progress=progress)
    train = ExampleView(prepared.path / "train.arrow", prepared.kind)
    evaluation = ExampleView(prepared.path / "eval.arrow", prepared.kind)
    return DataBundle(train, evaluation, template, dict(prepared.stats), prepared.path)
