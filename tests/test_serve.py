"""The OpenAI-compatible server: one tiny base with two LoRA runs, checked against PEFT directly.

Every answer the server gives is compared with what a plain ``PeftModel`` (or the bare
base) generates greedily for the same chat, so adapter leaks, template drift, padding or
batching bugs all show up as different text.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig  # noqa: E402

from tunelab.config import MethodConfig, ModelConfig, RunConfig, save_config  # noqa: E402
from tunelab.data.records import Message  # noqa: E402
from tunelab.errors import ConfigError  # noqa: E402
from tunelab.inference import (Completion, GenerationOptions, GenerationRow, complete, encode_prompt,  # noqa: E402
                               stream)
from tunelab.serve.app import build_engine, create_app  # noqa: E402
from tunelab.serve import batching  # noqa: E402
from tunelab.serve import engine as engine_module  # noqa: E402
from tunelab.serve.batching import DecodeBatch, prefill_groups, steppable  # noqa: E402
from tunelab.serve.catalog import plan  # noqa: E402
from tunelab.serve.engine import Engine, Job, ServedModel  # noqa: E402
from tunelab.testing.tiny import save_tiny_model_dir  # noqa: E402

BASE_ID = "tiny-base"
QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a short poem about the sea.",
             "hi", "Translate hello to French please, in one word."]
MAX_TOKENS = 10
CPU = torch.device("cpu")  # the references below run in fp32 on the CPU; so does the server under test


# ---------------------------------------------------------------------------- fixtures

def make_run(run_dir: Path, base_dir: Path, seed: int) -> Path:
    """A run directory as training leaves it: config, tokenizer, PEFT LoRA adapter (random, non-zero B)."""
    cfg = RunConfig(model=ModelConfig(name_or_path=str(base_dir)), method=MethodConfig(type="lora", r=4),
                    output_dir=str(run_dir))
    save_config(cfg, run_dir / "config.yaml")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run_dir)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run_dir / "adapter")
    return run_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny_model_dir(root / BASE_ID)
    return {"base": base, "run-a": make_run(root / "run-a", base, 1), "run-b": make_run(root / "run-b", base, 2)}


@pytest.fixture(scope="module")
def references(dirs) -> dict[str, torch.nn.Module]:
    """Independent models per id: a fresh base with PeftModel.from_pretrained, or the bare base."""
    refs = {BASE_ID: AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()}
    for run in ("run-a", "run-b"):
        base = AutoModelForCausalLM.from_pretrained(dirs["base"])
        refs[run] = PeftModel.from_pretrained(base, str(dirs[run] / "adapter")).eval()
    return refs


@pytest.fixture(scope="module")
def tok(dirs):
    return AutoTokenizer.from_pretrained(dirs["base"])


def chat_ids(tok, question: str) -> list[int]:
    """The prompt as the tokenizer's own chat template renders it (not through tunelab)."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def direct(references, tok, model_id: str, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    """(text, generated token count) of plain greedy generation, cut after the first eos."""
    ids = torch.tensor([prompt_ids])
    out = references[model_id].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=max_tokens, eos_token_id=[tok.eos_token_id],
                                        pad_token_id=tok.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id) + 1]
    return tok.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def engine(dirs) -> Engine:
    return build_engine([str(dirs["run-a"]), str(dirs["run-b"])], "transformers", max_batch_size=8, device=CPU)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def ask(client, model: str, question: str, **params: Any):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": MAX_TOKENS, **params}
    return client.post("/v1/chat/completions", json=body)


def sse_events(response) -> list[Any]:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


def assert_openai_error(response, status: int, type_: str = "invalid_request_error") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == type_
    return error


# ---------------------------------------------------------------------------- models and answers

def test_models_lists_every_run_and_the_base(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["run-a", "run-b", BASE_ID]
    assert [m["parent"] for m in data] == [BASE_ID, BASE_ID, None]
    assert data[0]["max_model_len"] == 512
    assert client.get("/v1/models/run-b").json()["id"] == "run-b"
    assert client.get("/health").json()["status"] == "ok"


def test_greedy_answers_equal_direct_peft_generation_with_usage(client, references, tok):
    answers = {}
    for model in ("run-a", "run-b", BASE_ID):
        body = ask(client, model, QUESTIONS[0]).json()
        prompt_ids = chat_ids(tok, QUESTIONS[0])
        text, generated = direct(references, tok, model, prompt_ids)
        choice = body["choices"][0]
        assert body["model"] == model and body["object"] == "chat.completion"
        assert choice["message"] == {"role": "assistant", "content": text}
        assert choice["finish_reason"] == ("stop" if generated < MAX_TOKENS else "length")
        assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": generated,
                                 "total_tokens": len(prompt_ids) + generated}
        answers[model] = text
    assert len(set(answers.values())) == 3  # the adapters really change the answer, so a leak would show


class _Gate:
    """Wraps a backend: the first batch waits for ``open``, so later requests pile up in the queue."""

    def __init__(self, inner):
        self.inner, self.models = inner, inner.models
        self.entered, self.open = threading.Event(), threading.Event()
        self.batches: list[tuple[str, int]] = []

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        self.entered.set()
        assert self.open.wait(30)
        self.batches.append((model.id, len(rows)))
        return self.inner.run(model, rows)


def test_interleaved_concurrent_requests_are_batched_per_model_without_leaks(engine, references, tok):
    gate = _Gate(engine.backend)
    gated = Engine(gate, max_batch_size=8)
    plan_ = [("run-a", QUESTIONS[0]), ("run-b", QUESTIONS[1]), (BASE_ID, QUESTIONS[2]), ("run-a", QUESTIONS[3]),
             ("run-b", QUESTIONS[4]), (BASE_ID, QUESTIONS[0]), ("run-a", QUESTIONS[4])]
    results: dict[int, Any] = {}
    with TestClient(create_app(gated)) as client:
        def worker(i: int) -> None:
            results[i] = ask(client, *plan_[i]).json()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plan_))]
        threads[0].start()
        assert gate.entered.wait(30)
        for thread in threads[1:]:
            thread.start()
        deadline = time.time() + 30
        while gated.queued < len(plan_) - 1 and time.time() < deadline:
            time.sleep(0.01)
        gate.open.set()
        for thread in threads:
            thread.join(60)
    assert gate.batches[0] == ("run-a", 1)
    assert sorted(gate.batches[1:]) == sorted([("run-a", 2), ("run-b", 2), (BASE_ID, 2)])
    for i, (model, question) in enumerate(plan_):
        expected, _ = direct(references, tok, model, chat_ids(tok, question))
        assert results[i]["choices"][0]["message"]["content"] == expected, (model, question)


def test_streamed_chat_equals_the_full_answer(client):
    full = ask(client, "run-b", QUESTIONS[1]).json()
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "run-b", "messages": [{"role": "user", "content": QUESTIONS[1]}], "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert len(chunks) > 3  # streamed in pieces, not in one block
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_n_choices_greedy_and_seeded_sampling(client, references, tok):
    body = ask(client, "run-a", QUESTIONS[0], n=2).json()
    expected, generated = direct(references, tok, "run-a", chat_ids(tok, QUESTIONS[0]))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [expected, expected]
    assert body["usage"]["completion_tokens"] == 2 * generated
    assert body["usage"]["prompt_tokens"] == len(chat_ids(tok, QUESTIONS[0]))  # the prompt counts once
    sampled = [ask(client, "run-a", QUESTIONS[0], n=3, temperature=1.0, seed=7).json() for _ in range(2)]
    texts = [[c["message"]["content"] for c in s["choices"]] for s in sampled]
    assert texts[0] == texts[1]  # a seed reproduces the answers
    assert len(set(texts[0])) > 1  # and the choices are independent samples


def test_stop_string_cuts_the_answer(client, references, tok):
    expected, _ = direct(references, tok, "run-a", chat_ids(tok, QUESTIONS[0]))
    stop = expected[3:6]
    body = ask(client, "run-a", QUESTIONS[0], stop=[stop]).json()
    assert body["choices"][0]["message"]["content"] == expected[:expected.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_endpoint_with_a_list_of_prompts(client, references, tok):
    prompts = ["The capital of France is", "Waves fold"]
    body = client.post("/v1/completions", json={"model": "run-b", "prompt": prompts, "temperature": 0,
                                                "max_tokens": 6}).json()
    assert body["object"] == "text_completion"
    for choice, prompt in zip(body["choices"], prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert choice["text"] == direct(references, tok, "run-b", ids, 6)[0]
    assert body["usage"]["prompt_tokens"] == sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    with client.stream("POST", "/v1/completions", json={"model": "run-b", "prompt": prompts, "temperature": 0,
                                                        "max_tokens": 6, "stream": True}) as response:
        chunks = sse_events(response)[:-1]
    for index, choice in enumerate(body["choices"]):
        pieces = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(p["text"] for p in pieces) == choice["text"]
        assert pieces[-1]["finish_reason"] == choice["finish_reason"]


# ---------------------------------------------------------------------------- errors

def test_api_key_is_required_when_set(engine):
    with TestClient(create_app(engine, api_key="s3cret")) as client:
        assert assert_openai_error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
        assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(ask(client, "run-a", "hi"), 401)
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_bad_requests_are_openai_style_400s(client):
    malformed = client.post("/v1/chat/completions", content=b'{"model": "run-a", "messages": [',
                            headers={"Content-Type": "application/json"})
    assert "not valid JSON" in assert_openai_error(malformed, 400)["message"]
    assert assert_openai_error(ask(client, "run-a", "hi", temperature=-1), 400)["param"] == "temperature"
    assert assert_openai_error(ask(client, "run-a", "hi", n=0), 400)["param"] == "n"
    missing = client.post("/v1/chat/completions", json={"model": "run-a"})
    assert assert_openai_error(missing, 400)["param"] == "messages"
    tools = ask(client, "run-a", "hi", tools=[{"type": "function", "function": {"name": "f"}}])
    assert "'tools' is not supported" in assert_openai_error(tools, 400)["message"]
    assert_openai_error(client.get("/v1/nothing-here"), 404)


def test_unknown_model_is_404_listing_the_available_ones(client):
    error = assert_openai_error(ask(client, "gpt-4", "hi"), 404)
    assert error["code"] == "model_not_found" and "run-a, run-b, tiny-base" in error["message"]


def test_too_long_prompt_is_400_with_the_limit(client):
    error = assert_openai_error(ask(client, "run-a", "the quick brown fox " * 200, max_tokens=16), 400)
    assert error["code"] == "context_length_exceeded"
    assert "context of 512 tokens" in error["message"] and "at most 496 tokens" in error["message"]


class _Broken:
    def __init__(self, models: dict[str, ServedModel]):
        self.models = models

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        raise RuntimeError("secret internal detail")


def test_generation_failure_is_a_generic_500(engine):
    with TestClient(create_app(Engine(_Broken(engine.models)))) as client:
        response = ask(client, "run-a", "hi")
        error = assert_openai_error(response, 500, "server_error")
        assert "secret" not in response.text and "Traceback" not in response.text and "server log" in error["message"]
        assert ask(client, "run-b", "hi").status_code == 500  # the worker survives and keeps answering


# ---------------------------------------------------------------------------- engine and planning

class _Recorder:
    """A fake backend that answers instantly and records each batch."""

    def __init__(self, models: dict[str, ServedModel]):
        self.models = models
        self.batches: list[list[str]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        self.entered.set()
        assert self.release.wait(10)
        self.batches.append([model.id] * len(rows))
        return [Completion(f"{model.id}:{r.prompt_ids[0]}", "stop", 1, 1) for r in rows]


def _job(model_id: str, marker: int, done: list, **options: Any) -> Job:
    row = GenerationRow([marker], GenerationOptions(temperature=0, **options))
    return Job(model_id, [row], on_done=done.append)


def test_engine_batches_compatible_jobs_and_drains_the_queue_on_stop(engine):
    backend = _Recorder(engine.models)
    eng = Engine(backend, max_batch_size=3)
    eng.start()
    done: list = []
    jobs = [_job("run-a", 0, done), _job("run-a", 1, done), _job("run-b", 2, done), _job("run-a", 3, done),
            _job("run-a", 4, done, max_new_tokens=5), _job("run-a", 5, done, seed=1), _job("run-a", 6, done)]
    eng.submit(jobs[0])
    assert backend.entered.wait(10)  # the worker is busy with the first job; the rest queue up
    for job in jobs[1:]:
        eng.submit(job)
    backend.release.set()
    eng.stop()  # returns only after every queued job has been answered
    assert len(done) == len(jobs)
    # max_tokens may differ inside a batch; seeded jobs run alone; at most 3 rows per batch.
    assert [len(b) for b in backend.batches] == [1, 3, 1, 1, 1] and backend.batches[2] == ["run-b"]
    assert sorted(d[0].text for d in done) == sorted(f"{j.model_id}:{j.rows[0].prompt_ids[0]}" for j in jobs)
    with pytest.raises(Exception, match="shutting down"):
        eng.submit(_job("run-a", 0, done))


def test_engine_hands_memory_back_when_it_runs_out_of_work(engine):
    backend = _Recorder(engine.models)
    eng = Engine(backend, max_batch_size=8)
    released: list[int] = []
    backend.release_memory = lambda: released.append(eng.queued)  # type: ignore[attr-defined]
    eng.start()
    done: list = []
    eng.submit(_job("run-a", 0, done))
    assert backend.entered.wait(10)
    eng.submit(_job("run-a", 1, done))
    eng.submit(_job("run-a", 2, done))
    backend.release.set()
    eng.stop()
    assert len(done) == 3 and released == [0]  # once, after the second batch emptied the queue


def test_cancelled_row_stops_generating(engine):
    model = engine.models["run-a"]
    ids = encode_prompt(model.run, [Message("user", "hi")])
    cancel = threading.Event()
    row = GenerationRow(ids, GenerationOptions(max_new_tokens=50, temperature=0),
                        on_text=lambda text: cancel.set(), cancelled=cancel)
    with model.activate():
        result = complete(model.run, [row])[0]
    assert result.finish_reason == "cancelled" and result.completion_tokens < 5


def test_inference_stream_never_emits_a_stop_string(engine, references, tok):
    model = engine.models["run-a"]
    expected, _ = direct(references, tok, "run-a", chat_ids(tok, QUESTIONS[0]))
    stop = expected[4:7]
    with model.activate():  # the shared module: select run-a's adapter, as the engine's worker does
        pieces = list(stream(model.run, [Message("user", QUESTIONS[0])],
                             GenerationOptions(max_new_tokens=MAX_TOKENS, temperature=0, stop=[stop])))
    assert "".join(pieces) == expected[:expected.index(stop)]


def test_plan_renames_colliding_ids_and_refuses_a_different_base(dirs, tmp_path):
    twin = make_run(tmp_path / "other" / "run-a", dirs["base"], 3)
    served = plan([str(dirs["run-a"]), str(twin)])
    assert [r.id for r in served.runs] == ["run-a", "run-a-2"] and served.base_id == BASE_ID
    assert any("'run-a-2'" in note for note in served.notes)
    other_base = save_tiny_model_dir(tmp_path / "other-base", seed=1)
    stranger = make_run(tmp_path / "stranger", other_base, 4)
    with pytest.raises(ConfigError, match="share one base model"):
        plan([str(dirs["run-a"]), str(stranger)])
    with pytest.raises(ConfigError, match="not a tunelab run directory"):
        plan([str(tmp_path)])
    with pytest.raises(ConfigError, match="not a tunelab run directory"):  # a base model is served only alone
        plan([str(dirs["run-a"]), str(dirs["base"])])


def test_a_base_model_alone_is_served_with_its_own_template(dirs, references, tok):
    served = plan([str(dirs["base"])])
    assert served.base_id == BASE_ID and served.runs == [] and served.base_config().data.template == "auto"
    with TestClient(create_app(build_engine([str(dirs["base"])], device=CPU))) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [BASE_ID]
        body = ask(client, BASE_ID, QUESTIONS[2]).json()
    assert body["choices"][0]["message"]["content"] == direct(references, tok, BASE_ID, chat_ids(tok, QUESTIONS[2]))[0]


# ---------------------------------------------------------------------------- real client, real server

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn_server(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; yields the base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    # log_config=None: uvicorn's records reach pytest's caplog like any other logger's.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def test_official_openai_client_against_uvicorn(dirs, references, tok):
    openai = pytest.importorskip("openai")
    engine = build_engine([str(dirs["run-a"]), str(dirs["run-b"])], "transformers", max_batch_size=4, device=CPU)
    with uvicorn_server(create_app(engine, api_key="k")) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in api.models.list()] == ["run-a", "run-b", BASE_ID]
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        answer = api.chat.completions.create(model="run-b", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        expected, generated = direct(references, tok, "run-b", chat_ids(tok, QUESTIONS[1]))
        assert answer.choices[0].message.content == expected and answer.usage.completion_tokens == generated
        pieces = api.chat.completions.create(model="run-b", messages=messages, temperature=0,
                                             max_tokens=MAX_TOKENS, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == expected
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()


# ---------------------------------------------------------------------------- continuous batching

def _submit(eng: Engine, model_id: str, question: str, max_tokens: int, **options: Any) -> dict[str, Any]:
    """Submit one chat to ``eng``; the returned dict gets 'result' and the 'done' event is set when answered."""
    ids = encode_prompt(eng.models[model_id].run, [Message("user", question)])
    record: dict[str, Any] = {"done": threading.Event()}

    def finish(result: Any) -> None:
        record["result"] = result
        record["done"].set()

    options = {"temperature": 0, **options}
    eng.submit(Job(model_id, [GenerationRow(ids, GenerationOptions(max_new_tokens=max_tokens, **options))],
                   on_done=finish))
    return record


def _text(record: dict[str, Any]) -> str:
    assert record["done"].wait(60)
    return record["result"][0].text


def test_continuous_batches_give_each_row_its_greedy_answer_alone(engine, references, tok, monkeypatch):
    """Rows of three models join running batches mid-flight and leave at their own lengths, yet every
    answer equals plain one-at-a-time greedy generation."""
    monkeypatch.setattr(batching, "CACHE_GROWTH", 2)  # the cache buffers fill and are regrown every 2 steps
    joins: list[tuple[int, int]] = []  # (rows running, rows joining) at every prefill
    widths: list[int] = []
    add, step = DecodeBatch.add, DecodeBatch.step
    monkeypatch.setattr(DecodeBatch, "add", lambda self, rows: (joins.append((len(self), len(rows))), add(self, rows)))
    monkeypatch.setattr(DecodeBatch, "step", lambda self: (widths.append(len(self)), step(self)))
    eng = Engine(engine.backend, max_batch_size=5)
    eng.start()
    plan_ = [("run-a", QUESTIONS[0], 4), ("run-b", QUESTIONS[1], 10), ("run-a", QUESTIONS[2], 10),
             (BASE_ID, QUESTIONS[3], 7), ("run-a", QUESTIONS[4], 9), ("run-b", QUESTIONS[0], 3),
             ("run-a", QUESTIONS[1], 10), (BASE_ID, QUESTIONS[2], 5), ("run-a", QUESTIONS[3], 6)]
    try:
        records = [_submit(eng, model, question, limit) for model, question, limit in plan_]
        texts = [_text(record) for record in records]
    finally:
        eng.stop()
    for (model, question, limit), text, record in zip(plan_, texts, records):
        expected, generated = direct(references, tok, model, chat_ids(tok, question), limit)
        assert text == expected, (model, question)
        assert record["result"][0].completion_tokens == generated
    assert max(widths) > 1  # rows really were generated together
    assert any(running > 0 for running, _ in joins)  # and some joined a batch already running


def test_newcomers_start_a_few_prompt_tokens_per_step(engine, monkeypatch):
    """A queue of newcomers is prefilled a bounded number of prompt tokens at a time, between steps."""
    monkeypatch.setattr(engine_module, "ADMIT_TOKENS", 24)  # "Who are you?" has 15 prompt tokens: two per step
    sizes: list[int] = []
    entered, release = threading.Event(), threading.Event()
    add = DecodeBatch.add

    def gated(self: DecodeBatch, rows: Any) -> None:
        sizes.append(len(rows))
        if len(sizes) == 1:  # hold the worker in the first prefill while the others queue up
            entered.set()
            assert release.wait(30)
        add(self, rows)

    monkeypatch.setattr(DecodeBatch, "add", gated)
    eng = Engine(engine.backend, max_batch_size=8)
    eng.start()
    try:
        records = [_submit(eng, "run-a", QUESTIONS[0], 3)]
        assert entered.wait(30)
        records += [_submit(eng, "run-a", QUESTIONS[0], 3) for _ in range(4)]
        release.set()
        assert all(record["done"].wait(60) for record in records)
    finally:
        eng.stop()
    assert sizes == [1, 2, 2]


def test_seeded_sampling_does_not_depend_on_the_neighbours(engine):
    eng = Engine(engine.backend, max_batch_size=8)
    eng.start()
    try:
        alone = _text(_submit(eng, "run-a", QUESTIONS[2], 12, temperature=1.0, seed=123))
        crowd = [_submit(eng, "run-a", QUESTIONS[0], 12, temperature=1.0),
                 _submit(eng, "run-a", QUESTIONS[2], 12, temperature=1.0, seed=123),
                 _submit(eng, "run-a", QUESTIONS[1], 12), _submit(eng, "run-a", QUESTIONS[2], 12, temperature=1.0,
                                                                  seed=124)]
        texts = [_text(record) for record in crowd]
    finally:
        eng.stop()
    assert texts[1] == alone and texts[3] != alone


def test_a_long_request_does_not_hold_back_a_short_one(engine):
    eng = Engine(engine.backend, max_batch_size=2)
    eng.start()
    try:
        long = _submit(eng, "run-a", QUESTIONS[0], 120)
        deadline = time.time() + 30
        while eng.running == 0 and time.time() < deadline:
            time.sleep(0.001)
        short = _submit(eng, "run-b", QUESTIONS[1], 3)
        assert short["done"].wait(30)
        long_was_running = not long["done"].is_set()
        assert long["done"].wait(60)
    finally:
        eng.stop()
    assert long_was_running and long["result"][0].completion_tokens == 120
    assert short["result"][0].completion_tokens <= 3


def test_only_models_whose_state_is_in_the_weights_are_stepped(references, dirs):
    assert steppable(references["run-a"]) and steppable(references[BASE_ID])
    prefix = get_peft_model(AutoModelForCausalLM.from_pretrained(dirs["base"]),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not steppable(prefix)  # its key/value prefix is not in our cache: inference.complete serves it
    sliding = MistralConfig(num_hidden_layers=2, sliding_window=16)
    assert not steppable(SimpleNamespace(config=sliding))


def test_a_failing_step_is_a_500_and_the_lane_serves_on(engine, monkeypatch):
    step, failures = DecodeBatch.step, []

    def fails_once(self: DecodeBatch) -> None:
        if not failures:
            failures.append(len(self))
            raise RuntimeError("secret internal detail")
        step(self)

    monkeypatch.setattr(DecodeBatch, "step", fails_once)
    with TestClient(create_app(Engine(engine.backend))) as client:
        response = ask(client, "run-a", "hi")
        assert "secret" not in assert_openai_error(response, 500, "server_error")["message"]
        assert ask(client, "run-a", "hi").status_code == 200
    assert failures == [1]


def test_prefill_groups_hold_similar_lengths_within_the_token_budget():
    lengths = [10, 30, 9, 60, 2, 12, 11, 100]
    assert prefill_groups("abcdefgh", lengths, budget=64, spread=1.25) == [["e"], ["c", "a", "g"], ["f"], ["b"],
                                                                           ["d"], ["h"]]
    assert prefill_groups("abcdefgh", lengths, budget=30, spread=2.0) == [["e"], ["c", "a"], ["g", "f"], ["b"],
                                                                          ["d"], ["h"]]


# ---------------------------------------------------------------------------- clients that go away

class _SlowLanes:
    """The real backend, but every lane step sleeps, and every row that leaves a lane is recorded."""

    def __init__(self, inner: Any, delay: float):
        self.inner, self.models, self.delay = inner, inner.models, delay
        self.ended: list[Completion] = []

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        return self.inner.run(model, rows)

    def lane(self, model: ServedModel) -> DecodeBatch:
        lane = self.inner.lane(model)
        step, pop = lane.step, lane.pop_finished

        def slow_step() -> None:
            time.sleep(self.delay)
            step()

        def recorded() -> list[tuple[GenerationRow, Completion]]:
            ended = pop()
            self.ended += [completion for _, completion in ended]
            return ended

        lane.step, lane.pop_finished = slow_step, recorded
        return lane


LONG = 400  # tokens; at 20 ms a step, 8 s if the request were not cancelled


@pytest.fixture(scope="module")
def slow_server(engine) -> Iterator[tuple[str, _SlowLanes]]:
    """A one-slot server (max_batch_size=1), so a row that is not cancelled blocks every other request."""
    slow = _SlowLanes(engine.backend, delay=0.02)
    with uvicorn_server(create_app(Engine(slow, max_batch_size=1))) as url:
        yield url, slow


def _short_answer_seconds(url: str) -> float:
    httpx = pytest.importorskip("httpx")
    start = time.time()
    body = {"model": "run-b", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 3}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    return time.time() - start


def _long_body(stream: bool) -> dict[str, Any]:
    return {"model": "run-a", "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0,
            "max_tokens": LONG, "stream": stream}


def test_closed_non_streaming_request_frees_the_worker(slow_server, caplog):
    httpx = pytest.importorskip("httpx")
    url, slow = slow_server
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
        httpx.post(f"{url}/v1/chat/completions", json=_long_body(False), timeout=httpx.Timeout(10, read=0.5))
    assert _short_answer_seconds(url) < 4
    cancelled = [c for c in slow.ended if c.finish_reason == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].completion_tokens < LONG / 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # a quiet hang-up, no 500


def test_closed_stream_frees_the_worker(slow_server, caplog):
    httpx = pytest.importorskip("httpx")
    url, slow = slow_server
    before = len(slow.ended)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=_long_body(True)) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):  # the opening chunk and two generated pieces: the row is running; now hang up
                next(events)
    assert _short_answer_seconds(url) < 4
    cancelled = [c for c in slow.ended[before:] if c.finish_reason == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].completion_tokens < LONG / 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
