"""Where math problems come from: JSONL files, Hugging Face datasets, or the synthetic generator.

Every source has ``load(...) -> list[MathRecord]``. File schemas (``schema=``):

- ``gsm8k``: ``question``, ``answer`` (reasoning, then ``#### <number>``).
- ``math``: ``problem``, ``solution`` (answer = last ``\\boxed{}``), optional ``id``, ``level`` ("Level 3").
- ``math500``: ``problem``, ``answer``, optional ``solution``, ``level`` (int), ``unique_id``/``id``
  (also reads AIME/AMC-style files that give the answer directly).
- ``labelled``: what ``scripts/label_budgets.py`` writes: the record fields plus ``response``,
  ``budget``, ``b_max`` (``response``/``budget`` null: no cold-start target; ``b_max`` null: no cap).
- ``auto``: one of the above, chosen from the first row's fields.

A row missing a field raises :class:`DataError` naming the file, the 1-based line and the field. A
gold answer that cannot be extracted drops the row (counted in ``dropped``) or, with
``on_bad_answer="error"``, raises.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol

from selfbudget_pl.data.answers import brace_boxed, extract_gsm8k_answer, extract_math_answer, gsm8k_reasoning
from selfbudget_pl.data.records import DataError, DroppedRows, MathRecord
from selfbudget_pl.data.synthetic import SyntheticSource

__all__ = [
    "DataError",
    "HFSource",
    "JsonlSource",
    "SCHEMAS",
    "Source",
    "SyntheticSource",
    "UnextractableAnswer",
    "records_from_rows",
]

SCHEMAS = ("gsm8k", "math", "math500", "labelled", "auto")
BAD_ANSWER_POLICIES = ("drop", "error")


class Source(Protocol):
    """Anything the DataModule can read problems from."""

    def load(
        self, *, on_bad_answer: str = "drop", dropped: Optional[DroppedRows] = None, root: Optional[str] = None
    ) -> list[MathRecord]:
        """All rows as records. ``root``: directory that relative paths are resolved against."""
        ...


class UnextractableAnswer(DataError):
    """The row is well-formed but its gold answer cannot be found."""


def _resolve(path: str | Path, root: Optional[str]) -> Path:
    path = Path(path).expanduser()
    if root is not None and not path.is_absolute():
        return Path(root).expanduser() / path
    return path


class JsonlSource:
    """Problems from a JSONL file, one JSON object a line.

    Args:
        path: the file; a relative path is resolved against the DataModule's ``data_root``.
        schema: ``gsm8k`` | ``math`` | ``math500`` | ``labelled`` | ``auto`` (see module doc).
        limit: read only the first ``limit`` rows (None: all).
        name: the records' ``source`` and id prefix; default ``<folder>/<file stem>``, e.g. ``gsm8k/train``.
    """

    def __init__(self, path: str, schema: str = "auto", limit: Optional[int] = None, name: Optional[str] = None):
        if schema not in SCHEMAS:
            raise ValueError(f"JsonlSource.schema={schema!r} is not one of {SCHEMAS}")
        self.path = str(path)
        self.schema = schema
        self.limit = limit
        self.name = name or f"{Path(path).parent.name}/{Path(path).stem}".lstrip("/")

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, schema={self.schema!r}, limit={self.limit})"

    def load(
        self, *, on_bad_answer: str = "drop", dropped: Optional[DroppedRows] = None, root: Optional[str] = None
    ) -> list[MathRecord]:
        """Read and normalise the file's rows."""
        path = _resolve(self.path, root)
        if not path.is_file():
            raise DataError(f"{path}: no such file (source {self.name!r})")
        return records_from_rows(self._rows(path), self.schema, self.name, on_bad_answer, dropped)

    def _rows(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        read = 0
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if self.limit is not None and read >= self.limit:
                    return
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: invalid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                read += 1
                yield where, row


class HFSource:
    """Problems from a Hugging Face dataset: a hub id (``openai/gsm8k``) or a ``save_to_disk`` folder.

    Args:
        name_or_path: hub id, or a folder written by ``Dataset(Dict).save_to_disk`` (a relative folder
            is looked up under the DataModule's ``data_root`` first).
        split: which split (ignored for a saved single ``Dataset``).
        schema: as for :class:`JsonlSource`; hub sets use the same fields (GSM8K, MATH, MATH-500).
        subset: the hub configuration name (e.g. ``main`` for ``openai/gsm8k``).
        limit: read only the first ``limit`` rows.
        name: the records' ``source`` and id prefix; default ``<last part of name_or_path>/<split>``.
    """

    def __init__(
        self,
        name_or_path: str,
        split: str = "train",
        schema: str = "auto",
        subset: Optional[str] = None,
        limit: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        if schema not in SCHEMAS:
            raise ValueError(f"HFSource.schema={schema!r} is not one of {SCHEMAS}")
        self.name_or_path = str(name_or_path)
        self.split = split
        self.schema = schema
        self.subset = subset
        self.limit = limit
        self.name = name or f"{Path(self.name_or_path).name}/{split}"

    def __repr__(self) -> str:
        return f"HFSource({self.name_or_path!r}, split={self.split!r}, schema={self.schema!r}, limit={self.limit})"

    def load(
        self, *, on_bad_answer: str = "drop", dropped: Optional[DroppedRows] = None, root: Optional[str] = None
    ) -> list[MathRecord]:
        """Load (lazily importing ``datasets``) and normalise the rows."""
        dataset = self._dataset(root)
        if self.limit is not None:
            dataset = dataset.select(range(min(self.limit, len(dataset))))
        rows = ((f"{self.name_or_path}[{self.split}] row {index}", row) for index, row in enumerate(dataset, 1))
        return records_from_rows(rows, self.schema, self.name, on_bad_answer, dropped)

    def _dataset(self, root: Optional[str]):
        import datasets

        for candidate in (_resolve(self.name_or_path, root), Path(self.name_or_path).expanduser()):
            if candidate.is_dir():
                loaded = datasets.load_from_disk(str(candidate))
                if isinstance(loaded, datasets.DatasetDict):
                    if self.split not in loaded:
                        raise DataError(f"{candidate}: no split {self.split!r} (has {sorted(loaded)})")
                    return loaded[self.split]
                return loaded
        return datasets.load_dataset(self.name_or_path, self.subset, split=self.split)


# -- schemas -----------------------------------------------------------------------------------


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
    raise DataError(f"{where}: cannot tell the schema from fields {sorted(row)}; set schema= explicitly")


def records_from_rows(
    rows: Iterable[tuple[str, dict[str, Any]]],
    schema: str,
    source_name: str,
    on_bad_answer: str = "drop",
    dropped: Optional[DroppedRows] = None,
) -> list[MathRecord]:
    """Normalise ``(location, row)`` pairs into records; ``auto`` is decided by the first row."""
    if on_bad_answer not in BAD_ANSWER_POLICIES:
        raise ValueError(f"on_bad_answer={on_bad_answer!r} is not one of {BAD_ANSWER_POLICIES}")
    records: list[MathRecord] = []
    for number, (where, row) in enumerate(rows, start=1):
        if schema == "auto":
            schema = detect_schema(row, where)
        try:
            records.append(_CONVERTERS[schema](row, where, source_name, f"{source_name}:{number}"))
        except UnextractableAnswer:
            if on_bad_answer == "error":
                raise
            if dropped is not None:
                dropped.add(source_name, "unextractable_answer", where)
    return records


def _field(row: dict[str, Any], key: str, where: str, schema: str) -> Any:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r} (schema {schema!r}; row has {sorted(row)})")
    return value


def _text(row: dict[str, Any], key: str, where: str, schema: str) -> str:
    value = _field(row, key, where, schema)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _answer_text(value: Any) -> str:
    # AMC-style files store answers as floats (27.0); the grader compares "27" the same either way.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


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
    problem = _text(row, "question", where, "gsm8k")
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
    problem = _text(row, "problem", where, "math")
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
    problem = _text(row, "problem", where, "math500")
    answer = _answer_text(_field(row, "answer", where, "math500"))
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
        raise DataError(f"{where}: field 'b_max' must be an integer >= 1 or null (no cap), got {b_max!r}")
    difficulty = row.get("difficulty")
    record = MathRecord(
        id=str(_field(row, "id", where, "labelled")),
        problem=_text(row, "problem", where, "labelled"),
        answer=_answer_text(_field(row, "answer", where, "labelled")),
        solution=row.get("solution"),
        difficulty=math.nan if difficulty is None else float(difficulty),
        source=str(row.get("source") or source_name),
        b_max=b_max,
    )
    for key in ("response", "budget"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (schema 'labelled'; null for no cold-start target)")
    if row["response"] is None and row["budget"] is None:
        return record
    budget = row["budget"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise DataError(f"{where}: field 'budget' must be an integer >= 1, got {budget!r}")
    return MathRecord(**record, response=_text(row, "response", where, "labelled"), budget=budget)


_CONVERTERS = {"gsm8k": _from_gsm8k, "math": _from_math, "math500": _from_math500, "labelled": _from_labelled}
