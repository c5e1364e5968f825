"""Length-control rewards from related work, for comparison runs (``docs/method.md``).

- :class:`L1ExactReward`, :class:`L1MaxReward`: LCPO (Aggarwal & Welleck 2025). The target ``N`` is the
  ``target_length`` column when given (L1's "Think for N tokens" prompts), else the completion's own
  ``<budget>``. A completion with neither gets ``no_target_reward``; pair these with
  :class:`~selfbudget_pl.rewards.simple.FormatReward` to penalise a missing budget tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.annotate import resolve_annotations
from selfbudget_pl.rewards.grader import Grader


def _targets(parsed: Sequence[Any], columns: dict[str, Any]) -> list[Optional[float]]:
    given = columns.get("target_length") or [None] * len(parsed)
    return [float(target) if target is not None else output.budget for target, output in zip(given, parsed)]


class _LengthControlled(ABC):
    name: str

    def __init__(self, alpha: float, no_target_reward: float, output_format: Optional[OutputFormat],
                 grader: Optional[Grader]) -> None:
        if alpha < 0:
            raise ValueError(f"{type(self).__name__}: `alpha` must be >= 0, got {alpha}.")
        self.alpha = float(alpha)
        self.no_target_reward = float(no_target_reward)
        self.output_format, self.grader = output_format, grader
        self.__name__ = self.name

    @abstractmethod
    def score(self, correct: bool, target: float, length: int) -> float:
        """The reward of one completion with target length ``target`` and length ``length``."""

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        parsed, correct, lengths = resolve_annotations(completions, columns, self.output_format, self.grader)
        return [
            self.no_target_reward if target is None else self.score(right, target, length)
            for target, right, length in zip(_targets(parsed, columns), correct, lengths)
        ]


class L1ExactReward(_LengthControlled):
    """LCPO-Exact: ``R = C - alpha * |N - l|`` with ``C`` = 1 for a correct answer, else 0."""

    name = "l1_exact"

    def __init__(self, alpha: float = 0.0003, no_target_reward: float = 0.0,
                 output_format: Optional[OutputFormat] = None, grader: Optional[Grader] = None) -> None:
        super().__init__(alpha, no_target_reward, output_format, grader)

    def score(self, correct: bool, target: float, length: int) -> float:
        return float(correct) - self.alpha * abs(target - length)


class L1MaxReward(_LengthControlled):
    """LCPO-Max: ``R = C * clip(alpha * (N - l) + delta, 0, 1)``: full credit under the budget, fading over."""

    name = "l1_max"

    def __init__(self, alpha: float = 0.0003, delta: float = 0.5, no_target_reward: float = 0.0,
                 output_format: Optional[OutputFormat] = None, grader: Optional[Grader] = None) -> None:
        super().__init__(alpha, no_target_reward, output_format, grader)
        self.delta = float(delta)

    def score(self, correct: bool, target: float, length: int) -> float:
        return float(correct) * min(max(self.alpha * (target - length) + self.delta, 0.0), 1.0)
