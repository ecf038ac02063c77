"""Merge a trained method into its base and write a plain transformers directory.

The result loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` on a machine without
tunelab, and carries the tokenizer with its chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.inference import is_run_dir, load_run
from tunelab.io import atomic_dir


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge ``run_dir``'s method into the base weights and save the merged model to ``out_dir``."""
    if not is_run_dir(run_dir):
        raise TunelabError(f"{run_dir} is not a tunelab run directory (no config.yaml). Pass the output_dir of "
                           "a finished `tunelab train` run.")
    loaded = load_run(run_dir, device=torch.device("cpu"))
    assert loaded.method is not None
    merged = loaded.method.merge(loaded.model)
    if getattr(merged, "hf_quantizer", None) is not None:  # quantized bases are merged into float weights
        merged.hf_quantizer = None
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out_dir)
