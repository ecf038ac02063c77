"""The generation path: one stop rule everywhere, beam search, virtual tokens, the shared options.

Models are tiny and random but drawn with a wide spread, so their greedy answers are
varied text: a stop string cut at the wrong place or a beam chosen wrongly shows up.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.records import Message
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import (GenerationOptions, GenerationRow, LoadedRun, complete, encode_prompt, generate,
                               load_run, stream)
from tunelab.testing.tiny import tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")
GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0)
QUESTION = [Message("user", "Who are you?")]
OTHER = [Message("user", "Write a short poem about the sea, please.")]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory):
    """A tiny model that answers with varied tokens (the default spread makes it repeat one token)."""
    path = tmp_path_factory.mktemp("lively")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), initializer_range=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(lively_dir) -> LoadedRun:
    return load_run(lively_dir, device=CPU)


@pytest.fixture(scope="module")
def prefix_run(loaded) -> LoadedRun:
    """The same base under a PEFT key/value prefix with non-trivial (seeded) values."""
    from peft import PrefixTuningConfig, get_peft_model

    base = tiny_llama(len(loaded.tokenizer), initializer_range=0.2)
    model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return replace(loaded, model=model, source="prefix")


def row(run: LoadedRun, messages: list[Message], options: GenerationOptions, **kwargs) -> GenerationRow:
    return GenerationRow(encode_prompt(run, messages), options, **kwargs)


def stop_inside(text: str) -> tuple[str, int]:
    """A 3-character stop string that first appears in the middle of ``text``, and where."""
    for start in range(3, len(text) - 3):
        piece = text[start:start + 3]
        if text.find(piece) == start and piece.strip() and "\ufffd" not in piece:
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


# ----------------------------------------------------------------------------- the stop rule

def test_a_stop_string_ends_every_path_at_the_same_place(loaded):
    free = complete(loaded, [row(loaded, QUESTION, GREEDY)])[0]
    assert free.finish_reason == "length" and free.completion_tokens == 12
    stop, start = stop_inside(free.text)
    options = replace(GREEDY, stop=["never appears", stop])
    cut = free.text[:start]

    assert "".join(stream(loaded, QUESTION, options)) == cut  # streamed: nothing of the stop string leaks
    assert generate(loaded, [QUESTION, OTHER], options)[0] == cut.strip()  # batched, non-streaming
    alone = complete(loaded, [row(loaded, OTHER, GREEDY)])[0]
    ended, other = complete(loaded, [row(loaded, QUESTION, options), row(loaded, OTHER, GREEDY)])
    assert (ended.text, ended.finish_reason) == (cut, "stop")
    assert ended.completion_tokens < free.completion_tokens  # generation stopped there, not just the text
    assert other == alone  # a row's stop string ends that row only


def test_rows_of_one_batch_keep_their_own_length_limits(loaded):
    short = replace(GREEDY, max_new_tokens=3)
    first, second = complete(loaded, [row(loaded, QUESTION, short), row(loaded, OTHER, GREEDY)])
    assert (first.completion_tokens, first.finish_reason) == (3, "length")
    assert first.text == complete(loaded, [row(loaded, QUESTION, short)])[0].text
    assert second.completion_tokens == 12


# ----------------------------------------------------------------------------- beam search

@torch.no_grad()
def beams_by_hand(run: LoadedRun, messages: list[Message], beams: int, length: int) -> str:
    """Plain beam search: every step, the ``beams`` best continuations by summed log-probability."""
    prompt = encode_prompt(run, messages)
    alive: list[tuple[float, list[int]]] = [(0.0, [])]
    for _ in range(length):
        candidates = []
        for score, tokens in alive:
            logits = run.model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()
            top = logits.log_softmax(-1).topk(beams)
            candidates += [(score + value, tokens + [index]) for value, index in
                           zip(top.values.tolist(), top.indices.tolist())]
        alive = sorted(candidates, key=lambda candidate: -candidate[0])[:beams]
    best = alive[0][1]
    assert not set(best) & {run.tokenizer.eos_token_id}, "the comparison assumes no answer ends early"
    return run.tokenizer.decode(best, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["base", "prefix"])
def test_beam_search_finds_what_a_search_by_hand_finds(which, loaded, prefix_run):
    run = loaded if which == "base" else prefix_run
    options = replace(GREEDY, max_new_tokens=5, num_beams=3)
    expected = [beams_by_hand(run, messages, beams=3, length=5) for messages in (QUESTION, OTHER)]
    assert [c.text for c in complete(run, [row(run, QUESTION, options), row(run, OTHER, options)])] == expected
    assert generate(run, [QUESTION], options) == [expected[0].strip()]


def test_beam_search_does_not_stream(loaded):
    options = replace(GREEDY, num_beams=2)
    with pytest.raises(TunelabError, match="cannot stream"):
        complete(loaded, [row(loaded, QUESTION, options, on_text=lambda text: None)])


# ----------------------------------------------------------------------------- virtual tokens

def test_a_prefix_changes_the_answer_and_switching_it_off_restores_the_base(loaded, prefix_run):
    tuned = generate(prefix_run, [QUESTION, OTHER], GREEDY)
    assert tuned != generate(loaded, [QUESTION, OTHER], GREEDY)
    with prefix_run.model.disable_adapter():  # what eval --compare-base and the served base model do
        assert generate(prefix_run, [QUESTION, OTHER], GREEDY) == generate(loaded, [QUESTION, OTHER], GREEDY)
    assert generate(prefix_run, [QUESTION, OTHER], GREEDY) == tuned


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("field, value", [("num_beams", 0), ("max_new_tokens", 0), ("top_p", 0.0),
                                          ("temperature", -1.0), ("stop", [""])])
def test_bad_generation_options_are_named(field, value):
    with pytest.raises(ConfigError, match="num_beams|max_new_tokens|top_p|temperature|stop string") as err:
        GenerationOptions(**{field: value})
    assert field.replace("stop", "stop string") in str(err.value)


def test_server_request_fields_are_generation_options():
    """The server takes the same options (OpenAI's names; max_tokens is max_new_tokens)."""
    from tunelab.serve.schemas import OpenAIRequest

    request_only = {"model", "n", "stream", "stream_options", "max_tokens"}
    generation = set(OpenAIRequest.model_fields) - request_only
    assert generation <= {spec.name for spec in dataclasses.fields(GenerationOptions)}


# ----------------------------------------------------------------------------- the commands

runner = CliRunner()


def test_chat_stops_at_stop_strings_and_beams_without_streaming(loaded, lively_dir):
    free = generate(loaded, [QUESTION], GREEDY)[0]
    stop, start = stop_inside(free)
    result = runner.invoke(app, ["chat", str(lively_dir), "--prompt", "Who are you?", "--max-new-tokens", "12",
                                 "--stop", "never appears", "--stop", stop])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == free[:start].strip()

    beams = replace(GREEDY, num_beams=3, max_new_tokens=5)
    result = runner.invoke(app, ["chat", str(lively_dir), "--prompt", "Who are you?", "--max-new-tokens", "5",
                                 "--num-beams", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == generate(loaded, [QUESTION], beams)[0]
    assert "does not stream" in result.stderr


def test_chat_refuses_streamed_beams_and_bad_options(lively_dir):
    result = runner.invoke(app, ["chat", str(lively_dir), "--prompt", "hi", "--stream", "--num-beams", "2"])
    assert result.exit_code == 2 and "--stream cannot be used with --num-beams 2" in result.output
    result = runner.invoke(app, ["chat", str(lively_dir), "--prompt", "hi", "--top-p", "0"])
    assert result.exit_code == 2 and "top_p must be in (0, 1]" in result.output


def test_predict_applies_the_stop_strings(loaded, lively_dir, tmp_path):
    free = generate(loaded, [QUESTION], GREEDY)[0]
    stop, start = stop_inside(free)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"instruction": "Who are you?", "input": "", "output": "Tuna"}) + "\n")
    out = tmp_path / "pred.jsonl"
    result = runner.invoke(app, ["predict", str(lively_dir), "--data", str(data), "--out", str(out),
                                 "--max-new-tokens", "12", "--stop", stop])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["prediction"] == free[:start].strip()
