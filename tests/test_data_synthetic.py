"""The synthetic sum task: correct arithmetic, every knob honoured, splits disjoint."""

from __future__ import annotations

import re

import pytest

from selfbudget_pl.data.answers import extract_math_answer
from selfbudget_pl.data.synthetic import SyntheticSource, split_of

_STEP = re.compile(r"(\d+)\+(\d+)=(\d+);")
_CHECK = re.compile(r"\?(\d+)-(\d+)=(\d+);")


def _steps(reasoning: str) -> list[str]:
    return re.findall(r"\??\d+[+-]\d+=\d+;", reasoning)


def test_reasoning_is_correct_arithmetic_ending_in_the_boxed_sum():
    records = SyntheticSource(size=300, seed=3).load()
    for record in records:
        operands = [int(value) for value in record["problem"].split("+")]
        steps = _steps(record["solution"])
        assert "".join(steps) + f"\\boxed{{{sum(operands)}}}" == record["solution"]
        assert extract_math_answer(record["solution"]) == record["answer"] == str(sum(operands))
        additions = [step for step in steps if not step.startswith("?")]
        total = operands[0]
        for step, operand in zip(additions, operands[1:], strict=True):
            a, b, c = map(int, _STEP.fullmatch(step).groups())
            assert (a, b, c) == (total, operand, total + operand)
            total = c
        for check in (step for step in steps if step.startswith("?")):
            c, b, a = map(int, _CHECK.fullmatch(check).groups())
            assert c - b == a
        assert record["difficulty"] == len(operands)


def test_knobs_bound_operands_k_and_checks():
    source = SyntheticSource(
        size=400, seed=1, operand_min=10, operand_max=99, k_min=3, k_max=8, checks_min=1, checks_max=1
    )
    records = source.load()
    ks = {int(record["difficulty"]) for record in records}
    assert ks == set(range(3, 9))
    for record in records:
        operands = [int(value) for value in record["problem"].split("+")]
        assert all(10 <= value <= 99 for value in operands)
        steps = _steps(record["solution"])
        assert sum(step.startswith("?") for step in steps) == len(operands) - 1  # exactly one check per step


def test_checks_make_length_vary_for_the_same_k():
    records = SyntheticSource(size=500, seed=0, k_min=4, k_max=4).load()
    lengths = {len(record["solution"]) for record in records}
    assert len(lengths) > 5
    no_checks = SyntheticSource(size=50, seed=0, k_min=4, k_max=4, checks_max=0).load()
    assert all("?" not in record["solution"] for record in no_checks)


def test_generation_is_deterministic_and_seeded():
    assert SyntheticSource(size=50, seed=5).load() == SyntheticSource(size=50, seed=5).load()
    assert SyntheticSource(size=50, seed=5).load() != SyntheticSource(size=50, seed=6).load()


def test_splits_share_no_problem_even_for_tiny_k():
    problems = {
        split: {record["problem"] for record in SyntheticSource(size=2000, split=split, k_min=2, k_max=3).load()}
        for split in ("train", "val", "test")
    }
    assert not problems["train"] & problems["val"]
    assert not problems["train"] & problems["test"]
    assert not problems["val"] & problems["test"]
    # val still covers the easiest problems (hash partition, not "whatever train did not draw").
    assert any(problem.count("+") == 1 for problem in problems["val"])
    for split, found in problems.items():
        assert all(split_of(problem, 0.1) == split for problem in found)


def test_ids_and_source_name_the_split():
    record = SyntheticSource(size=3, split="val", name="sums").load()[2]
    assert (record["id"], record["source"]) == ("sums/val/2", "sums/val")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "dev"},
        {"k_min": 1},
        {"k_min": 5, "k_max": 4},
        {"operand_min": 5, "operand_max": 2},
        {"checks_min": 3, "checks_max": 1},
        {"heldout_fraction": 0.5},
    ],
)
def test_invalid_knobs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticSource(**kwargs)


def test_too_small_problem_space_is_an_error_not_a_hang():
    # Operands 1..1 and k=2 give one problem, "1+1"; at most one split can own it.
    owner = split_of("1+1", 0.1)
    other = next(split for split in ("train", "val", "test") if split != owner)
    with pytest.raises(ValueError, match="too few problems"):
        SyntheticSource(size=1, split=other, operand_min=1, operand_max=1, k_min=2, k_max=2).load()


def test_story_wording_states_the_same_sums_as_word_problems():
    symbols = SyntheticSource(size=200, seed=5, k_min=2, k_max=5).load()
    stories = SyntheticSource(size=200, seed=5, k_min=2, k_max=5, wording="story").load()
    story = re.compile(r"(\w+) has (\d+) (\w+)\.((?: (?:Then )?\1 (?:gets|finds|buys|is given|wins) \d+ more \3\.)+) "
                       r"How many \3 does \1 have now\?")  # fmt: skip
    for plain, worded in zip(symbols, stories, strict=True):
        # the same problems, answers, references and difficulties, in the same order: only the wording differs
        assert {k: v for k, v in worded.items() if k != "problem"} == {k: v for k, v in plain.items() if k != "problem"}
        match = story.fullmatch(worded["problem"])
        assert match, worded["problem"]
        operands = [int(match.group(2)), *map(int, re.findall(r" (\d+) more", match.group(4)))]
        assert "+".join(map(str, operands)) == plain["problem"]
    assert len({record["problem"].split()[0] for record in stories}) > 3  # names vary
    with pytest.raises(ValueError, match="wording='prose': must be one of 'symbols', 'story'"):
        SyntheticSource(wording="prose")
