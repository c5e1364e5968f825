"""Where math problems come from: JSONL files (read line by line, each line bounded), Hugging Face
datasets, or the synthetic generator. Every source has ``load(...) -> list[MathRecord]``; turning a
file's rows into records (its schema, the checks, bad rows) is :mod:`selfbudget_pl.data.rows`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Protocol

from selfbudget_pl.data.records import BadRow, DataError, DroppedRows, MathRecord
from selfbudget_pl.data.rows import SCHEMAS, records_from_rows
from selfbudget_pl.data.synthetic import SyntheticSource
from selfbudget_pl.schema import Schema, check_arguments, not_blank, spec

__all__ = ["DataError", "HFSource", "JsonlSource", "Source", "SyntheticSource"]

# A JSONL line longer than this is a bad row, and reading stops there (the rest of the line is skipped
# in chunks): one 50 MB line otherwise costs minutes and gigabytes before the tokenizer refuses it.
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024


class Source(Protocol):
    """Anything the DataModule can read problems from."""

    def load(
        self,
        *,
        on_bad_row: str = "drop",
        dropped: Optional[DroppedRows] = None,
        root: Optional[str] = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> list[MathRecord]:
        """All rows as records. ``root``: directory that relative paths are resolved against."""
        ...


def _resolve(path: str | Path, root: Optional[str]) -> Path:
    path = Path(path).expanduser()
    if root is not None and not path.is_absolute():
        return Path(root).expanduser() / path
    return path


@dataclass
class JsonlSourceSchema(Schema):
    """The arguments of :class:`JsonlSource` (a ``data`` source) and what each allows."""

    TARGETS = ("selfbudget_pl.data.sources.JsonlSource",)

    path: str = spec(rule=not_blank)
    schema: str = spec(choices=SCHEMAS)
    limit: Optional[int] = spec(ge=1, note="null: every row")
    name: Optional[str] = spec()


class JsonlSource:
    """Problems from a JSONL file, one JSON object a line.

    Args:
        path: the file; a relative path is resolved against the DataModule's ``data_root``.
        schema: ``gsm8k`` | ``math`` | ``math500`` | ``labelled`` | ``auto`` (see module doc).
        limit: read only the first ``limit`` rows (None: all).
        name: the records' ``source`` and id prefix; default ``<folder>/<file stem>``, e.g. ``gsm8k/train``.
    """

    def __init__(self, path: str, schema: str = "auto", limit: Optional[int] = None, name: Optional[str] = None):
        check_arguments(JsonlSourceSchema, locals(), "JsonlSource")
        self.path = str(path)
        self.schema = schema
        self.limit = limit
        self.name = name or f"{Path(path).parent.name}/{Path(path).stem}".lstrip("/")

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, schema={self.schema!r}, limit={self.limit})"

    def load(
        self,
        *,
        on_bad_row: str = "drop",
        dropped: Optional[DroppedRows] = None,
        root: Optional[str] = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> list[MathRecord]:
        """Read and normalise the file's rows; lines longer than ``max_line_bytes`` are bad rows."""
        path = _resolve(self.path, root)
        if not path.is_file():
            raise DataError(f"{path}: no such file (source {self.name!r})")
        return records_from_rows(self._rows(path, max_line_bytes), self.schema, self.name, on_bad_row, dropped)

    def _rows(self, path: Path, max_line_bytes: int) -> Iterator[tuple[str, dict[str, Any] | BadRow]]:
        read = 0
        with path.open("rb") as handle:
            for line_number, line in _bounded_lines(handle, max_line_bytes):
                if self.limit is not None and read >= self.limit:
                    return
                where = f"{path}:{line_number}"
                row = _parse_line(line, where, max_line_bytes, first=line_number == 1)
                if row is None:
                    continue  # a blank line
                read += 1
                yield where, row


def _bounded_lines(handle: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """``(1-based line number, line)``, or ``(number, its length in bytes)`` for a line longer than
    ``max_bytes``, which is skipped in 1 MiB pieces rather than held in memory."""
    number = 0
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield number, line
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = handle.readline(1 << 20)
            if not line:
                break
            size += len(line)
        yield number, size


def _parse_line(line: bytes | int, where: str, max_bytes: int, first: bool) -> dict[str, Any] | BadRow | None:
    """One JSONL line as a checked row, a :class:`BadRow` saying what is wrong with it, or None if blank."""
    if isinstance(line, int):
        return BadRow("line_too_long", f"{where}: line of {line:,} bytes is longer than max_line_bytes={max_bytes:,}")
    if first:
        line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadRow(
            "invalid_utf8",
            f"{where}: not UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1} of the line: {error.reason})",
        )
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return BadRow("invalid_json", f"{where}: invalid JSON ({error.msg} at column {error.colno})")
    except RecursionError:
        return BadRow("too_deeply_nested", f"{where}: JSON nested deeper than the parser's recursion limit")
    if not isinstance(row, dict):
        return BadRow("not_an_object", f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


@dataclass
class HFSourceSchema(Schema):
    """The arguments of :class:`HFSource` (a ``data`` source) and what each allows."""

    TARGETS = ("selfbudget_pl.data.sources.HFSource",)

    name_or_path: str = spec(rule=not_blank)
    split: str = spec()
    schema: str = spec(choices=SCHEMAS)
    subset: Optional[str] = spec()
    limit: Optional[int] = spec(ge=1, note="null: every row")
    name: Optional[str] = spec()


class HFSource:
    """Problems from a Hugging Face dataset: a hub id (``openai/gsm8k``), a ``save_to_disk`` folder, or a
    local folder laid out like a hub repository (``data/train-*.parquet``), read by the same
    ``datasets.load_dataset`` call as the hub id.

    Args:
        name_or_path: hub id or folder (a relative folder is looked up under the DataModule's
            ``data_root`` first).
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
        check_arguments(HFSourceSchema, locals(), "HFSource")
        self.name_or_path = str(name_or_path)
        self.split = split
        self.schema = schema
        self.subset = subset
        self.limit = limit
        self.name = name or f"{Path(self.name_or_path).name}/{split}"

    def __repr__(self) -> str:
        return f"HFSource({self.name_or_path!r}, split={self.split!r}, schema={self.schema!r}, limit={self.limit})"

    def load(
        self,
        *,
        on_bad_row: str = "drop",
        dropped: Optional[DroppedRows] = None,
        root: Optional[str] = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> list[MathRecord]:
        """Load (lazily importing ``datasets``) and normalise the rows (``max_line_bytes`` is for files)."""
        dataset = self._dataset(root)
        if self.limit is not None:
            dataset = dataset.select(range(min(self.limit, len(dataset))))
        rows = ((f"{self.name_or_path}[{self.split}] row {index}", row) for index, row in enumerate(dataset, 1))
        return records_from_rows(rows, self.schema, self.name, on_bad_row, dropped)

    def _dataset(self, root: Optional[str]):
        import datasets

        name_or_path = self.name_or_path
        for candidate in (_resolve(self.name_or_path, root), Path(self.name_or_path).expanduser()):
            if candidate.is_dir():
                if not any((candidate / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
                    name_or_path = str(candidate)  # data files as on the hub: load_dataset reads them
                    break
                loaded = datasets.load_from_disk(str(candidate))
                if isinstance(loaded, datasets.DatasetDict):
                    if self.split not in loaded:
                        raise DataError(f"{candidate}: no split {self.split!r} (has {sorted(loaded)})")
                    return loaded[self.split]
                return loaded
        return datasets.load_dataset(name_or_path, self.subset, split=self.split)


