"""``--adapter-only``: the trained adapter kept apart, as a standard PEFT directory.

What users want it for: loading the adapter on a base of their choosing (the original float
base of a QLoRA run, a differently quantized copy), serving many adapters on one base, or
publishing a few megabytes instead of a whole model. The directory holds PEFT's files as
training wrote them, the run's tokenizer with the chat template it was trained with, and an
``adapter_config.json`` whose ``base_model_name_or_path`` names the base portably (the hub id,
not a path inside this machine's cache), so ``AutoPeftModelForCausalLM.from_pretrained(DIR)``
works elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunelab.config import RunConfig
from tunelab.data.templates import get_template
from tunelab.errors import ConfigError
from tunelab.export.chat_template import exported_chat_template
from tunelab.export.merge import require_run
from tunelab.io import atomic_dir, write_json
from tunelab.methods.base import get_method
from tunelab.methods.peft_common import ADAPTER_CONFIG_FILE, PeftMethod, require_adapter
from tunelab.models.hub import is_hub_id
from tunelab.models.loader import with_granted_remote_code


def export_adapter(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy ``run_dir``'s PEFT adapter and tokenizer to ``out_dir`` (atomically) with a portable base name."""
    run = require_run(run_dir)
    cfg = run.read_config()
    if not isinstance(get_method(cfg.method), PeftMethod):
        raise ConfigError(f"--adapter-only: {run_dir} was trained with method '{cfg.method.type}', which keeps no PEFT "
                          "adapter (full and freeze runs hold whole weights; bottleneck adapters are tunelab's own "
                          "format). Export the merged model instead (leave out --adapter-only).")
    source = require_adapter(run_dir, "--adapter-only")
    with atomic_dir(out_dir) as tmp:
        for file in source.iterdir():
            if file.is_file():
                shutil.copy2(file, tmp / file.name)
        _name_base(tmp / ADAPTER_CONFIG_FILE, cfg)
        _tokenizer(run.tokenizer, cfg).save_pretrained(tmp)
    return Path(out_dir)


def _name_base(config_file: Path, cfg: RunConfig) -> None:
    """Point the adapter at the hub id (and revision) it was trained on, when the base came from the hub."""
    if not is_hub_id(cfg.model.name_or_path):
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = cfg.model.name_or_path
    config["revision"] = cfg.model.revision
    write_json(config_file, config)


def _tokenizer(directory: Path, cfg: RunConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory,
                                              trust_remote_code=with_granted_remote_code(cfg.model).trust_remote_code)
    tokenizer.chat_template = exported_chat_template(get_template(cfg.data.template, tokenizer, system=cfg.data.system))
    return tokenizer
