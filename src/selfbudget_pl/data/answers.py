"""Gold answers out of reference solutions: GSM8K ``#### 42`` and MATH's last ``\\boxed{}``.

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
