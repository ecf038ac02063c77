"""Training: one run lifecycle (:mod:`.lifecycle`), the batch loop (:mod:`.loop`) and rollout
loops (:mod:`.ppo`), driven by the stage registry (:mod:`.stages`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.train.lifecycle import TrainResult


def run_stage(cfg: "RunConfig", *, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> "TrainResult":
    """Train ``cfg.stage`` with the loop its stage declares (the batch loop, or a rollout loop)."""
    from tunelab.train.stages import get_stage

    trainer = get_stage(cfg.stage).trainer
    return trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).run()
