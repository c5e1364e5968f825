"""The output format: rendering round-trips and the parser is total on hostile input."""

from __future__ import annotations

import pytest

from selfbudget_pl.format import FormatError, OutputFormat, extract_boxed

FMT = OutputFormat()


def test_render_parse_round_trip():
    text = FMT.render(42, "3+4=7;\\boxed{7}")
    parsed = FMT.parse(text)
    assert parsed.well_formed
    assert parsed.budget == 42
    assert parsed.answer == "7"
    assert parsed.solution == FMT.solution_text("3+4=7;\\boxed{7}")


def test_prefix_is_what_prefill_writes():
    assert FMT.budget_prefix(300) == "<budget>300</budget><solution>"
    assert FMT.parse(FMT.budget_prefix(300) + "x \\boxed{1}").well_formed  # closing tag may be cut


@pytest.mark.parametrize(
    "text, error",
    [
        ("", FormatError.EMPTY),
        ("   ", FormatError.EMPTY),
        (None, FormatError.EMPTY),
        ("no tags \\boxed{1}", FormatError.NO_BUDGET),
        ("<budget>5</budget><budget>6</budget><solution>\\boxed{1}</solution>", FormatError.MULTIPLE_BUDGETS),
        ("<budget>5<solution>\\boxed{1}</solution>", FormatError.UNCLOSED_BUDGET),
        ("<budget>-5</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_OUT_OF_RANGE),
        ("<budget>0</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_OUT_OF_RANGE),
        ("<budget>1e99</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_NOT_INTEGER),
        ("<budget>" + "9" * 5000 + "</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_NOT_INTEGER),
        ("<budget>99999999999</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_OUT_OF_RANGE),
        ("<budget>nan</budget><solution>\\boxed{1}</solution>", FormatError.BUDGET_NOT_INTEGER),
        ("<budget>12</budget>just text \\boxed{1}", FormatError.NO_SOLUTION),
        ("<budget>12</budget><solution>no answer</solution>", FormatError.NO_ANSWER),
        ("<budget>12</budget><solution>so \\boxed{} </solution>", FormatError.NO_ANSWER),
        ("<budget>12</budget><solution>so \\boxed{ \n } </solution>", FormatError.NO_ANSWER),
        ("<budget>12</budget><solution>\\boxed{" + "{" * 10_000 + "</solution>", FormatError.NO_ANSWER),
        ("x" * 300_000, FormatError.TOO_LONG),
    ],
)
def test_parser_classifies_broken_output(text, error):
    parsed = FMT.parse(text)
    assert parsed.error is error
    assert not parsed.well_formed


def test_parser_accepts_bytes_and_odd_unicode():
    parsed = FMT.parse("<budget>7</budget><solution>\u200b\U0001f600 \\boxed{\u00bd}</solution>".encode())
    assert parsed.well_formed and parsed.answer == "\u00bd"
    assert FMT.parse(b"\xff\xfe<budget>3</budget>").error is FormatError.NO_SOLUTION


def test_answer_outside_solution_block_does_not_count():
    text = "<budget>9</budget><solution>thinking</solution> \\boxed{5}"
    assert FMT.parse(text).error is FormatError.NO_ANSWER


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("a \\boxed{1} then \\fbox{2}", "2"),
        ("\\fbox{1} then \\boxed{ {a}{b} }", "{a}{b}"),
        ("\\boxed{unclosed", None),
        ("nothing", None),
        ("\\boxed{" + "x" * 5000 + "}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_configurable_tags():
    fmt = OutputFormat(budget_open="[B]", budget_close="[/B]", solution_open="[S]", solution_close="[/S]")
    parsed = fmt.parse(fmt.render(11, "\\boxed{3}"))
    assert parsed.well_formed and parsed.budget == 11
