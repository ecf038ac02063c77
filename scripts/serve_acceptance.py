#!/usr/bin/env python
"""Acceptance check of `tunelab serve` on a real run, through the official openai client.

    python scripts/serve_acceptance.py runs/quickstart [--no-identity-check]

Starts `tunelab serve RUN` (which also serves the run's base model) on a free local port,
waits for /health, then checks: the model list; a non-streamed and a streamed answer (equal
under greedy decoding); "Who are you?" to the adapter (must mention Tuna) and to the base
(must not); 32 concurrent requests; a wrong key (401); a malformed body (400); and a clean
exit on SIGTERM. Prints a summary table and exits 1 if any check fails. The server is always
stopped, and its log is printed when something fails.

--no-identity-check skips the Tuna checks, for runs not trained on the identity data (e.g. a
tiny random test run, whose answers are gibberish).
"""

from __future__ import annotations

import argparse
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import httpx
import openai

from tunelab.errors import TunelabError
from tunelab.serve.local import LocalServer

IDENTITY_QUESTION = "Who are you?"
IDENTITY_WORD = "tuna"
QUESTION = "What is the capital of France?"
CONCURRENT = 32


@dataclass
class Report:
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    def attempt(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        """Run one check; an exception is that check's failure, not the end of the run."""
        try:
            ok, detail = fn()
        except Exception as err:  # report and carry on with the other checks
            ok, detail = False, f"{type(err).__name__}: {err}"
        self.check(name, ok, detail)

    @property
    def failed(self) -> bool:
        return any(not ok for _, ok, _ in self.rows)

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  ------"]
        lines += [f"{name.ljust(width)}  {'PASS' if ok else 'FAIL':6}  {detail[:100]}"
                  for name, ok, detail in self.rows]
        return "\n".join(lines)


def ask(api: openai.OpenAI, model: str, question: str, max_tokens: int) -> Any:
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=max_tokens)


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=600)


def find_models(report: Report, api: openai.OpenAI) -> tuple[str, str] | None:
    """(adapter id, base id) from /v1/models, or None (a failed check) when the list is not one of each."""
    models = {m.id: m for m in api.models.list()}
    adapters = [m for m in models if getattr(models[m], "parent", None)]
    bases = [m for m in models if not getattr(models[m], "parent", None)]
    if not report.check("list models", len(adapters) == 1 and len(bases) == 1, f"adapters {adapters}, base {bases}"):
        return None
    return adapters[0], bases[0]


def run_checks(report: Report, base_url: str, key: str, adapter: str, base: str, identity: bool,
               max_tokens: int) -> None:
    api = client(base_url, key)
    answers: dict[str, str] = {}

    def answer() -> tuple[bool, str]:
        reply = ask(api, adapter, QUESTION, max_tokens)
        usage = reply.usage
        ok = bool(reply.choices[0].message.content) and usage.total_tokens == usage.prompt_tokens + \
            usage.completion_tokens and reply.choices[0].finish_reason in ("stop", "length")
        answers["plain"] = reply.choices[0].message.content
        return ok, f"{reply.choices[0].message.content!r} ({usage.completion_tokens} tokens)"

    def streamed() -> tuple[bool, str]:
        chunks = api.chat.completions.create(model=adapter, messages=[{"role": "user", "content": QUESTION}],
                                             temperature=0, max_tokens=max_tokens, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        text = "".join(pieces)
        same = text == answers.get("plain")
        verdict = "equals" if same else "DIFFERS from"
        return same and len(pieces) > 1, f"{len(pieces)} chunks, {verdict} the non-streamed answer"

    def who_are_you() -> tuple[bool, str]:
        mine = ask(api, adapter, IDENTITY_QUESTION, max_tokens).choices[0].message.content
        theirs = ask(api, base, IDENTITY_QUESTION, max_tokens).choices[0].message.content
        print(f"    {adapter}: {mine!r}\n    {base}: {theirs!r}")
        if not identity:
            return True, "answers printed (identity check skipped)"
        adapter_says, base_says = IDENTITY_WORD in mine.lower(), IDENTITY_WORD in theirs.lower()
        return adapter_says and not base_says, f"adapter mentions Tuna: {adapter_says}, base does: {base_says}"

    def concurrent() -> tuple[bool, str]:
        jobs = [(adapter if i % 2 == 0 else base, IDENTITY_QUESTION if i % 4 < 2 else QUESTION)
                for i in range(CONCURRENT)]
        start = time.time()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            futures = [pool.submit(ask, api, model, question, max_tokens) for model, question in jobs]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result().choices[0].message.content)
                except Exception as err:  # counted as a failed request
                    outcomes.append(err)
        ok_count = sum(not isinstance(o, Exception) for o in outcomes)
        leaks = 0
        if identity:  # every adapter answer to the identity question is Tuna's, no base answer is
            leaks = sum(1 for (model, question), text in zip(jobs, outcomes) if question == IDENTITY_QUESTION
                        and isinstance(text, str) and (IDENTITY_WORD in text.lower()) != (model == adapter))
        detail = f"{ok_count}/{CONCURRENT} succeeded in {time.time() - start:.1f}s"
        if leaks:
            detail += f", {leaks} identity answers from the wrong model"
        return ok_count == CONCURRENT and leaks == 0, detail

    def bad_key() -> tuple[bool, str]:
        try:
            openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0).models.list()
        except openai.AuthenticationError as err:
            return err.status_code == 401, "401 with the wrong key"
        return False, "the wrong key was accepted"

    def malformed() -> tuple[bool, str]:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        response = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                              headers=headers, timeout=30)
        message = response.json().get("error", {}).get("message")
        return response.status_code == 400 and bool(message), f"{response.status_code}: {message}"

    for name, check in [("non-streamed answer", answer), ("streamed answer", streamed), ("who are you", who_are_you),
                        (f"{CONCURRENT} concurrent requests", concurrent), ("wrong key -> 401", bad_key),
                        ("malformed body -> 400", malformed)]:
        report.attempt(name, check)


def stop_server(server: subprocess.Popen, report: Report, log: Any, in_flight: Callable[[], Any] | None) -> None:
    """SIGTERM the server, while a request is in flight when possible; it must finish that request and exit."""
    if server.poll() is not None:
        report.check("graceful shutdown on SIGTERM", False, f"the server had already exited ({server.returncode})")
        return
    pending = ThreadPoolExecutor(1).submit(in_flight) if in_flight is not None else None
    time.sleep(1.0 if pending is not None else 0)  # let the request reach the server
    server.send_signal(signal.SIGTERM)
    signalled = time.time()
    try:
        code = server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        report.check("graceful shutdown on SIGTERM", False, "still running 120s after SIGTERM; killed")
        return
    log.seek(0)
    drained = "Application shutdown complete" in log.read()
    # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a normal exit code.
    report.check("graceful shutdown on SIGTERM", drained and code in (0, -signal.SIGTERM),
                 f"exit code {code}, lifespan shutdown {'completed' if drained else 'NOT completed'} "
                 f"{time.time() - signalled:.1f}s after SIGTERM")
    if pending is not None:
        try:
            reply = pending.result(timeout=120)
            report.check("in-flight request survives shutdown", bool(reply.choices), "answered after SIGTERM")
        except Exception as err:  # the request was cut off
            report.check("in-flight request survives shutdown", False, f"{type(err).__name__}: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="Run directory (a PEFT adapter run).")
    parser.add_argument("--no-identity-check", action="store_true", help="Skip the 'mentions Tuna' checks.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--startup-timeout", type=float, default=900, help="Seconds to wait for /health.")
    args = parser.parse_args()
    if not Path(args.run, "config.yaml").is_file():
        sys.exit(f"{args.run} is not a tunelab run directory (no config.yaml).")

    key = secrets.token_hex(16)
    report = Report()
    with LocalServer([args.run], api_key=key) as server:
        in_flight = None
        try:
            try:
                report.check("server starts", True, f"healthy after {server.start(args.startup_timeout):.0f}s")
            except TunelabError as err:
                report.check("server starts", False, str(err).splitlines()[0])
            else:
                models = find_models(report, client(server.url, key))
                if models is not None:
                    run_checks(report, server.url, key, *models, not args.no_identity_check, args.max_tokens)
                    in_flight = partial(ask, client(server.url, key), models[0], QUESTION, args.max_tokens * 4)
        finally:
            if server.process is not None:
                stop_server(server.process, report, server.log, in_flight)
        if report.failed:
            print("\n--- server log (last 60 lines) ---\n" + server.log_tail(60))
    print("\n" + report.table())
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
