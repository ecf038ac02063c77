"""Perplexity on held-out text or conversations, through the training code path.

Records are read, given the run's default system prompt, tokenized and batched by the same
functions the trainer uses (``pipeline.load_records`` -> ``tokenize.encode_records`` ->
``batching.collate``) and scored by the same objective (``CausalLMObjective``: hidden
states + chunked ``causal_lm_loss``) under the same precision. So the loss reported here
equals the trainer's eval loss on the same examples, and never materialises the full
batch x length x vocabulary logits.

What is scored: every token for plain text (continued pre-training data, cut into
``data.max_length`` blocks, eos appended), and only assistant answers (every turn, with
their end-of-turn marker) for conversations -- the prompt is what the model is given, not
what it should produce. ``train_on_prompt``/``mask_history`` of the run are deliberately
not applied, so runs trained with different settings are measured on the same tokens. The
loss is the average over all scored tokens of the set (not a mean of per-example means),
and perplexity is ``exp(loss)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.config import RunConfig
from tunelab.data.pipeline import load_records
from tunelab.data.records import Conversation, Example, Record, Text
from tunelab.data.tokenize import encode_records
from tunelab.errors import DataError
from tunelab.evaluate.forward import chunks, eval_autocast, padded_batch
from tunelab.evaluate.report import TaskResult
from tunelab.inference import LoadedRun
from tunelab.progress import track
from tunelab.train.objectives import CausalLMObjective


def load_perplexity_records(data: str, cfg: RunConfig, max_samples: int | None) -> list[Record]:
    """Text or conversation records of ``data`` (a path or a name in ``data.dataset_dir``)."""
    data_cfg = cfg.data.model_copy(update={"max_samples": max_samples, "on_error": "raise"})
    records = load_records([data], data_cfg, cfg.train.seed, stats={})
    if not records:
        raise DataError("the dataset holds no records to score.", file=data)
    for record in records:
        if not isinstance(record, (Text, Conversation)):
            raise DataError(f"{record.origin}: perplexity scores plain text or conversations, but this record is "
                            f"a {type(record).__name__}.", file=data,
                            hint="Use a text or SFT (alpaca/sharegpt/messages) file.")
    return records


def encode_for_perplexity(records: list[Record], loaded: LoadedRun) -> tuple[list[Example], Any]:
    """Token ids and labels exactly as training encodes them (stage pt for text, sft for chats)."""
    stage = "pt" if isinstance(records[0], Text) else "sft"
    examples, stats = encode_records(records, loaded.template, loaded.tokenizer, stage, loaded.cfg.data.max_length)
    return examples, stats  # type: ignore[return-value]


@torch.no_grad()
def perplexity(loaded: LoadedRun, records: list[Record], batch_size: int, progress: str | None = None) -> TaskResult:
    """Token-level loss, perplexity and token counts of ``loaded.model`` on ``records``.

    ``progress``: the label of a progress bar on the terminal (None: no bar).
    """
    examples, stats = encode_for_perplexity(records, loaded)
    if not examples:
        raise DataError(f"none of the {len(records)} records has a token to score after tokenization "
                        f"({stats.dropped} dropped).", hint="Check that conversations end with assistant answers.")
    objective = CausalLMObjective(loaded.cfg.train.loss_chunk_size)
    order = sorted(examples, key=lambda example: len(example.input_ids))  # like lengths: little padding
    loss_sum, tokens = 0.0, 0
    loaded.model.eval()
    with eval_autocast(loaded):
        for group in track(chunks(order, batch_size), progress, unit="example"):
            batch = padded_batch(group, loaded)
            loss, _ = objective.loss(loaded.model, batch)
            loss_sum += float(loss)
            tokens += objective.count(batch)
    loss = loss_sum / tokens
    return TaskResult({"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens,
                       "examples": len(examples), "truncated": stats.truncated, "dropped": stats.dropped})
