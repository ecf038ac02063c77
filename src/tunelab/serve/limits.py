"""What the server accepts from one request, and who may send it.

Why limits at all: without them one client decides how much memory and worker time a
request costs (a 20 MB body was parsed whole before being refused; ``max_tokens`` up to the
context held the worker for minutes). The body limit is enforced before the body is read
(on ``Content-Length``, and while reading a chunked body); the answer-length cap is checked
with the prompt in :mod:`tunelab.serve.app`. Not Starlette's ``RequestBodyLimitMiddleware``
(FastAPI's ``max_body_size``): for a declared oversized body it replaces whatever the app
answers with a plain-text "Content Too Large", and clients of an OpenAI API expect its JSON
error shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from tunelab.errors import ConfigError

#: Enough for a prompt filling a 128k-token context as JSON; far below what hurts the server.
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
#: Longest answer a request may ask for (also bounded by each model's context).
DEFAULT_MAX_TOKENS = 1024
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits, set on the ``tunelab serve`` command line."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for flag, value in (("--max-tokens", self.max_tokens), ("--max-body-bytes", self.max_body_bytes)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}.")


class BodyTooLarge(HTTPException):
    """A request body over the limit; raised while reading one, answered as a 413 in OpenAI's shape."""

    def __init__(self, limit: int, size: int | None):
        told = f"is {size} bytes" if size is not None else "is longer than that"
        super().__init__(413, f"the request body {told}, but this server accepts at most {limit} bytes per request "
                              "(--max-body-bytes). Send a shorter prompt, or start the server with a larger "
                              "--max-body-bytes.")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.detail, "type": "invalid_request_error", "param": None,
                                       "code": "request_too_large"}}, status_code=self.status_code)


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` before they are read whole."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await BodyTooLarge(self.max_bytes, int(declared)).response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:  # a body without (or lying about) Content-Length is counted
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, None)
            return message

        await self.app(scope, limited, send)


def access_warnings(host: str, api_key: str | None) -> list[str]:
    """What to warn about at startup when the server takes requests without an API key."""
    if api_key is not None:
        return []
    if host in _LOOPBACK_HOSTS:
        return ["serving without an API key: every program on this machine can use the models. Pass --api-key "
                "or set TUNELAB_API_KEY to require one."]
    return [f"SERVING WITHOUT AN API KEY ON {host}: anyone who can reach this port can use the models and the "
            "server's time. Pass --api-key or set TUNELAB_API_KEY, or listen on 127.0.0.1 only."]
