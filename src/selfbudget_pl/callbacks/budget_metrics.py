"""Logs budget adherence (:class:`~selfbudget_pl.metrics.BudgetAdherence`) of every training step's
rollouts, the collapse detector among it (``understated_rate``), and histograms of their lengths and
budget errors (validation has its own record: :mod:`selfbudget_pl.modules.validation_metrics`)."""

from __future__ import annotations

from typing import Optional, Sequence

import lightning.pytorch as pl

from selfbudget_pl import internals
from selfbudget_pl.callbacks.reward import RolloutHook, Scores
from selfbudget_pl.metrics import (
    UNDERSTATED_FRACTION, BudgetAdherence, budget_errors, completion_lengths, update_from_rollouts,
)
from selfbudget_pl.plots import log_histograms
from selfbudget_pl.rewards.annotate import Annotations, annotate
from selfbudget_pl.rollout.base import Rollouts


def log_budget_metrics(pl_module: pl.LightningModule, metric: BudgetAdherence, prefix: str, on_step: bool = False) -> None:
    """Compute ``metric`` (synchronised across processes by torchmetrics), log every value as
    ``<prefix>/<key>``, then reset it."""
    values = metric.compute()
    metric.reset()
    # Values are already global, so Lightning must not reduce them again.
    pl_module.log_dict({f"{prefix}/{key}": value for key, value in values.items()},
                       on_step=on_step, on_epoch=not on_step, sync_dist=False)


class BudgetMetricsCallback(RolloutHook):
    """Per training step: ``rollout/budget/<key>`` and ``rollout/budget/difficulty_<edge>/<key>`` over that
    step's rollouts. ``understated_rate`` (own budgets below ``understated_fraction`` of their length) is the
    collapse detector: a model gaming a budget reward states tiny budgets on some difficulties first.

    Args:
        difficulty_buckets: upper edges of difficulty buckets (see :class:`BudgetAdherence`);
            None or empty for no per-bucket metrics.
        understated_fraction: a stated budget below this fraction of its solution length is understated.
        prefix: metric name prefix.
        histogram_prefix: every ``trainer.log_every_n_steps`` steps, histograms of completion length and
            relative budget error go to ``<histogram_prefix>/completion_length|budget_error`` (None: off).
    """

    def __init__(
        self, difficulty_buckets: Optional[Sequence[float]] = None, prefix: str = "rollout/budget",
        histogram_prefix: Optional[str] = "rollout", understated_fraction: float = UNDERSTATED_FRACTION,
    ) -> None:  # fmt: skip
        self.metric = BudgetAdherence(difficulty_buckets, understated_fraction)
        self.prefix = prefix
        self.histogram_prefix = histogram_prefix

    def on_rollouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts, scores: Scores) -> None:
        # A scorer that rewards without grading leaves the annotations to whoever needs them.
        annotations = scores.annotations or annotate(rollouts, pl_module.output_format, pl_module.grader, pl_module.tokenizer)
        # States must live where the process group communicates (NCCL needs CUDA tensors).
        self.metric = self.metric.to(pl_module.device)
        update_from_rollouts(self.metric, rollouts, annotations)
        log_budget_metrics(pl_module, self.metric, self.prefix, on_step=True)
        self._log_histograms(trainer, pl_module, rollouts, annotations)

    def _log_histograms(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollouts: Rollouts, annotations: Annotations
    ) -> None:
        """Completion length and budget error of this step's rollouts, on the steps and at the x-axis value
        Lightning logs this batch's scalars with (every ``log_every_n_steps`` batches; rank 0)."""
        experiment = getattr(pl_module.logger, "experiment", None)
        if self.histogram_prefix is None or experiment is None or not trainer.is_global_zero:
            return
        if internals.logs_this_step(trainer):
            step = internals.logging_step(trainer)  # the step Lightning's scalars use
            log_histograms(experiment, self.histogram_prefix, completion_lengths(rollouts), budget_errors(annotations), step)
