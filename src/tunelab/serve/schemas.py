"""OpenAI-compatible request bodies (validated) and response bodies (built as plain dicts).

Requests accept the fields the official clients send and ignore unknown ones, except
parameters that would change the answer in a way this server does not implement (tools,
logprobs, logit bias...): those are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.data.records import Message
from tunelab.inference import Completion, GenerationOptions

#: Answer length when a request gives no max_tokens (clamped to what the context leaves).
DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4  # OpenAI's limit

#: Parameters whose only accepted values are the neutral ones listed.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
}


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 63 - 1)  # OpenAI's int64; torch refuses larger seeds
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, neutral in _NEUTRAL_ONLY.items():
                if key in data and data[key] not in neutral:
                    raise ValueError(f"'{key}' is not supported by tunelab serve; leave it out")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def options(self, max_tokens: int) -> GenerationOptions:
        """Generation settings; OpenAI semantics: temperature 0 is greedy, no top-k cut."""
        return GenerationOptions(max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None else
                                 self.temperature, top_p=1.0 if self.top_p is None else self.top_p, top_k=0,
                                 seed=self.seed, stop=list(self.stop or []))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, text)


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = Field(min_length=1)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def answer_limit(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------------------- responses

def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


class ResponseIds:
    """The id and timestamp shared by a response and all its stream chunks."""

    def __init__(self, prefix: str, model: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}


def chat_response(ids: ResponseIds, completions: list[Completion], prompt_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None} for i, c in enumerate(completions)]
    return {**ids.envelope("chat.completion", choices), "usage": usage(prompt_tokens, completions)}


def chat_chunk(ids: ResponseIds, index: int, delta: dict[str, Any], finish_reason: str | None = None
               ) -> dict[str, Any]:
    return ids.envelope("chat.completion.chunk", [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                                   "logprobs": None}])


def completion_response(ids: ResponseIds, completions: list[Completion], prompt_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
               for i, c in enumerate(completions)]
    return {**ids.envelope("text_completion", choices), "usage": usage(prompt_tokens, completions)}


def completion_chunk(ids: ResponseIds, index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return ids.envelope("text_completion", [{"index": index, "text": text, "finish_reason": finish_reason,
                                             "logprobs": None}])


def usage_chunk(ids: ResponseIds, obj: str, prompt_tokens: int, completions: list[Completion]) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the request's usage."""
    return {**ids.envelope(obj, []), "usage": usage(prompt_tokens, completions)}
