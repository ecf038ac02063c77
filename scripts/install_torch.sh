#!/usr/bin/env bash
# Install torch VERSION into the active environment -- the CUDA build where an NVIDIA GPU is
# present, else the CPU build -- and say which was chosen and which build is installed.
#
# Why this way: on Linux, PyPI's torch wheel is the CUDA build (with ~3 GB of nvidia-* wheels);
# the CPU build lives on PyTorch's own index. So without a GPU, torch comes from that index, but
# only when it answers: machines that reach nothing but a package mirror (our CI, where
# `pip install torch==VERSION` already resolves to a CPU wheel on local disk) must keep working,
# so there plain pip decides and the report below says what it brought. Checking the installed
# build afterwards (rather than trusting the choice) is what makes the message true either way.
# macOS and Windows wheels on PyPI have no CUDA, so plain pip is right there.
#
# Usage: scripts/install_torch.sh VERSION [CPU_INDEX_URL]   (setup.sh calls it; idempotent)
set -euo pipefail
version=$1
cpu_index=${2:-https://download.pytorch.org/whl/cpu}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
reachable() {  # an HTTP answer from the index within 5 s (no answer: no network, a proxy, a mirror-only machine)
  python - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5)
except Exception:
    sys.exit(1)
PY
}

installed=$(python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ "${installed%%+*}" = "$version" ]; then
  echo "setup: torch $installed is already installed"
elif has_gpu; then
  echo "setup: NVIDIA GPU found: installing torch $version with CUDA (PyPI's build)"
  pip install -q --disable-pip-version-check "torch==$version"
elif [ "$(uname -s)" != Linux ]; then
  echo "setup: no NVIDIA GPU: installing torch $version (PyPI's $(uname -s) build has no CUDA)"
  pip install -q --disable-pip-version-check "torch==$version"
elif reachable "$cpu_index/torch/"; then
  echo "setup: no NVIDIA GPU: installing the CPU build of torch $version from $cpu_index"
  pip install -q --disable-pip-version-check --index-url "$cpu_index" "torch==$version"
else
  echo "setup: no NVIDIA GPU, and $cpu_index does not answer: installing torch $version from the configured index"
  pip install -q --disable-pip-version-check "torch==$version"
fi

python - "$cpu_index" "$version" <<'PY'
import shutil, subprocess, sys

import torch

cuda = torch.version.cuda
print(f"setup: torch {torch.__version__} is the {'CUDA ' + cuda if cuda else 'CPU'} build")
if cuda and not (shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0):
    print(f"setup: note: no NVIDIA GPU here, so the CUDA build only takes space (several GB). The CPU build: "
          f"pip install --force-reinstall --index-url {sys.argv[1]} torch=={sys.argv[2]}")
PY
