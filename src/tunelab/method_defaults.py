"""The learning rate a run gets when ``train.lr`` is ``auto`` (the default): one place, per
method family and stage.

Why per family: the methods change the model through very different parameters, and one
Adam step moves each of them by about the learning rate, whatever its gradient's size.
Full and freeze fine-tuning move the base weights themselves (entries of order 1e-2), so a
rate of 1e-4 already shifts every weight by ~1% per step; LoRA's update is a product of two
small matrices and needs more; virtual tokens and IA3's scaling vectors are a few thousand
numbers that must move far for the model to notice. One rate for all (the old 2e-4) either
wrecks full fine-tuning or leaves prompt learning and AdaLoRA where they started. The table
below was measured (``benchmarks/lr_sweep.sh``, README "Methods"): for each family, the
rate with the lowest held-out loss after a short SFT run on SmolLM2, among rates that stay
below the base model's loss at every tried length, rounded down to the safe side.

Stages: the batch stages (pt, sft, rm, dpo, kto) use the SFT table; the RL stages (ppo,
grpo) use :data:`RL_LR`, because RL moves the policy on one sparse, noisy reward per answer
(PPO, LoRA r8, 40 steps: the reward fell at 5e-5 and rose at 5e-4) while methods that train
the base weights take a far smaller step. A new stage-aware rule goes in :func:`default_lr`.
"""

from __future__ import annotations

from tunelab.errors import ConfigError

#: Method type -> the family whose learning rate it shares. tests/test_method_defaults.py
#: insists that every registered type is listed, so a new method gets a measured rate, not a
#: guess. (This module sits beside config.py, which resolves ``auto`` through it: it reads no
#: registry and imports no method.)
LR_FAMILY: dict[str, str] = {
    "full": "base_weights", "freeze": "base_weights",
    "lora": "low_rank", "dora": "low_rank", "rslora": "low_rank", "qlora": "low_rank",
    "pissa": "principal", "loraplus": "loraplus",
    "adalora": "adalora",
    "ia3": "scaling",
    "prompt": "prompt_embeddings", "ptuning": "prompt_encoder",
    "prefix": "prefix_encoder", "ptuning_v2": "prefix_table", "mam": "bottleneck_prefix",
    "houlsby": "bottleneck", "pfeiffer": "bottleneck", "parallel": "bottleneck",
    "adapter_fusion": "fusion",
}

#: Peak learning rate of each family in the batch stages (measured: module docstring).
SFT_LR: dict[str, float] = {
    "base_weights": 5e-5,
    "low_rank": 5e-4,
    "principal": 2e-4,
    "loraplus": 2e-4,
    "adalora": 1e-2,
    "scaling": 1e-2,
    "prompt_embeddings": 3e-2,
    "prompt_encoder": 1e-3,
    "prefix_encoder": 1e-4,
    "prefix_table": 3e-3,
    "bottleneck_prefix": 2e-3,
    "bottleneck": 1e-3,
    "fusion": 1e-4,
}

#: Stages whose learning rate follows :data:`RL_LR` rather than the SFT table.
RL_STAGES: tuple[str, ...] = ("ppo", "grpo")
#: RL learning rate of methods that train adapters, prompts or bottlenecks, and of those
#: that train the base weights (full, freeze).
RL_LR: dict[str, float] = {"adapter": 5e-4, "base_weights": 1e-5}


def lr_family(method_type: str) -> str:
    """The family of ``method_type`` in :data:`LR_FAMILY`."""
    if method_type not in LR_FAMILY:
        raise ConfigError(f"train.lr is auto, but method.type '{method_type}' has no learning-rate family in "
                          "tunelab.method_defaults.LR_FAMILY. Set train.lr to a number for this method.")
    return LR_FAMILY[method_type]


def default_lr(method_type: str, stage: str) -> float:
    """The peak learning rate of ``train.lr: auto`` for this method type in this stage."""
    family = lr_family(method_type)
    if stage in RL_STAGES:
        return RL_LR["base_weights" if family == "base_weights" else "adapter"]
    return SFT_LR[family]

