"""The output format, in one place: ``<budget>N</budget><solution> ... \\boxed{answer} </solution>``.

Training (SFT targets, GRPO rewards), evaluation and generation all render and parse through this
module, so the tags and the rules for a well-formed answer cannot drift apart.

Model output is untrusted: :meth:`OutputFormat.parse` is total (any string gives a result, never an
exception) and does linear work bounded by ``max_chars``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Optional

# Longest final answer we keep; anything longer is treated as no answer (it cannot be graded cheaply).
MAX_ANSWER_CHARS = 1_000
_BOXED_COMMANDS = ("\\boxed", "\\fbox")


class FormatError(str, enum.Enum):
    """Why a completion is not well-formed (``NONE`` when it is)."""

    NONE = "none"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    NO_BUDGET = "no_budget"
    MULTIPLE_BUDGETS = "multiple_budgets"
    UNCLOSED_BUDGET = "unclosed_budget"
    BUDGET_NOT_INTEGER = "budget_not_integer"
    BUDGET_OUT_OF_RANGE = "budget_out_of_range"
    NO_SOLUTION = "no_solution"
    NO_ANSWER = "no_answer"


@dataclass(frozen=True)
class ParsedOutput:
    """A parsed completion. ``budget``/``solution``/``answer`` are filled as far as parsing got."""

    error: FormatError
    budget: Optional[int] = None
    solution: Optional[str] = None  # everything after the closing budget tag
    answer: Optional[str] = None  # content of the last \\boxed{} in the solution

    @property
    def well_formed(self) -> bool:
        return self.error is FormatError.NONE


def extract_boxed(text: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces allowed).

    Returns None when there is none, when its braces never close, or when it is longer than
    ``max_answer_chars``. Runs in time linear in the length of the text after the last command.
    """
    start = -1
    for command in _BOXED_COMMANDS:
        start = max(start, text.rfind(command + "{"))
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    depth = 1
    # Scan only as far as an answer may reach: a longer one is rejected anyway.
    limit = min(len(text), begin + max_answer_chars + 1)
    for pos in range(begin, limit):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:pos].strip()
    return None


def count_solution_tokens(solution_text: str, tokenizer: Any) -> int:
    """The length ``l`` of a solution: its tokens under the model's tokenizer (no BOS/EOS added). The one
    definition that budget labels, rewards and metrics all count with, so they cannot disagree."""
    return len(tokenizer(solution_text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class OutputFormat:
    """Tags of the SelfBudgeter output format and the rules for parsing it.

    Args:
        budget_open/budget_close/solution_open/solution_close: the tag strings.
        max_budget: budgets above this are absurd (``BUDGET_OUT_OF_RANGE``), so a model cannot claim
            1e99 tokens and poison rewards or metrics.
        max_chars: completions longer than this are rejected unparsed (``TOO_LONG``).
        require_solution_block: whether ``<solution>`` must open the solution (the paper's format);
            when the closing tag is missing the completion still counts as long as it has an answer,
            because truncation is measured separately.
    """

    budget_open: str = "<budget>"
    budget_close: str = "</budget>"
    solution_open: str = "<solution>"
    solution_close: str = "</solution>"
    max_budget: int = 1_000_000
    max_chars: int = 200_000
    require_solution_block: bool = True

    @property
    def tags(self) -> list[str]:
        return [self.budget_open, self.budget_close, self.solution_open, self.solution_close]

    def budget_prefix(self, budget: int) -> str:
        """The text that states a budget and opens the solution (what pre-filling writes)."""
        return f"{self.budget_open}{int(budget)}{self.budget_close}{self.solution_open}"

    def render(self, budget: int, reasoning: str) -> str:
        """A complete, well-formed response for a budget and a solution text."""
        return f"{self.budget_prefix(budget)}{reasoning}{self.solution_close}"

    def solution_text(self, reasoning: str) -> str:
        """The part of a rendered response whose token count is the budget label."""
        return f"{self.solution_open}{reasoning}{self.solution_close}"

    def screen(self, text: object) -> tuple[str, Optional[ParsedOutput]]:
        """``text`` as a string, and why it cannot be parsed at all (not text, empty, too long) or None."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str) or not text.strip():
            return "", ParsedOutput(FormatError.EMPTY)
        if len(text) > self.max_chars:
            return text, ParsedOutput(FormatError.TOO_LONG)
        return text, None

    def parse(self, text: object) -> ParsedOutput:
        """Parse any completion; never raises."""
        text, rejected = self.screen(text)
        if rejected is not None:
            return rejected

        open_at = text.find(self.budget_open)
        if open_at < 0:
            return ParsedOutput(FormatError.NO_BUDGET)
        if text.find(self.budget_open, open_at + len(self.budget_open)) >= 0:
            return ParsedOutput(FormatError.MULTIPLE_BUDGETS)
        value_at = open_at + len(self.budget_open)
        close_at = text.find(self.budget_close, value_at)
        if close_at < 0:
            return ParsedOutput(FormatError.UNCLOSED_BUDGET)
        budget, error = self._parse_budget(text[value_at:close_at])
        solution = text[close_at + len(self.budget_close) :]
        if error is not FormatError.NONE:
            return ParsedOutput(error, budget=None, solution=solution)

        stripped = solution.lstrip()
        if self.require_solution_block and not stripped.startswith(self.solution_open):
            return ParsedOutput(FormatError.NO_SOLUTION, budget=budget, solution=solution)
        body = stripped[len(self.solution_open) :] if stripped.startswith(self.solution_open) else stripped
        end = body.find(self.solution_close)
        if end >= 0:
            body = body[:end]
        answer = extract_boxed(body)
        if not answer:  # no \boxed{}, or an empty one: nothing was answered
            return ParsedOutput(FormatError.NO_ANSWER, budget=budget, solution=solution)
        return ParsedOutput(FormatError.NONE, budget=budget, solution=solution, answer=answer)

    def _parse_budget(self, raw: str) -> tuple[Optional[int], FormatError]:
        raw = raw.strip()
        # Bounded before int(): Python refuses >4300-digit ints anyway, and we want a typed error.
        if not _INTEGER.fullmatch(raw[:32]) or len(raw) > 32:
            return None, FormatError.BUDGET_NOT_INTEGER
        value = int(raw)
        if value < 1 or value > self.max_budget:
            return None, FormatError.BUDGET_OUT_OF_RANGE
        return value, FormatError.NONE


_INTEGER = re.compile(r"[+-]?\d+")
