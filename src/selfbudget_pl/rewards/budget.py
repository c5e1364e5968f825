"""The SelfBudgeter reward (``docs/method.md``; every constant configurable).

    cos(x, X, r0, rX) = rX + (r0 - rX) * (1 + cos(pi * min(x, X) / X)) / 2
    alpha = alpha_start -> alpha_end over training (linear by default; progress in optimizer steps)
    peak  = max(0, (1 - alpha) b) if correct else (1 + alpha) b          # peak="alpha" (the paper, as read)
    peak  = b (1 - delta) if correct else b (1 + delta)                 # peak="fixed" (ablation)
    R = r_f                                                             if not well-formed or unfinished
    R = cos(|l - peak|, alpha b, s_max, s_min) + (r_b if b > b_max else 0) - c min(b, b_max) / b_max [correct]

with ``[s_min, s_max]`` the correct range ``[s_c_min, s_c_max]`` or the wrong one ``[s_w_min, s_w_max]``.
``shape="linear"`` replaces the cosine by a straight fall from ``s_max`` at the peak to ``s_min`` at the
width (a cosine is flat at its peak, so small forecast errors cost almost nothing). ``budget_cost`` (c,
0 in the paper) charges a correct answer for the budget it states, relative to its cap: compression
pressure on the forecast itself, while the precision term keeps the length on the forecast. Neither r_b
nor the cost applies to a pre-filled budget: it is the user's, not the model's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.annotate import finished_solutions, resolve_annotations
from selfbudget_pl.rewards.grader import Grader

SCHEDULES = ("linear", "cosine", "constant")
PEAKS = ("alpha", "fixed")
SHAPES = ("cosine", "linear")


def cosine_interpolation(x: float, width: float, value_at_zero: float, value_at_width: float) -> float:
    """``cos(x, X, r0, rX)``: ``r0`` at ``x = 0``, falling along a half cosine to ``rX`` at ``x >= X``."""
    x = min(max(x, 0.0), width)
    return value_at_width + (value_at_zero - value_at_width) * (1.0 + math.cos(math.pi * x / width)) / 2.0


def linear_interpolation(x: float, width: float, value_at_zero: float, value_at_width: float) -> float:
    """``r0`` at ``x = 0``, falling in a straight line to ``rX`` at ``x >= X``."""
    x = min(max(x, 0.0), width)
    return value_at_zero + (value_at_width - value_at_zero) * x / width


FALLOFFS = {"cosine": cosine_interpolation, "linear": linear_interpolation}


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


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"BudgetGuidedReward: `{key}` must be one of {choices}, got {value!r}.")


class BudgetGuidedReward:
    """SelfBudgeter's reward: format, budget cap, and precision around the budget.

    Args:
        peak: where a well-formed answer scores best. ``alpha`` (the paper as read, method.md Formula 2):
            ``(1 - alpha) b`` when correct (0 while alpha >= 1: shorter is better, the compression
            pressure) and ``(1 + alpha) b`` when wrong; ``fixed``: ``b (1 -/+ delta)`` throughout.
        format_penalty: ``r_f``, the whole reward of a completion that is not well-formed, was cut off by
            the length limit, or never closed its solution block.
        budget_penalty: ``r_b``, added when the model's own budget exceeds the question's ``b_max``.
        delta: the ``fixed`` peak's offset from the budget.
        alpha_start, alpha_end, alpha_schedule: tolerance width ``alpha * b`` (and the ``alpha`` peak),
            annealed over training progress (``linear`` | ``cosine`` | ``constant`` at ``alpha_start``).
        shape: fall-off from the peak to the range's minimum at the width: ``cosine`` (the paper) or
            ``linear`` (steepest at the peak, so every token of forecast error costs).
        budget_cost: ``c >= 0``; a correct answer with its own budget and a finite cap loses
            ``c * min(b, b_max) / b_max`` (0: the paper's reward).
        correct_max, correct_min: ``s_c_max``/``s_c_min``, the range for correct answers.
        wrong_max, wrong_min: ``s_w_max``/``s_w_min``, the range for wrong answers.
        output_format, grader: used only when the caller does not pass ``parsed``/``correct``/``finished``.

    Call as a TRL reward: ``reward(completions=[...], parsed=..., correct=..., solution_lengths=...,
    b_max=..., prefilled=..., finished=..., progress=...)``; ``progress`` in [0, 1] is the fraction of
    training done. Without ``finished``, a completion is finished when it is not in ``truncated`` and its
    solution text holds the closing tag.
    """

    name = "budget_guided"

    def __init__(
        self,
        peak: str = "alpha",
        format_penalty: float = -1.0,
        budget_penalty: float = -0.5,
        delta: float = 0.1,
        alpha_start: float = 6.0,
        alpha_end: float = 0.1,
        alpha_schedule: str = "linear",
        shape: str = "cosine",
        budget_cost: float = 0.0,
        correct_max: float = 1.0,
        correct_min: float = 0.5,
        wrong_max: float = -0.5,
        wrong_min: float = -1.0,
        output_format: Optional[OutputFormat] = None,
        grader: Optional[Grader] = None,
    ) -> None:
        _check_choice("peak", peak, PEAKS)
        _check_choice("alpha_schedule", alpha_schedule, SCHEDULES)
        _check_choice("shape", shape, SHAPES)
        if not (alpha_start > 0 and alpha_end > 0):
            raise ValueError(
                f"BudgetGuidedReward: `alpha_start` and `alpha_end` must be > 0 (the tolerance width is "
                f"alpha * budget), got {alpha_start} and {alpha_end}."
            )
        if not 0 <= delta < 1:
            raise ValueError(f"BudgetGuidedReward: `delta` must be in [0, 1), got {delta}.")
        if budget_cost < 0:
            raise ValueError(f"BudgetGuidedReward: `budget_cost` must be >= 0, got {budget_cost}.")
        if correct_min > correct_max or wrong_min > wrong_max:
            raise ValueError(
                "BudgetGuidedReward: each range needs min <= max: "
                f"`correct_min`={correct_min}, `correct_max`={correct_max}, "
                f"`wrong_min`={wrong_min}, `wrong_max`={wrong_max}."
            )
        if correct_min + budget_penalty - budget_cost < wrong_max:
            raise ValueError(
                "BudgetGuidedReward: `correct_min` + `budget_penalty` - `budget_cost` must be >= `wrong_max`, "
                "so that a correct answer over its budget cap still beats every wrong answer; got "
                f"{correct_min} + {budget_penalty} - {budget_cost} < {wrong_max}."
            )
        self.peak = peak
        self.format_penalty = float(format_penalty)
        self.budget_penalty = float(budget_penalty)
        self.delta = float(delta)
        self.alpha_start = float(alpha_start)
        self.alpha_end = float(alpha_end)
        self.alpha_schedule = alpha_schedule
        self.shape = shape
        self.budget_cost = float(budget_cost)
        self.correct_max, self.correct_min = float(correct_max), float(correct_min)
        self.wrong_max, self.wrong_min = float(wrong_max), float(wrong_min)
        self.output_format = output_format
        self.grader = grader
        self.__name__ = self.name  # TRL-style metric key

    def alpha(self, progress: float) -> float:
        """The tolerance factor at a point of training."""
        return annealed(self.alpha_start, self.alpha_end, progress, self.alpha_schedule)

    def best_length(self, budget: float, correct: bool, progress: float) -> float:
        """The solution length that scores highest for a budget at a point of training."""
        if self.peak == "alpha":
            alpha = self.alpha(progress)
            return max(0.0, (1 - alpha) * budget) if correct else (1 + alpha) * budget
        return budget * (1 - self.delta) if correct else budget * (1 + self.delta)

    def score(self, well_formed: bool, budget: Optional[int], length: int, correct: bool,
              b_max: Any = None, progress: float = 0.0, prefilled: bool = False, finished: bool = True) -> float:
        """The reward of one completion."""
        if not well_formed or not finished or budget is None:
            return self.format_penalty
        high, low = (self.correct_max, self.correct_min) if correct else (self.wrong_max, self.wrong_min)
        distance = abs(length - self.best_length(budget, correct, progress))
        reward = FALLOFFS[self.shape](distance, self.alpha(progress) * budget, high, low)
        cap = _budget_cap(b_max)
        if prefilled:
            return reward  # the user's budget: neither the cap penalty nor the cost is the model's doing
        if budget > cap:
            reward += self.budget_penalty
        if correct and self.budget_cost and math.isfinite(cap) and cap > 0:
            reward -= self.budget_cost * min(budget, cap) / cap
        return reward

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        parsed, correct, lengths = resolve_annotations(completions, columns, self.output_format, self.grader)
        size = len(completions)
        caps = columns.get("b_max") or [None] * size
        prefilled = columns.get("prefilled") or [False] * size
        finished = columns.get("finished")
        if finished is None:
            truncated = columns.get("truncated") or [False] * size
            finished = finished_solutions(parsed, truncated, self.output_format or OutputFormat())
        progress = float(columns.get("progress") or 0.0)
        return [
            self.score(output.well_formed, output.budget, length, right, cap, progress, bool(pre), bool(done))
            for output, right, length, cap, pre, done in zip(parsed, correct, lengths, caps, prefilled, finished)
        ]
