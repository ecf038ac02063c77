"""From ``cfg.data`` to tokenized train and eval examples.

sources (files -> rows) -> formats (rows -> canonical records) -> mixing, sampling and the
eval split -> templates (with ``data.system``) + tokenize (records -> token ids and labels). Counts of skipped,
truncated and dropped examples are gathered here and reported by the trainer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunelab.config import DataConfig, RunConfig
from tunelab.data.formats import to_records
from tunelab.data.records import Example, PairExample, PromptExample, Record, UnpairedExample
from tunelab.data.sources import DatasetRegistry
from tunelab.data.templates import ChatTemplate, get_template
from tunelab.data.tokenize import encode_records
from tunelab.errors import ConfigError

TokenizedExample = Example | PairExample | UnpairedExample | PromptExample


@dataclass
class DataBundle:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    template: ChatTemplate
    stats: dict[str, Any] = field(default_factory=dict)


def example_length(example: TokenizedExample) -> int:
    """Tokens the example puts through the model (both sides of a pair)."""
    if isinstance(example, PairExample):
        return len(example.chosen.input_ids) + len(example.rejected.input_ids)
    if isinstance(example, UnpairedExample):
        return len(example.example.input_ids)
    if isinstance(example, PromptExample):
        return len(example.prompt_ids)
    return len(example.input_ids)


def _mix(parts: list[list[Record]], weights: list[float] | None, seed: int) -> list[Record]:
    """Concatenate datasets, or resample them to the given mixing proportions.

    With weights, the mixture keeps the total size and takes ``w_i / sum(w)`` of it from
    dataset i, sampling with replacement where a dataset is smaller than its share.
    """
    if weights is None:
        return [record for part in parts for record in part]
    if len(weights) != len(parts):
        raise ConfigError(f"data.weights has {len(weights)} values but data.train names {len(parts)} datasets; "
                          "give one weight per dataset.")
    rng = random.Random(seed)
    total = sum(len(p) for p in parts)
    norm = sum(weights)
    mixed: list[Record] = []
    for part, weight in zip(parts, weights):
        share = round(total * weight / norm)
        if not part or share == 0:
            continue
        mixed.extend(rng.sample(part, share) if share <= len(part) else rng.choices(part, k=share))
    rng.shuffle(mixed)
    return mixed


def load_records(names: list[str], cfg: DataConfig, seed: int, stats: dict[str, Any],
                 weights: list[float] | None = None, stage: str = "sft") -> list[Record]:
    """Read, convert and mix the named datasets; per-dataset ``max_samples`` like LLaMA-Factory.

    PPO only needs prompts, so its records may come without answers.
    """
    registry = DatasetRegistry(cfg.dataset_dir)
    parts = []
    for name in names:
        spec = registry.resolve(name)
        records, conversion = to_records(spec.rows(), spec, cfg.on_error, require_answer=stage != "ppo")
        stats["skipped"] = stats.get("skipped", 0) + conversion.skipped
        if cfg.max_samples is not None:
            records = records[:cfg.max_samples]
        parts.append(records)
    return _mix(parts, weights, seed)


def split_eval(records: list[Record], eval_split: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a fraction (< 1) or a count (>= 1) of the records, chosen by ``seed``."""
    if eval_split <= 0:
        return records, []
    count = int(eval_split) if eval_split >= 1 else round(len(records) * eval_split)
    if not 0 < count < len(records):
        raise ConfigError(f"data.eval_split={eval_split} holds out {count} of {len(records)} records; it must leave "
                          "at least one record on each side.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def build_data(cfg: RunConfig, tokenizer: Any) -> DataBundle:
    """Tokenized train and eval examples for ``cfg.stage``."""
    data = cfg.data
    if not data.train:
        raise ConfigError("data.train is empty: name at least one dataset (a name from "
                          f"{data.dataset_dir}/dataset_info.json or a file path).")
    template = get_template(data.template, tokenizer, system=data.system)
    stats: dict[str, Any] = {}
    train_records = load_records(data.train, data, cfg.train.seed, stats, data.weights, cfg.stage)
    eval_records = load_records(data.eval, data, cfg.train.seed, stats, stage=cfg.stage) if data.eval else []
    if data.eval_split and not data.eval:
        train_records, eval_records = split_eval(train_records, data.eval_split, cfg.train.seed)
    encode = dict(template=template, tokenizer=tokenizer, max_length=data.max_length,
                  train_on_prompt=data.train_on_prompt, mask_history=data.mask_history, stage=cfg.stage,
                  separate_documents=data.separate_documents)
    train, train_stats = encode_records(train_records, **encode)
    evaluation, _ = encode_records(eval_records, **encode) if eval_records else ([], None)
    stats.update({"truncated": train_stats.truncated, "dropped": train_stats.dropped,
                  "tokens": train_stats.tokens, "supervised_tokens": train_stats.supervised_tokens})
    if not train:
        raise ConfigError(f"no training examples are left after tokenization ({stats}). Check data.max_length "
                          "and that records have answers to learn from.")
    return DataBundle(train, evaluation, template, stats)
