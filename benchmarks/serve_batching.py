#!/usr/bin/env python
"""The same requests to `tunelab serve` one after another, then all at once.

    python benchmarks/serve_batching.py                  # SmolLM2 base, 32 requests, 64 tokens
    python benchmarks/serve_batching.py runs/quickstart  # a run directory (its adapter is asked)
    python benchmarks/serve_batching.py --requests 8 --max-tokens 16

Starts `tunelab serve` on a free 127.0.0.1 port, sends one warm-up request, then the same
`--requests` greedy chats (distinct alpaca-style prompts, one fixed `max_tokens`; an answer
may end earlier at its end of turn, as it would alone) first sequentially from one client,
then concurrently from one thread per request. Prints both
wall times, their ratio, and whether every concurrent answer equals its sequential one; also
the server's CPU seconds in each phase, a ratio that other jobs on a shared machine move less.
Exits 1 unless the concurrent run takes at most a quarter of the sequential time with
identical outputs. Writes benchmarks/results/serve-batching.json.
"""

from __future__ import annotations

import argparse
import threading
import time

import httpx
from serve_soak import HERE, chat_body, first_model, load_average, load_prompts

from tunelab.config import DEFAULT_MODEL
from tunelab.io import write_json
from tunelab.serve.local import LocalServer

TARGET_RATIO = 4.0


def answer(client: httpx.Client, url: str, body: dict) -> tuple[str, int]:
    response = client.post(url, json=body)
    response.raise_for_status()
    data = response.json()
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]


def sequential(server: LocalServer, bodies: list[dict]) -> tuple[list[tuple[str, int]], float]:
    url = f"{server.url}/v1/chat/completions"
    start = time.time()
    with httpx.Client(headers=server.headers, timeout=3600) as client:
        answers = [answer(client, url, body) for body in bodies]
    return answers, time.time() - start


def concurrent(server: LocalServer, bodies: list[dict]) -> tuple[list[tuple[str, int]], float]:
    url = f"{server.url}/v1/chat/completions"
    answers: list[tuple[str, int] | None] = [None] * len(bodies)
    ready = threading.Barrier(len(bodies) + 1)

    def send(index: int) -> None:
        with httpx.Client(headers=server.headers, timeout=3600) as client:
            ready.wait()
            answers[index] = answer(client, url, bodies[index])

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.time()
    for thread in threads:
        thread.join()
    wall = time.time() - start
    if any(a is None for a in answers):
        raise SystemExit("a concurrent request failed; see the traceback above")
    return [a for a in answers if a is not None], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=DEFAULT_MODEL, help="Run directory, or a base model (default).")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--startup-timeout", type=float, default=900)
    args = parser.parse_args()

    with LocalServer([args.run], options=["--max-batch-size", str(args.max_batch_size)]) as server:
        server.start(args.startup_timeout)
        model = first_model(server)
        bodies = [chat_body(model, prompt, args.max_tokens) for prompt in load_prompts(args.requests)]
        sequential(server, bodies[:1])  # warm-up: first-call allocations are nobody's fault
        load_before = load_average()
        cpu_start = server.cpu_seconds()
        alone, sequential_s = sequential(server, bodies)
        cpu_middle = server.cpu_seconds()
        together, concurrent_s = concurrent(server, bodies)
        cpu_end = server.cpu_seconds()
        load_after = load_average()
    differing = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    ratio = sequential_s / concurrent_s
    result = {
        "run": args.run, "model": model, "requests": args.requests, "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size, "generated_tokens": sum(tokens for _, tokens in alone),
        "sequential_s": round(sequential_s, 1), "concurrent_s": round(concurrent_s, 1), "ratio": round(ratio, 2),
        "sequential_cpu_s": round(cpu_middle - cpu_start, 1), "concurrent_cpu_s": round(cpu_end - cpu_middle, 1),
        "cpu_ratio": round((cpu_middle - cpu_start) / max(cpu_end - cpu_middle, 0.01), 2),
        "identical_outputs": not differing, "differing_requests": differing,
        "load_average_before": load_before, "load_average_after": load_after,
    }
    write_json(HERE / "results" / "serve-batching.json", result)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    ok = ratio >= TARGET_RATIO and not differing
    print("PASS" if ok else f"FAIL: target is a ratio >= {TARGET_RATIO} with identical outputs")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
