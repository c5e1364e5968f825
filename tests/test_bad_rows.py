"""Bad data rows: each is named as ``file:line: what is wrong``, counted under its cause, dropped or an
error by ``on_bad_row``, and no good row is lost on the way."""

from __future__ import annotations

import json
import logging
import math
import re
import tracemalloc

import pytest

from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.data.records import BadRow, DataError, DroppedRows
from selfbudget_pl.data.sources import JsonlSource

GOOD = [
    {"id": "g1", "problem": "What is 1+1?", "answer": "2", "solution": "1+1=\\boxed{2}", "level": 1},
    {"id": "g2", "problem": "Ünïcödé: 3·3 = ?", "answer": 9, "level": "Level 2"},
    {"id": "g3", "problem": "AMC-style float", "answer": 27.0},
    {"id": "g4", "problem": "a fraction", "answer": 0.5, "solution": None},
    {"id": "g5", "problem": "emoji 😀 and \\frac{1}{2}", "answer": "\\frac{1}{2}", "extra": {"nested": [1, 2]}},
    {"id": "g6", "problem": "negative", "answer": -3},
]


def _line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"


# (cause, raw line, what the message says after "file:line: ")
BAD_LINES = {
    "invalid_utf8": (b'{"id": "b1", "problem": "caf\xe9", "answer": "1"}\n', "not UTF-8 (byte 0xe9"),
    "invalid_json": (b'{"id": "b2", "problem": \n', "invalid JSON"),
    "too_deeply_nested": (b'{"id": "b3", "problem": "p", "answer": "1", "x": ' + b"[" * 40 + b"]" * 40 + b"}\n",
                          "nests deeper than 32 levels"),
    "too_deeply_nested_for_the_parser": (b'{"id": "b3b", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}\n",
                                         "recursion limit"),
    "not_an_object": (b"[1, 2, 3]\n", "expected a JSON object, got list"),
    "invalid_unicode": (b'{"id": "b4", "problem": "lone \\ud800 surrogate", "answer": "1"}\n',
                        "field 'problem' holds a lone surrogate U+D800"),
    "nan_answer": (b'{"id": "b5", "problem": "p", "answer": NaN}\n', "field 'answer' is nan"),
    "infinite_answer": (b'{"id": "b6", "problem": "p", "answer": -Infinity}\n', "field 'answer' is -inf"),
    "boolean_answer": (b'{"id": "b7", "problem": "p", "answer": true}\n', "field 'answer' is a boolean"),
    "list_answer": (b'{"id": "b8", "problem": "p", "answer": [1, 2]}\n', "field 'answer' is a list"),
    "object_answer": (b'{"id": "b9", "problem": "p", "answer": {"v": 1}}\n', "field 'answer' is an object"),
    "empty_problem": (b'{"id": "b10", "problem": "  ", "answer": "1"}\n', "field 'problem' is empty"),
    "missing_field": (b'{"id": "b11", "problem": "p", "answer": null}\n', "missing field 'answer'"),
    "wrong_type": (b'{"id": "b12", "problem": 5, "answer": "1"}\n', "field 'problem' must be a string"),
    "duplicate_id": (_line({"id": "g1", "problem": "another", "answer": "3"}), "id 'g1' already used at "),
    "line_too_long": (b'{"id": "b13", "problem": "' + b"x" * 5000 + b'", "answer": "1"}\n',
                      "longer than max_line_bytes=4,096"),
}
CAUSE = {
    "too_deeply_nested_for_the_parser": "too_deeply_nested",
    "nan_answer": "bad_answer",
    "infinite_answer": "bad_answer",
    "boolean_answer": "bad_answer",
    "list_answer": "bad_answer",
    "object_answer": "bad_answer",
}


def _write(path, lines: list[bytes]):
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_row_is_an_error_naming_file_line_and_what(tmp_path, case):
    line, message = BAD_LINES[case]
    path = _write(tmp_path / "data.jsonl", [_line(GOOD[0]), line, _line(GOOD[1])])
    with pytest.raises(BadRow, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)) as error:
        JsonlSource(str(path), schema="math500").load(on_bad_row="error", max_line_bytes=4096)
    assert error.value.cause == CAUSE.get(case, case)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_row_is_dropped_and_counted_with_its_location(tmp_path, case):
    line, message = BAD_LINES[case]
    path = _write(tmp_path / "data.jsonl", [_line(GOOD[0]), line, _line(GOOD[1])])
    dropped = DroppedRows()
    records = JsonlSource(str(path), schema="math500", name="d").load(dropped=dropped, max_line_bytes=4096)
    assert [record["id"] for record in records] == ["g1", "g2"]
    cause = CAUSE.get(case, case)
    assert dropped.by_reason("d") == {cause: 1}
    assert dropped.examples[("d", cause)].startswith(f"{path}:2: ") and message in dropped.examples[("d", cause)]


def test_a_mixed_file_loses_no_good_row(tmp_path):
    """Good rows between every kind of bad row arrive exactly as they do from a file of good rows only."""
    lines, bad = [], 0
    for index, good in enumerate(GOOD):
        lines.append(_line(good))
        for line, _ in list(BAD_LINES.values())[index::len(GOOD)]:
            lines.append(line)
            bad += 1
        lines.append(b"\n")  # blank lines are not rows
    mixed = _write(tmp_path / "mixed.jsonl", lines)
    clean = _write(tmp_path / "clean.jsonl", [_line(good) for good in GOOD])
    dropped = DroppedRows()
    got = JsonlSource(str(mixed), name="d").load(dropped=dropped, max_line_bytes=4096)
    expected = JsonlSource(str(clean), name="d").load()
    assert got == expected and len(got) == len(GOOD)
    assert dropped.count("d") == bad == len(BAD_LINES)
    assert [record["answer"] for record in got] == ["2", "9", "27", "0.5", "\\frac{1}{2}", "-3"]
    assert got[1]["problem"] == GOOD[1]["problem"] and got[4]["problem"] == GOOD[4]["problem"]


def test_an_over_long_line_is_skipped_without_being_read_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("wb") as handle:
        handle.write(_line(GOOD[0]))
        handle.write(b'{"id": "huge", "problem": "' + b"7" * 20_000_000 + b'", "answer": "1"}\n')
        handle.write(_line(GOOD[1]))
    dropped = DroppedRows()
    tracemalloc.start()
    try:
        records = JsonlSource(str(path), name="d").load(dropped=dropped, max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [record["id"] for record in records] == ["g1", "g2"]
    assert dropped.by_reason("d") == {"line_too_long": 1}
    assert "20,000,045 bytes" in dropped.examples[("d", "line_too_long")]
    assert peak < 8 * (1 << 20), peak  # a few times the limit, not the 20 MB line


def test_a_source_of_only_bad_rows_is_an_error_with_the_counts(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [BAD_LINES["invalid_json"][0], BAD_LINES["nan_answer"][0]])
    with pytest.raises(DataError, match=r"all 2 row\(s\) are bad: bad_answer: 1 .*invalid_json: 1 \(first: " +
                       re.escape(f"{path}:1")):
        JsonlSource(str(path), schema="math500").load()


def test_without_a_counter_drops_are_logged_not_silent(tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", [_line(GOOD[0]), BAD_LINES["boolean_answer"][0]])
    with caplog.at_level(logging.WARNING):
        records = JsonlSource(str(path), schema="math500", name="d").load()
    assert len(records) == 1
    assert f"d: dropped 1 row(s): bad_answer (first: {path}:2: field 'answer' is a boolean" in caplog.text


def test_datamodule_switch_drops_and_reports_or_stops(tokenizer, tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", [_line(GOOD[0]), BAD_LINES["invalid_utf8"][0], _line(GOOD[2]),
                                         BAD_LINES["duplicate_id"][0]])
    dm = BudgetMathDataModule(train=[JsonlSource(str(path), name="d")], mode="grpo", batch_size=1)
    dm.connect(tokenizer)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert [example["id"] for example in dm.datasets["train"]] == ["g1", "g3"]
    assert dm.dropped.by_reason("d") == {"invalid_utf8": 1, "duplicate_id": 1}
    assert f"(first: {path}:2: not UTF-8" in caplog.text and f"(first: {path}:4: id 'g1'" in caplog.text
    strict = BudgetMathDataModule(train=[JsonlSource(str(path))], mode="grpo", on_bad_row="error")
    strict.connect(tokenizer)
    with pytest.raises(BadRow, match=re.escape(f"{path}:2: not UTF-8")):
        strict.setup("fit")


def test_numbers_stay_numbers_and_bom_is_accepted(tmp_path):
    path = _write(tmp_path / "n.jsonl", [b"\xef\xbb\xbf" + _line({"problem": "p", "answer": 1e20}),
                                         _line({"problem": "q", "answer": 1.25})])
    first, second = JsonlSource(str(path)).load(on_bad_row="error")
    assert (first["answer"], second["answer"]) == ("100000000000000000000", "1.25")
    assert math.isnan(first["difficulty"])
