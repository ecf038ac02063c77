"""Training: one run lifecycle (:mod:`.lifecycle`), the batch loop (:mod:`.loop`) and rollout
loops (:mod:`.ppo`), driven by the stage registry (:mod:`.stages`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.estimate.budget import BudgetChoice
    from tunelab.train.lifecycle import TrainResult


def run_stage(cfg: "RunConfig", *, resume: bool = False, overwrite: bool = False, discard: bool = False,
              force: bool = False, allow_config_change: bool = False, progress: bool = True,
              budget: "BudgetChoice | None" = None) -> "TrainResult":
    """Train ``cfg.stage`` with the loop its stage declares (the batch loop, or a rollout loop).

    The flags say what the run may do with what ``cfg.output_dir`` holds
    (``tunelab.train.lifecycle.check_run_dir``); ``budget``, what ``train.memory_budget``
    resolved to, is logged by the run and reported against its measured peak."""
    from tunelab.train.stages import get_stage

    trainer = get_stage(cfg.stage).trainer
    return trainer(cfg, resume=resume, overwrite=overwrite, discard=discard, force=force,
                   allow_config_change=allow_config_change, progress=progress, budget=budget).run()
