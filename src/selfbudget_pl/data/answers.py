"""Answers out of solutions: the gold one of a reference (GSM8K ``#### 42``, MATH's last ``\\boxed{}``), and
the one a free-form answer of a base model states (:func:`stated_answer`, and :class:`FreeFormOutput`, which
parses a base model's completions for evaluation as :class:`~selfbudget_pl.format.OutputFormat` parses a
trained model's).

Extraction returns the answer string as written (GSM8K thousands separators removed); judging
equivalence is the grader's job, not ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from selfbudget_pl.format import FormatError, OutputFormat, ParsedOutput, extract_boxed

_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# GSM8K's calculator markup (<<48/2=24>>) is a tool trace, not reasoning a model should learn to write.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
# A few MATH solutions write "\boxed 2" without braces.
_BRACELESS_BOXED = re.compile(r"\\boxed +([^\s{}$\\]+)")
# Chat models answer in prose ("The answer is 42."), often after an empty \boxed{} copied from the prompt.
# The number entire (never a prefix of it), and not the first operand of a calculation ("The answer is
# 20 * 15 = 250" states no answer, least of all 20): small models write that, and crediting it labels a
# wrong answer as correct.
_ANSWER_IS = re.compile(
    r"answer is:?\s*\$?\s*([-+]?\d(?:[\d,]*\d)?(?:\.\d+)?)(?![.,]?\d)(?!\s*(?:[-+*/×÷^=]|x\s*\$?\d))",
    re.IGNORECASE,
)
# Else the last number written, as lm-eval-harness's "flexible-extract" reads GSM8K answers and math-verify
# reads prose (its last expression): a chat model's "3 + 5 = 8." or "Tom has 13 apples now." A number entire,
# never digits inside a word or a hyphenated one ("v3", "base-10"); a sign only where it stands alone ("-2").
# Thousands groups of exactly three digits, so no run of digits and commas makes it backtrack.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+](?=\d)|(?<![\w.+-]))\d+(?:,\d{3})*(?:\.\d+)?(?!\w)")


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The number after the last ``#### `` line, without thousands separators (``1,000`` -> ``1000``)."""
    matches = _GSM8K_FINAL.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer or None


def gsm8k_reasoning(text: str, answer: str) -> str:
    """A GSM8K solution as a reference reasoning: calculator markup removed, ``#### x`` -> ``\\boxed{x}``."""
    body = _GSM8K_FINAL.sub("", _CALCULATOR.sub("", text)).rstrip()
    return f"{body}\n\\boxed{{{answer}}}"


def brace_boxed(solution: str) -> str:
    """Rewrite brace-less ``\\boxed 2`` as ``\\boxed{2}``, so the answer parses like every other."""
    return _BRACELESS_BOXED.sub(lambda match: f"\\boxed{{{match.group(1)}}}", solution)


def extract_math_answer(solution: str) -> Optional[str]:
    """Content of the last ``\\boxed{}``/``\\fbox{}`` (nested braces; brace-less ``\\boxed 2`` too)."""
    return extract_boxed(brace_boxed(solution))


def stated_answer(text: str) -> Optional[str]:
    """The final answer a free-form solution states: its last non-empty ``\\boxed{}``, else its last
    ``#### x`` line, else the number after its last "the answer is", else its last number (None when it
    writes none)."""
    boxed = extract_math_answer(text)
    if boxed:
        return boxed
    gsm8k = extract_gsm8k_answer(text)
    if gsm8k:
        return gsm8k
    said = [match.group(1) for match in _ANSWER_IS.finditer(text)] or _NUMBER.findall(text)
    if not said:
        return None
    answer = said[-1]
    return answer.replace(",", "") if _THOUSANDS.fullmatch(answer) else answer


def boxed_solution(text: str, answer: str) -> str:
    """``text`` as a solution that ends in ``\\boxed{answer}``: unchanged when its last box holds the
    answer, else with the box appended on its own line (as :func:`gsm8k_reasoning` does for references)."""
    if extract_math_answer(text) == answer:
        return text
    return f"{text.rstrip()}\n\\boxed{{{answer}}}"


@dataclass(frozen=True)
class FreeFormOutput(OutputFormat):
    """A base model's completions, which state no budget: every finished text is well formed and its answer is
    :func:`stated_answer` (``NO_ANSWER`` when it writes none). Evaluating the base model with it gives the
    accuracy and lengths that compression is measured against (the paper's baseline); with
    :class:`~selfbudget_pl.format.OutputFormat` every such completion fails on its missing budget tag."""

    def parse(self, text: object) -> ParsedOutput:
        """Parse any completion; never raises. ``solution`` stays None: the whole completion is the answer's
        length."""
        text, rejected = self.screen(text)
        if rejected is not None:
            return rejected
        answer = stated_answer(text)
        return ParsedOutput(FormatError.NONE if answer else FormatError.NO_ANSWER, answer=answer)
