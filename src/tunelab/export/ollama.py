"""An Ollama ``Modelfile`` next to an exported GGUF file (``ollama create NAME -f Modelfile``).

Ollama prompts through a Go template of its own. When the run's chat format is one of
tunelab's declared formats (checked by rendering, so a tokenizer's own ChatML template counts
as ChatML), the Modelfile spells it out, with the default system prompt training used;
otherwise it leaves the template to Ollama, which reads the Jinja template in the GGUF file.
Stop strings are always written: they are what ends an answer.
"""

from __future__ import annotations

import json

from tunelab.data.records import Message
from tunelab.data.templates import BUILTIN_TEMPLATES, BuiltinTemplate, ChatTemplate, TemplateSpec
from tunelab.export.gguf_vocab import adds_bos

#: Renders every part of a format: a system message, two user turns, one answer.
_PROBE = [Message("system", "S"), Message("user", "U1"), Message("assistant", "A1"), Message("user", "U2")]


def modelfile(gguf_name: str, template: ChatTemplate) -> str:
    """The Modelfile text for ``gguf_name`` (in the same directory), prompted as ``template`` renders."""
    lines = [f"FROM ./{gguf_name}"]
    spec = _declared_format(template)
    if spec is None:
        lines.append("# No TEMPLATE: Ollama uses the chat template stored in the GGUF file.")
    else:
        lines.append(f'TEMPLATE """{_go_template(spec, template)}"""')
        system = _default_system(template, spec)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in template.stop_strings]
    return "\n".join(lines) + "\n"


def _declared_format(template: ChatTemplate) -> TemplateSpec | None:
    """The built-in format ``template`` renders exactly (system message given), if any."""
    if isinstance(template, BuiltinTemplate):
        return template.spec
    expected = template.render(_PROBE, add_generation_prompt=True)
    for name, spec in BUILTIN_TEMPLATES.items():
        candidate = BuiltinTemplate(name, spec, template.tokenizer)
        if candidate.end_of_turn == template.end_of_turn and candidate.render(_PROBE, True) == expected:
            return spec
    return None


def _default_system(template: ChatTemplate, spec: TemplateSpec) -> str | None:
    """The system message ``template`` writes into a conversation that has none (data.system, or the
    tokenizer template's own default, such as SmolLM2's), found by rendering one."""
    rendered = template.render([Message("user", "U")], add_generation_prompt=True)
    head, tail = spec.system.split("{content}")
    rest = spec.user.replace("{content}", "U") + spec.assistant
    if not rendered.startswith(spec.prefix + head) or not rendered.endswith(tail + rest):
        return None
    return rendered[len(spec.prefix + head):len(rendered) - len(tail + rest)]


def _go_template(spec: TemplateSpec, template: ChatTemplate) -> str:
    """The format in Ollama's Go template language (``.Messages``), on one line so no layout leaks in.

    A prefix that is the bos token is left out when the tokenizer adds bos: llama.cpp adds it then.
    """
    prefix = "" if spec.prefix == template.tokenizer.bos_token and adds_bos(template.tokenizer) else spec.prefix

    def around(text: str) -> str:
        before, after = text.split("{content}")
        return _literal(before) + "{{ .Content }}" + _literal(after)

    return (_literal(prefix) + "{{ range .Messages }}"
            + '{{ if eq .Role "assistant" }}' + _literal(spec.assistant) + "{{ .Content }}"
            + _literal(template.end_of_turn + spec.separator)
            + '{{ else if eq .Role "system" }}' + around(spec.system)
            + "{{ else }}" + around(spec.user) + "{{ end }}{{ end }}" + _literal(spec.assistant))


def _literal(text: str) -> str:
    """Text as it must appear in a Go template (an opening ``{{`` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')
