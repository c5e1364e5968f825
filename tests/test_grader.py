"""MathGrader: no false credit (lists, tuples, sets, intervals, malformed LaTeX, look-alike digits),
numeric golds, the fast path, math-verify through worker processes started from any ``__main__``,
timeouts (retried, never cached, counted), a pool that cannot start (an error, never "wrong"), and
agreement with labelled cases."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from selfbudget_pl.rewards.answer_text import (
    aligned_for_math_verify,
    foreign_digits,
    malformed,
    normalise_answer,
    plain_number,
    shape,
    too_costly,
)
from selfbudget_pl.rewards.grader import (
    Grader,
    GraderUnavailableError,
    MathGrader,
    answer_text_of,
    default_workers,
    fast_verdict,
)
from selfbudget_pl.rewards.grading_pool import GradingPool
from selfbudget_pl.rewards.verify_worker import VerifySettings, as_documented, verify_pair

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def grader():
    """One two-worker pool for the whole module: starting workers is the slow part."""
    with MathGrader(workers=2, timeout_s=1.0) as shared:
        yield shared


@pytest.fixture(scope="module")
def local():
    """In-process grading (pytest runs tests on the main thread), no cache: every call decides afresh."""
    return MathGrader(workers=0, cache_size=0)


# -- lists, tuples, sets, intervals: every pair from the issue, both directions ------------------

# (prediction, gold, verdict); each pair is also graded with the sides swapped (same verdict).
LIST_PAIRS = [
    ("2, 6", "2, 4, 6", False),  # a subset of the solutions is not the answer
    ("10", "-10, 10", False),  # one solution of two
    ("6, 4, 2", "2, 4, 6", True),  # a list of solutions is a set: order is free
    ("9, 8", "8, 9", True),
    ("-2, 2", "2, -2", True),
    ("a = 1, b = 2", "1, 2", True),  # labels are dropped
    ("x = 2, y = 1", "x = 1, y = 2", False),  # ... but labelled values must match their labels
    ("1,000", "1000", True),  # a 3-digit group is a thousands separator against a number
    ("1,5", "1.5", False),  # not a decimal comma: the list 1, 5
    ("(1,2)", "(2,1)", False),  # ordered pairs
    ("[1,2)", "(1,2)", False),  # intervals: brackets matter
    (r"(-\infty, 2)", r"(-\infty, 2]", False),
    ("1, 2", "(1,2)", False),  # a set is neither a tuple nor an interval
    (r"\{1, 2\}", "(1, 2)", False),
    (r"\{1, 2\}", "2, 1", True),  # set notation against a bare list
    ("x = 1, y = 2", "(1, 2)", True),  # labels in the written order against a point
    ("y = 2, x = 1", "(1, 2)", False),
    ("(1, 2, 3)", "(1, 2)", False),
    ("2,500", "2, 500", True),  # against a list, 2,500 is the list
]


@pytest.mark.parametrize("pred, gold, expected", LIST_PAIRS)
def test_lists_tuples_sets_and_intervals(local, pred, gold, expected):
    assert local.grade(pred, gold) is expected
    assert local.grade(gold, pred) is expected


def test_list_rules_hold_through_the_pool(grader):
    preds = [p for p, _, _ in LIST_PAIRS] + [g for _, g, _ in LIST_PAIRS]
    golds = [g for _, g, _ in LIST_PAIRS] + [p for p, _, _ in LIST_PAIRS]
    assert grader.grade_batch(preds, golds) == [e for _, _, e in LIST_PAIRS] * 2


@pytest.mark.parametrize(
    "text, expected",
    [("2, 4, 6", "set"), (r"\{1,2\}", "set"), ("(1,2)", "tuple"), ("[1,2)", "tuple"), ("1,000", "single"),
     ("1, 000", "set"), ("(1)", "single"), (r"\frac{1}{2}", "single"), ("(1,2)\\cup(3,4)", "single"), ("f(1,2)", "single")],
)
def test_shape(text, expected):
    assert shape(text) == expected


def test_aligned_pairs_for_math_verify():
    assert aligned_for_math_verify("1, 2", "(1, 2)") is None
    assert aligned_for_math_verify("x=1, y=2", "(1,2)") == ("(1,2)", "(1,2)")
    assert aligned_for_math_verify("2,500", "2, 500") == ("2, 500", "2, 500")
    assert aligned_for_math_verify("2,500", "2500") == ("2,500", "2500")  # a number against a number


def test_math_verify_is_called_as_documented():
    # Raw, math-verify's number regex reads "3, 5, 7" as 7; inside $...$, as its README writes answers,
    # a comma list is a set.
    assert as_documented("3, 5, 7") == "$3, 5, 7$" and as_documented(r"\boxed{7}") == r"\boxed{7}"
    assert as_documented("28 %") == r"$28 \%$"  # a bare % would be a LaTeX comment
    assert verify_pair("7", "3, 5, 7", 5.0, VerifySettings()) is False
    assert verify_pair("2, 6", "2, 4, 6", 5.0, VerifySettings()) is False
    assert verify_pair("6, 4, 2", "2, 4, 6", 5.0, VerifySettings()) is True
    assert verify_pair("$6, 4, 2$", r"\(2, 4, 6\)", 5.0, VerifySettings()) is True  # outer delimiters dropped


# -- malformed LaTeX, empty answers, numeric golds, digits ----------------------------------------


@pytest.mark.parametrize(
    "pred, gold",
    [(r"\begin{pmatrix} 1 & 2", "2"), (r"\frac{1}{", "1"), ("(1,2", "(1,2)"), (r"\sqrt{4", "2"),
     (r"\left( 2", "2"), (r"\{1, 2", r"\{1,2\}"), (r"1 & 2 \end{pmatrix}", "2"), ("2}", "2")],
)
def test_malformed_latex_is_wrong(local, pred, gold):
    assert malformed(pred)
    assert local.grade(pred, gold) is False


def test_well_formed_latex_is_not_flagged(local):
    for text in [r"\begin{pmatrix} 1 & 2 \end{pmatrix}", "[1,2)", r"(-\infty, 2]", r"\left[ 0, 1 \right)",
                 r"\{1,2\}", r"\frac{\sqrt{3}}{2}", r"10\!080"]:
        assert malformed(text) is None, text
    assert local.grade(r"\begin{pmatrix} 1 & 2 \end{pmatrix}", r"\begin{pmatrix}1&2\end{pmatrix}") is True


@pytest.mark.parametrize(
    "gold, right, wrong",
    [(27.0, "27", "28"), (27, "27.0", "26"), (0.5, r"\frac{1}{2}", "0.4"), (1e-07, "0.0000001", "0.000001"),
     (Fraction(3, 4), "0.75", "3/5"), (Decimal("2.50"), "2.5", "25")],
)
def test_numeric_golds_are_graded_as_numbers(local, gold, right, wrong):
    assert local.grade(right, gold) is True
    assert local.grade(wrong, gold) is False


def test_unreadable_golds_are_never_matched(local):
    assert answer_text_of(True) is None and answer_text_of(float("nan")) is None and answer_text_of(None) is None
    assert local.grade_batch(["1", "nan", "None"], [True, float("nan"), None]) == [False, False, False]


def test_numeric_golds_through_scoring(local):
    from selfbudget_pl.format import OutputFormat
    from selfbudget_pl.rewards.annotate import grade_parsed

    fmt = OutputFormat()
    parsed = [fmt.parse(fmt.render(10, r" so \boxed{36} ")), fmt.parse(fmt.render(10, r" so \boxed{35} "))]
    assert grade_parsed(parsed, [36.0, 36.0], local) == [True, False]


@pytest.mark.parametrize("digits", ["١٢", "१२", "１２", "𝟏𝟐"])
def test_only_ascii_digits_are_digits(local, digits):
    """The documented choice (rewards/answer_text.py): other digit characters are not read as numbers."""
    assert foreign_digits(digits) and not foreign_digits("12") and not foreign_digits(r"\pi")
    assert plain_number(digits) is None
    assert local.grade(digits, "12") is False
    assert local.grade("12", digits) is False
    assert local.grade(digits, digits) is True  # the gold string itself


# -- the fast path ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("1,000", Fraction(1000)), ("-12", Fraction(-12)), ("3.50", Fraction(7, 2)), (".5", Fraction(1, 2)),
     ("1,000.25", Fraction(4001, 4)), ("0,111", None), ("1000,99", None), ("1,00", None), ("1/2", None),
     ("9" * 65, None)],
)
def test_plain_number_reads_thousands_separators_only(text, expected):
    assert plain_number(text) == expected


def test_normalise_answer_drops_spacing_and_delimiters():
    assert normalise_answer(r"$\dfrac{1}{2}$") == r"\frac{1}{2}"
    assert normalise_answer(r"\left( 1, 2 \right).") == "(1,2)"
    assert normalise_answer(r"\$ 10") == "10"
    assert normalise_answer(r"\leftarrow") == r"\leftarrow"
    assert normalise_answer(r"\begin{pmatrix} -7 \\ 16 \end{pmatrix}") == r"\begin{pmatrix}-7\\16\end{pmatrix}"


@pytest.mark.parametrize(
    "pred, gold, expected",
    [("1,000", "1000", True), ("1000.0", "1000", True), ("72", "72.5", False), ("7", "8", False),
     (r"\dfrac{1}{2}", r"\frac{1}{2}", True), ("", "5", False), ("5", "   ", False),
     (r"\frac{1}{2}", "0.5", True), ("1/2", r"\frac12", True), (r"\frac{1}{3}", r"\frac{2}{3}", False),
     ("0.333333", r"\frac{1}{3}", None), ("3x+2", "2+3x", None), ("2, 6", "2, 4, 6", None), ("10", "-10, 10", None)],
)
def test_fast_verdict_decides_plain_cases_and_defers_the_rest(pred, gold, expected):
    assert fast_verdict(pred, gold) is expected


def test_fast_path_verdicts_are_math_verifys(local):
    """Every verdict the fast path gives is the one math-verify, called boxed, gives too, so the fast
    path only saves time (on the pairs where it differs by design, the rule is stated in the docstring:
    none here)."""
    pairs = [("1,000", "1000"), ("1000.0", "1000"), ("72", "72.5"), (r"\dfrac{1}{2}", r"\frac{1}{2}"),
             (r"\frac{1}{2}", "0.5"), ("1/2", r"\frac12"), (r"\frac{1}{3}", r"\frac{2}{3}"), ("-12", "-12.00"),
             ("3.5", r"\frac{7}{2}"), ("0.75", r"\frac{3}{4}"), ("10", "10.5"), ("7,425,000", "7425000")]
    for pred, gold in pairs:
        assert fast_verdict(pred, gold) is verify_pair(pred, gold, 5.0, VerifySettings()), (pred, gold)


def test_fast_verdict_relative_tolerance():
    assert fast_verdict("100.4", "100", numeric_rel_tol=0.01) is True
    assert fast_verdict("102", "100", numeric_rel_tol=0.01) is False


def test_plain_numbers_never_reach_math_verify(monkeypatch):
    grader = MathGrader(workers=0)
    monkeypatch.setattr(grader, "_verify", lambda pairs: pytest.fail(f"math-verify called for {pairs}"))
    assert grader.grade_batch(["1,000", "18", "3.0", None], ["1000", "17", "3", "3"]) == [True, False, True, False]


def test_default_workers_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers(4) == 1 and MathGrader().workers == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(4) == 4 and MathGrader().workers == MathGrader.MAX_DEFAULT_WORKERS


# -- math-verify through the workers ----------------------------------------------------------------

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{14}{3}", r"\frac{14}{3}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("3+2x", "2x+3"),
    (r"\sqrt{12}", r"2\sqrt{3}"),
    (r"\left(3, \frac{\pi}{2}\right)", r"(3,\frac{\pi}{2})"),
    (r"\pi/2", r"\frac{\pi}{2}"),
]
DIFFERENT = [(r"\frac{1}{3}", "0.5"), ("x^2+1", "(x+1)^2"), (r"\sqrt{2}", "2"), ("(1,2)", "(2,1)")]


def test_pool_grades_equivalent_rewritings(grader):
    pairs = EQUIVALENT + DIFFERENT
    verdicts = grader.grade_batch([p for p, _ in pairs], [g for _, g in pairs])
    assert verdicts == [True] * len(EQUIVALENT) + [False] * len(DIFFERENT)
    assert grader._pool.torch_in_workers is False  # workers import math-verify, not the training stack


def test_in_process_matches_pool(grader, local):
    pairs = EQUIVALENT + DIFFERENT
    assert local.grade_batch([p for p, _ in pairs], [g for _, g in pairs]) == grader.grade_batch(
        [p for p, _ in pairs], [g for _, g in pairs]
    )


def test_in_process_restores_the_alarm_handler():
    def mine(signum, frame):
        return None

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        assert MathGrader(workers=0).grade(r"\sqrt{36}", "6")
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_off_main_thread_uses_a_pool_even_with_zero_workers():
    grader = MathGrader(workers=0)
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(grader.grade(r"\sqrt{25}", "5")))
    worker.start()
    worker.join(120)
    try:
        assert results == [True]
        assert grader._pool is not None and grader._pool.started
    finally:
        grader.close()
    assert grader._pool is None


def test_oversized_and_costly_input_is_wrong_without_parsing(local, monkeypatch):
    monkeypatch.setattr(local, "_verify", lambda pairs: pytest.fail(f"math-verify called for {pairs}"))
    assert local.grade("1" * 20_000, "1" * 20_001) is False
    for text in [r"9^{9^{9^{9}}}", "9**9**9**9", r"(10^{100})!", "12345!", r"10^{10^{10}}", r"2^{123456}",
                 "__import__('os').system('id')", 'exec("print(1)")', "`id`",
                 r"\frac{" * 20 + "1" + "}{2}" * 20, "{" * 40 + "1" + "}" * 40,
                 r"\binom{10^{9}}{10^{8}}", r"{10^{9} \choose 10^{8}}", r"\dbinom{1000000}{500000}"]:
        assert too_costly(text), text
        assert local.grade(text, "3") is False
    for text in [r"2^{10}", "x^{2^n}", "(n+1)!", "(2-1)!", "5!", "f'(x)", r"\text{Evelyn's}", r"\frac{1}{2}", r"e^{-x^2}", r"(2^3)^2",
                 r"\binom{2024}{2}", r"\binom{10^{9}}{2}", r"\binom{n}{k^2}", r"{5 \choose 2}"]:
        assert too_costly(text) is None, text


# -- timeouts ---------------------------------------------------------------------------------------


class _Scripted(GradingPool):
    """A pool whose verdicts are scripted per attempt: None = ran out of time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list, float]] = []
        self.script: dict[str, list] = {}

    def start(self) -> None:
        pass

    def run(self, jobs, settings):
        self.calls.append(([(p, g) for p, g, _ in jobs], jobs[0][2]))
        return [self.script[p].pop(0) for p, _, _ in jobs]


class _ScriptedGrader(MathGrader):
    pool_class = _Scripted


def test_a_timed_out_item_is_retried_longer_then_wrong_counted_and_not_cached():
    grader = _ScriptedGrader(workers=1, timeout_s=0.5, retry_timeout_s=3.0)
    pool = grader._ensure_pool()
    pool.script = {r"\sqrt{16}": [None, True], r"\sqrt{25}": [None, None], r"\sqrt{36}": [None, None]}
    assert grader.grade_batch([r"\sqrt{16}", r"\sqrt{25}"], ["4", "5"]) == [True, False]
    assert [timeout for _, timeout in pool.calls] == [0.5, 3.0]  # the retry gets the longer limit
    assert pool.calls[1][0] == [(r"\sqrt{16}", "4"), (r"\sqrt{25}", "5")]
    assert (r"\sqrt{16}", "4") in grader._cache and (r"\sqrt{25}", "5") not in grader._cache
    assert grader.pop_metrics() == {"grader/timeouts": 1.0, "grader/retries": 2.0, "grader/worker_restarts": 0.0}
    assert grader.pop_metrics() == {"grader/timeouts": 0.0, "grader/retries": 0.0, "grader/worker_restarts": 0.0}
    pool.script[r"\sqrt{25}"] = [True]  # not cached as wrong: a later batch computes it
    assert grader.grade(r"\sqrt{25}", "5") is True


def test_a_slow_item_times_out_in_the_worker(grader):
    started = time.monotonic()
    pool = grader._ensure_pool()
    pool.start()
    # A limit far too short for a first-time integral: the worker's timer, not the item, ends it.
    verdicts = pool.run([(r"\int_0^1 x^{17} \sin(x)^3 dx", "1", 0.001), (r"\frac{1}{2}", "0.5", 5.0)], VerifySettings())
    assert verdicts[0] is None and verdicts[1] is True
    assert time.monotonic() - started < 30


def test_verdicts_are_cached_per_pair(grader, monkeypatch):
    assert fast_verdict(r"\sqrt{16}", "4") is None  # a pair only math-verify can decide
    grader.grade(r"\sqrt{16}", "4")
    monkeypatch.setattr(grader, "_verify", lambda pairs: pytest.fail(f"not cached: {pairs}"))
    assert grader.grade(r"\sqrt{16}", "4") is True


# A worker stuck where the interval timer cannot reach it (SIGALRM blocked, then asleep).
_WEDGING_WORKER = """
import signal, socket, sys, time
from multiprocessing.connection import Connection
connection = Connection(socket.socket(fileno=int(sys.argv[1])).detach())
connection.send(("ready", "torch" in sys.modules))
while True:
    prediction, gold, timeout_s, settings = connection.recv()
    if prediction == "WEDGE":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    connection.send(prediction.replace(" ", "") == gold.replace(" ", ""))
"""


class _WedgingPool(GradingPool):
    worker_code = _WEDGING_WORKER


def test_a_wedged_worker_is_killed_and_only_its_item_is_lost():
    pool = _WedgingPool(workers=1, kill_grace_s=0.2)
    try:
        pool.start()
        started = time.monotonic()
        # Only the wedge has a short deadline: on a loaded machine a 0.2 s deadline also expired for a
        # plain item now and then, which this test would have read as a second wedge.
        jobs = [("a + b", "a+b", 5.0), ("WEDGE", "x", 0.2), ("c + d", "c+d", 5.0), ("e", "f", 5.0)]
        assert pool.run(jobs, VerifySettings()) == [True, None, True, False]
        assert time.monotonic() - started < 15  # the wedge cost its own deadline, then a restart
        assert pool.run([("g + h", "g+h", 5.0)], VerifySettings()) == [True]  # a fresh worker took over
        assert pool.restarts == 1
    finally:
        pool.close()


# -- starting workers ---------------------------------------------------------------------------------

_STDIN_SCRIPT = """
import logging, sys
sys.path.insert(0, {src!r})
from selfbudget_pl.rewards.grader import MathGrader
with MathGrader(workers=2) as grader:
    print("verdicts", grader.grade_batch(["x^2+2x+1", "x^2+1", "6, 4, 2"], ["(x+1)^2", "(x+1)^2", "2, 4, 6"]))
    print("torch in workers", grader._pool.torch_in_workers)
"""


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_grading_from_a_script_on_standard_input_or_the_command_line(how):
    """The way that once failed: workers re-imported ``<stdin>`` and every verdict came back wrong."""
    script = _STDIN_SCRIPT.format(src=SRC)
    command, stdin = ([sys.executable, "-"], script) if how == "stdin" else ([sys.executable, "-c", script], None)
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verdicts [True, False, True]" in done.stdout
    assert "torch in workers False" in done.stdout
    assert "Traceback" not in done.stderr


class _NeverStarts(GradingPool):
    worker_code = "import sys; sys.stderr.write('cannot import math_verify (simulated)\\n'); sys.exit(3)"


class _NeverStartsGrader(MathGrader):
    pool_class = _NeverStarts


def test_a_pool_that_cannot_start_raises_instead_of_grading_wrong():
    grader = _NeverStartsGrader(workers=2, max_failed_starts=3)
    with pytest.raises(GraderUnavailableError, match=r"failed to start \(exited with code 3.*simulated"):
        grader.grade("x^2+2x+1", "(x+1)^2")
    assert grader.grade("1,000", "1000") is True  # the fast path needs no worker
    with pytest.raises(GraderUnavailableError):
        grader.start()
    grader.close()


class _SilentPool(GradingPool):
    worker_code = "import time; time.sleep(60)"


def test_a_silent_worker_counts_as_a_failed_start():
    pool = _SilentPool(workers=1, startup_timeout_s=0.5, max_failed_starts=2)
    with pytest.raises(GraderUnavailableError, match="not ready within"):
        pool.start()
    assert not pool.started


# -- object behaviour -------------------------------------------------------------------------------


def test_pickles_without_its_pool(grader):
    grader.start()
    assert grader._pool is not None
    copy = pickle.loads(pickle.dumps(grader))
    assert copy._pool is None and not copy._cache
    assert copy.timeout_s == grader.timeout_s and copy.workers == grader.workers
    assert isinstance(copy, Grader)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout_s"):
        MathGrader(timeout_s=0)
    with pytest.raises(ValueError, match="retry_timeout_s"):
        MathGrader(timeout_s=2.0, retry_timeout_s=1.0)
    with pytest.raises(ValueError, match="workers"):
        MathGrader(workers=-1)
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        MathGrader(workers=0).grade_batch(["1", "2"], ["1"])


# -- agreement with labelled cases ------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_agreement_with_cases_jsonl(shared_data, grader):
    rows = [row for row in _rows(shared_data / "grader" / "cases.jsonl") if not row.get("params") and not row.get("flag")]
    verdicts = grader.grade_batch([row["pred"] for row in rows], [row["gold"] for row in rows])
    wrong = [row["id"] for verdict, row in zip(verdicts, rows) if verdict != row["equal"]]
    # Each disagreement is listed with its reason in benchmarks/RESULTS.md.
    assert len(wrong) <= 11, wrong


OTHER_GRADERS = Path(__file__).resolve().parent / "data" / "other_graders_cases.jsonl"
# Pairs labelled wrong that we grade right, each kept on purpose (reasons in benchmarks/RESULTS.md): a unit
# right after the number is dropped as math-verify drops it; the prose around a mixed number is read by
# math-verify 0.9 as its last number.
KEPT_CREDIT = {("10cm", "10"), ("10m", "10"), ("The answer is 4 4/9.", "4")}


def test_other_graders_cases_file_is_well_formed(shared_data):
    rows = _rows(OTHER_GRADERS)
    assert len(rows) >= 150
    assert all(set(row) >= {"pred", "gold", "expected", "source"} for row in rows)
    repos = {row["source"].split("@")[0] for row in rows}
    assert len(repos) >= 5, repos
    cases = {(row["pred"], row["gold"]) for row in _rows(shared_data / "grader" / "cases.jsonl")}
    assert not cases & {(row["pred"], row["gold"]) for row in rows if isinstance(row["pred"], str)}  # beyond cases.jsonl


def test_no_false_credit_on_other_graders_cases(grader):
    """No pair a public grader's tests label wrong is graded right, except the three kept on purpose;
    agreement stays at its measured level (122/151, benchmarks/RESULTS.md; one item may time out under load)."""
    rows = _rows(OTHER_GRADERS)
    verdicts = grader.grade_batch([row["pred"] for row in rows], [row["gold"] for row in rows])
    false_credit = {(row["pred"], row["gold"]) for verdict, row in zip(verdicts, rows) if verdict and not row["expected"]}
    assert false_credit <= KEPT_CREDIT, false_credit - KEPT_CREDIT
    agree = sum(verdict == row["expected"] for verdict, row in zip(verdicts, rows))
    assert agree >= 121, f"{agree}/{len(rows)}"
