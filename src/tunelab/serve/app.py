"""The OpenAI-compatible HTTP layer: FastAPI routes, auth, errors, SSE streaming.

Routes: ``GET /health`` (no key needed), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``. Every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``; an unexpected failure is a 500 with a
generic message while the traceback goes to the server log.

Each request is validated and tokenized here, then handed to the :class:`Engine` as a
:class:`Job`. The worker reports back through callbacks that only schedule a put on the
request's own asyncio queue, so a slow client delays nobody but itself. A client that goes
away cancels its job: a streamed response is cancelled by Starlette when the client
disconnects, and a non-streamed one watches the connection for ``http.disconnect`` while
it waits, so the worker stops generating for nobody at its next step.

Limits (:mod:`tunelab.serve.limits`): request bodies over ``--max-body-bytes`` get a 413
before they are read, and ``max_tokens`` over ``--max-tokens`` (or the model's context) a 400.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import torch

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data.records import Message
from tunelab.errors import ConfigError, TunelabError
from tunelab.inference import Completion, GenerationOptions, GenerationRow, encode_prompt
from tunelab.serve import schemas
from tunelab.serve.engine import Engine, EngineClosed, Job, ServedModel
from tunelab.serve.limits import BodySizeLimit, BodyTooLarge, ServeLimits, access_warnings

log = logging.getLogger("tunelab.serve")

#: Status logged for a request whose client left before its answer (nginx's "client closed request").
_CLIENT_GONE = 499


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(schemas.error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def _generation_failed() -> APIError:
    return APIError(500, "generation failed on the server; the server log has the details.", "server_error")


# ---------------------------------------------------------------------------- errors

def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first problem of a request body, and the parameter at fault."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])}).", None
    loc = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(loc) or None
    where = f"'{param}': " if param else "request body: "
    more = f" ({len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"{where}{first['msg']}{more}.", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        return APIError(err.status_code, str(err.detail), type_).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.error("unexpected error while handling %s %s", request.method, request.url.path, exc_info=err)
        return APIError(500, "internal server error; the server log has the details.", "server_error").response()


# ---------------------------------------------------------------------------- requests

def _lookup(engine: Engine, model_id: str) -> ServedModel:
    try:
        return engine.models[model_id]
    except KeyError:
        available = ", ".join(engine.models)
        raise APIError(404, f"model '{model_id}' is not served here. Available models: {available}.", param="model",
                       code="model_not_found") from None


def _answer_limit(model: ServedModel, prompts: list[list[int]], requested: int | None, param: str,
                  cap: int) -> int:
    """max_tokens to use; a 400 when it is over ``cap`` or the context, or leaves the prompt no room."""
    longest = max(len(ids) for ids in prompts)
    context = model.context_length
    most = cap if context is None else min(cap, context - 1)
    if requested is not None and requested > most:
        why = "the server's --max-tokens" if most == cap else f"model '{model.id}' has a context of {context} tokens"
        raise APIError(400, f"max_tokens={requested} is more than this server generates for one answer: at most "
                            f"{most} tokens ({why}). Lower max_tokens.", param="max_tokens")
    if context is None:
        return requested or min(schemas.DEFAULT_MAX_TOKENS, cap)
    answer = requested or max(1, min(schemas.DEFAULT_MAX_TOKENS, most, context - longest))
    if longest + answer > context:
        raise APIError(400, f"the prompt has {longest} tokens, but model '{model.id}' has a context of {context} "
                            f"tokens and max_tokens={answer} must fit in it too, so the prompt may have at most "
                            f"{context - answer} tokens. Shorten the prompt or lower max_tokens.",
                       param=param, code="context_length_exceeded")
    return answer


def _chat_prompt(model: ServedModel, messages: list[Message]) -> list[int]:
    try:
        return encode_prompt(model.run, messages)
    except TunelabError as err:  # the chat template refused the conversation (roles, order)
        raise APIError(400, str(err), param="messages") from None


def _text_prompts(model: ServedModel, prompts: list[str]) -> list[list[int]]:
    encoded = [model.run.tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    if any(not ids for ids in encoded):
        raise APIError(400, "a prompt is empty; give every prompt some text.", param="prompt")
    return encoded


class _Call:
    """One accepted request in flight: its job and the asyncio queue the worker reports to."""

    def __init__(self, engine: Engine, model: ServedModel, prompts: list[list[int]], request: schemas.OpenAIRequest,
                 options: GenerationOptions):
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stream = request.stream

        def send(*event: Any) -> None:  # worker thread -> this request's event loop, never blocking
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the client is gone
                pass

        def on_text(index: int) -> Callable[[str], None] | None:
            return (lambda text: send("text", index, text)) if stream else None

        rows = [GenerationRow(ids, options, on_text=on_text(p * request.n + k))
                for p, ids in enumerate(prompts) for k in range(request.n)]
        self.job = Job(model.id, rows, on_done=lambda result: send("done", result), stream=stream)
        try:
            engine.submit(self.job)
        except EngineClosed as err:
            raise APIError(503, str(err), "server_error") from None

    async def result(self) -> list[Completion]:
        try:
            while (event := await self.events.get())[0] != "done":
                pass
        except asyncio.CancelledError:  # the request was abandoned: do not generate for nobody
            self.job.cancelled.set()
            raise
        outcome = event[1]
        if isinstance(outcome, BaseException):
            raise _generation_failed()
        return outcome

    async def result_unless_gone(self, request: Request) -> list[Completion] | None:
        """The result, or None (and the job cancelled) when the client disconnects first."""
        answer = asyncio.ensure_future(self.result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            left = not answer.done()
            if left:
                self.job.cancelled.set()
                answer.cancel()
        return None if left else answer.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has closed the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _ChatFormat:
    obj = "chat.completion.chunk"
    prefix = "chatcmpl"
    prompt_param = "messages"
    response = staticmethod(schemas.chat_response)

    @staticmethod
    def opening(ids: schemas.ResponseIds, index: int) -> dict[str, Any] | None:
        return schemas.chat_chunk(ids, index, {"role": "assistant", "content": ""})

    @staticmethod
    def piece(ids: schemas.ResponseIds, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return schemas.chat_chunk(ids, index, {"content": text} if text else {}, finish)


class _CompletionFormat:
    obj = "text_completion"
    prefix = "cmpl"
    prompt_param = "prompt"
    response = staticmethod(schemas.completion_response)

    @staticmethod
    def opening(ids: schemas.ResponseIds, index: int) -> dict[str, Any] | None:
        return None

    piece = staticmethod(schemas.completion_chunk)


async def _stream_events(call: _Call, fmt: Any, ids: schemas.ResponseIds, choices: int,
                         include_usage: bool) -> AsyncIterator[str]:
    try:
        for index in range(choices):
            if (chunk := fmt.opening(ids, index)) is not None:
                yield _sse(chunk)
        while (event := await call.events.get())[0] == "text":
            yield _sse(fmt.piece(ids, event[1], event[2]))
        outcome = event[1]
        if isinstance(outcome, BaseException):
            err = _generation_failed()
            yield _sse(schemas.error_body(err.message, err.type))
        else:
            for index, completion in enumerate(outcome):
                yield _sse(fmt.piece(ids, index, "", completion.finish_reason))
            if include_usage:
                yield _sse(schemas.usage_chunk(ids, fmt.obj, call.prompt_tokens, outcome))
        yield _sse("[DONE]")
    finally:  # the client may have gone away mid-stream: stop generating for it
        call.job.cancelled.set()


async def _respond(engine: Engine, model: ServedModel, prompts: list[list[int]], request: schemas.OpenAIRequest,
                   fmt: Any, limits: ServeLimits, http: Request) -> Any:
    answer = _answer_limit(model, prompts, request.answer_limit, fmt.prompt_param, limits.max_tokens)
    call = _Call(engine, model, prompts, request, request.options(answer))
    ids = schemas.ResponseIds(fmt.prefix, model.id)
    if request.stream:
        events = _stream_events(call, fmt, ids, len(call.job.rows), request.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    completions = await call.result_unless_gone(http)
    if completions is None:  # nobody reads this; it only makes the access log say what happened
        return Response(status_code=_CLIENT_GONE)
    return fmt.response(ids, completions, call.prompt_tokens)


# ---------------------------------------------------------------------------- app

def _require_key(api_key: str | None) -> Callable[..., Any]:
    async def check(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with.", code="invalid_api_key")

    return check


def _model_card(model: ServedModel, created: int) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": created, "owned_by": "tunelab", "root": model.source,
            "parent": model.parent, "max_model_len": model.context_length}


def create_app(engine: Engine, api_key: str | None = None, limits: ServeLimits | None = None) -> FastAPI:
    """The HTTP app over ``engine``; its lifespan starts the worker and drains it on shutdown."""
    created = int(time.time())
    limits = limits or ServeLimits()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_require_key(api_key))])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(engine.models), "queued": engine.queued, "running": engine.running}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m, created) for m in engine.models.values()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return _model_card(_lookup(engine, model_id), created)

    @v1.post("/chat/completions")
    async def chat_completions(request: schemas.ChatRequest, http: Request) -> Any:
        model = _lookup(engine, request.model)
        messages = [m.to_message() for m in request.messages]
        prompt = await run_in_threadpool(_chat_prompt, model, messages)
        return await _respond(engine, model, [prompt], request, _ChatFormat, limits, http)

    @v1.post("/completions")
    async def completions(request: schemas.CompletionRequest, http: Request) -> Any:
        model = _lookup(engine, request.model)
        prompts = await run_in_threadpool(_text_prompts, model, request.prompts)
        return await _respond(engine, model, prompts, request, _CompletionFormat, limits, http)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------------------- entry point

def build_engine(runs: list[str], backend: str = "transformers", max_batch_size: int = 8,
                 device: torch.device | None = None) -> Engine:
    """Plan the models of ``runs`` and load them with ``backend`` ("transformers" or "vllm").

    ``device`` (transformers backend; default cuda > mps > cpu) lets tests pin the CPU.
    """
    from tunelab.serve.catalog import plan

    served = plan(runs)
    for note in served.notes:
        log.warning(note)
    if backend == "transformers":
        from tunelab.serve.hf_backend import TransformersBackend

        return Engine(TransformersBackend.load(served, device), max_batch_size)
    if backend == "vllm":
        from tunelab.serve.vllm_backend import VllmBackend

        return Engine(VllmBackend.load(served, max_batch_size), max_batch_size)
    raise ConfigError(f"--backend '{backend}' is unknown; use 'transformers' or 'vllm'.")


def serve_main(runs: list[str], host: str, port: int, api_key: str | None, backend: str,
               max_batch_size: int, limits: ServeLimits) -> None:
    """Load ``runs`` (plus their base) and serve them until SIGINT/SIGTERM.

    ``api_key`` None falls back to the ``TUNELAB_API_KEY`` environment variable; with
    neither, the server accepts every request (and says so loudly at startup). On SIGTERM
    uvicorn stops accepting connections, lets in-flight requests finish, and the engine
    drains its queue.
    """
    import uvicorn

    from tunelab.heap import configure_heap

    configure_heap()  # before the model is loaded and the threads start (see tunelab.heap)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    api_key = api_key or os.environ.get("TUNELAB_API_KEY") or None
    engine = build_engine(runs, backend, max_batch_size)
    for model in engine.models.values():
        kind = f"on {model.parent}" if model.parent else "base model"
        log.info("serving %-32s %s (%s)", model.id, kind, model.source)
    for warning in access_warnings(host, api_key):
        log.warning(warning)
    uvicorn.run(create_app(engine, api_key, limits), host=host, port=port, log_level="info")
