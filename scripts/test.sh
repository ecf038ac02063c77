#!/usr/bin/env bash
# Set up and run the test suite (tiny models; a few end-to-end tests on the real SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests (tests/test_webui_browser.py) drive Debian's chromium through playwright, never a
# downloaded browser: install it when missing (root only, about 30 s); without it they skip and say why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium is not installed and this is not root: the browser tests will be skipped" >&2
  fi
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest tests "$@"
