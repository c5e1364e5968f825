"""Plain rewards: correctness and format (the control run of ``../shared/docs/toy_task_notes.md`` uses both)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.annotate import grade_parsed
from selfbudget_pl.rewards.grader import Grader


class AccuracyReward:
    """``correct_reward`` for a correct final answer, ``wrong_reward`` otherwise (malformed = wrong)."""

    name = "accuracy"

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0,
                 output_format: Optional[OutputFormat] = None, grader: Optional[Grader] = None) -> None:
        self.correct_reward, self.wrong_reward = float(correct_reward), float(wrong_reward)
        self.output_format, self.grader = output_format, grader
        self.__name__ = self.name

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        correct = columns.get("correct")
        if correct is None:
            if self.grader is None or "answer" not in columns:
                raise ValueError("AccuracyReward needs `correct=[...]`, or a `grader` and the `answer` column.")
            parsed = columns.get("parsed") or [(self.output_format or OutputFormat()).parse(c) for c in completions]
            correct = grade_parsed(parsed, columns["answer"], self.grader)
        return [self.correct_reward if right else self.wrong_reward for right in correct]


class FormatReward:
    """``well_formed_reward`` for a well-formed completion, ``malformed_reward`` (``r_f``) otherwise."""

    name = "format"

    def __init__(self, well_formed_reward: float = 0.0, malformed_reward: float = -1.0,
                 output_format: Optional[OutputFormat] = None) -> None:
        self.well_formed_reward, self.malformed_reward = float(well_formed_reward), float(malformed_reward)
        self.output_format = output_format
        self.__name__ = self.name

    def __call__(self, completions: Sequence[str], **columns: Any) -> list[float]:
        parsed = columns.get("parsed") or [(self.output_format or OutputFormat()).parse(c) for c in completions]
        return [self.well_formed_reward if output.well_formed else self.malformed_reward for output in parsed]
