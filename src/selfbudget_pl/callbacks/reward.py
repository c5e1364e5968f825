"""Rollout hooks: what the GRPO module calls after each batch of rollouts, and the reward callback.

The GRPO module owns the output format, grader and tokenizer; it calls ``on_rollouts(trainer, module,
rollouts)`` on every :class:`RolloutHook` in ``trainer.callbacks``, in order, inside ``training_step``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl

from selfbudget_pl.rewards.combine import RewardFunction, WeightedRewards, reward_statistics
from selfbudget_pl.rollout.base import Rollouts
from selfbudget_pl.rewards.annotate import annotate, finished_solutions, is_annotated


class RolloutHook(pl.Callback):
    """A callback that also sees every batch of training rollouts."""

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts) -> None:
        """Called after sampling, before the loss; may annotate ``rollouts`` in place."""


def training_progress(trainer: pl.Trainer, pl_module: Optional[pl.LightningModule] = None,
                      steps_per_batch: int = 1) -> float:
    """Fraction of training done, in [0, 1], in optimizer steps: ``global_step`` over the run's total
    (``pl_module.total_optimizer_steps()`` when it has one, which counts GRPO's mini-batches and
    iterations; else Lightning's estimate). Rewards are scored before their batch's ``steps_per_batch``
    optimizer steps, so the last batch of rollouts is scored at 1. 0 when the total is unknown."""
    try:
        if hasattr(pl_module, "total_optimizer_steps"):
            total = float(pl_module.total_optimizer_steps())
        elif trainer.max_steps and trainer.max_steps > 0:
            total = float(trainer.max_steps)
        else:
            total = float(trainer.estimated_stepping_batches)
    except Exception:  # no dataloader yet or an iterable of unknown length
        total = math.inf
    if not math.isfinite(total) or total <= 0:
        return 0.0
    return min(max(trainer.global_step / max(total - steps_per_batch, 1.0), 0.0), 1.0)


def reward_columns(rollouts: Rollouts, progress: float) -> dict[str, Any]:
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
        "progress": progress,
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
        steps = getattr(pl_module, "optimizer_steps_per_batch", None)
        progress = training_progress(trainer, pl_module, steps(len(rollouts)) if steps else 1)
        columns = reward_columns(rollouts, progress)
        total, components = self.rewards(rollouts.completions, **columns)
        rollouts.rewards = total
        rollouts.reward_components = components
        for key, value in reward_statistics(components).items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=len(rollouts), sync_dist=self.sync_dist)
