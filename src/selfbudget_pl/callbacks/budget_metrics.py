"""Logs budget adherence (:class:`~selfbudget_pl.metrics.BudgetAdherence`) for every training step.

For validation or evaluation, keep a ``BudgetAdherence`` on the module, feed it with
:func:`~selfbudget_pl.metrics.update_from_rollouts`, and log it at epoch end with :func:`log_budget_metrics`
(prefix ``val/budget``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl

from selfbudget_pl.callbacks.reward import RolloutHook
from selfbudget_pl.metrics import BudgetAdherence, update_from_rollouts
from selfbudget_pl.rollout.base import Rollouts
from selfbudget_pl.scoring import annotate, is_annotated


def log_budget_metrics(pl_module: pl.LightningModule, metric: BudgetAdherence, prefix: str, on_step: bool = False) -> None:
    """Compute ``metric`` (synchronised across processes by torchmetrics), log every value as
    ``<prefix>/<key>``, then reset it."""
    values = metric.compute()
    metric.reset()
    # Values are already global, so Lightning must not reduce them again.
    pl_module.log_dict({f"{prefix}/{key}": value for key, value in values.items()},
                       on_step=on_step, on_epoch=not on_step, sync_dist=False)


class BudgetMetricsCallback(RolloutHook):
    """Per training step: ``budget/<key>`` and ``budget/difficulty_<edge>/<key>`` over that step's rollouts.

    Args:
        difficulty_buckets: upper edges of difficulty buckets (see :class:`BudgetAdherence`);
            None or empty for no per-bucket metrics.
        prefix: metric name prefix.
    """

    def __init__(self, difficulty_buckets: Optional[Sequence[float]] = None, prefix: str = "budget") -> None:
        self.metric = BudgetAdherence(difficulty_buckets)
        self.prefix = prefix

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts) -> None:
        if not is_annotated(rollouts):
            annotate(rollouts, pl_module.output_format, pl_module.grader, pl_module.tokenizer)
        # States must live where the process group communicates (NCCL needs CUDA tensors).
        self.metric = self.metric.to(pl_module.device)
        update_from_rollouts(self.metric, rollouts)
        log_budget_metrics(pl_module, self.metric, self.prefix, on_step=True)
