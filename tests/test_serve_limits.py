"""What the server refuses, and how: body size, answer length, seeds, serving without a key.

The server under test is the real one (transformers backend, continuous batching) over
the tiny base model; only `serve_main`'s model loading and uvicorn are stubbed where the
test is about what it logs at startup.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import nullcontext
from typing import Any

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tunelab.errors import ConfigError  # noqa: E402
from tunelab.inference import load_run  # noqa: E402
from tunelab.serve import app as serve_app  # noqa: E402
from tunelab import heap  # noqa: E402
from tunelab.serve.app import create_app  # noqa: E402
from tunelab.serve.engine import Engine, ServedModel  # noqa: E402
from tunelab.serve.hf_backend import TransformersBackend  # noqa: E402
from tunelab.serve.limits import BodySizeLimit, ServeLimits, access_warnings  # noqa: E402

MODEL = "tiny"
CONTEXT = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    run = load_run(tiny_model_dir, torch.device("cpu"))
    served = ServedModel(MODEL, run, str(tiny_model_dir), None, CONTEXT, nullcontext)
    return Engine(TransformersBackend({MODEL: served}), max_batch_size=4)


def client_for(engine: Engine, **limits: int) -> TestClient:
    return TestClient(create_app(engine, limits=ServeLimits(**limits)))


def chat(**params: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 3,
            **params}


def error_of(response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---------------------------------------------------------------------------- body size

def test_body_over_the_limit_is_413_and_a_smaller_one_is_served(engine):
    with client_for(engine, max_body_bytes=300) as client:
        big = chat(messages=[{"role": "user", "content": "x" * 400}])
        error = error_of(client.post("/v1/chat/completions", json=big), 413)
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert "at most 300 bytes" in error["message"] and "--max-body-bytes" in error["message"]
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def test_chunked_body_without_length_is_cut_off_at_the_limit(engine):
    def chunks():  # httpx sends a generator with Transfer-Encoding: chunked, no Content-Length
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(50):
            yield b"x" * 100
        yield b'"}]}'

    with client_for(engine, max_body_bytes=1000) as client:
        response = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
        error = error_of(response, 413)
        assert error["code"] == "request_too_large" and "at most 1000 bytes" in error["message"]


def test_declared_length_over_the_limit_is_refused_without_reading_the_body():
    """The middleware answers from the headers alone: the app and receive() are never called."""
    sent: list[dict[str, Any]] = []

    async def app(scope, receive, send):
        raise AssertionError("the app must not run for an oversized body")

    async def receive():
        raise AssertionError("the body must not be read")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"20000000")]}
    asyncio.run(BodySizeLimit(app, max_bytes=1024)(scope, receive, send))
    assert sent[0]["status"] == 413 and b"20000000 bytes" in sent[1]["body"]


# ---------------------------------------------------------------------------- max_tokens and seed

def test_max_tokens_over_the_cap_names_the_cap(engine):
    with client_for(engine, max_tokens=8) as client:
        error = error_of(client.post("/v1/chat/completions", json=chat(max_tokens=10 ** 9)), 400)
        assert error["param"] == "max_tokens"
        assert "max_tokens=1000000000" in error["message"] and "at most 8 tokens" in error["message"]
        assert "--max-tokens" in error["message"] and "-" not in error["message"].split("at most")[1].split()[0]
        # Without max_tokens the answer is cut at the cap, not at the default of 256.
        body = client.post("/v1/chat/completions", json=chat(max_tokens=None)).json()
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"


def test_max_tokens_over_the_context_names_the_context(engine):
    with client_for(engine, max_tokens=100_000) as client:
        error = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                              "max_tokens": 10 ** 9}), 400)
        assert f"at most {CONTEXT - 1} tokens" in error["message"]
        assert f"context of {CONTEXT} tokens" in error["message"]


@pytest.mark.parametrize("seed, bound", [(2 ** 70, "less than or equal to 9223372036854775807"),
                                         (-(2 ** 64), "greater than or equal to -9223372036854775808")])
def test_out_of_range_seed_is_a_400(engine, seed, bound):
    with client_for(engine) as client:
        error = error_of(client.post("/v1/chat/completions", json=chat(seed=seed, temperature=1.0)), 400)
        assert error["param"] == "seed" and bound in error["message"]


def test_largest_seed_samples_reproducibly(engine):
    with client_for(engine) as client:
        body = chat(seed=2 ** 63 - 1, temperature=1.0, max_tokens=6)
        first, second = (client.post("/v1/chat/completions", json=body) for _ in range(2))
        assert first.status_code == second.status_code == 200
        assert first.json()["choices"] == second.json()["choices"]


def test_limits_below_one_are_refused():
    with pytest.raises(ConfigError, match="--max-tokens must be at least 1, got 0"):
        ServeLimits(max_tokens=0)
    with pytest.raises(ConfigError, match="--max-body-bytes must be at least 1"):
        ServeLimits(max_body_bytes=-5)


# ---------------------------------------------------------------------------- API key warnings

def test_access_warnings():
    assert access_warnings("127.0.0.1", "key") == access_warnings("0.0.0.0", "key") == []
    local = access_warnings("127.0.0.1", None)
    assert len(local) == 1 and "without an API key" in local[0] and "this machine" in local[0]
    remote = access_warnings("0.0.0.0", None)
    assert len(remote) == 1 and "WITHOUT AN API KEY ON 0.0.0.0" in remote[0] and "anyone" in remote[0]


def test_serve_main_warns_at_startup_without_a_key(engine, monkeypatch, caplog):
    uvicorn = pytest.importorskip("uvicorn")
    started: list[dict[str, Any]] = []
    heaps: list[bool] = []  # the real one would change malloc settings for the rest of this test process
    monkeypatch.setattr(heap, "configure_heap", lambda: heaps.append(True))
    monkeypatch.setattr(serve_app, "build_engine", lambda runs, backend, size: engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs))
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="tunelab.serve"):
        serve_app.serve_main(["run"], "0.0.0.0", 8123, None, "transformers", 4, ServeLimits())
    assert started == [{"host": "0.0.0.0", "port": 8123, "log_level": "info"}] and heaps == [True]
    assert any("WITHOUT AN API KEY ON 0.0.0.0" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tunelab.serve"):
        serve_app.serve_main(["run"], "0.0.0.0", 8123, "k", "transformers", 4, ServeLimits())
    assert not any("API KEY" in r.message.upper() for r in caplog.records)
