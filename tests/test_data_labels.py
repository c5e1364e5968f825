"""Budget labels: N is the token count after the budget tag; prompts; the labelling script."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from selfbudget_pl.data.budget_labels import label_record, label_records, round_budget
from selfbudget_pl.format import count_solution_tokens
from selfbudget_pl.data.prompts import build_prompt, encode_prompt
from selfbudget_pl.data.records import DroppedRows, MathRecord
from selfbudget_pl.data.sources import JsonlSource
from selfbudget_pl.data.synthetic import SyntheticSource
from selfbudget_pl.format import OutputFormat

REPO_ROOT = Path(__file__).resolve().parents[1]


def _record(solution, answer="15", problem="3+5+7") -> MathRecord:
    return MathRecord(id="r", problem=problem, answer=answer, solution=solution, difficulty=3.0, source="t")


def _tokens_after_budget_tag(response: str, tokenizer, fmt: OutputFormat) -> int:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    close = tokenizer.convert_tokens_to_ids(fmt.budget_close)
    return len(ids) - ids.index(close) - 1


def test_count_solution_tokens_adds_no_special_tokens(tokenizer):
    text = "<solution>3+5=8;\\boxed{8}</solution>"
    assert count_solution_tokens(text, tokenizer) == len(tokenizer.encode(text, add_special_tokens=False))
    assert count_solution_tokens("", tokenizer) == 0


def test_round_budget_rounds_up_and_never_below_one():
    assert [round_budget(n, 10) for n in (0, 1, 10, 11, 99)] == [10, 10, 10, 20, 100]
    assert round_budget(37) == 37 and round_budget(0) == 1
    with pytest.raises(ValueError):
        round_budget(5, 0)


def test_label_is_the_number_of_tokens_after_the_budget_tag(tokenizer):
    fmt = OutputFormat()
    for record in SyntheticSource(size=40, seed=2).load():
        labelled = label_record(record, tokenizer, fmt)
        parsed = fmt.parse(labelled["response"])
        assert parsed.well_formed and parsed.answer == record["answer"]
        assert labelled["budget"] == labelled["b_max"] == parsed.budget
        # The same length rewards measure on a generated response: everything after </budget>.
        assert labelled["budget"] == _tokens_after_budget_tag(labelled["response"], tokenizer, fmt)
        assert record.get("response") is None  # the input record is not modified


def test_rounded_label_and_custom_tags(tokenizer):
    fmt = OutputFormat(budget_open="<b>", budget_close="</b>")
    labelled = label_record(_record("3+5=8;8+7=15;\\boxed{15}"), tokenizer, fmt, round_to=50)
    assert labelled["response"].startswith("<b>50</b><solution>") and labelled["budget"] == 50


def test_label_records_drops_rows_that_cannot_be_targets(tokenizer):
    dropped = DroppedRows()
    response = "<budget>3</budget><solution>\\boxed{1}</solution>"
    already = {**_record("x"), "response": response, "budget": 3, "b_max": None}
    records = [
        _record("3+5=8;8+7=15;\\boxed{15}"),
        {**_record(None), "id": "no-solution"},
        {**_record("3+5=8;8+7=15;\\boxed{16}"), "id": "wrong"},
        already,
    ]
    labelled = label_records(records, tokenizer, dropped=dropped, scope="train")
    assert [record["id"] for record in labelled] == ["r", "r"] and labelled[1] is already
    assert dropped.by_reason("train") == {"no_reference_solution": 1, "target_answer_differs_from_gold": 1}


def test_real_reference_solutions_label_and_parse_back(shared_data, tokenizer):
    fmt = OutputFormat()
    for relative, schema in (("gsm8k/train.jsonl", "gsm8k"), ("math/train.jsonl", "math")):
        records = JsonlSource(relative, schema=schema, limit=25).load(root=str(shared_data))
        dropped = DroppedRows()
        labelled = label_records(records, tokenizer, fmt, round_to=10, dropped=dropped)
        assert len(labelled) == 25 and dropped.count() == 0
        for record in labelled:
            assert record["budget"] % 10 == 0 and fmt.parse(record["response"]).answer == record["answer"]


def test_build_prompt_uses_the_chat_template_when_there_is_one(tokenizer):
    prompt = build_prompt("3+5", tokenizer, template="Sum: {problem}. Answer in \\boxed{}.", system_prompt="Be brief.")
    assert prompt == "<|system|>Be brief.<|user|>Sum: 3+5. Answer in \\boxed{}.<|assistant|>"
    assert tokenizer.decode(encode_prompt(prompt, tokenizer)) == prompt
    with pytest.raises(ValueError, match="problem"):
        build_prompt("3+5", tokenizer, template="no field")


def test_build_prompt_without_chat_template(tokenizer):
    class Plain:
        chat_template = None

    assert build_prompt("3+5", Plain()) == "3+5"
    assert build_prompt("3+5", Plain(), "Q: {problem}\nA:", system_prompt="Sys") == "Sys\n\nQ: 3+5\nA:"
    with pytest.raises(ValueError, match=r"chat_template=true, but the tokenizer of 'this model' has no chat template: set"):
        build_prompt("3+5", Plain(), chat_template=True)


def test_chat_template_false_writes_plain_text_with_the_tokenizers_special_tokens(tokenizer):
    prompt = build_prompt("3+5", tokenizer, "Q: {problem}", system_prompt="Sys", chat_template=False)
    assert prompt == "Sys\n\nQ: 3+5"
    assert encode_prompt(prompt, tokenizer, chat_template=False) == tokenizer(prompt)["input_ids"]
    assert build_prompt("3+5", tokenizer, chat_template=True) == build_prompt("3+5", tokenizer) == "<|user|>3+5<|assistant|>"


def test_label_budgets_script_writes_labelled_jsonl(tmp_path, tiny_model_dir, tokenizer):
    problems = tmp_path / "problems.jsonl"
    rows = [
        {"question": "Tom has 2 and gets 3. How many?", "answer": "2+3 = <<2+3=5>>5\n#### 5"},
        {"question": "Broken row", "answer": "no final answer"},
        {"question": "Big", "answer": "1000+234=1234\n#### 1,234"},
    ]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out" / "labelled.jsonl"
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "label_budgets.py"), run_name="label_budgets")
    code = script["main"](
        ["--jsonl", str(problems), "--schema", "gsm8k", "--model", str(tiny_model_dir), "--output", str(output)]
    )
    assert code == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["answer"] for row in written] == ["5", "1234"]
    assert written[0]["response"].endswith("2+3 = 5\n\\boxed{5}</solution>")
    reread = JsonlSource(str(output), schema="auto").load()
    assert [record["budget"] for record in reread] == [row["budget"] for row in written]
    fmt = OutputFormat()
    for record in reread:
        assert record["b_max"] == record["budget"] == _tokens_after_budget_tag(record["response"], tokenizer, fmt)
