#!/usr/bin/env bash
# Every method on the identity job (examples/compare.yaml), for the README's method table.
# Steps, data order and seed are the same for all; learning rates follow each family's usual
# range. METHODS and OUT override the method list and the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1
ALL=lora,dora,rslora,pissa,loraplus,qlora,adalora,ia3,prefix,prompt,ptuning,ptuning_v2,houlsby,pfeiffer,parallel,adapter_fusion,mam,freeze,full
OUT=${OUT:-runs/compare}
tunelab compare examples/compare.yaml --out "$OUT" --methods "${METHODS:-$ALL}" \
  --set loraplus:method.loraplus_lr_ratio=16 --set loraplus:train.lr=5e-4 \
  --set adalora:method.init_r=12 --set adalora:method.target_r=8 --set adalora:method.tinit=2 \
  --set adalora:method.tfinal=4 --set adalora:method.deltaT=2 --set adalora:train.lr=2e-2 \
  --set ia3:train.lr=2e-2 \
  --set prefix:method.prefix_projection=true --set prefix:train.lr=3e-3 \
  --set prompt:train.lr=3e-2 --set prompt:method.prompt_init_text="You are Tuna, an assistant trained with tunelab." \
  --set ptuning:train.lr=1e-2 --set ptuning_v2:train.lr=3e-3 \
  --set ptuning_v2:method.prompt_init_text="You are Tuna, an assistant trained with tunelab." \
  --set mam:method.prompt_init_text="You are Tuna, an assistant trained with tunelab." \
  --set adapter_fusion:method.fusion_adapters=[runs/compare/houlsby,runs/compare/pfeiffer] \
  --set adapter_fusion:train.lr=5e-5 --set mam:train.lr=3e-3 \
  --set freeze:train.lr=2e-4 --set full:train.lr=5e-5
