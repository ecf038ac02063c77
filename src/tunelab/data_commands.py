"""``tunelab data prepare`` and ``tunelab data preview``: a run's data, without training.

``prepare`` builds (or finds) the tokenized cache a run would train on and says what became
of every record, so a 10-million-record dataset can be checked and tokenized before the GPU
is booked, and ``tunelab train`` then starts in seconds. ``preview`` shows the first examples
exactly as the model will see them, with the tokens it learns to produce marked, so a wrong
column mapping, template or mask is visible before any training.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.config import RunConfig, load_config
from tunelab.data.columns import Encoded
from tunelab.data.pipeline import build_data
from tunelab.data.records import IGNORE_INDEX, Example, PairExample, PromptExample, UnpairedExample
from tunelab.data.streaming import preview_examples
from tunelab.data.templates import get_template
from tunelab.errors import ConfigError

OPEN, CLOSE = "[[", "]]"


def _config_and_tokenizer(config: Path, overrides: list[str]) -> tuple[RunConfig, object]:
    from tunelab.models.loader import load_tokenizer

    cfg = load_config(config, overrides)
    return cfg, load_tokenizer(cfg.model)


def prepare_main(config: Path, overrides: list[str]) -> str:
    """Prepare the cache of CONFIG's data; the summary to print."""
    cfg, tokenizer = _config_and_tokenizer(config, overrides)
    if cfg.data.streaming:
        raise ConfigError("data.streaming=true tokenizes on the fly and caches nothing, so there is nothing to "
                          "prepare; `tunelab data preview` shows its first examples.")
    start = time.perf_counter()
    bundle = build_data(cfg, tokenizer, progress=True)
    return summary(bundle.stats, bundle.cache_dir, time.perf_counter() - start)


def summary(stats: dict, cache_dir: Path | None, seconds: float) -> str:
    """What became of the records, one fact per line."""
    reasons = "".join(f"\n    {reason}" for reason in stats.get("skip_reasons", []))
    lines = [
        f"records            {stats['records']:,} train, {stats.get('eval_records', 0):,} eval",
        f"examples           {stats['examples']:,} train, {stats.get('eval_examples', 0):,} eval",
        f"tokens             {stats['tokens']:,} ({stats['supervised_tokens']:,} supervised)",
        f"truncated          {stats['truncated']:,} (lost supervised tokens at data.max_length)",
        f"dropped            {stats['dropped']:,} (no supervised token left, or a prompt over data.max_length)",
        f"skipped            {stats['skipped']:,} (records that could not be converted){reasons}",
        f"cache              {cache_dir} ({seconds:.1f} s)",
    ]
    return "\n".join(lines)


def preview_main(config: Path, overrides: list[str], count: int) -> str:
    """The first ``count`` examples of CONFIG's training data, rendered."""
    if count < 1:
        raise ConfigError(f"-n {count}: show at least one example.")
    cfg, tokenizer = _config_and_tokenizer(config, overrides)
    template = get_template(cfg.data.template, tokenizer, system=cfg.data.system)
    blocks = [f"stage {cfg.stage}, template {template.name}; text in {OPEN} {CLOSE} is supervised (the model "
              "learns to produce it)."]
    for number, (origin, example) in enumerate(preview_examples(cfg, tokenizer, template, count), start=1):
        blocks.append(f"--- example {number}: {origin}\n{render(example, tokenizer)}")
    if len(blocks) == 1:
        raise ConfigError(f"data.train {cfg.data.train} holds no example that can train at "
                          f"data.max_length={cfg.data.max_length}.")
    return "\n\n".join(blocks)


def render(example: Encoded, tokenizer: object) -> str:
    """An example's text with its supervised spans marked, and its token counts."""
    if isinstance(example, PairExample):
        return f"chosen:\n{_marked(example.chosen, tokenizer)}\n\nrejected:\n{_marked(example.rejected, tokenizer)}"
    if isinstance(example, UnpairedExample):
        label = "desirable" if example.desirable else "undesirable"
        return f"{label}:\n{_marked(example.example, tokenizer)}"
    if isinstance(example, PromptExample):
        return f"({len(example.prompt_ids)} prompt tokens)\n{tokenizer.decode(example.prompt_ids)}"  # type: ignore[attr-defined]
    return _marked(example, tokenizer)


def _marked(example: Example, tokenizer: object) -> str:
    """Decode runs of equal supervision separately and wrap the supervised ones."""
    supervised = [label != IGNORE_INDEX for label in example.labels]
    pieces, start = [], 0
    for end in range(1, len(example.input_ids) + 1):
        if end == len(example.input_ids) or supervised[end] != supervised[start]:
            text = tokenizer.decode(example.input_ids[start:end])  # type: ignore[attr-defined]
            pieces.append(f"{OPEN}{text}{CLOSE}" if supervised[start] else text)
            start = end
    counts = f"({len(example.input_ids)} tokens, {sum(supervised)} supervised{', truncated' if example.truncated else ''})"
    return f"{counts}\n{''.join(pieces)}"
