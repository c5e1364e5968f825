"""Budget adherence as a torchmetrics Metric, correct under DDP: accuracy, length, budget error,
rank correlations, format errors, truncation and understated budgets (the collapse detector), overall and
per difficulty bucket.

Every per-completion value is kept as a ``cat`` state: rank correlations need the values themselves,
and one pass over them gives the overall and per-bucket numbers alike. Training resets the metric
every step; an evaluation holds at most ~10^5 completions (six floats each). Also the per-completion
lengths and relative budget errors that the histograms show.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from selfbudget_pl.rewards.annotate import Annotations
from selfbudget_pl.rollout.base import Rollouts

_FIELDS = ("budget", "length", "correct", "difficulty", "format_ok", "truncated", "prefilled")
# A stated budget below this fraction of the solution's length counts as understated: a model that games a
# reward with a floor states tiny budgets and writes long answers (budget 1, 120 tokens).
UNDERSTATED_FRACTION = 0.5
KEYS = (
    "accuracy",
    "mean_length",
    "budget_mae",
    "budget_rel_error",
    "within_10",
    "within_20",
    "spearman_budget_length",
    "spearman_budget_difficulty",
    "format_error_rate",
    "truncation_rate",
    "understated_rate",
)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    group_rank = ends - (counts.to(torch.float64) - 1) / 2  # mean of positions (end-count+1 .. end)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation with average ranks; NaN for fewer than two points or a constant input."""
    if x.numel() < 2:
        return torch.tensor(math.nan, dtype=torch.float64)
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denominator == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    return (rx * ry).sum() / denominator


def _summary(values: dict[str, torch.Tensor], understated_fraction: float) -> dict[str, torch.Tensor]:
    nan = torch.tensor(math.nan, dtype=torch.float64)
    length, budget = values["length"], values["budget"]
    has_budget = ~torch.isnan(budget)
    b, l = budget[has_budget], length[has_budget]
    error = (l - b).abs()
    with_difficulty = has_budget & ~torch.isnan(values["difficulty"])
    own = has_budget & (values["format_ok"] == 1) & (values["prefilled"] == 0)  # budgets the model chose

    def mean(t: torch.Tensor) -> torch.Tensor:
        return t.double().mean() if t.numel() else nan

    return {
        "accuracy": mean(values["correct"]),
        "mean_length": mean(length),
        "budget_mae": mean(error),
        "budget_rel_error": mean(error / b),
        "within_10": mean((error <= 0.1 * b).double()),
        "within_20": mean((error <= 0.2 * b).double()),
        "spearman_budget_length": spearman(b, l),
        "spearman_budget_difficulty": spearman(budget[with_difficulty], values["difficulty"][with_difficulty]),
        "format_error_rate": mean(1.0 - values["format_ok"]),
        "truncation_rate": mean(values["truncated"]),
        "understated_rate": mean((budget[own] < understated_fraction * length[own]).double()),
    }


class BudgetAdherence(Metric):
    """Budget adherence of completions. Budget statistics use only completions that state a budget.

    Args:
        difficulty_buckets: upper edges of difficulty buckets (e.g. ``[1, 2, 3, 4, 5]`` for MATH
            levels); a completion goes to the first bucket whose edge is >= its difficulty, and
            :meth:`compute` adds ``difficulty_<edge>/<key>`` for each bucket. None: no buckets.
        understated_fraction: ``understated_rate`` is the share of well-formed completions with their own
            (not pre-filled) budget that state less than this fraction of their solution length.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, difficulty_buckets: Optional[Sequence[float]] = None,
                 understated_fraction: float = UNDERSTATED_FRACTION, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        edges = sorted(float(edge) for edge in (difficulty_buckets or ()))
        self.difficulty_buckets = edges
        self.understated_fraction = float(understated_fraction)
        for field in _FIELDS:
            self.add_state(field, default=[], dist_reduce_fx="cat")

    def update(self, budgets: Any, lengths: Any, correct: Any, difficulty: Any = None,
               format_ok: Any = None, truncated: Any = None, prefilled: Any = None) -> None:
        """Add completions. ``budgets``: stated budget or None/NaN; ``difficulty``: number or None/NaN;
        ``format_ok``/``truncated``/``prefilled`` default to all True/False/False."""
        size = len(lengths)
        columns = {
            "budget": budgets,
            "length": lengths,
            "correct": correct,
            "difficulty": difficulty if difficulty is not None else [None] * size,
            "format_ok": format_ok if format_ok is not None else [True] * size,
            "truncated": truncated if truncated is not None else [False] * size,
            "prefilled": prefilled if prefilled is not None else [False] * size,
        }
        for field, values in columns.items():
            if len(values) != size:
                raise ValueError(f"BudgetAdherence.update: `{field}` has {len(values)} entries, `lengths` has {size}.")
            tensor = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
            getattr(self, field).append(tensor.to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        values = {field: self._gathered(field) for field in _FIELDS}
        results = _summary(values, self.understated_fraction)
        lower = -math.inf
        for edge in self.difficulty_buckets:
            inside = (values["difficulty"] > lower) & (values["difficulty"] <= edge)
            bucket = _summary({field: tensor[inside] for field, tensor in values.items()}, self.understated_fraction)
            results.update({f"difficulty_{edge:g}/{key}": value for key, value in bucket.items()})
            lower = edge
        return {key: value.float() for key, value in results.items()}

    def _gathered(self, field: str) -> torch.Tensor:
        state = getattr(self, field)
        if isinstance(state, list):
            return torch.cat(state) if state else torch.empty(0, dtype=torch.float64, device=self.device)
        return dim_zero_cat(state).double()


def update_from_rollouts(metric: BudgetAdherence, rollouts: Rollouts, annotations: Annotations) -> None:
    """Add rollouts and their :class:`~selfbudget_pl.rewards.annotate.Annotations` to ``metric``."""
    size = len(rollouts.completions)
    metric.update(
        budgets=[parsed.budget for parsed in annotations.parsed],
        lengths=annotations.solution_lengths,
        correct=annotations.correct,
        difficulty=rollouts.columns.get("difficulty") or [None] * size,
        format_ok=[parsed.well_formed for parsed in annotations.parsed],
        truncated=rollouts.truncated,
        prefilled=rollouts.columns.get("prefilled") or [False] * size,
    )


def completion_lengths(rollouts: Rollouts) -> list[float]:
    """Generated tokens per completion (EOS stripped, as the backends return them)."""
    return [float(len(ids)) for ids in rollouts.completion_ids]


def budget_errors(annotations: Annotations) -> list[float]:
    """Relative budget error ``(l - b) / b`` of every completion that states a budget."""
    return [
        (length - parsed.budget) / parsed.budget
        for parsed, length in zip(annotations.parsed, annotations.solution_lengths)
        if parsed.budget
    ]
