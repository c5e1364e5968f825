"""Budget labels: N = the number of tokens the response spends after the budget tag
(:func:`selfbudget_pl.format.count_solution_tokens`, the length the reward measures too)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from selfbudget_pl.data.records import DroppedRows, MathRecord
from selfbudget_pl.format import OutputFormat, count_solution_tokens


def round_budget(tokens: int, multiple: int = 1) -> int:
    """Round a token count up to a multiple of ``multiple`` (1: unchanged); never below ``multiple``.

    Up, not to nearest, so that a model following its label ends at or under its budget.
    """
    if multiple < 1:
        raise ValueError(f"budget rounding multiple must be >= 1, got {multiple}")
    return max(multiple, math.ceil(tokens / multiple) * multiple)


def label_record(
    record: MathRecord, tokenizer: Any, output_format: Optional[OutputFormat] = None, round_to: int = 1
) -> MathRecord:
    """A copy of ``record`` with a cold-start target built from its reference ``solution``.

    ``response = output_format.render(N, solution)`` with N = ``round_budget(count_solution_tokens(
    output_format.solution_text(solution)))``; ``budget = b_max = N`` (the reference is the correct
    cold-start response, so its label length is the stage-2 cap).
    """
    output_format = output_format or OutputFormat()
    reasoning = record.get("solution")
    if not reasoning:
        raise ValueError(f"record {record['id']!r} has no reference solution to label")
    budget = round_budget(count_solution_tokens(output_format.solution_text(reasoning), tokenizer), round_to)
    return MathRecord(**record, response=output_format.render(budget, reasoning), budget=budget, b_max=budget)


def label_records(
    records: Iterable[MathRecord],
    tokenizer: Any,
    output_format: Optional[OutputFormat] = None,
    round_to: int = 1,
    dropped: Optional[DroppedRows] = None,
    scope: str = "label",
) -> list[MathRecord]:
    """Label every record that has no ``response`` yet; records that cannot be a target are dropped.

    Dropped (counted under ``scope``): no reference solution, or a rendered target whose parsed answer
    is not the gold answer (it would teach the model a wrong or unparsable answer).
    """
    output_format = output_format or OutputFormat()
    labelled = []
    for record in records:
        if "response" in record:
            labelled.append(record)
            continue
        if not record.get("solution"):
            if dropped is not None:
                dropped.add(scope, "no_reference_solution", record["id"])
            continue
        record = label_record(record, tokenizer, output_format, round_to)
        if output_format.parse(record["response"]).answer != record["answer"]:
            if dropped is not None:
                dropped.add(scope, "target_answer_differs_from_gold", record["id"])
            continue
        labelled.append(record)
    return labelled


def write_jsonl(records: Iterable[MathRecord], path: str | Path, append: bool = False) -> int:
    """Write records as JSONL (the ``labelled`` schema when they carry ``b_max``; a record without a target
    gets ``response``/``budget`` null); returns rows. ``append``: add to the file (a resumed labelling run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        for record in records:
            difficulty = record["difficulty"]
            row = {**record, "difficulty": None if math.isnan(difficulty) else difficulty}
            if "b_max" in record and "response" not in record:
                row.update(response=None, budget=None)  # a problem without a cold-start target
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def labelled_ids(path: str | Path) -> set[str]:
    """The ids already written to a labelling run's output (empty when there is none yet), so a resumed run
    labels only the rest. A last line cut off by a killed run is removed: its problem is labelled again."""
    path = Path(path)
    if not path.is_file():
        return set()
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        path.write_text("".join(lines[:-1]), encoding="utf-8")
        lines = lines[:-1]
    return {str(json.loads(line)["id"]) for line in lines if line.strip()}
