"""Merge a trained method into its base: the model every merged export (safetensors, GGUF) writes.

The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` on a machine without
tunelab, and carries the tokenizer with the chat template the run was trained with.

The merge itself runs in fp32 on the CPU (the merged weights are rounded once, at the end,
to the export dtype). For a QLoRA run it is computed on the *dequantized* 4-bit base,
W = dequant(NF4(W0)) + s*B*A: the function the 4-bit model computed during training and
chat, not W0 + s*B*A on the original float base, since the adapter learned to correct
the quantized weights (measured in the README, "QLoRA export").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.export.chat_template import exported_chat_template
from tunelab.export.precision import DtypeChoice
from tunelab.inference import LoadedRun, load_run
from tunelab.io import atomic_dir
from tunelab.runs import RunDir


@dataclass
class MergedRun:
    """A run with its method folded into plain weights, and what it was loaded with."""

    model: Any  # transformers.PreTrainedModel, fp32, on the CPU
    loaded: LoadedRun

    @property
    def from_4bit(self) -> bool:
        return self.loaded.cfg.model.quantization == "4bit"

    def tokenizer_for_export(self) -> Any:
        """The run's tokenizer, carrying the chat template the run was trained with."""
        tokenizer = self.loaded.tokenizer
        tokenizer.chat_template = exported_chat_template(self.loaded.template)
        return tokenizer


def require_run(run_dir: str | Path) -> RunDir:
    run = RunDir(run_dir)
    if not run.is_run():
        raise TunelabError(f"{run_dir} is not a tunelab run directory (no config.yaml). Pass the output_dir of "
                           "a finished `tunelab train` run.")
    return run


def merge_run(run_dir: str | Path) -> MergedRun:
    """Load ``run_dir`` (base + method) on the CPU and merge the method into the base weights."""
    require_run(run_dir)
    loaded = load_run(run_dir, device=torch.device("cpu"))
    assert loaded.method is not None
    merged = loaded.method.merge(loaded.model)
    if getattr(merged, "hf_quantizer", None) is not None:  # quantized bases are merged into float weights
        merged.hf_quantizer = None
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
    return MergedRun(merged.float(), loaded)


def save_merged(merged: MergedRun, out_dir: str | Path, dtype: DtypeChoice) -> Path:
    """Write the merged model in ``dtype`` (safetensors) with its tokenizer to ``out_dir``, atomically."""
    model = merged.model.to(dtype.dtype)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        merged.tokenizer_for_export().save_pretrained(tmp)
    return Path(out_dir)
