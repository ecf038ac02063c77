"""Stage ``sft``: supervised fine-tuning, next-token loss on the answers of conversations."""

from tunelab.data.records import Conversation
from tunelab.data.tokenize import encode_conversation
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm_objective
from tunelab.train.stages.base import StageSpec

STAGE = StageSpec(
    name="sft",
    summary="supervised fine-tuning: next-token loss on the assistant turns of conversations",
    records=(Conversation,),
    needs="conversations (alpaca/sharegpt/messages data)",
    encoder=encode_conversation,
    trainer=Trainer,
    objective=causal_lm_objective,
    metrics=("loss",),
)
