"""The vLLM backend (``--backend vllm``): the same API and queue, generation by vLLM.

Deliberately thin: one ``vllm.LLM`` over the base model with ``enable_lora=True`` and one
``LoRARequest`` per run. Prompts are still rendered and tokenized by tunelab (each run's own
tokenizer and template) and passed to vLLM as token ids, so prompts match training exactly.
Only PEFT LoRA-family adapters on an unquantised base are supported (vLLM's multi-LoRA);
streaming delivers the whole answer as one piece, since the offline ``LLM`` API returns
finished outputs. Needs CUDA and the ``vllm`` package; it is not exercised by the test
suite (no GPU there).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

from tunelab.data.templates import get_template
from tunelab.errors import ConfigError
from tunelab.inference import Completion, GenerationRow, LoadedRun, stop_token_ids, wrap_run
from tunelab.methods.base import get_method
from tunelab.methods.peft_common import ADAPTER_CONFIG_FILE
from tunelab.models.loader import load_tokenizer, model_directory
from tunelab.models.vllm_support import require_vllm, vllm_lora_rank
from tunelab.serve.catalog import ServePlan
from tunelab.serve.engine import ServedModel

#: What to do instead, in every refusal of this backend.
_FALLBACK = "serve with --backend transformers"


def _check_plan(plan: ServePlan) -> list[dict[str, Any]]:
    """The adapter configs, after refusing what vLLM cannot serve."""
    if plan.base.quantization != "none":
        raise ConfigError(f"--backend vllm serves an unquantised base, but the runs load it with "
                          f"model.quantization={plan.base.quantization}. Serve them with --backend transformers.")
    if plan.separate:
        names = ", ".join(run.id for run in plan.separate)
        raise ConfigError(f"--backend vllm serves LoRA adapters only; {names} are not (full, freeze, bottleneck or "
                          "another PEFT type). Serve them with --backend transformers.")
    configs = [json.loads((run.adapter / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8")) for run in plan.shared]
    for run, config in zip(plan.shared, configs):
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            raise ConfigError(f"--backend vllm serves plain LoRA adapters; '{run.id}' is a {config.get('peft_type')}"
                              f"{' (DoRA)' if config.get('use_dora') else ''} adapter. Serve it with --backend "
                              "transformers.")
    return configs


def _max_rank(configs: list[dict[str, Any]]) -> int:
    need = max((max([c.get("r", 8), *c.get("rank_pattern", {}).values()]) for c in configs), default=8)
    return vllm_lora_rank(need, _FALLBACK)


class VllmBackend:
    """Generates with ``vllm.LLM.generate`` and a ``LoRARequest`` per model id (None for the base)."""

    def __init__(self, llm: Any, models: dict[str, ServedModel], lora: dict[str, Any]):
        self.llm = llm
        self.models = models
        self.lora = lora

    @classmethod
    def load(cls, plan: ServePlan, max_batch_size: int) -> "VllmBackend":
        require_vllm("--backend vllm", _FALLBACK)
        configs = _check_plan(plan)
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        base_dir = str(model_directory(plan.base))  # the snapshot at model.revision for a hub id
        llm = LLM(model=base_dir, dtype=plan.base.dtype, enable_lora=bool(configs), max_loras=max(1, len(configs)),
                  max_lora_rank=_max_rank(configs), max_num_seqs=max_batch_size,
                  trust_remote_code=plan.base.trust_remote_code)
        context = getattr(AutoConfig.from_pretrained(base_dir), "max_position_embeddings", None)
        models: dict[str, ServedModel] = {}
        lora: dict[str, Any] = {}
        # vLLM owns the weights: these LoadedRuns carry only each run's tokenizer, template and config.
        for number, run in enumerate(plan.shared, start=1):
            loaded = wrap_run(None, run.path, run.cfg, get_method(run.cfg.method))  # type: ignore[arg-type]
            models[run.id] = ServedModel(run.id, loaded, str(run.path), plan.base_id, context, nullcontext)
            lora[run.id] = LoRARequest(run.id, number, str(run.adapter))
        base_cfg = plan.base_config()
        tokenizer = load_tokenizer(plan.base)
        base = LoadedRun(None, tokenizer, get_template(base_cfg.data.template, tokenizer),  # type: ignore[arg-type]
                         base_cfg, None, plan.base.name_or_path)
        models[plan.base_id] = ServedModel(plan.base_id, base, plan.base.name_or_path, None, context, nullcontext)
        lora[plan.base_id] = None
        return cls(llm, models, lora)

    def run(self, model: ServedModel, rows: list[GenerationRow]) -> list[Completion]:
        from vllm import SamplingParams

        stops = stop_token_ids(model.run)
        params = [SamplingParams(n=1, temperature=row.options.temperature, top_p=row.options.top_p,
                                 max_tokens=row.options.max_new_tokens, stop=row.options.stop or None,
                                 stop_token_ids=stops, seed=row.options.seed) for row in rows]
        prompts = [{"prompt_token_ids": row.prompt_ids} for row in rows]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora[model.id], use_tqdm=False)
        completions = []
        for row, output in zip(rows, outputs):
            answer = output.outputs[0]
            if row.on_text is not None and answer.text:
                row.on_text(answer.text)
            reason = "length" if answer.finish_reason == "length" else "stop"
            completions.append(Completion(answer.text, reason, len(row.prompt_ids), len(answer.token_ids)))
        return completions

