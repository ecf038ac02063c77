#!/usr/bin/env bash
# Every method with its defaults on a job new to the defaults (benchmarks/compare_defaults.yaml),
# for the README's method table: no per-method setting, train.lr left at auto. adapter_fusion is
# given the one input it cannot default, the adapters it fuses (this run's houlsby and pfeiffer).
# Prints the wall time and the load average before and after. METHODS and OUT override the
# method list and the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ALL=lora,dora,rslora,pissa,loraplus,qlora,adalora,ia3,prefix,prompt,ptuning,ptuning_v2,houlsby,pfeiffer,parallel,adapter_fusion,mam,freeze,full
OUT=${OUT:-runs/compare_defaults}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
tunelab compare benchmarks/compare_defaults.yaml --out "$OUT" --methods "${METHODS:-$ALL}" \
  --set "adapter_fusion:method.fusion_adapters=[$OUT/houlsby,$OUT/pfeiffer]"
echo "wall time: $(( $(date +%s) - start )) s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
