"""Rollout hooks: what the GRPO module calls after each batch of rollouts, and the reward callback.

The GRPO module owns the output format, grader and tokenizer; it calls ``on_rollouts(trainer, module,
rollouts)`` on every :class:`RolloutHook` in ``trainer.callbacks``, in order, inside ``training_step``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import lightning.pytorch as pl

from selfbudget_pl.rewards.annotate import annotate, finished_solutions, is_annotated
from selfbudget_pl.rewards.combine import RewardFunction, WeightedRewards, reward_statistics
from selfbudget_pl.rollout.base import Rollouts


class RolloutHook(pl.Callback):
    """A callback that also sees every batch of training rollouts."""

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts) -> None:
        """Called after sampling, before the loss; may annotate ``rollouts`` in place."""


def reward_columns(rollouts: Rollouts) -> dict[str, Any]:
    """Keyword arguments for reward functions: dataset columns, annotations, ``progress``."""
    columns = dict(rollouts.columns)
    return {
        **columns,
        "prompts": columns.get("problem", rollouts.prompt_ids),
        "completion_ids": rollouts.completion_ids,
        "parsed": rollouts.parsed,
        "correct": rollouts.correct,
        "solution_lengths": rollouts.solution_lengths,
        "truncated": rollouts.truncated,
        "progress": rollouts.progress,
    }


class RewardCallback(RolloutHook):
    """Fills ``rollouts.rewards`` (float32) and ``rollouts.reward_components`` from reward functions.

    Annotates the rollouts first (with the module's ``output_format``, ``grader`` and ``tokenizer``)
    unless that was done. Logs ``rewards/<name>/mean|std`` per step; the GRPO module logs the total as
    ``rewards/mean``/``rewards/std``.

    Args:
        functions: name -> TRL-style reward function (Hydra-instantiated classes or plain functions).
        weights: name -> weight of that component in the total (default 1.0).
        sync_dist: reduce the logged means across processes (costs a collective per key per step).
    """

    def __init__(self, functions: Mapping[str, RewardFunction], weights: Optional[Mapping[str, float]] = None,
                 sync_dist: bool = False) -> None:
        self.rewards = WeightedRewards(functions, weights)
        self.sync_dist = sync_dist

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts) -> None:
        if not is_annotated(rollouts):
            annotate(rollouts, pl_module.output_format, pl_module.grader, pl_module.tokenizer)
        rollouts.columns["finished"] = finished_solutions(rollouts.parsed, rollouts.truncated, pl_module.output_format)
        columns = reward_columns(rollouts)
        total, components = self.rewards(rollouts.completions, **columns)
        rollouts.rewards = total
        rollouts.reward_components = components
        for key, value in reward_statistics(components).items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=len(rollouts), sync_dist=self.sync_dist)
