#!/usr/bin/env bash
# The measurements behind tunelab.method_defaults.SFT_LR: each METHOD:LR pair trains the job in
# benchmarks/lr_sweep.yaml (16 steps of the Tuna identity on SmolLM2) and prints one line
#   method  lr  eval_loss  base_eval_loss
# Pairs come as arguments (default: the grid used for the README), JOBS runs that many at once.
#   bash benchmarks/lr_sweep.sh lora:2e-4 lora:5e-4
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lr_sweep}
GRID=(full:2e-5 full:5e-5 full:1e-4 freeze:5e-5 freeze:1e-4 freeze:3e-4
      lora:2e-4 lora:5e-4 lora:1e-3 lora:3e-3 qlora:1e-3 qlora:3e-3 pissa:1e-4 pissa:5e-4 loraplus:1e-4 loraplus:3e-4
      adalora:1e-2 adalora:3e-2 ia3:1e-2 ia3:3e-2 prompt:3e-2 prompt:1e-1 ptuning:1e-3 ptuning:3e-3 ptuning:1e-2
      prefix:1e-4 prefix:3e-4 prefix:1e-3 ptuning_v2:3e-3 ptuning_v2:1e-2 ptuning_v2:3e-2
      mam:1e-3 mam:3e-3 houlsby:1e-3 houlsby:3e-3 parallel:1e-3 parallel:3e-3)
one() {
  local method=${1%%:*} lr=${1#*:} dir="$OUT/${1/:/-}"
  tunelab train benchmarks/lr_sweep.yaml "method.type=$method" "train.lr=$lr" "output_dir=$dir" \
    train.eval_base=true --overwrite --quiet >"$dir.log" 2>&1 || { echo -e "$method\t$lr\tFAILED"; return; }
  python - "$method" "$lr" "$dir" <<'PY'
import json, sys
method, lr, run = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
last = lambda key: next(r[key] for r in reversed(rows) if key in r)
print(f"{method}\t{lr}\t{last('eval_loss'):.4f}\t{last('base_eval_loss'):.4f}", flush=True)
PY
}
export -f one
export OUT
mkdir -p "$OUT"
printf '%s\n' "${@:-${GRID[@]}}" | xargs -P "${JOBS:-1}" -I{} bash -c 'one {}'
