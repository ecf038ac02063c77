"""The chat template an exported model carries: the one the run was trained with.

A run may have been trained with a built-in template (``data.template: llama3``) or with a
default system prompt (``data.system``) that the tokenizer's own template knows nothing
about. An export that kept the tokenizer's template would then be prompted, by transformers,
llama.cpp or Ollama, in a format the model was not trained on. So the exported template is
built from the run's :class:`~tunelab.data.templates.ChatTemplate`: the tokenizer's Jinja
for ``auto``, a Jinja rendering of the declared format for built-ins, and in both cases a
default system message inserted exactly when training inserted one.
"""

from __future__ import annotations

import json

from tunelab.data.templates import BuiltinTemplate, ChatTemplate, TemplateSpec

_CONTENT = "{{ message['content'] }}"


def exported_chat_template(template: ChatTemplate) -> str:
    """Jinja for ``tokenizer.chat_template`` that renders every conversation as ``template`` does."""
    if isinstance(template, BuiltinTemplate):
        body = _builtin_jinja(template.spec, template.end_of_turn)
    else:
        body = template.tokenizer.get_chat_template()
    if template.system is None:
        return body
    # An `if` opens no scope in Jinja, so the new `messages` is the one the body iterates.
    system = json.dumps({"role": "system", "content": template.system})
    return (f"{{% if messages|length == 0 or messages[0]['role'] != 'system' %}}"
            f"{{% set messages = [{system}] + messages %}}{{% endif %}}{body}")


def _builtin_jinja(spec: TemplateSpec, end_of_turn: str) -> str:
    """A :class:`TemplateSpec` as Jinja; its texts are kept verbatim inside raw blocks."""
    return "".join([
        _raw(spec.prefix), "{% for message in messages %}",
        "{% if message['role'] == 'assistant' %}", _raw(spec.assistant), _CONTENT, _raw(end_of_turn + spec.separator),
        "{% elif message['role'] == 'system' %}", _around_content(spec.system),
        "{% else %}", _around_content(spec.user), "{% endif %}{% endfor %}",
        "{% if add_generation_prompt %}", _raw(spec.assistant), "{% endif %}",
    ])


def _around_content(text: str) -> str:
    before, after = text.split("{content}")
    return _raw(before) + _CONTENT + _raw(after)


def _raw(text: str) -> str:
    return f"{{% raw %}}{text}{{% endraw %}}" if text else ""
