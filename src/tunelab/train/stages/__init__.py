"""The stage registry: which training stages exist, and the module that declares each one.

A stage is one module of this package, named after the stage, that defines ``STAGE``: a
:class:`tunelab.train.stages.base.StageSpec` saying which records it trains on, which
data encoder turns them into examples, which loop drives it (the batch loop or a rollout
loop), its objective and the metrics it logs. Adding a stage is that module plus its
name in :data:`STAGE_NAMES`.

This file imports nothing heavy on purpose: ``tunelab.config`` types ``stage`` with
:data:`STAGE_NAMES`, and a config must load without torch. Stage modules (which import
the loops) are loaded only when a stage is looked up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from tunelab.config import RunConfig
    from tunelab.methods.base import Method
    from tunelab.train.objectives import Objective
    from tunelab.train.stages.base import StageSpec

#: Every stage, in pipeline order. One line per stage: its module is ``tunelab.train.stages.<name>``.
STAGE_NAMES: tuple[str, ...] = (
    "pt",
    "sft",
    "rm",
    "dpo",
    "kto",
    "ppo",
    "grpo",
)


def get_stage(name: str) -> "StageSpec":
    """The declaration of stage ``name``."""
    if name not in STAGE_NAMES:
        raise ConfigError(f"stage = {name!r} is not one of {', '.join(STAGE_NAMES)}.")
    spec = importlib.import_module(f"{__name__}.{name}").STAGE
    if spec.name != name:
        raise RuntimeError(f"module {__name__}.{name} declares stage {spec.name!r}")
    return spec


def build_objective(cfg: "RunConfig", method: "Method", model: "nn.Module", tokenizer: Any) -> "Objective":
    """The batch-loop objective of ``cfg.stage``.

    Called after the method is applied and before the optimizer is built: a stage that adds
    trainable weights (the reward model's value head) attaches them to ``model`` here.
    """
    stage = get_stage(cfg.stage)
    if stage.objective is None:
        raise ConfigError(f"stage '{stage.name}' trains in its own {stage.loop} loop, not the batch loop: start it "
                          "with `tunelab train` (tunelab.train.run_stage), which picks the stage's own loop.")
    return stage.objective(cfg, method, model, tokenizer)
