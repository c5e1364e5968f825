"""A source's rows as records: each file schema's fields, the checks every row passes, and what happens
to a bad row. File schemas (``schema=``):

- ``gsm8k``: ``question``, ``answer`` (reasoning, then ``#### <number>``).
- ``math``: ``problem``, ``solution`` (answer = last ``\\boxed{}``), optional ``id``, ``level`` ("Level 3").
- ``math500``: ``problem``, ``answer``, optional ``solution``, ``level`` (int), ``unique_id``/``id``
  (also reads AIME/AMC-style files that give the answer directly).
- ``labelled``: what ``scripts/label_budgets.py`` writes: the record fields plus ``response``,
  ``budget``, ``b_max`` (``response``/``budget`` null: no cold-start target; ``b_max`` null: no cap).
- ``question_answer``: ``question``, ``answer`` (a final answer, e.g. STILL-3-Preview RL data).
- ``s1k``: ``question``, ``solution`` (answer = last ``\\boxed{}``, else the whole solution when it is
  one short line, e.g. an AIME number); s1K-1.1's rows without a checkable answer are dropped.
- ``auto``: one of the above, chosen from the first row's fields.

Every row is checked before it becomes a record; a bad one is a :class:`BadRow` whose message is
``<file>:<line>: what is wrong`` and whose ``cause`` it is counted under: ``invalid_utf8``,
``line_too_long`` (over ``max_line_bytes``, never read whole), ``invalid_json``, ``too_deeply_nested``,
``not_an_object``, ``invalid_unicode`` (a lone surrogate), ``unknown_schema``, ``missing_field``,
``wrong_type``, ``empty_problem``, ``bad_answer`` (NaN, infinite, boolean, list or object; numbers are
read as numbers: 27.0 -> "27"), ``unextractable_answer``, ``bad_budget``, ``duplicate_id``. With
``on_bad_row="drop"`` (the default) bad rows are left out and counted in ``dropped`` (logged at the
end of loading, never silently); ``"error"`` raises the first. A source whose every row is bad is an
error either way.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

from selfbudget_pl.data.answers import brace_boxed, extract_gsm8k_answer, extract_math_answer, gsm8k_reasoning
from selfbudget_pl.data.records import BadRow, DataError, DroppedRows, MathRecord

SCHEMAS = ("gsm8k", "math", "math500", "labelled", "question_answer", "s1k", "auto")
BAD_ROW_POLICIES = ("drop", "error")
# Math rows are flat objects (labelled ones hold a list or two); deeper nesting is not data we read.
MAX_NESTING = 32

log = logging.getLogger(__name__)


class UnextractableAnswer(BadRow):
    """The row is well-formed but its gold answer cannot be found."""

    def __init__(self, message: str) -> None:
        super().__init__("unextractable_answer", message)


def check_structure(row: dict[str, Any], where: str) -> None:
    """Raise :class:`BadRow` if ``row`` nests deeper than :data:`MAX_NESTING` or holds a string that is
    not valid Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes let through and tokenizers refuse)."""
    stack: list[tuple[Any, int, str]] = [(row, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                raise BadRow("too_deeply_nested", f"{where}: field {path!r} nests deeper than {MAX_NESTING} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    _check_text(key, where, f"a key in {path!r}" if path else "a key")
                stack.append((item, depth + 1, name))
        elif isinstance(value, str):
            _check_text(value, where, f"field {path!r}")


def _check_text(text: str, where: str, what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRow(
            "invalid_unicode",
            f"{where}: {what} holds a lone surrogate U+{ord(text[error.start]):04X} at character {error.start + 1}",
        ) from None


def detect_schema(row: dict[str, Any], where: str) -> str:
    """The schema a row's fields fit (see module doc)."""
    if "response" in row and "budget" in row:
        return "labelled"
    # "problem" first: AIME/AMC files also carry a "question" copy of the problem.
    if "problem" in row and "answer" in row:
        return "math500"
    if "problem" in row and "solution" in row:
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k"
    raise BadRow("unknown_schema", f"{where}: cannot tell the schema from fields {sorted(row)}; set schema= explicitly")


def records_from_rows(
    rows: Iterable[tuple[str, dict[str, Any] | BadRow]],
    schema: str,
    source_name: str,
    on_bad_row: str = "drop",
    dropped: Optional[DroppedRows] = None,
) -> list[MathRecord]:
    """Normalise ``(location, row)`` pairs into records; ``auto`` is decided by the first good row.

    A row that is a :class:`BadRow` already (the file reader's verdict) or fails a check here is dropped
    and counted in ``dropped`` under its cause, or raised with ``on_bad_row="error"``. Without a
    ``dropped`` to count in, the drops are logged here, at the end of the source.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not one of {BAD_ROW_POLICIES}")
    counts = DroppedRows() if dropped is None else dropped
    before = counts.count(source_name)
    records: list[MathRecord] = []
    first_seen: dict[str, str] = {}
    number = 0
    for number, (where, row) in enumerate(rows, start=1):
        try:
            if isinstance(row, BadRow):
                raise row
            check_structure(row, where)
            row_schema = detect_schema(row, where) if schema == "auto" else schema
            record = _CONVERTERS[row_schema](row, where, source_name, f"{source_name}:{number}")
            if record["id"] in first_seen:
                raise BadRow("duplicate_id", f"{where}: id {record['id']!r} already used at {first_seen[record['id']]}")
        except BadRow as error:
            if on_bad_row == "error":
                raise
            counts.add(source_name, error.cause, str(error))
            continue
        if schema == "auto":
            schema = row_schema
        first_seen[record["id"]] = where
        records.append(record)
    bad = counts.count(source_name) - before
    if bad and not records:
        raise DataError(f"{source_name}: all {number} row(s) are bad: {counts.describe(source_name)}")
    if dropped is None:
        counts.log_summary(log)
    return records


def _field(row: dict[str, Any], key: str, where: str, schema: str) -> Any:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", f"{where}: missing field {key!r} (schema {schema!r}; row has {sorted(row)})")
    return value


def _text(row: dict[str, Any], key: str, where: str, schema: str) -> str:
    value = _field(row, key, where, schema)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _problem(row: dict[str, Any], key: str, where: str, schema: str) -> str:
    problem = _text(row, key, where, schema)
    if not problem.strip():
        raise BadRow("empty_problem", f"{where}: field {key!r} is empty")
    return problem


def _answer_text(value: Any, where: str) -> str:
    """A gold answer as the grader compares it: strings as written, numbers as numbers (AMC-style files
    store 27.0, which is "27"); NaN, infinities, booleans, lists and objects are bad rows, not strings."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
        raise BadRow("bad_answer", f"{where}: field 'answer' is {kind} ({value!r:.40}); expected a string or a number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRow("bad_answer", f"{where}: field 'answer' is {value} (NaN or infinite)")
        if value.is_integer():
            return str(int(value))
    return str(value)


def _level(value: Any) -> float:
    """MATH level as a number: 3, "3" or "Level 3" -> 3.0; unknown ("Level ?", missing) -> NaN."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value or "").removeprefix("Level").strip()
    return float(text) if text.isdigit() else math.nan


def _row_id(row: dict[str, Any], fallback: str) -> str:
    for key in ("id", "unique_id"):
        if row.get(key) is not None:
            return str(row[key])
    return fallback


def _from_gsm8k(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    problem = _problem(row, "question", where, "gsm8k")
    text = _text(row, "answer", where, "gsm8k")
    answer = extract_gsm8k_answer(text)
    if answer is None:
        raise UnextractableAnswer(f"{where}: no '#### <answer>' line in field 'answer'")
    steps = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("####")]
    return MathRecord(
        id=_row_id(row, fallback_id),
        problem=problem,
        answer=answer,
        solution=gsm8k_reasoning(text, answer),
        difficulty=float(len(steps)),  # GSM8K has no level; its number of solution steps is the proxy
        source=source_name,
    )


def _from_math(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    problem = _problem(row, "problem", where, "math")
    solution = brace_boxed(_text(row, "solution", where, "math"))
    answer = extract_math_answer(solution)
    if answer is None:
        raise UnextractableAnswer(f"{where}: no \\boxed{{}} answer in field 'solution'")
    return MathRecord(
        id=_row_id(row, fallback_id),
        problem=problem,
        answer=answer,
        solution=solution,
        difficulty=_level(row.get("level")),
        source=source_name,
    )


def _from_math500(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    problem = _problem(row, "problem", where, "math500")
    answer = _answer_text(_field(row, "answer", where, "math500"), where)
    if not answer:
        raise UnextractableAnswer(f"{where}: empty field 'answer'")
    solution = row.get("solution")
    return MathRecord(
        id=_row_id(row, fallback_id),
        problem=problem,
        answer=answer,
        solution=brace_boxed(solution) if isinstance(solution, str) and solution.strip() else None,
        difficulty=_level(row.get("level")),
        source=source_name,
    )


def _from_labelled(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    """A labelled row; ``response`` and ``budget`` null together mark a problem with no cold-start target
    (RL only, capped by ``b_max`` or, when that is null too, uncapped)."""
    b_max = row.get("b_max")
    if b_max is not None and (not isinstance(b_max, int) or isinstance(b_max, bool) or b_max < 1):
        raise BadRow("bad_budget", f"{where}: field 'b_max' must be an integer >= 1 or null (no cap), got {b_max!r:.40}")
    difficulty = row.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (int, float))):
        raise BadRow("wrong_type", f"{where}: field 'difficulty' must be a number or null, got {difficulty!r:.40}")
    record = MathRecord(
        id=str(_field(row, "id", where, "labelled")),
        problem=_problem(row, "problem", where, "labelled"),
        answer=_answer_text(_field(row, "answer", where, "labelled"), where),
        solution=row.get("solution"),
        difficulty=math.nan if difficulty is None else float(difficulty),
        source=str(row.get("source") or source_name),
        b_max=b_max,
    )
    for key in ("response", "budget"):
        if key not in row:
            raise BadRow("missing_field", f"{where}: missing field {key!r} (schema 'labelled'; null for no cold-start target)")
    if row["response"] is None and row["budget"] is None:
        return record
    budget = row["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise BadRow("bad_budget", f"{where}: field 'budget' must be an integer >= 1, got {budget!r:.40}")
    return MathRecord(**record, response=_text(row, "response", where, "labelled"), budget=budget)


def _from_question_answer(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    problem = _text(row, "question", where, "question_answer")
    answer = _answer_text(_field(row, "answer", where, "question_answer"), where)
    if not answer:
        raise UnextractableAnswer(f"{where}: empty field 'answer'")
    return MathRecord(
        id=_row_id(row, fallback_id), problem=problem, answer=answer, solution=None,
        difficulty=_level(row.get("level")), source=source_name,
    )  # fmt: skip


S1K_MAX_PLAIN_ANSWER = 64  # longer unboxed solutions are derivations, not answers a grader can check


def _from_s1k(row: dict[str, Any], where: str, source_name: str, fallback_id: str) -> MathRecord:
    problem = _text(row, "question", where, "s1k")
    solution = brace_boxed(_text(row, "solution", where, "s1k").strip())
    answer = extract_math_answer(solution)
    reference: Optional[str] = solution  # a worked solution ending in \boxed{}: usable as a cold-start target
    if answer is None and "\n" not in solution and 0 < len(solution) <= S1K_MAX_PLAIN_ANSWER:
        answer, reference = solution, None  # AIME-style rows give the bare answer, no worked solution
    if answer is None:
        raise UnextractableAnswer(f"{where}: no \\boxed{{}} answer and no short plain answer in field 'solution'")
    return MathRecord(
        id=_row_id(row, fallback_id), problem=problem, answer=answer, solution=reference,
        difficulty=math.nan, source=source_name,
    )  # fmt: skip


_CONVERTERS = {
    "gsm8k": _from_gsm8k,
    "math": _from_math,
    "math500": _from_math500,
    "labelled": _from_labelled,
    "question_answer": _from_question_answer,
    "s1k": _from_s1k,
}
