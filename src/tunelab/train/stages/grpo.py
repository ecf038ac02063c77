"""Stage ``grpo``: RL with verifiable rewards (GRPO, DAPO, Dr. GRPO, GSPO, RLOO); its rollout
loop is :class:`tunelab.train.grpo.GRPOTrainer`."""

from tunelab.data.records import Conversation, Preference, Unpaired
from tunelab.data.tokenize import encode_prompt
from tunelab.train.grpo import GRPOTrainer
from tunelab.train.stages.base import StageSpec

STAGE = StageSpec(
    name="grpo",
    summary="RL with verifiable rewards: sample a group of answers per prompt, score them with reward "
            "functions, group-relative clipped updates",
    records=(Conversation, Preference, Unpaired),
    needs="prompts (conversations or preference data), with the reference answer where a reward checks it",
    encoder=encode_prompt,
    trainer=GRPOTrainer,
    metrics=("loss", "reward_mean", "reward_std", "equal_reward_groups", "completion_length",
             "completion_clipped", "clip_ratio", "clip_low", "clip_high", "entropy"),
)
