"""Hostile model output: every item gets a finite reward, without an exception, within 2 s, and without
touching the file system. Runs the real path: parse -> grade (process pool) -> token count -> reward."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from selfbudget_pl.callbacks.reward import reward_columns
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.budget import BudgetGuidedReward
from selfbudget_pl.rewards.combine import WeightedRewards
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rewards.simple import AccuracyReward, FormatReward
from selfbudget_pl.rollout.base import Rollouts
from selfbudget_pl.rewards.annotate import annotate

FORMAT = OutputFormat()
PER_ITEM_LIMIT_S = 2.0  # the bound; grading's own timeout is 1 s


def hostile_answers(canary: Path) -> dict[str, str]:
    """Final answers a model might put in \\boxed{}; the injections would create ``canary`` if run."""
    return {
        "os_system": f"__import__('os').system('touch {canary}')",
        "exec": f"exec(\"open('{canary}', 'w').write('x')\")",
        "eval_subprocess": f"eval(\"__import__('subprocess').call(['touch', '{canary}'])\")",
        "sympy_escape": f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {canary}')",
        "power_tower_python": "9**9**9**9",
        "power_tower_latex": r"9^{9^{9^{9}}}",
        "huge_factorial": r"(10^{100})!",
        "huge_binomial": r"\binom{10^{9}}{10^{8}}",
        "division_by_zero": r"\frac{1}{0}",
        "nested_braces_400": "{" * 400 + "1" + "}" * 400,
        "nested_fractions": r"\frac{" * 150 + "1" + "}{2}" * 150,
        "nan": "nan",
        "inf": r"\infty",
        "neg_inf": "-inf",
        "unicode_controls": "\u202e\u200b１２３\U0001f600\x00",
        "lone_surrogate": "\ud800 1",
        "latex_input": r"\input{/etc/passwd}",
    }


def hostile_completions(canary: Path) -> dict[str, str]:
    completions = {name: FORMAT.render(50, f" so \\boxed{{{answer}}} ") for name, answer in hostile_answers(canary).items()}
    completions.update(
        {
            "answer_1mb": FORMAT.render(50, " \\boxed{" + "1" * 1_000_000 + "}"),
            "answer_150k": FORMAT.render(50, " \\boxed{" + "9" * 150_000 + "}"),
            "nested_braces_10k": FORMAT.render(50, " \\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"),
            "budget_negative": "<budget>-5</budget><solution> \\boxed{2} </solution>",
            "budget_1e99": "<budget>1e99</budget><solution> \\boxed{2} </solution>",
            "budget_huge_int": "<budget>" + "9" * 5000 + "</budget><solution> \\boxed{2} </solution>",
            "budget_nan": "<budget>nan</budget><solution> \\boxed{2} </solution>",
            "budget_twice": "<budget>5</budget><budget>6</budget><solution> \\boxed{2} </solution>",
            "budget_unclosed": "<budget>5 <solution> \\boxed{2} </solution>",
            "budget_empty": "<budget></budget><solution> \\boxed{2} </solution>",
            "boxed_unclosed": "<budget>5</budget><solution> \\boxed{2 </solution>",
            "empty": "",
            "whitespace": " \n\t ",
        }
    )
    return completions


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=2, timeout_s=1.0) as shared:
        shared.start()  # the pool's start-up is not part of any timed item
        yield shared


@pytest.fixture(scope="module")
def reward():
    return WeightedRewards({"budget_guided": BudgetGuidedReward(), "accuracy": AccuracyReward(), "format": FormatReward()})


def _listing(directory: Path) -> set[str]:
    return set(os.listdir(directory))


def test_hostile_completions_get_rewards_fast_and_harmlessly(tmp_path, monkeypatch, grader, reward, tokenizer):
    canary = tmp_path / "canary"
    monkeypatch.chdir(tmp_path)  # relative writes would land here
    before_tmp, before_repo = _listing(tmp_path), _listing(Path(__file__).resolve().parents[1])
    slow: dict[str, float] = {}
    for name, text in hostile_completions(canary).items():
        rollouts = Rollouts(
            prompt_ids=[[1]], completion_ids=[[1]], completions=[text], finish_reasons=["eos"], group_index=[0],
            columns={"answer": ["2"], "b_max": [None]},
        )
        started = time.monotonic()
        annotations = annotate(rollouts, FORMAT, grader, tokenizer)
        rollouts.progress = 0.5
        total, components = reward(rollouts.completions, **reward_columns(rollouts, annotations))
        elapsed = time.monotonic() - started
        assert math.isfinite(total.item()), name
        assert all(math.isfinite(values[0]) for values in components.values()), name
        if elapsed >= PER_ITEM_LIMIT_S:
            slow[name] = elapsed
    assert not slow, f"items over {PER_ITEM_LIMIT_S}s: {slow}"
    assert not canary.exists()
    assert _listing(tmp_path) == before_tmp
    assert _listing(Path(__file__).resolve().parents[1]) == before_repo


def test_hostile_answers_graded_directly_are_wrong_and_bounded(tmp_path, grader):
    canary = tmp_path / "canary"
    answers = hostile_answers(canary)
    answers.update({"answer_1mb": "1" * 1_000_000, "nested_braces_10k": "{" * 10_000 + "1" + "}" * 10_000})
    for name, answer in answers.items():
        started = time.monotonic()
        assert grader.grade(answer, "3") is False, name  # not the gold of the test above: no cache hits
        assert time.monotonic() - started < PER_ITEM_LIMIT_S, name
    # hostile gold strings too (a corrupted dataset row must not hang training)
    started = time.monotonic()
    assert grader.grade_batch(["1", "2"], [r"9^{9^{9^{9}}}", "{" * 10_000]) == [False, False]
    assert time.monotonic() - started < 2 * PER_ITEM_LIMIT_S
    assert not canary.exists()
    assert _listing(tmp_path) == set()


def test_a_whole_hostile_batch_in_one_call(tmp_path, grader, reward, tokenizer):
    """Together, as GRPO sees them: one batch, the pool grading in parallel; each item within its bound."""
    completions = list(hostile_completions(tmp_path / "canary").values())
    n = len(completions)
    rollouts = Rollouts(
        prompt_ids=[[1]] * n, completion_ids=[[1]] * n, completions=completions, finish_reasons=["eos"] * n,
        group_index=list(range(n)), columns={"answer": ["2"] * n, "b_max": [None] * n},
    )
    started = time.monotonic()
    annotations = annotate(rollouts, FORMAT, grader, tokenizer)
    total, _ = reward(rollouts.completions, **reward_columns(rollouts, annotations))
    assert time.monotonic() - started < n * PER_ITEM_LIMIT_S
    assert len(total) == n and all(math.isfinite(value) for value in total.tolist())
    assert annotations.correct == [False] * n
