"""The dataset picker's preview: the first records of a dataset as the model will see them.

Each record is rendered by the chat template the run would use (the tokenizer's own, or
``data.template``) and split into the parts that take a loss and the parts that do not,
with the same :meth:`~tunelab.data.templates.ChatTemplate.segments` that tokenization
uses, so what is highlighted is what is trained on.
"""

from __future__ import annotations

from itertools import islice

from tunelab.config import RunConfig
from tunelab.data.formats import to_records
from tunelab.data.records import Conversation, Message, Preference, Record, Text, Unpaired
from tunelab.data.sources import DatasetRegistry
from tunelab.data.templates import ChatTemplate, Segment, get_template
from tunelab.errors import TunelabError
from tunelab.models.loader import load_tokenizer

#: The label the preview gives supervised text (the UI colours it).
SUPERVISED = "trained on"


def dataset_names(dataset_dir: str) -> list[str]:
    """The names in ``dataset_dir/dataset_info.json``; none when the directory has no such file."""
    try:
        return DatasetRegistry(dataset_dir).names
    except TunelabError:
        return []


def _conversations(record: Record) -> list[list[Message]]:
    """The conversations a record trains on (both answers of a preference pair)."""
    if isinstance(record, Conversation):
        return [record.messages]
    if isinstance(record, Preference):
        return [[*record.prompt, Message("assistant", answer)] for answer in (record.chosen, record.rejected)]
    if isinstance(record, Unpaired):
        return [[*record.prompt, Message("assistant", record.completion)]]
    return []


def _segments(record: Record, template: ChatTemplate) -> list[Segment]:
    if isinstance(record, Text):
        return [(record.text, True)]
    pieces: list[Segment] = []
    for number, messages in enumerate(_conversations(record)):
        if number:
            pieces.append(("\n\n— rejected answer —\n\n", False))
        pieces.extend(template.segments(messages))
    return pieces


def preview(cfg: RunConfig, dataset: str, count: int = 3) -> list[list[tuple[str, str | None]]]:
    """The first ``count`` records of ``dataset``: ``(text, SUPERVISED or None)`` pieces each."""
    spec = DatasetRegistry(cfg.data.dataset_dir).resolve(dataset)
    records, _ = to_records(islice(spec.rows(), count), spec, "skip", require_answer=False)
    template = get_template(cfg.data.template, load_tokenizer(cfg.model), system=cfg.data.system)
    return [[(text, SUPERVISED if supervised else None) for text, supervised in _segments(record, template)]
            for record in records]
