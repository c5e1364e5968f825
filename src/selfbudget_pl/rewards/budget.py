"""The SelfBudgeter reward (``docs/method.md``; every constant configurable).

    cos(x, X, r0, rX) = rX + (r0 - rX) * (1 + cos(pi * min(x, X) / X)) / 2
    alpha = alpha_start -> alpha_end over training (linear by default; progress in optimizer steps)
    peak  = max(0, (1 - alpha) b) if correct else (1 + alpha) b          # peak="alpha" (the paper, as read)
    peak  = b (1 - delta) if correct else b (1 + delta)                 # peak="fixed" (ablation)
    R = r_f                                                             if not well-formed or unfinished
    R = cos(d, alpha b, s_max, s_min) + (r_b if b > b_max else 0) - c min(n, b_max) / b_max [correct]
    d = max(0, |l - peak| - band b)                                     # band 0 in the paper
    n = b (cost_on="budget") or max(b, l) (cost_on="spent")

with ``[s_min, s_max]`` the correct range ``[s_c_min, s_c_max]`` or the wrong one ``[s_w_min, s_w_max]``.
``shape="linear"`` replaces the cosine by a straight fall from ``s_max`` at the peak to ``s_min`` at the
width (a cosine is flat at its peak, so small forecast errors cost almost nothing). ``band`` widens the
peak to a band of ``2 band b`` where every length scores ``s_max``: within a group, lengths that all land
in it then differ only by what their budgets cost, so the cost ranks the budgets instead of the noise of
landing a token or two either side of the peak. ``budget_cost`` (c,
0 in the paper) charges a correct answer for the budget it states, relative to its cap: compression
pressure on the forecast itself, while the precision term keeps the length on the forecast. Neither r_b
nor the cost applies to a pre-filled budget: it is the user's, not the model's.

The paper's form and ours before it can be gamed: beyond the width a correct answer keeps ``s_c_min``
however far its length is from its budget, while the cost falls with the stated budget, so stating a
budget of 1 and writing a long answer scores ``s_c_min`` minus almost nothing, above every honest answer
at the edge of its tolerance (``s_c_min - c``). Two parameters close that exit:
``correct_floor`` (beyond the width a correct answer's precision term keeps falling, at the linear
shape's slope ``(s_c_max - s_c_min) / (alpha b)`` per token, down to the floor) and ``cost_on="spent"``
(the cost charged on ``max(b, l)``, so understating the budget never lowers it). With a floor set,
:func:`constant_violations` also requires the inequalities that make every such exit lose.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.annotate import finished_solutions, resolve_annotations
from selfbudget_pl.rewards.grader import Grader
from selfbudget_pl.schema import Findings, Schema, check_arguments, check_ordered, spec

SCHEDULES = ("linear", "cosine", "constant")
PEAKS = ("alpha", "fixed")
SHAPES = ("cosine", "linear")
COST_BASES = ("budget", "spent")


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


def constant_violations(
    correct_max: float, correct_min: float, wrong_max: float, wrong_min: float, budget_penalty: float,
    budget_cost: float, format_penalty: float, correct_floor: Optional[float] = None,
) -> list[tuple[str, str]]:
    """The inequalities between :class:`BudgetGuidedReward`'s constants that fail, each as (the argument
    to change, what fails with the values), checked by :class:`BudgetGuidedRewardSchema`.

    Always (the paper's constraint, with the lowest correct score): ``lowest + r_b - c >= s_w_max``, where
    ``lowest`` is ``correct_floor`` when set, else ``s_c_min``: a correct answer however far from its budget
    and over its cap still beats every wrong answer.

    With ``correct_floor`` set (the form claims to have no exit, so it must have none):
      - ``s_c_max > s_c_min``: the fall beyond the width continues the slope within it;
      - ``correct_floor < min(s_c_min, s_c_max + r_b) - c``: an absurd budget scores below every honest
        answer (within the tolerance) whose budget is within the cap, the worst of which scores
        ``s_c_min - c``, and below the best honest answer of its own length when that one's budget is over
        the cap (``s_c_max + r_b - c``). An understated budget pays at least nothing, so this holds
        whatever ``cost_on`` is (``spent`` makes the answer pay for its length on top);
      - ``r_f < s_w_min + r_b``: stopping before the answer scores below every finished answer.
    """
    failures = []
    lowest, lowest_name = (correct_min, "correct_min") if correct_floor is None else (correct_floor, "correct_floor")
    if lowest + budget_penalty - budget_cost < wrong_max:
        failures.append((
            "budget_penalty",
            f"`{lowest_name}` + `budget_penalty` - `budget_cost` must be >= `wrong_max`, so that a correct answer "
            f"far from and over its budget cap still beats every wrong answer; got {lowest_name}={lowest} + "
            f"budget_penalty={budget_penalty} - budget_cost={budget_cost} < wrong_max={wrong_max}",
        ))  # fmt: skip
    if correct_floor is None:
        return failures
    if correct_max <= correct_min:
        failures.append((
            "correct_max",
            f"`correct_floor` needs `correct_max` > `correct_min` (beyond the width the precision term keeps "
            f"falling at the slope it falls within it); got correct_max={correct_max} <= correct_min={correct_min}",
        ))  # fmt: skip
    honest_worst = min(correct_min, correct_max + budget_penalty) - budget_cost
    if not correct_floor < honest_worst:
        failures.append((
            "correct_floor",
            "`correct_floor` must be < min(`correct_min`, `correct_max` + `budget_penalty`) - `budget_cost`, so "
            "that a correct answer with an absurd budget scores below every honest one within the tolerance; "
            f"got correct_floor={correct_floor} >= {honest_worst:g}",
        ))  # fmt: skip
    if not format_penalty < wrong_min + budget_penalty:
        failures.append((
            "format_penalty",
            f"`format_penalty` must be < `wrong_min` + `budget_penalty`, so that stopping before the answer "
            f"scores below every finished answer; got format_penalty={format_penalty} >= {wrong_min + budget_penalty:g}",
        ))  # fmt: skip
    return failures


@dataclass
class BudgetGuidedRewardSchema(Schema):
    """The arguments of :class:`BudgetGuidedReward` (``reward.functions.budget_guided``) and what each allows."""

    TARGETS = ("selfbudget_pl.rewards.budget.BudgetGuidedReward",)
    INJECTED = ("output_format", "grader")

    peak: str = spec(choices=PEAKS, note="alpha: the paper's moving peak; fixed: b(1 -/+ delta)")
    format_penalty: float = spec()
    budget_penalty: float = spec()
    delta: float = spec(ge=0, lt=1)
    alpha_start: float = spec(gt=0)
    alpha_end: float = spec(gt=0)
    alpha_schedule: str = spec(choices=SCHEDULES)
    shape: str = spec(choices=SHAPES)
    band: float = spec(ge=0, note="half the band around the peak, as a fraction of b, scoring the range's maximum")
    budget_cost: float = spec(ge=0, note="a correct answer with its own capped budget loses budget_cost * n / b_max")
    correct_max: float = spec()
    correct_min: float = spec()
    wrong_max: float = spec()
    wrong_min: float = spec()
    correct_floor: Optional[float] = spec(note="null: a correct answer far from its budget keeps correct_min")
    cost_on: str = spec(choices=COST_BASES, note="n: the stated budget, or max(budget, length)")

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        check_ordered(node, key, findings, "correct_min", "correct_max")
        check_ordered(node, key, findings, "wrong_min", "wrong_max")
        check_ordered(node, key, findings, "correct_floor", "correct_min")
        # the constants' inequalities, on the node's values (the constructor's defaults for keys left out)
        defaults = inspect.signature(BudgetGuidedReward).parameters
        values = {name: node.get(name, defaults[name].default) for name in inspect.signature(constant_violations).parameters}
        numbers = [value for name, value in values.items() if name != "correct_floor"]
        floor = values["correct_floor"]
        if all(isinstance(v, (int, float)) for v in numbers) and (floor is None or isinstance(floor, (int, float))):
            for name, message in constant_violations(**values):
                findings.error(f"{key}.{name}", values[name], message)


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
        band: ``>= 0``, half the width of the band around the peak, as a fraction of ``b``, where every
            length scores the range's maximum; the fall-off starts at its edges (0: the paper).
        budget_cost: ``c >= 0``; a correct answer with its own budget and a finite cap loses
            ``c * min(n, b_max) / b_max`` (0: the paper's reward; ``n`` as ``cost_on`` says).
        cost_on: what the cost is charged on: ``budget`` (the stated ``b``) or ``spent`` (``max(b, l)``:
            stating less than was written saves nothing). r_b is always on the stated budget.
        correct_floor: None (the paper): beyond the width a correct answer scores ``correct_min`` however
            far its length is from the budget. A number (<= ``correct_min``): it keeps falling at the linear
            shape's slope down to this floor, and the constants must pass :func:`constant_violations`'s
            checks for a form without exits.
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
        band: float = 0.0,
        budget_cost: float = 0.0,
        correct_max: float = 1.0,
        correct_min: float = 0.5,
        wrong_max: float = -0.5,
        wrong_min: float = -1.0,
        correct_floor: Optional[float] = None,
        cost_on: str = "budget",
        output_format: Optional[OutputFormat] = None,
        grader: Optional[Grader] = None,
    ) -> None:
        check_arguments(BudgetGuidedRewardSchema, locals(), "BudgetGuidedReward")
        self.peak = peak
        self.format_penalty = float(format_penalty)
        self.budget_penalty = float(budget_penalty)
        self.delta = float(delta)
        self.alpha_start = float(alpha_start)
        self.alpha_end = float(alpha_end)
        self.alpha_schedule = alpha_schedule
        self.shape = shape
        self.band = float(band)
        self.budget_cost = float(budget_cost)
        self.correct_max, self.correct_min = float(correct_max), float(correct_min)
        self.wrong_max, self.wrong_min = float(wrong_max), float(wrong_min)
        self.correct_floor = None if correct_floor is None else float(correct_floor)
        self.cost_on = cost_on
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
        distance = max(0.0, abs(length - self.best_length(budget, correct, progress)) - self.band * budget)
        width = self.alpha(progress) * budget
        reward = FALLOFFS[self.shape](distance, width, high, low)
        if correct and self.correct_floor is not None and distance > width:
            reward = max(self.correct_floor, low - (high - low) * (distance - width) / width)
        cap = _budget_cap(b_max)
        if prefilled:
            return reward  # the user's budget: neither the cap penalty nor the cost is the model's doing
        if budget > cap:
            reward += self.budget_penalty
        if correct and self.budget_cost and math.isfinite(cap) and cap > 0:
            charged = max(budget, length) if self.cost_on == "spent" else budget
            reward -= self.budget_cost * min(charged, cap) / cap
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
