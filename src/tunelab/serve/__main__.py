"""``python -m tunelab.serve RUN [RUN ...]``: the server without the tunelab CLI (same options)."""

from __future__ import annotations

import argparse
import sys

from tunelab.errors import TunelabError
from tunelab.serve import serve_main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunelab.serve", description=__doc__)
    parser.add_argument("runs", nargs="+", help="Run directories trained on one base model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="Bearer key clients must send (default: $TUNELAB_API_KEY).")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--max-batch-size", type=int, default=8, help="Sequences generated together.")
    args = parser.parse_args(argv)
    try:
        serve_main(args.runs, args.host, args.port, args.api_key, args.backend, args.max_batch_size)
    except TunelabError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
