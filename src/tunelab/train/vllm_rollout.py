"""GRPO rollouts sampled by vLLM (``grpo.rollout_backend``), on a GPU where vLLM is installed.

Why: sampling dominates a GRPO step (G completions per prompt, token by token), and vLLM's
paged KV cache and continuous batching sample many times faster than ``generate`` on a GPU.
Deliberately thin, as the server's vLLM backend: one ``vllm.LLM`` over the frozen base with
LoRA enabled, and each step the policy's current adapter is written to a scratch directory
and passed as a new ``LoRARequest`` (a new id, so vLLM loads the new weights). Prompts go in
as token ids, so they match training exactly, and the sampled ids come back through
:func:`rollout_from_samples`, the same layout as the transformers path; log-probs are then
computed by the policy itself, as on that path. Only plain LoRA (``lora``, ``loraplus``) on an
unquantised base in one process qualifies: vLLM applies exactly that adapter to exactly that
base. Not exercised on a GPU by the test suite (none there); the plumbing is tested with a
stand-in ``vllm``.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from tunelab.config import RunConfig
from tunelab.data.records import PromptExample
from tunelab.errors import ConfigError
from tunelab.methods.base import Method
from tunelab.models.loader import model_directory
from tunelab.models.vllm_support import require_vllm, vllm_lora_rank, vllm_usable
from tunelab.train.rollout import Rollout, rollout_from_samples

#: Method types whose saved adapter vLLM applies as trained (DoRA, rsLoRA, PiSSA and 4-bit bases are not).
VLLM_METHODS = ("lora", "loraplus")
_FALLBACK = "set grpo.rollout_backend: transformers"


def rollout_backend(cfg: RunConfig, world_size: int) -> str:
    """``grpo.rollout_backend`` resolved: ``auto`` takes vLLM when it can serve this run, else transformers.

    An explicit ``vllm`` that cannot work is refused here, before anything is loaded.
    """
    setting = cfg.grpo.rollout_backend
    reason = None
    if cfg.method.type not in VLLM_METHODS:
        reason = f"method.type={cfg.method.type} (vLLM applies plain LoRA adapters only: {', '.join(VLLM_METHODS)})"
    elif cfg.model.quantization != "none":
        reason = f"model.quantization={cfg.model.quantization} (vLLM samples from the unquantised base)"
    elif world_size > 1:
        reason = f"{world_size} processes (vLLM rollouts run in a single process)"
    if setting == "auto":
        return "vllm" if reason is None and vllm_usable() else "transformers"
    if setting == "vllm":
        if reason is not None:
            raise ConfigError(f"grpo.rollout_backend=vllm cannot sample this run: {reason}. Set "
                              "grpo.rollout_backend: transformers (or auto).")
        require_vllm("grpo.rollout_backend=vllm", _FALLBACK)
    return setting


class VllmSampler:
    """Samples completions with vLLM from the policy's current LoRA weights."""

    def __init__(self, cfg: RunConfig, method: Method):
        from vllm import LLM

        self.llm = LLM(model=str(model_directory(cfg.model)), dtype=cfg.model.dtype, enable_lora=True, max_loras=1,
                       max_lora_rank=vllm_lora_rank(cfg.method.r, _FALLBACK), seed=cfg.train.seed,
                       gpu_memory_utilization=cfg.grpo.vllm_gpu_memory_utilization,
                       trust_remote_code=cfg.model.trust_remote_code)
        self.method = method
        self.scratch = Path(tempfile.mkdtemp(prefix="tunelab-vllm-"))
        weakref.finalize(self, shutil.rmtree, self.scratch, True)  # the adapters handed over die with the run
        self.version = 0

    def _publish(self, policy: nn.Module) -> Any:
        """Write the policy's adapter as a new version and return the request that names it."""
        from vllm.lora.request import LoRARequest

        self.version += 1
        adapter = self.method.save(policy, self.scratch / f"v{self.version}")
        shutil.rmtree(self.scratch / f"v{self.version - 1}", ignore_errors=True)  # vLLM has read it
        return LoRARequest(f"policy-v{self.version}", self.version, str(adapter))

    @torch.no_grad()
    def sample(self, policy: nn.Module, examples: list[PromptExample], tokenizer, config: GenerationConfig,
               device: torch.device) -> Rollout:
        """One completion per example, as :func:`tunelab.train.rollout.sample_rollout` returns them."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=config.temperature, top_p=config.top_p,
                                top_k=config.top_k or -1, max_tokens=config.max_new_tokens,
                                stop_token_ids=list(config.eos_token_id))
        outputs = self.llm.generate([{"prompt_token_ids": e.prompt_ids} for e in examples], params,
                                    lora_request=self._publish(policy), use_tqdm=False)
        generated = [list(output.outputs[0].token_ids) for output in outputs]
        return rollout_from_samples(examples, generated, tokenizer, config, device)
