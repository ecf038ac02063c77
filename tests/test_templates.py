"""Chat templates: built-ins match the tokenizers' Jinja, segments rebuild the rendering exactly,
and an inference prompt is always the start of the training text."""

import pytest

from tunelab.data.records import Message
from tunelab.data.templates import BUILTIN_TEMPLATES, get_template
from tunelab.errors import ConfigError, DataError
from tunelab.testing.tiny import tiny_tokenizer

# SmolLM2-135M-Instruct's template, verbatim: injects a default system prompt when none is given.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

U, A, S = (lambda text: Message("user", text)), (lambda text: Message("assistant", text)), \
    (lambda text: Message("system", text))

CONVERSATIONS = [
    [U("Hi"), A("Hello!")],
    [S("Be brief."), U("Capital of France?"), A("Paris.")],
    [U("Hi"), A("Hello!"), U("Who are you?"), A(" I am Tuna.\n\nNice to meet you. ")],
    [S("sys"), U("one"), A("1"), U("two"), A("2"), U("three"), A("3")],
    [U("question only")],
]


def _with_template(source: str, extra_specials: tuple[str, ...] = ()):
    tok = tiny_tokenizer()
    if extra_specials:
        tok.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    tok.chat_template = source
    return tok


def _chat(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_builtin_chatml_renders_like_the_tokenizers_jinja(tokenizer, messages, generation_prompt):
    expected = tokenizer.apply_chat_template(_chat(messages), tokenize=False, add_generation_prompt=generation_prompt)
    for name in ("chatml", "auto"):
        assert get_template(name, tokenizer).render(messages, generation_prompt) == expected


@pytest.mark.parametrize("name", ["auto", *BUILTIN_TEMPLATES])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_segments_join_to_render_and_supervise_exactly_the_answers(tokenizer, name, messages):
    template = get_template(name, tokenizer)
    pieces = template.segments(messages)
    assert "".join(text for text, _ in pieces) == template.render(messages, add_generation_prompt=False)
    supervised = [text for text, flag in pieces if flag]
    assert supervised == [m.content + template.end_of_turn for m in messages if m.role == "assistant"]


def test_auto_segments_on_the_tiny_tokenizer(tokenizer):
    template = get_template("auto", tokenizer)
    assert template.end_of_turn == "<|im_end|>"
    assert template.stop_strings == ("<|im_end|>",)
    assert template.stop_token_ids() == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert template.segments([U("Hi"), A("Hello!"), U("More?"), A("Yes.")]) == [
        ("<|im_start|>user\nHi<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nMore?<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
        ("Yes.<|im_end|>", True), ("\n", False)]


@pytest.mark.parametrize("name", ["auto", *BUILTIN_TEMPLATES])
@pytest.mark.parametrize("messages", CONVERSATIONS[:4])
def test_inference_prompt_is_the_start_of_the_training_text(tokenizer, name, messages):
    """Training and inference render identically: prompting with the history before any answer
    yields exactly the training text up to where that answer's supervision begins."""
    template = get_template(name, tokenizer)
    training = template.render(messages)
    pieces = template.segments(messages)
    starts = [len("".join(t for t, _ in pieces[:i])) for i, (_, flag) in enumerate(pieces) if flag]
    answers = [i for i, m in enumerate(messages) if m.role == "assistant"]
    assert len(starts) == len(answers)
    for start, index in zip(starts, answers):
        prompt = template.render(messages[:index], add_generation_prompt=True)
        assert training[:start] == prompt
        assert training[start:].startswith(messages[index].content)


def test_smollm2_default_system_prompt_is_identical_in_training_and_inference():
    template = get_template("auto", _with_template(SMOLLM2_TEMPLATE))
    messages = [U("Hi"), A("Hello!")]
    prompt = template.render(messages[:1], add_generation_prompt=True)
    assert prompt == SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    pieces = template.segments(messages)
    assert pieces[0] == (SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n", False)
    assert "".join(t for t, _ in pieces).startswith(prompt)


def test_configured_system_prompt_replaces_the_templates_default():
    template = get_template("auto", _with_template(SMOLLM2_TEMPLATE), system="Be brief.")
    prompt = template.render([U("Hi")], add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.segments([U("Hi"), A("Yo")])[0] == ("<|im_start|>system\nBe brief.<|im_end|>\n", False)
    # A record's own system message wins over the configured one.
    assert "Be brief." not in template.render([S("Own."), U("Hi")])


def test_alpaca_uses_default_system_and_tokenizer_eos(tokenizer):
    template = get_template("alpaca", tokenizer)
    assert template.end_of_turn == tokenizer.eos_token
    text = template.render([U("Say hi"), A("hi")])
    assert text == (BUILTIN_TEMPLATES["alpaca"].default_system + "\n\n### Instruction:\nSay hi\n\n"
                    "### Response:\nhi" + tokenizer.eos_token + "\n\n")


def test_auto_finds_an_end_of_turn_token_that_is_not_eos():
    llama3_like = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    tok = _with_template(llama3_like, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                       "<|eot_id|>"))
    template = get_template("auto", tok)
    assert template.end_of_turn == "<|eot_id|>"
    assert template.stop_strings == ("<|eot_id|>", "<|im_end|>")
    messages = [U("Hi"), A("Hello!")]
    assert template.render(messages) == get_template("llama3", tok).render(messages)
    assert [t for t, flag in template.segments(messages) if flag] == ["Hello!<|eot_id|>"]


def test_template_that_rewrites_earlier_turns_is_rejected():
    # Drops the content of every assistant turn except the last one (like reasoning-stripping templates).
    rewriting = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                 "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
                 "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
    with pytest.raises(ConfigError, match="not prefix-stable.*data.template to chatml"):
        get_template("auto", _with_template(rewriting))


def test_tokenizer_without_template_and_unknown_names_are_config_errors():
    tok = _with_template("")
    with pytest.raises(ConfigError, match="no chat template.*set data.template to chatml, llama3 or alpaca"):
        get_template("auto", tok)
    with pytest.raises(ConfigError, match="'vicuna' is not a known chat template.*chatml, llama3, alpaca"):
        get_template("vicuna", tok)


def test_conversation_the_template_rejects_is_a_data_error():
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    template = get_template("auto", _with_template(no_system))  # data without system messages still works
    assert template.segments([U("a"), A("b")])[-2] == ("b<|im_end|>", True)
    with pytest.raises(DataError, match="rejected this conversation: System role not supported"):
        template.segments([S("s"), U("a"), A("b")])


def test_conversation_starting_with_an_answer_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="starts with an assistant message"):
        get_template("chatml", tokenizer).segments([A("hi"), U("?")])
