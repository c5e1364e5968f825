"""The one record every data source produces, and the bookkeeping for rows that are dropped.

A record is a plain dict (cheap to pickle into DataLoader workers, trivially written as JSONL).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional, TypedDict


class _RequiredFields(TypedDict):
    id: str
    problem: str
    answer: str  # gold final answer, as the grader compares it
    solution: Optional[str]  # reference solution ending in \boxed{answer}, when the source has one
    difficulty: float  # synthetic: k operands; MATH: level 1-5; GSM8K: solution steps; NaN = unknown
    source: str  # name of the source the row came from (e.g. "gsm8k/train", "synthetic/val")


class MathRecord(_RequiredFields, total=False):
    """A math problem, normalised. The optional keys exist once the record is budget-labelled.

    ``response`` is a full rendered target ``<budget>N</budget><solution>...</solution>``, ``budget`` its
    N, and ``b_max`` the stage-2 budget cap (the label length of the correct cold-start response;
    None = no correct cold-start response, so no cap).
    """

    response: str
    budget: int
    b_max: Optional[int]
    samples_correct: int  # of the base model's ``samples`` answers, how many were correct and finished
    samples: int


class DataError(ValueError):
    """Input that cannot be used; the message names the file (or dataset) and 1-based line/row."""


class BadRow(DataError):
    """One row that cannot be used, and why: ``cause`` is the short name it is counted under (e.g.
    ``invalid_json``); the message is ``<file>:<line>: what is wrong``. Whether it stops the run or is
    dropped and counted is the ``on_bad_row`` switch's decision."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


class DroppedRows:
    """Counts rows left out, per scope (a source name or a split) and reason, for one logged summary."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, scope: str, reason: str, where: str) -> None:
        """Count one dropped row; the first location per (scope, reason) is kept for the summary."""
        self.counts[(scope, reason)] += 1
        self.examples.setdefault((scope, reason), where)

    def count(self, scope: Optional[str] = None, reason: Optional[str] = None) -> int:
        """Rows dropped, optionally only in one scope and/or for one reason."""
        return sum(
            n
            for (row_scope, row_reason), n in self.counts.items()
            if (scope is None or row_scope == scope) and (reason is None or row_reason == reason)
        )

    def by_reason(self, scope: str) -> dict[str, int]:
        """Drop counts of one scope, per reason."""
        return {reason: n for (row_scope, reason), n in self.counts.items() if row_scope == scope}

    def describe(self, scope: Optional[str] = None) -> str:
        """``reason: count (first: where)`` for every reason, optionally of one scope only."""
        return "; ".join(
            f"{reason}: {n} (first: {self.examples[(row_scope, reason)]})"
            for (row_scope, reason), n in sorted(self.counts.items())
            if scope is None or row_scope == scope
        )

    def log_summary(self, logger: logging.Logger) -> None:
        """One warning line per (scope, reason) with a count and the first offending row."""
        for (scope, reason), n in sorted(self.counts.items()):
            logger.warning("%s: dropped %d row(s): %s (first: %s)", scope, n, reason, self.examples[(scope, reason)])
