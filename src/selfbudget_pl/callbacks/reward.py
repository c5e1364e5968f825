"""The reward contract: what the GRPO module calls to score a batch of rollouts, and what it hands on.

The module finds the one :class:`RewardScorer` among ``trainer.callbacks`` and calls
:meth:`RewardScorer.score`, which returns :class:`Scores` (rewards, their components, and the annotations it
made); it then passes the rollouts and scores to every :class:`RolloutHook` (metrics), in callback order.
:class:`RewardCallback` is the scorer the ``reward`` config group builds: TRL-style reward functions over
the annotated completions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch

from selfbudget_pl.rewards.annotate import Annotations, annotate
from selfbudget_pl.rewards.combine import RewardFunction, WeightedRewards, reward_statistics
from selfbudget_pl.rollout.base import Rollouts


@dataclass
class Scores:
    """A batch of rollouts scored, completion by completion in the rollouts' order.

    Args:
        rewards: the total reward per completion, float32 ``[num_completions]``: what the advantages use.
        components: name -> each reward function's own scores (unweighted).
        annotations: what grading found (parsed output, correctness, lengths, finished); None from a scorer
            that rewards without grading.
    """

    rewards: torch.Tensor
    components: dict[str, list[float]] = field(default_factory=dict)
    annotations: Optional[Annotations] = None


class RewardScorer(pl.Callback, ABC):
    """A callback that scores every batch of training rollouts; a GRPO run has exactly one."""

    @abstractmethod
    def score(self, rollouts: Rollouts, pl_module: pl.LightningModule) -> Scores:
        """Score ``rollouts`` (the module gives the output format, grader and tokenizer, and logs)."""


class RolloutHook(pl.Callback):
    """A callback that also sees every batch of training rollouts, after they are scored."""

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts, scores: Scores) -> None:
        """Called after scoring, before the loss."""


def reward_columns(rollouts: Rollouts, annotations: Annotations) -> dict[str, Any]:
    """Keyword arguments for reward functions: dataset columns, annotations, ``progress``."""
    columns = dict(rollouts.columns)
    return {
        **columns,
        "prompts": columns.get("problem", rollouts.prompt_ids),
        "completion_ids": rollouts.completion_ids,
        "parsed": annotations.parsed,
        "correct": annotations.correct,
        "solution_lengths": annotations.solution_lengths,
        "finished": annotations.finished,
        "truncated": rollouts.truncated,
        "progress": rollouts.progress,
    }


class RewardCallback(RewardScorer):
    """Scores rollouts with reward functions, after annotating them with the module's ``output_format``,
    ``grader`` and ``tokenizer``. Logs ``rewards/<name>/mean|std`` per step; the GRPO module logs the total
    as ``rewards/mean``/``rewards/std``.

    Args:
        functions: name -> TRL-style reward function (Hydra-instantiated classes or plain functions).
        weights: name -> weight of that component in the total (default 1.0).
        sync_dist: reduce the logged means across processes (costs a collective per key per step).
    """

    def __init__(self, functions: Mapping[str, RewardFunction], weights: Optional[Mapping[str, float]] = None,
                 sync_dist: bool = False) -> None:
        self.rewards = WeightedRewards(functions, weights)
        self.sync_dist = sync_dist

    def score(self, rollouts: Rollouts, pl_module: pl.LightningModule) -> Scores:
        annotations = annotate(rollouts, pl_module.output_format, pl_module.grader, pl_module.tokenizer)
        total, components = self.rewards(rollouts.completions, **reward_columns(rollouts, annotations))
        for key, value in reward_statistics(components).items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=len(rollouts), sync_dist=self.sync_dist)
        return Scores(rewards=total, components=components, annotations=annotations)
