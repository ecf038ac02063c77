"""OpenAI-compatible serving of trained runs: one base model, every run's adapter on it.

Modules: :mod:`catalog` (which model ids, decided from the run directories),
:mod:`engine` (the queue and the single worker thread that schedules it), :mod:`batching`
and :mod:`sampling` (continuous batching over a KV cache), :mod:`hf_backend` and
:mod:`vllm_backend` (what generates), :mod:`limits` (request size, answer length, API-key
warnings), :mod:`schemas` and :mod:`app` (the HTTP layer), :mod:`local` (the server as a
child process, for benchmarks and checks). The process's C heap is set up by
:mod:`tunelab.heap`.
"""

from __future__ import annotations

import importlib.util

from tunelab.errors import TunelabError

_SERVER_PACKAGES = ("fastapi", "uvicorn")


def serve_main(runs: list[str], host: str, port: int, api_key: str | None, backend: str,
               max_batch_size: int, max_tokens: int, max_body_bytes: int) -> None:
    """Entry point of ``tunelab serve``: load ``runs`` and their base, serve until SIGINT/SIGTERM.

    ``api_key`` None falls back to the ``TUNELAB_API_KEY`` environment variable.
    """
    missing = [name for name in _SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise TunelabError(f"tunelab serve needs {' and '.join(missing)}, which is not installed. Install the server "
                           "extras with: pip install 'tunelab[serve]'")
    from tunelab.serve.app import serve_main as run_server
    from tunelab.serve.limits import ServeLimits

    limits = ServeLimits(max_tokens=max_tokens, max_body_bytes=max_body_bytes)  # checked before any model loads
    run_server(runs, host, port, api_key, backend, max_batch_size, limits)
