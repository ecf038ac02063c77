"""Training: one loop for every batch-based stage, and PPO's rollout loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.config import RunConfig


def run_stage(cfg: "RunConfig", **kwargs: Any):
    """Train ``cfg.stage``: PPO has its own rollout loop, every other stage the batch loop."""
    if cfg.stage == "ppo":
        from tunelab.train.ppo import train_ppo

        return train_ppo(cfg, **kwargs)
    from tunelab.train.loop import train

    return train(cfg, **kwargs)
