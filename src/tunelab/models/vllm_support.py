"""What every use of vLLM needs first: the package, a CUDA GPU, and a LoRA rank it accepts.

Shared by the server's vLLM backend and GRPO's vLLM rollouts, so both refuse the same
situations with the same advice. vLLM is an optional dependency and never imported here.
"""

from __future__ import annotations

import importlib.util

import torch

from tunelab.errors import ConfigError, TunelabError

#: LoRA ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def cuda_visible() -> bool:
    return torch.cuda.is_available()


def vllm_usable() -> bool:
    """True when vLLM is installed and a CUDA GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and cuda_visible()


def require_vllm(setting: str, fallback: str) -> None:
    """Raise unless vLLM can run here; ``setting`` is what asked for it, ``fallback`` the way out."""
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError(f"{setting} needs the vllm package, which is not installed. Install it on a CUDA machine "
                           f"(pip install vllm), or {fallback}.")
    if not cuda_visible():
        raise TunelabError(f"{setting} needs a CUDA GPU and none is visible; {fallback}.")


def vllm_lora_rank(need: int, fallback: str) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``need``."""
    fits = [rank for rank in VLLM_LORA_RANKS if rank >= need]
    if not fits:
        raise ConfigError(f"an adapter has rank {need}, more than vLLM supports ({VLLM_LORA_RANKS[-1]}); {fallback}.")
    return fits[0]
