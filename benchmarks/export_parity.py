"""Export parity on a real run: merged model (plain transformers) vs tunelab's adapter model.

    python benchmarks/export_parity.py runs/quickstart

Exports RUN to a temporary directory with `tunelab export`, loads it with plain
`AutoModelForCausalLM.from_pretrained`, loads the adapter with plain
`PeftModel.from_pretrained` on the same base, and prints the largest absolute logit
difference of each against tunelab's own loaded run (fp32, CPU) over a few prompts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunelab.data.records import Message
from tunelab.export.merge import export_run
from tunelab.inference import load_run
from tunelab.models.loader import materialize, resolve_source
from tunelab.runs import RunDir

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a haiku about autumn leaves."]


def main(run: str) -> int:
    loaded = load_run(run, device=torch.device("cpu"))
    cfg = loaded.cfg
    texts = [loaded.render_prompt([Message("user", p)]) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = export_run(run, Path(tmp) / "merged")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        base_dir = materialize(resolve_source(cfg.model.name_or_path, cfg.model.gguf_file))
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, RunDir(run).adapter).eval()
        worst_merged = worst_peft = 0.0
        with torch.no_grad():
            for text in texts:
                ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
                ours = loaded.model(input_ids=ids).logits
                worst_merged = max(worst_merged, float((merged(input_ids=ids).logits - ours).abs().max()))
                worst_peft = max(worst_peft, float((peft(input_ids=ids).logits - ours).abs().max()))
    print(f"max |logit diff| merged (plain transformers) vs tunelab: {worst_merged:.2e}")
    print(f"max |logit diff| PeftModel.from_pretrained vs tunelab:   {worst_peft:.2e}")
    return 0 if worst_merged < 1e-4 and worst_peft < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
