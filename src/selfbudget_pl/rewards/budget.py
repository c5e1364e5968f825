"""The SelfBudgeter reward (``docs/method.md``, "default parameterisation"; every constant configurable).

    cos(x, X, r0, rX) = rX + (r0 - rX) * (1 + cos(pi * min(x, X) / X)) / 2
    t = b (1 - delta) if correct else b (1 + delta)
    R = r_f                                                      if not well-formed
    R = cos(|l - t|, alpha b, s_max, s_min) + (r_b if b > b_max else 0)      otherwise

with ``[s_min, s_max]`` the correct range ``[s_c_min, s_c_max]`` or the wrong one ``[s_w_min, s_w_max]``,
and the tolerance factor ``alpha`` annealed from ``alpha_start`` to ``alpha_end`` over training.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.grader import Grader

SCHEDULES = ("linear", "cosine", "constant")


def cosine_interpolation(x: float, width: float, value_at_zero: float, value_at_width: float) -> float:
    """``cos(x, X, r0, rX)``: ``r0`` at ``x = 0``, falling along a half cosine to ``rX`` at ``x >= X``."""
    x = min(max(x, 0.0), width)
    return value_at_width + (value_at_zero - value_at_width) * (1.0 + math.cos(math.pi * x / width)) / 2.0


def annealed(start: float, end: float, progress: float, schedule: str) -> float:
    """A value moving from ``start`` (progress 0) to ``end`` (progress 1) along ``schedule``."""
    progress = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    if schedule == "constant":
        return start
    raise ValueError(f"alpha_schedule must be one of {SCHEDULES}, got {schedule!r}")


def _budget_cap(value: Any) -> float:
    """``b_max`` as a number; None/NaN (no correct base answer, so no cap) -> infinity."""
    if value is None:
        return math.inf
    cap = float(value)
    return math.inf if math.isnan(cap) else cap


class BudgetGuidedReward:
    """SelfBudgeter's reward: format, budget cap, and cosine precision around the budget.

    Args:
        format_penalty: ``r_f``, the whole reward of a completion that is not well-formed.
        budget_penalty: ``r_b``, added when the stated budget exceeds the question's ``b_max``.
        delta: where the peak sits: ``b(1 - delta)`` for correct answers, ``b(1 + delta)`` for wrong.
        alpha_start, alpha_end, alpha_schedule: tolerance width ``alpha * b``, annealed over training
            progress (``linear`` | ``cosine`` | ``constant``, the latter staying at ``alpha_start``).
        correct_max, correct_min: ``s_c_max``/``s_c_min``, the range for correct answers.
        wrong_max, wrong_min: ``s_w_max``/``s_w_min``, the range for wrong answers.
        output_format, grader: used only when the caller does not pass ``parsed``/``correct``.

    Call as a TRL reward: ``reward(completions=[...], parsed=..., correct=..., solution_lengths=...,
    b_max=..., progress=...)``; ``progress`` in [0, 1] is the fraction of training done.
    """

    name = "budget_guided"

    def __init__(
        self,
        format_penalty: float = -1.0,
        budget_penalty: float = -0.5,
        delta: float = 0.1,
        alpha_start: float = 6.0,
        alpha_end: float = 0.1,
        alpha_schedule: str = "linear",
        correct_max: float = 1.0,
        correct_min: float = 0.5,
        wrong_max: float = -0.5,
        wrong_min: float = -1.0,
        output_format: Optional[OutputFormat] = None,
        grader: Optional[Grader] = None,
    ) -> None:
        if alpha_schedule not in SCHEDULES:
            raise ValueError(f"BudgetGuidedReward: `alpha_schedule` must be one of {SCHEDULES}, got {alpha_schedule!r}.")
        if not (alpha_start > 0 and alpha_end > 0):
            raise ValueError(
                f"BudgetGuidedReward: `alpha_start` and `alpha_end` must be > 0 (the tolerance width is "
                f"alpha * budget), got {alpha_start} and {alpha_end}."
            )
        if not 0 <= delta < 1:
            raise ValueError(f"BudgetGuidedReward: `delta` must be in [0, 1), got {delta}.")
        if correct_min > correct_max or wrong_min > wrong_max:
            raise ValueError(
                "BudgetGuidedReward: each range needs min <= max: "
                f"`correct_min`={correct_min}, `correct_max`={correct_max}, "
                f"`wrong_min`={wrong_min}, `wrong_max`={wrong_max}."
            )
        if correct_min + budget_penalty < wrong_max:
            raise ValueError(
                "BudgetGuidedReward: `correct_min` + `budget_penalty` must be >= `wrong_max`, so that a correct "
                "answer over its budget cap still beats every wrong answer; got "
                f"{correct_min} + {budget_penalty} < {wrong_max}."
            )
        self.format_penalty = float(format_penalty)
        self.budget_penalty = float(budget_penalty)
        self.delta = float(delta)
        self.alpha_start = float(alpha_start)
        self.alpha_end = float(alpha_end)
        self.alpha_schedule = alpha_schedule
        self.correct_max, self.correct_min = float(correct_max), float(correct_min)
        self.wrong_max, self.wrong_min = float(wrong_max), float(wrong_min)
        self.output_format = output_format
        self.grader = grader
        self.__name__ = self.name  # TRL-style metric key

    def alpha(self, progress: float) -> float:
        """The tolerance factor at a point of training."""
        return annealed(self.alpha_start, self.alpha_end, progress, self.alpha_schedule)

    def score(self, well_formed: bool, budget: Optional[int], length: int, correct: bool,
              b_max: Any = None, progress: float = 0.0) -> float:
        """The reward of one completion."""
        if not well_formed or budget is None:
            return self.format_penalty
        target = budget * (1 - self.delta) if correct else budget * (1 + self.delta)
        high, low = (self.correct_max, self.correct_min) if correct else (self.wrong_max, self.wrong_min)
        reward = cosine_interpolation(abs(length - target), self.alpha(progress) * budget, high, low)
        if budget > _budget_cap(b_max):
            reward += self.budget_penalty
        return reward

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        from selfbudget_pl.scoring import resolve_annotations

        parsed, correct, lengths = resolve_annotations(completions, columns, self.output_format, self.grader)
        caps = columns.get("b_max") or [None] * len(completions)
        progress = float(columns.get("progress") or 0.0)
        return [
            self.score(output.well_formed, output.budget, length, right, cap, progress)
            for output, right, length, cap in zip(parsed, correct, lengths, caps)
        ]
