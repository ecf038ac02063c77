"""The data layer serves each stage exactly as the stage registry declares it.

data/ cannot import the registry (it sits above, in train/), so until ``build_data`` takes a
stage's records, wording and encoder as arguments, data/ keeps its own per-stage tables
(``tokenize._STAGE_RECORDS``, ``_STAGE_NEEDS``, the encoder choice, ``columns.KIND_OF_STAGE``,
``streaming.STREAM_STAGES``). This test holds them to the registry's ``StageSpec`` s, so the two
cannot drift apart (they had: grpo's wording)."""

import pytest

from tunelab.data import tokenize
from tunelab.data.columns import KIND_OF_STAGE
from tunelab.data.records import Conversation, Message, Preference, Text, Unpaired
from tunelab.data.streaming import STREAM_STAGES
from tunelab.data.templates import get_template
from tunelab.train.stages import STAGE_NAMES, get_stage

#: What each encoder of data/tokenize.py produces, as the cache lays it out.
KIND_OF_ENCODER = {"encode_texts": "sequence", "encode_conversation": "sequence", "encode_preference": "pair",
                   "encode_unpaired": "unpaired", "encode_prompt": "prompt"}
PROMPT = [Message("user", "Hi?")]
RECORD_OF_TYPE = {Text: Text("Some text."), Conversation: Conversation([*PROMPT, Message("assistant", "Hello.")]),
                  Preference: Preference(PROMPT, "Hello.", "Go away."), Unpaired: Unpaired(PROMPT, "Hello.", True)}


class Called(Exception):
    """Raised by the stand-in encoder: the stage's records reached it."""


def stand_in(*args, **kwargs):
    raise Called


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_data_tables_match_the_stage_declaration(name):
    spec = get_stage(name)
    assert tokenize._STAGE_RECORDS[name] == spec.records
    assert tokenize._STAGE_NEEDS[name] == spec.needs
    assert KIND_OF_STAGE[name] == KIND_OF_ENCODER[spec.encoder.__name__]
    assert (name in STREAM_STAGES) == (spec.loop == "batch" and KIND_OF_STAGE[name] == "sequence")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_each_stage_encodes_with_its_declared_encoder(name, tokenizer, monkeypatch):
    spec = get_stage(name)
    monkeypatch.setattr(tokenize, spec.encoder.__name__, stand_in)
    template = get_template("chatml", tokenizer)
    for record_type in spec.records:
        with pytest.raises(Called):
            tokenize.encode_records([RECORD_OF_TYPE[record_type]], template, tokenizer, name, max_length=64)
