"""The learning rate a run gets when ``train.lr`` is ``auto`` (the default): one place, per
method family and stage.

Why per family: the methods change the model through very different parameters, and one
Adam step moves each parameter by about the learning rate, whatever its gradient's size.
Full and freeze fine-tuning move the base weights themselves; LoRA's update is the product
of two small matrices (AdaLoRA's of three, one starting at zero); virtual tokens and IA3's
scaling vectors are a few thousand numbers that must move far before the model notices.
One rate for all (the old 2e-4) left LoRA at eval loss 2.90 after the sweep's 16 steps
where 1e-3 reaches 1.35 (base 3.67), and prompt learning, IA3 and AdaLoRA want 10 to 100
times more, while full fine-tuning wants less. The rates are in :data:`SFT_LR`.

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
    "full": "all_weights", "freeze": "top_layers",
    "lora": "low_rank", "dora": "low_rank", "rslora": "low_rank", "qlora": "low_rank",
    "pissa": "principal_low_rank", "loraplus": "loraplus",
    "adalora": "adalora",
    "ia3": "scaling_vectors",
    "prompt": "prompt_embeddings", "ptuning": "prompt_encoder",
    "prefix": "prefix_mlp", "ptuning_v2": "prefix_table", "mam": "parallel_adapter_and_prefix",
    "houlsby": "bottleneck", "pfeiffer": "bottleneck", "parallel": "parallel_adapter",
    "adapter_fusion": "fusion",
}

#: Families that train base-model weights (the RL rule gives them :data:`RL_LR`'s smaller rate).
BASE_WEIGHT_FAMILIES = ("all_weights", "top_layers")

#: Peak learning rate of each family in the batch stages. Measured by benchmarks/lr_sweep.sh
#: (README "Defaults that do no harm" has every rate tried and its loss): the lowest rate within
#: 10% of the best held-out loss, never extrapolated past the grid, and half that for full
#: fine-tuning, the one method that moves every weight (its forgetting, which grows with the
#: rate, is invisible to a short identity job; 5e-5 is also the Transformers/LLaMA-Factory
#: default). AdapterFusion was not swept (it needs trained adapters): 5e-5 is Pfeiffer et al.'s.
#: QLoRA shares LoRA's rate. Both were measured at 3e-3 after the table was set (README): better
#: than 1e-3 by the rule's measure, but the family stays at 1e-3 until DoRA, rsLoRA and the
#: preference stages (which read this table too) are measured there.
SFT_LR: dict[str, float] = {
    "all_weights": 5e-5,
    "top_layers": 3e-4,
    "low_rank": 1e-3,
    "principal_low_rank": 5e-4,
    "loraplus": 3e-4,
    "adalora": 1e-2,
    "scaling_vectors": 3e-2,
    "prompt_embeddings": 3e-2,
    "prompt_encoder": 3e-3,
    "prefix_mlp": 3e-4,
    "prefix_table": 3e-2,
    "parallel_adapter_and_prefix": 3e-3,
    "bottleneck": 1e-3,
    "parallel_adapter": 3e-3,
    "fusion": 5e-5,
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
        return RL_LR["base_weights" if family in BASE_WEIGHT_FAMILIES else "adapter"]
    return SFT_LR[family]

