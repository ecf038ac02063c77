"""Records -> ids and labels: exact supervision, train/inference-identical prompt ids, honest truncation."""

import pytest

from tunelab.data.records import Conversation, Message, Preference, Text, Unpaired
from tunelab.data.templates import get_template
from tunelab.data.tokenize import (IGNORE, encode_conversation, encode_preference, encode_prompt, encode_records,
                                   encode_texts, encode_unpaired)
from tunelab.errors import DataError

U, A, S = (lambda text: Message("user", text)), (lambda text: Message("assistant", text)), \
    (lambda text: Message("system", text))

CHAT = [U("Hi"), A("Hello!"), U("What is the capital of France?"), A("The capital of France is Paris.")]


@pytest.fixture(scope="module")
def chatml(tokenizer):
    return get_template("auto", tokenizer)


def _supervised_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("messages", [
    CHAT,
    [S("You are a helpful assistant."), U(" leading and trailing "), A(" Paris. ")],
    [U("\n\nnewlines first"), A("\n\nWaves fold silver\n\ninto the shore.")],
])
def test_runwise_ids_equal_tokenizing_the_whole_rendering(tokenizer, chatml, messages):
    example = encode_conversation(Conversation(messages), chatml, tokenizer, max_length=1000)
    whole = _ids(tokenizer, chatml.render(messages))
    # Only the separator after the last end-of-turn is left out (it carries no label).
    assert example.input_ids == whole[:-1]
    assert tokenizer.decode(whole[-1:]) == "\n"
    assert example.labels == [label if label == IGNORE else t for t, label in zip(example.input_ids, example.labels)]


def test_labels_cover_every_answer_and_its_end_of_turn(tokenizer, chatml):
    example = encode_conversation(Conversation(CHAT), chatml, tokenizer, max_length=1000)
    assert _supervised_text(tokenizer, example) == "Hello!<|im_end|>The capital of France is Paris.<|im_end|>"
    assert example.labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not example.truncated


def test_mask_history_supervises_only_the_last_answer(tokenizer, chatml):
    example = encode_conversation(Conversation(CHAT), chatml, tokenizer, 1000, mask_history=True)
    assert _supervised_text(tokenizer, example) == "The capital of France is Paris.<|im_end|>"


def test_train_on_prompt_supervises_everything_but_the_first_token(tokenizer, chatml):
    example = encode_conversation(Conversation(CHAT), chatml, tokenizer, 1000, train_on_prompt=True)
    assert example.labels[0] == IGNORE
    assert example.labels[1:] == example.input_ids[1:]


def test_training_prompt_ids_equal_inference_prompt_ids(tokenizer, chatml):
    """The ids before each answer are exactly what encode_prompt gives the model at inference."""
    example = encode_conversation(Conversation(CHAT), chatml, tokenizer, 1000)
    starts = [i for i in range(1, len(example.labels))
              if example.labels[i] != IGNORE and example.labels[i - 1] == IGNORE]
    assert len(starts) == 2
    for start, answer in zip(starts, (1, 3)):
        assert example.input_ids[:start] == encode_prompt(CHAT[:answer], chatml, tokenizer).prompt_ids


def test_truncation_marks_cut_answers_and_keeps_the_start(tokenizer, chatml):
    full = encode_conversation(Conversation(CHAT), chatml, tokenizer, 1000)
    cut = encode_conversation(Conversation(CHAT), chatml, tokenizer, len(full.input_ids) - 3)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]


def test_encode_records_drops_and_counts_examples_without_supervised_tokens(tokenizer, chatml):
    prompt_length = len(encode_prompt(CHAT[:1], chatml, tokenizer).prompt_ids)
    records = [Conversation(CHAT, "a.jsonl:1"), Conversation(CHAT[:2], "a.jsonl:2")]
    examples, stats = encode_records(records, chatml, tokenizer, "sft", max_length=prompt_length + 2)
    # Record 1 keeps 2 tokens of its first answer (truncated); record 2 the same, and its answer
    # "Hello!<|im_end|>" is 3+ tokens so it is truncated too.
    assert len(examples) == 2 and stats.truncated == 2 and stats.dropped == 0
    assert stats.supervised_tokens == 4 and stats.tokens == 2 * (prompt_length + 2)
    examples, stats = encode_records(records, chatml, tokenizer, "sft", max_length=prompt_length)
    assert examples == [] and stats.dropped == 2 and stats.examples == 0 and stats.truncated == 0


def test_preference_pairs_share_the_prompt_and_supervise_only_the_answers(tokenizer, chatml):
    prompt = [U("Hi"), A("Hello!"), U("What is the capital of France?")]
    pair = encode_preference(Preference(prompt, "Paris.", "London is."), chatml, tokenizer, 1000)
    shared = encode_prompt(prompt, chatml, tokenizer).prompt_ids
    for example, answer in ((pair.chosen, "Paris."), (pair.rejected, "London is.")):
        assert example.input_ids[:len(shared)] == shared
        assert all(label == IGNORE for label in example.labels[:len(shared)])
        assert _supervised_text(tokenizer, example) == answer + "<|im_end|>"


def test_unpaired_keeps_the_desirability_label(tokenizer, chatml):
    item = encode_unpaired(Unpaired([U("2+2?")], "4", desirable=False), chatml, tokenizer, 1000)
    assert item.desirable is False
    assert _supervised_text(tokenizer, item.example) == "4<|im_end|>"


def test_encode_prompt_ends_with_the_generation_prompt(tokenizer, chatml):
    prompt = encode_prompt([U("Hi")], chatml, tokenizer)
    assert tokenizer.decode(prompt.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


DOCS = ["The quick brown fox.", "Paris is the capital of France.", "Waves fold silver into the shore."]


def test_encode_texts_concatenated_blocks_cover_the_stream(tokenizer):
    eos = tokenizer.eos_token_id
    stream = [t for doc in DOCS for t in _ids(tokenizer, doc) + [eos]]
    blocks = encode_texts(DOCS, tokenizer, block_size=8, separate_documents=False)
    assert [t for b in blocks for t in b.input_ids] == stream
    assert all(len(b.input_ids) == 8 for b in blocks[:-1]) and 0 < len(blocks[-1].input_ids) <= 8
    for block in blocks:
        assert block.labels == [IGNORE, *block.input_ids[1:]]


def test_encode_texts_separate_documents_never_mixes_documents(tokenizer):
    eos = tokenizer.eos_token_id
    blocks = encode_texts(DOCS, tokenizer, block_size=8, separate_documents=True)
    expected = []
    for doc in DOCS:
        ids = _ids(tokenizer, doc) + [eos]
        expected += [ids[i:i + 8] for i in range(0, len(ids), 8)]
    assert [b.input_ids for b in blocks] == expected
    assert all(eos not in b.input_ids[:-1] for b in blocks)


def test_encode_records_dispatches_on_stage(tokenizer, chatml):
    pairs, stats = encode_records([Preference([U("Hi")], "Hello!", "Go away.")], chatml, tokenizer, "dpo", 1000)
    assert _supervised_text(tokenizer, pairs[0].rejected) == "Go away.<|im_end|>"
    assert stats.supervised_tokens == sum(sum(label != IGNORE for label in e.labels)
                                          for e in (pairs[0].chosen, pairs[0].rejected))
    prompts, stats = encode_records([Conversation(CHAT), Conversation(CHAT[:1])], chatml, tokenizer, "ppo", 1000)
    assert prompts[0].prompt_ids == encode_prompt(CHAT[:3], chatml, tokenizer).prompt_ids
    assert prompts[1].prompt_ids == encode_prompt(CHAT[:1], chatml, tokenizer).prompt_ids
    short = len(prompts[1].prompt_ids)
    _, stats = encode_records([Conversation(CHAT), Conversation(CHAT[:1])], chatml, tokenizer, "ppo", short)
    assert stats.examples == 1 and stats.dropped == 1
    texts, stats = encode_records([Text("The quick brown fox.")], chatml, tokenizer, "pt", 1000)
    assert texts[0].input_ids == _ids(tokenizer, "The quick brown fox.") + [tokenizer.eos_token_id]


def test_wrong_record_type_for_stage_names_the_record(tokenizer, chatml):
    with pytest.raises(DataError, match="pairs.jsonl:7: stage 'sft' needs conversations.*Preference"):
        encode_records([Preference([U("a")], "b", "c", origin="pairs.jsonl:7")], chatml, tokenizer, "sft", 100)


def test_template_errors_name_the_record(tokenizer, chatml):
    with pytest.raises(DataError, match="chat.jsonl:3: .*starts with an assistant message"):
        encode_records([Conversation([A("hi")], origin="chat.jsonl:3")], chatml, tokenizer, "sft", 100)
