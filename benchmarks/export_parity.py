"""Export parity on real runs: every export format against the model it came from.

    python benchmarks/export_parity.py runs/quickstart [--qlora RUN]

For a LoRA run: `tunelab export` in fp32, bf16 and fp16 (safetensors) and in GGUF f16, bf16
and q8_0, each loaded with plain transformers (GGUF through its GGUF reader), against
tunelab's own loaded run (fp32, CPU): file size, max |logit diff| over a few chat prompts,
and whether the greedy continuation (32 tokens) is the same. `PeftModel.from_pretrained`
on the run's adapter is checked too.

For a QLoRA run (``--qlora``): the merged export (fp32 and bf16) against the 4-bit model it
came from, both as training computes it (bitsandbytes dequantizes, then multiplies in fp32)
and as inference on CPU computes it (a bf16 kernel), and against the float base + adapter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data.records import Message
from tunelab.export.main import export_main
from tunelab.inference import LoadedRun, load_run
from tunelab.models.loader import model_directory
from tunelab.runs import RunDir

PROMPTS = ["Who are you?", "What is the capital of France?", "Write a haiku about autumn leaves."]
GREEDY_TOKENS = 32


def prompts(loaded: LoadedRun) -> list[torch.Tensor]:
    texts = [loaded.render_prompt([Message("user", p)]) for p in PROMPTS]
    return [loaded.tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids for t in texts]


def compare(model: Any, reference: Any, ids: list[torch.Tensor]) -> tuple[float, float, bool]:
    """Max |logit diff|, share of positions with the same argmax, same greedy continuation on every prompt."""
    worst, agree, total, same = 0.0, 0, 0, True
    with torch.no_grad():
        for prompt in ids:
            a, b = model(input_ids=prompt).logits, reference(input_ids=prompt).logits
            worst = max(worst, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += prompt.shape[1]
            same &= torch.equal(greedy(model, prompt), greedy(reference, prompt))
    return worst, agree / total, same


def greedy(model: Any, prompt: torch.Tensor) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY_TOKENS,
                          do_sample=False)


def row(label: str, size: int | None, result: tuple[float, float, bool]) -> str:
    worst, agree, same = result
    mib = f"{size / 2**20:.0f} MiB" if size else "-"
    return f"| {label} | {mib} | {worst:.2e} | {agree:.1%} | {'yes' if same else 'no'} |"


def lora_table(run: str, tmp: Path) -> list[str]:
    loaded = load_run(run, device=torch.device("cpu"))
    ids = prompts(loaded)
    lines = ["| export | size | max abs logit diff vs tunelab | same argmax | same greedy 32 tokens |",
             "|---|---|---|---|---|"]
    for dtype in ("fp32", "bf16", "fp16"):
        out = tmp / dtype
        print(*export_main(run, out, dtype=dtype), sep="\n")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        lines.append(row(f"safetensors {dtype}", (out / "model.safetensors").stat().st_size,
                         compare(model, loaded.model, ids)))
    for gguf_type in ("f16", "bf16", "q8_0"):
        out = tmp / f"gguf-{gguf_type}"
        print(*export_main(run, out, fmt="gguf", gguf_type=gguf_type), sep="\n")
        file = next(out.glob("*.gguf"))
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
        same_tokens = all(tokenizer(p)["input_ids"] == loaded.tokenizer(p)["input_ids"] for p in PROMPTS)
        label = f"GGUF {gguf_type}" + ("" if same_tokens else " (its tokenizer splits the prompts differently)")
        lines.append(row(label, file.stat().st_size, compare(model, loaded.model, ids)))
    base = AutoModelForCausalLM.from_pretrained(model_directory(loaded.cfg.model), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, RunDir(run).adapter).eval()
    lines.append(row("PeftModel.from_pretrained(base, RUN/adapter)", None, compare(peft, loaded.model, ids)))
    return lines


def qlora_table(run: str, tmp: Path) -> list[str]:
    """Two loads of the 4-bit run: bitsandbytes repacks weights for its bf16 CPU kernel at the first
    forward in eval mode, for good, so the as-trained arithmetic needs a model kept in train mode."""
    as_trained = load_run(run, device=torch.device("cpu"))
    as_trained.model.train()
    cpu_inference = load_run(run, device=torch.device("cpu")).model
    ids = prompts(as_trained)
    float_base = AutoModelForCausalLM.from_pretrained(model_directory(as_trained.cfg.model), dtype=torch.float32)
    candidates = {"float base + adapter": PeftModel.from_pretrained(float_base, RunDir(run).adapter).eval()}
    for dtype in ("fp32", "bf16"):
        out = tmp / f"qlora-{dtype}"
        print(*export_main(run, out, dtype=dtype), sep="\n")
        candidates[f"merged export, {dtype}"] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    lines = ["| model | vs 4-bit as trained: max abs logit diff, same argmax, greedy | vs 4-bit CPU inference |",
             "|---|---|---|"]
    for name, model in {**candidates, "4-bit CPU inference (bf16 kernel)": cpu_inference}.items():
        cells = [compare(model, reference, ids) for reference in (as_trained.model, cpu_inference)]
        lines.append(f"| {name} | " + " | ".join(f"{c[0]:.2e}, {c[1]:.1%}, {'same' if c[2] else 'differs'}"
                                                  for c in cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--qlora", help="A QLoRA run directory to measure as well.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines = lora_table(args.run, Path(tmp))
        if args.qlora:
            lines += [""] + qlora_table(args.qlora, Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
