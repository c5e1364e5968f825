"""Cold-start labels from the model's own samples: keep correct ones, choose, label with their length."""

from __future__ import annotations

import subprocess
import sys
import json

from selfbudget_pl.data.budget_labels import count_solution_tokens
from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.data.self_labels import label_from_samples
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts

from .conftest import REPO_ROOT


class ScriptedBackend(RolloutBackend):
    """Answers each prompt with fixed texts, so the selection logic is checked exactly."""

    def __init__(self, answers: list[list[str]], truncated_texts: set[str] = frozenset()) -> None:
        self.answers = answers
        self.truncated_texts = truncated_texts

    def generate(self, prompt_ids, num_samples, sampling, prefill=None, columns=None) -> Rollouts:
        texts = [text for group in self.answers[: len(prompt_ids)] for text in group]
        groups = [g for g, group in enumerate(self.answers[: len(prompt_ids)]) for _ in group]
        self.answers = self.answers[len(prompt_ids):]
        return Rollouts(prompt_ids=[[1]] * len(texts), completion_ids=[[1]] * len(texts), completions=texts,
                        finish_reasons=["length" if t in self.truncated_texts else "eos" for t in texts], group_index=groups)


def test_keeps_the_shortest_correct_finished_sample(tokenizer):
    records = [
        {"id": "a", "problem": "2+3", "answer": "5", "solution": None, "difficulty": 2.0, "source": "t"},
        {"id": "b", "problem": "4+4", "answer": "8", "solution": None, "difficulty": 2.0, "source": "t"},
        {"id": "c", "problem": "1+1", "answer": "2", "solution": None, "difficulty": 2.0, "source": "t"},
    ]
    long_right, short_right, cut = "so 2+3 is \\boxed{5} indeed yes", "\\boxed{5}", "2+3=5 \\boxed{5}"
    backend = ScriptedBackend(
        [[long_right, "\\boxed{6}", short_right], ["\\boxed{9}", "no answer"], [cut]], truncated_texts={cut}
    )
    dropped = DroppedRows()
    with MathGrader(workers=0) as grader:
        labelled = label_from_samples(records, backend, tokenizer, grader, samples=3, batch_size=2, dropped=dropped)
    assert [r["id"] for r in labelled] == ["a"]
    fmt = OutputFormat()
    (record,) = labelled
    assert record["solution"] == short_right
    assert record["response"] == fmt.render(record["budget"], short_right)
    assert record["budget"] == record["b_max"] == count_solution_tokens(fmt.solution_text(short_right), tokenizer)
    assert dropped.count(reason="no_correct_sample") == 2  # b: all wrong; c: only a truncated sample


def test_script_samples_with_the_tiny_model(tmp_path, tiny_model_dir):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "scripts/label_budgets.py", "--jsonl", str(problems), "--schema", "gsm8k", "--samples", "2",
         "--max-new-tokens", "8", "--model", str(tiny_model_dir), "--output", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # An untrained model answers nothing correctly: every problem is dropped and the summary says why.
    assert out.read_text() == ""
    assert "no_correct_sample" in result.stderr
