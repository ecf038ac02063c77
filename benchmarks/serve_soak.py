#!/usr/bin/env python
"""Soak test of `tunelab serve`: concurrent clients, half of them hanging up mid-request.

    python benchmarks/serve_soak.py                  # SmolLM2 base, 32 clients, 192 requests
    python benchmarks/serve_soak.py runs/quickstart  # a run directory (its adapter is asked)
    python benchmarks/serve_soak.py --requests 64 --time-limit 300

Starts `tunelab serve` on a free 127.0.0.1 port (loopback only) and runs a fixed number of
requests from `--clients` threads, the same number from each. Even-numbered clients
("keepers") send non-streamed greedy
chats of `--max-tokens` and wait for the answer; odd-numbered clients ("leavers") ask for
`--long-tokens` (far longer) and hang up mid-request: a non-streamed request after a random
0.3-3 s, a stream after 1-8 chunks. Stops by itself after `--requests` requests or
`--time-limit` seconds, whichever comes first, and always stops the server.

Reports keeper latency p50/p99/max, errors (any answer but 200, failed connections; a
leaver's own hang-up is not an error), how long after the last client the server had no row left running
(a leaver still generating would hold a slot for `--long-tokens` steps), and the server's
RSS after startup, after a warm-up request and at the end. Exits 1 when a target is missed:
no error (so no 5xx), nothing left running, RSS growth (end - warm-up) < 100 MB. Writes
benchmarks/results/serve-soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tunelab.config import DEFAULT_MODEL
from tunelab.io import write_json
from tunelab.serve.local import LocalServer

HERE = Path(__file__).resolve().parent
PROMPTS_FILE = HERE / "data" / "alpaca_bench.json"
RSS_GROWTH_LIMIT_MB = 100


def load_prompts(count: int) -> list[str]:
    """``count`` distinct user prompts: the benchmark's alpaca-style instructions (with their inputs)."""
    records = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))
    prompts = [f"{r['instruction']}\n\n{r['input']}".strip() for r in records]
    return [prompts[i % len(prompts)] for i in range(count)]


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}


def first_model(server: LocalServer) -> str:
    """The model id to ask: the first run's (runs are listed before their base), or the base served alone."""
    models = httpx.get(f"{server.url}/v1/models", headers=server.headers, timeout=30).json()["data"]
    return models[0]["id"]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Tally:
    """What the clients saw; appended to from many threads under one lock."""

    latencies: list[float] = field(default_factory=list)  # keepers' completed requests
    errors: list[str] = field(default_factory=list)  # 5xx answers and failed connections
    left: int = 0  # leaver requests that hung up before their answer
    finished_early: int = 0  # leaver requests answered before they could hang up
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: Any) -> None:
        with self.lock:
            for name, value in counts.items():
                if isinstance(value, list):
                    getattr(self, name).extend(value)
                else:
                    setattr(self, name, getattr(self, name) + value)


def keep(client: httpx.Client, url: str, body: dict[str, Any], tally: Tally) -> None:
    start = time.time()
    response = client.post(url, json=body)
    if response.status_code != 200:
        tally.add(errors=[f"{response.status_code}: {response.text[:200]}"])
    else:
        tally.add(latencies=[time.time() - start])


def leave(client: httpx.Client, url: str, body: dict[str, Any], tally: Tally, rng: random.Random) -> None:
    """Hang up mid-request: a stream after a few chunks, a plain request after a short wait."""
    if rng.random() < 0.5:
        chunks = rng.randint(1, 8)
        with client.stream("POST", url, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                tally.add(errors=[f"{response.status_code} on a stream"])
                return
            for number, _ in enumerate(response.iter_lines(), start=1):
                if number >= chunks:
                    tally.add(left=1)
                    return
        tally.add(finished_early=1)
        return
    try:
        response = client.post(url, json=body, timeout=httpx.Timeout(60, read=rng.uniform(0.3, 3.0)))
    except httpx.ReadTimeout:  # the hang-up we wanted: the connection is closed on the way out
        tally.add(left=1)
        return
    if response.status_code != 200:
        tally.add(errors=[f"{response.status_code}: {response.text[:200]}"])
    else:
        tally.add(finished_early=1)


def soak(server: LocalServer, model: str, args: argparse.Namespace) -> tuple[Tally, float]:
    """Run the clients; returns what they saw and the wall time."""
    prompts = load_prompts(args.requests)
    url = f"{server.url}/v1/chat/completions"
    tally = Tally()
    deadline = time.time() + args.time_limit

    def client_thread(number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(headers=server.headers, timeout=args.time_limit) as client:
            for index in range(number, args.requests, args.clients):  # every client sends its share
                if time.time() > deadline:
                    return
                try:
                    if number % 2 == 0:
                        keep(client, url, chat_body(model, prompts[index], args.max_tokens), tally)
                    else:
                        leave(client, url, chat_body(model, prompts[index], args.long_tokens), tally, rng)
                except httpx.HTTPError as err:
                    tally.add(errors=[f"{type(err).__name__}: {err}"])

    start = time.time()
    threads = [threading.Thread(target=client_thread, args=(n,), daemon=True) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, deadline - time.time() + 60))
    return tally, time.time() - start


def seconds_until_idle(server: LocalServer, limit: float = 60) -> float | None:
    """Seconds until the server has nothing queued or running; None if it still has after ``limit``."""
    start = time.time()
    while time.time() - start < limit:
        health = server.health()
        if health.get("running", 0) == 0 and health.get("queued", 0) == 0:
            return time.time() - start
        time.sleep(0.1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=DEFAULT_MODEL, help="Run directory, or a base model (default).")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=192, help="Requests in all (keepers and leavers).")
    parser.add_argument("--max-tokens", type=int, default=32, help="Answer length of the keepers.")
    parser.add_argument("--long-tokens", type=int, default=512, help="What the leavers ask for.")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=1200, help="Seconds of soak at most.")
    parser.add_argument("--startup-timeout", type=float, default=900)
    args = parser.parse_args()

    with LocalServer([args.run], options=["--max-batch-size", str(args.max_batch_size)]) as server:
        server.start(args.startup_timeout)
        rss_start = server.rss_mb()
        model = first_model(server)
        with httpx.Client(headers=server.headers, timeout=600) as client:
            keep(client, f"{server.url}/v1/chat/completions", chat_body(model, "Hello!", args.max_tokens), Tally())
        rss_warm = server.rss_mb()
        load_before = load_average()
        tally, wall = soak(server, model, args)
        idle_after = seconds_until_idle(server)
        rss_end = server.rss_mb()
        load_after = load_average()
        log = server.log_tail(10_000)
    server_errors = sum(1 for line in log.splitlines() if line.startswith("ERROR") or "Traceback" in line)
    done = len(tally.latencies) + len(tally.errors) + tally.left + tally.finished_early
    result = {
        "run": args.run, "model": model, "clients": args.clients, "requests": done, "wall_s": round(wall, 1),
        "max_tokens": args.max_tokens, "long_tokens": args.long_tokens, "max_batch_size": args.max_batch_size,
        "keepers_answered": len(tally.latencies),
        "latency_p50_s": round(statistics.median(tally.latencies), 2) if tally.latencies else None,
        "latency_p99_s": round(percentile(tally.latencies, 0.99), 2) if tally.latencies else None,
        "latency_max_s": round(max(tally.latencies), 2) if tally.latencies else None,
        "leavers_hung_up": tally.left, "leavers_answered_first": tally.finished_early,
        "errors": len(tally.errors), "error_samples": tally.errors[:5], "server_log_errors": server_errors,
        "idle_after_last_client_s": None if idle_after is None else round(idle_after, 2),
        "rss_start_mb": round(rss_start), "rss_after_warmup_mb": round(rss_warm), "rss_end_mb": round(rss_end),
        "rss_growth_mb": round(rss_end - rss_warm), "load_average_before": load_before,
        "load_average_after": load_after,
    }
    write_json(HERE / "results" / "serve-soak.json", result)
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    ok = (not tally.errors and server_errors == 0 and idle_after is not None and done == args.requests
          and rss_end - rss_warm < RSS_GROWTH_LIMIT_MB)
    print("PASS" if ok else "FAIL: a target was missed (no error, all requests done, nothing left running, "
          f"RSS growth < {RSS_GROWTH_LIMIT_MB} MB)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
