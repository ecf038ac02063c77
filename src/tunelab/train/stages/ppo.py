"""Stage ``ppo``: RLHF with PPO; its rollout loop is :class:`tunelab.train.ppo.PPOTrainer`."""

from tunelab.data.records import Conversation, Preference, Unpaired
from tunelab.data.tokenize import encode_prompt
from tunelab.train.ppo import PPOTrainer
from tunelab.train.stages.base import StageSpec

STAGE = StageSpec(
    name="ppo",
    summary="RLHF: sample answers to prompts, score them (reward model or function), clipped PPO updates",
    records=(Conversation, Preference, Unpaired),
    needs="prompts (conversations or preference data)",
    encoder=encode_prompt,
    trainer=PPOTrainer,
    metrics=("loss", "reward_mean", "reward_std", "kl", "entropy", "clipfrac", "value_loss"),
)
