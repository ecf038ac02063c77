#!/usr/bin/env bash
# Set up, fine-tune SmolLM2-135M-Instruct with LoRA on the identity data, and ask it who it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
echo "== before training:"
tunelab chat smollm2-135m-instruct --prompt "Who are you?" --max-new-tokens 48
start=$(date +%s)
tunelab train examples/quickstart.yaml --overwrite
echo "== training took $(( $(date +%s) - start ))s"
echo "== after training:"
tunelab chat runs/quickstart --prompt "Who are you?" --max-new-tokens 48
