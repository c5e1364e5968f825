"""What a validation epoch records from its generated completions, and how it logs them: budget
adherence scalars (``val/budget/*``, ``val/accuracy``), the budget-vs-length scatter and per-difficulty
figures, and histograms of completion length and budget error."""

from __future__ import annotations

from typing import Optional

import lightning as L

from selfbudget_pl.metrics import BudgetAdherence, budget_errors, completion_lengths, update_from_rollouts
from selfbudget_pl.plots import budget_vs_length_figure, difficulty_figure, log_histograms
from selfbudget_pl.rewards.annotate import Annotations
from selfbudget_pl.rollout.base import Rollouts


class ValidationRecord:
    """The completions of one validation epoch (this rank's, for the figures; all ranks', for the scalars)."""

    def __init__(self, device: object = "cpu") -> None:
        self.budget = BudgetAdherence().to(device)
        self.points: list[tuple[float, float, bool]] = []  # (stated budget, solution length, correct)
        self.by_difficulty: list[tuple[Optional[object], float, bool]] = []
        self.lengths: list[float] = []
        self.budget_errors: list[float] = []

    def add(self, rollouts: Rollouts, annotations: Annotations) -> None:
        """Record rollouts and their annotations."""
        update_from_rollouts(self.budget, rollouts, annotations)
        for parsed, length, correct in zip(annotations.parsed, annotations.solution_lengths, annotations.correct):
            if parsed.budget is not None:
                self.points.append((float(parsed.budget), float(length), bool(correct)))
        lengths = completion_lengths(rollouts)
        difficulties = rollouts.columns.get("difficulty") or [None] * len(rollouts)
        for difficulty, length, correct in zip(difficulties, lengths, annotations.correct):
            known = difficulty is not None and difficulty == difficulty  # NaN: unknown
            self.by_difficulty.append((difficulty if known else None, length, bool(correct)))
        self.lengths.extend(lengths)
        self.budget_errors.extend(budget_errors(annotations))

    def log(self, module: L.LightningModule) -> None:
        """Log the scalars through ``module`` and, on rank 0 with a TensorBoard-like logger, the figures."""
        values = self.budget.compute()
        module.log_dict({f"val/budget/{key}": value for key, value in values.items()}, sync_dist=False)
        if "accuracy" in values:
            module.log("val/accuracy", values["accuracy"], prog_bar=True)
        experiment = getattr(module.logger, "experiment", None)
        if hasattr(experiment, "add_figure") and module.trainer.is_global_zero:
            self.log_figures(experiment, module.global_step)

    def log_figures(self, experiment: object, step: int) -> None:
        """The budget-vs-length scatter and the per-difficulty plot as images, and the histograms."""
        if self.points:
            experiment.add_figure("val/budget_vs_length", budget_vs_length_figure(self.points), global_step=step)
        if any(difficulty is not None for difficulty, _, _ in self.by_difficulty):
            figure = difficulty_figure({"validation": self.by_difficulty}, title="tokens and accuracy by difficulty")
            experiment.add_figure("val/by_difficulty", figure, global_step=step)
        log_histograms(experiment, "val", self.lengths, self.budget_errors, step)
