"""Answers out of solutions: the gold one of a reference (GSM8K ``#### 42``, MATH's last ``\\boxed{}``), and
the one a free-form answer of a base model states (:func:`stated_answer`).

Extraction returns the answer string as written (GSM8K thousands separators removed); judging
equivalence is the grader's job, not ours.
"""

from __future__ import annotations

import re
from typing import Optional

from selfbudget_pl.format import extract_boxed

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
    ``#### x`` line, else the number after its last "the answer is" (None when it states none)."""
    boxed = extract_math_answer(text)
    if boxed:
        return boxed
    gsm8k = extract_gsm8k_answer(text)
    if gsm8k:
        return gsm8k
    said = [match.group(1) for match in _ANSWER_IS.finditer(text)]
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
