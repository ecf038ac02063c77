"""Stage ``pt``: continued pre-training, next-token loss on every token of plain text."""

from tunelab.data.records import Text
from tunelab.data.tokenize import encode_texts
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm_objective
from tunelab.train.stages.base import StageSpec

STAGE = StageSpec(
    name="pt",
    summary="continued pre-training: next-token loss on plain text cut into blocks of data.max_length",
    records=(Text,),
    needs="plain-text records (a text column)",
    encoder=encode_texts,
    trainer=Trainer,
    objective=causal_lm_objective,
    metrics=("loss",),
)
