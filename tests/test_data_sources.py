"""Sources and answer extraction: the shared math files, error messages, HF datasets on disk."""

from __future__ import annotations

import json
import math
import re

import pytest

from selfbudget_pl.data.answers import extract_gsm8k_answer, extract_math_answer, gsm8k_reasoning
from selfbudget_pl.data.records import DataError, DroppedRows
from selfbudget_pl.data.rows import UnextractableAnswer
from selfbudget_pl.data.sources import HFSource, JsonlSource
from selfbudget_pl.format import extract_boxed


def _rows(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_math500_extraction_agrees_with_given_answer_on_all_rows(shared_data):
    rows = _rows(shared_data / "math500" / "test.jsonl")
    agree = sum(extract_math_answer(row["solution"]) == row["answer"].strip() for row in rows)
    assert (agree, len(rows)) == (500, 500)


def test_math_train_and_test_all_have_extractable_answers(shared_data):
    for split in ("train", "test"):
        rows = _rows(shared_data / "math" / f"{split}.jsonl")
        missing = [row["id"] for row in rows if extract_math_answer(row["solution"]) is None]
        assert missing == [], split


def test_braceless_boxed_is_read_and_rewritten(shared_data, tmp_path):
    # train/algebra/24014.json ends "our answer is $\boxed 2$." (no braces).
    assert extract_boxed("the answer is $\\boxed 2$.") is None
    assert extract_math_answer("the answer is $\\boxed 2$.") == "2"
    assert extract_math_answer("$\\boxed{1}$ then $\\boxed 9$.") == "9"
    records = JsonlSource(str(shared_data / "math" / "train.jsonl"), schema="math").load()
    by_id = {record["id"]: record for record in records}
    assert len(records) == 7500
    record = by_id["train/algebra/24014.json"]
    assert record["answer"] == "2" and record["solution"].endswith("$\\boxed{2}$.")


def test_gsm8k_answers_are_plain_numbers_on_all_rows(shared_data):
    for split, expected_rows in (("train", 7473), ("test", 1319)):
        rows = _rows(shared_data / "gsm8k" / f"{split}.jsonl")
        answers = [extract_gsm8k_answer(row["answer"]) for row in rows]
        assert len(answers) == expected_rows
        assert all(answer is not None and re.fullmatch(r"-?\d+(\.\d+)?", answer) for answer in answers), split
    assert extract_gsm8k_answer("so 1,000 + 200\n#### 1,200") == "1200"
    assert extract_gsm8k_answer("no final line") is None


def test_gsm8k_reasoning_drops_calculator_markup_and_boxes_the_answer():
    text = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24"
    assert gsm8k_reasoning(text, "24") == "She sold 48/2 = 24 clips.\n\\boxed{24}"


@pytest.mark.parametrize(
    ("relative", "schema", "expected_rows"),
    [("gsm8k/train.jsonl", "gsm8k", 7473), ("math/test.jsonl", "math", 5000), ("math500/test.jsonl", "math500", 500)],
)
def test_jsonl_sources_normalise_shared_files(shared_data, relative, schema, expected_rows):
    limited = JsonlSource(relative, schema=schema, limit=20).load(root=str(shared_data))
    auto = JsonlSource(relative, schema="auto", limit=20).load(root=str(shared_data))
    assert limited == auto and len(limited) == 20
    for record in limited:
        assert set(record) == {"id", "problem", "answer", "solution", "difficulty", "source"}
        assert record["problem"] and record["answer"] and record["source"] == relative.removesuffix(".jsonl")
        assert extract_math_answer(record["solution"]) == record["answer"]  # every solution ends boxed
        assert record["difficulty"] >= 1
    assert len({record["id"] for record in limited}) == 20


def test_auto_schema_reads_aime_and_amc_answers(shared_data):
    aime = JsonlSource("aime24/test.jsonl").load(root=str(shared_data))
    amc = JsonlSource("amc23/test.jsonl").load(root=str(shared_data))
    assert (len(aime), len(amc)) == (30, 40)
    assert aime[0]["answer"] == "204" and all(record["answer"].isdigit() for record in aime)
    assert all("." not in record["answer"] for record in amc)  # 27.0 -> "27"
    assert amc[0]["solution"] is None and math.isnan(amc[0]["difficulty"])


def test_math_level_is_difficulty_and_unknown_level_is_nan(tmp_path):
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"problem": "p1", "solution": "$\\boxed{1}$", "level": "Level 4"},
            {"problem": "p2", "solution": "$\\boxed{2}$", "level": "Level ?"},
        ],
    )
    first, second = JsonlSource(str(path), schema="math").load()
    assert first["difficulty"] == 4.0 and math.isnan(second["difficulty"])
    assert first["id"] == f"{tmp_path.name}/m:1"  # no id field: <source name>:<row number>


def test_missing_field_error_names_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2") + r".*'answer'"):
        JsonlSource(str(path), schema="gsm8k").load(on_bad_row="error")


def test_invalid_json_error_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": \n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*invalid JSON"):
        JsonlSource(str(path)).load(on_bad_row="error")


def test_missing_file_and_unknown_schema_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        JsonlSource(str(tmp_path / "absent.jsonl")).load()
    with pytest.raises(ValueError, match="schema"):
        JsonlSource("x.jsonl", schema="csv")
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"text": "what"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*cannot tell the schema"):
        JsonlSource(str(path)).load()


def test_unextractable_answer_is_dropped_and_counted_or_an_error(tmp_path):
    rows = [
        {"question": "a", "answer": "1+1=2\n#### 2"},
        {"question": "b", "answer": "forgot the final line"},
        {"question": "c", "answer": "#### 3"},
    ]
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    dropped = DroppedRows()
    records = JsonlSource(str(path), schema="gsm8k", name="g").load(dropped=dropped)
    assert [record["answer"] for record in records] == ["2", "3"]
    assert dropped.count("g", "unextractable_answer") == 1
    assert dropped.examples[("g", "unextractable_answer")].startswith(f"{path}:2: ")
    with pytest.raises(UnextractableAnswer, match=re.escape(f"{path}:2")):
        JsonlSource(str(path), schema="gsm8k").load(on_bad_row="error")


def test_answer_given_as_float_is_written_as_an_integer(tmp_path):
    rows = [{"id": 7, "problem": "p", "answer": 27.0}, {"problem": "q", "answer": 0.5}]
    path = _write_jsonl(tmp_path / "amc.jsonl", rows)
    first, second = JsonlSource(str(path)).load()
    assert (first["id"], first["answer"], first["solution"]) == ("7", "27", None)
    assert second["answer"] == "0.5"


def test_hf_source_reads_save_to_disk_like_the_jsonl(shared_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows(shared_data / "math500" / "test.jsonl")[:15]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "m500"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    expected = JsonlSource(str(shared_data / "math500" / "test.jsonl"), limit=10, name="m").load()
    from_dict = HFSource("m500", split="test", limit=10, name="m").load(root=str(tmp_path))
    from_single = HFSource(str(tmp_path / "single"), split="test", limit=10, name="m").load()
    assert from_dict == expected == from_single
    with pytest.raises(DataError, match="no split 'train'"):
        HFSource(str(tmp_path / "m500"), split="train").load()


def test_hf_source_error_names_the_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": None}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "g"))
    with pytest.raises(DataError, match=r"\[train\] row 2.*'answer'"):
        HFSource(str(tmp_path / "g"), schema="gsm8k").load(on_bad_row="error")
