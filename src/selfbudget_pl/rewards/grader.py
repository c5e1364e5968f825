"""Answer grading: does a predicted final answer equal the gold one?

:class:`MathGrader` decides in two steps. A fast path settles what needs no algebra: equal strings
after light normalisation, and plain numbers (``1,000`` == ``1000.0``) compared exactly, so GSM8K and
the synthetic task never touch sympy; then :mod:`~selfbudget_pl.rewards.canonical` reads both answers
into small canonical forms (numbers, ``\\sqrt``/``\\pi`` expressions, polynomials, intervals, tuples,
sets, matrices, ``\\text{}``) and settles the pairs whose math-verify verdict those forms fix, mostly
unequal ones (a number against an interval). What is left (0.2% of the benchmark's MATH-500 mix, a
tenth of random pairs of MATH answers: lists, functions, percentages, text) goes to math-verify, in a
process pool whose workers run it on their main thread under one interval timer per item.

Model text is untrusted. Nothing here calls ``eval``/``sympify``; math-verify only hands model text
to its LaTeX grammar (ANTLR) and hands sympy's ``parse_expr`` only the substrings its number/operator
regex matched (digits, ``.``, whitespace and ``+-*/^()×÷``). Size is bounded by ``max_chars`` and time
by ``timeout_s`` per item, with a hard deadline that kills and restarts a wedged pool.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Optional, Protocol, Sequence, runtime_checkable

from selfbudget_pl.rewards.canonical import (
    NUMBER_LIKE,
    Settings,
    canonical_form,
    decide,
    normalise_answer,
    split_top_level,
)

logger = logging.getLogger(__name__)


@runtime_checkable
class Grader(Protocol):
    """Anything that can judge final answers. ``prediction`` None (no answer) is never correct."""

    def grade(self, prediction: Optional[str], gold: str) -> bool:
        """Whether ``prediction`` equals ``gold``."""
        ...

    def grade_batch(self, predictions: Sequence[Optional[str]], golds: Sequence[str]) -> list[bool]:
        """:meth:`grade` over pairs, in order."""
        ...


# ---------------------------------------------------------------------------------------------
# Fast path: no sympy.

# Thousands groups need a non-zero lead digit: "0,111" is a decimal comma, not 111.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_MAX_NUMBER_CHARS = 64  # longer "numbers" are not GSM8K answers; leave them to the bounded path


def plain_number(text: str) -> Optional[Fraction]:
    """The exact value of a plain decimal (``-12``, ``1,000``, ``3.50``, ``.5``), else None.

    Commas count only as thousands separators (``1,000``); ``1000,99`` is not a plain number and
    goes to math-verify, which reads it as a decimal comma.
    """
    if len(text) > _MAX_NUMBER_CHARS or not _PLAIN_NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


_FRACTION_LITERAL = re.compile(r"([+-]?)(?:\\frac(?:\{([+-]?\d{1,20})\}\{(\d{1,20})\}|(\d)(\d))|(\d{1,20})/(\d{1,20}))")


def rational_literal(text: str) -> Optional[Fraction]:
    """The exact value of a plain number or a fraction literal (``\\frac{3}{4}``, ``\\frac34``,
    ``-3/4``) in normalised text, else None (zero denominators included: math-verify decides those)."""
    number = plain_number(text)
    if number is not None:
        return number
    match = _FRACTION_LITERAL.fullmatch(text)
    if not match:
        return None
    sign, numerator, denominator = match[1], match[2] or match[4] or match[6], match[3] or match[5] or match[7]
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if sign == "-" else value


def _top_level_terms(text: str) -> Optional[list[str]]:
    """Summands of a top-level sum (``+`` outside every bracket), or None when it is not a plain sum."""
    # Lists, relations, matrices and plus-minus have a '+' that does not join summands of one sum.
    if not text or any(mark in text for mark in ",;=<>|&") or any(cmd in text for cmd in ("\\pm", "\\mp", "\\begin")):
        return None
    terms = split_top_level(text, "+")
    if terms is None or len(terms) < 2 or not all(terms):
        return None
    return sorted(terms)


def fast_verdict(
    prediction: str,
    gold: str,
    numeric_rel_tol: float = 0.0,
    float_rounding: int = 6,
    numeric_precision: int = 15,
    strict: bool = True,
) -> Optional[bool]:
    """Decide without sympy when it is safe: True/False, or None when math-verify must look.

    Decides: equal normalised strings; plain numbers (exactly, or within ``numeric_rel_tol``); fraction
    literals against numbers or fractions, except a decimal against a fraction that differs from it
    by less than math-verify's rounding (0.333333 = 1/3 at 6 places); the same summands in another
    order (True only). Then whatever :mod:`~selfbudget_pl.rewards.canonical` can tell from both
    answers' canonical forms: numbers against expressions, intervals, tuples, sets, matrices and
    ``\\text{}`` answers, units and degrees, each only where math-verify (with ``float_rounding``,
    ``numeric_precision``, ``strict``) gives the same verdict.
    """
    pred, ref = normalise_answer(prediction), normalise_answer(gold)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    pred_value, ref_value = rational_literal(pred), rational_literal(ref)
    if pred_value is not None and ref_value is not None:
        if numeric_rel_tol > 0:
            return abs(pred_value - ref_value) <= Fraction(numeric_rel_tol) * max(abs(pred_value), abs(ref_value))
        if pred_value == ref_value:
            return True
        both_plain = plain_number(pred) is not None and plain_number(ref) is not None
        has_decimal = "." in pred or "." in ref
        if both_plain or not has_decimal:
            return False
    else:
        pred_terms = _top_level_terms(pred)
        if pred_terms is not None and pred_terms == _top_level_terms(ref):
            return True  # addition commutes; a different order of the same summands is the same sum
    pred_form, gold_form = canonical_form(prediction), canonical_form(gold)
    if pred_form is None or gold_form is None:
        return None
    return decide(pred_form, gold_form, Settings(float_rounding, numeric_precision, strict, numeric_rel_tol))


# ---------------------------------------------------------------------------------------------
# math-verify, run where signals work (a worker's main thread, or the caller's main thread).


@dataclass(frozen=True)
class _VerifySettings:
    timeout_s: float
    float_rounding: int
    numeric_precision: int
    strict: bool


class _ItemTimeout(BaseException):
    """Raised by the interval timer. A BaseException so that math-verify's and sympy's
    ``except Exception`` clauses cannot swallow it and keep computing."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _ItemTimeout()


# Already delimited text, or a number-like string that math-verify's number regex reads best raw
# (thousands spaces, decimal commas, percent); anything else is LaTeX without delimiters, so box it.
_DELIMITED = re.compile(r"\$|\\boxed|\\fbox|\\\(|\\\[")


def _math_verify_input(text: str) -> str:
    if _DELIMITED.search(text) or NUMBER_LIKE.fullmatch(text):
        return text
    return "\\boxed{" + text + "}"


def _prepare_math_verify() -> None:
    """Import math-verify and tell it we time out ourselves (its warnings say to do exactly that)."""
    from math_verify import grader as mv_grader
    from math_verify import parser as mv_parser

    mv_grader.TIMEOUT_WARNING_SHOWN = True
    mv_parser.TIMEOUT_WARNING_SHOWN = True


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # A group of G completions shares one gold answer: parse it once per worker.
    from math_verify import parse

    return parse(_math_verify_input(gold), parsing_timeout=None)


def _verify_one(prediction: str, gold: str, settings: _VerifySettings) -> bool:
    """math-verify under one timer for the whole item (gold parse, prediction parse, comparison).

    math-verify's own timeouts are off: they use whole seconds via ``signal.alarm``, one per call, and
    each call's cleanup would cancel an outer timer; one float timer bounds the item as a whole.
    """
    from math_verify import parse, verify

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout_s)
    try:
        gold_parsed = _parse_gold(gold)
        pred_parsed = parse(_math_verify_input(prediction), parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(
            verify(
                gold_parsed,
                pred_parsed,
                float_rounding=settings.float_rounding,
                numeric_precision=settings.numeric_precision,
                strict=settings.strict,
                timeout_seconds=None,
            )
        )
    except Exception:  # RecursionError, MemoryError, sympy bugs: untrusted input is simply wrong
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _verify_guarded(prediction: str, gold: str, settings: _VerifySettings) -> bool:
    try:
        return _verify_one(prediction, gold, settings)
    except _ItemTimeout:  # also catches a timer that fires during cleanup
        return False


def _verify_chunk(pairs: list[tuple[str, str]], settings: _VerifySettings) -> list[bool]:
    """Pool task: grade a chunk of (prediction, gold) pairs on the worker's main thread."""
    return [_verify_guarded(prediction, gold, settings) for prediction, gold in pairs]


def default_workers(limit: int) -> int:
    """The cores this process may run on (its affinity mask, which a scheduler or taskset may have
    narrowed), between 1 and ``limit``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


# What reaches math-verify now is mostly relations, sets and functions; their first use in a process
# loads sympy's solvers and set machinery (0.1-0.6 s an item). A worker pays that while starting.
_WARM_UP = (
    ("1", "1"), ("3+y=2x", "y=2x+3"), ("8", r"x \in [-2,7]"), (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1,2]"),
    (r"\{1\pm\sqrt{5},-2\}", r"3\sqrt{5}"), (r"\cot x", r"\sin x"), (r"\frac{\sqrt{2}}{2}", "0.7071"), ("1+2i", "3"),
)


def _init_worker(memory_limit_mb: Optional[int], warm_up: bool = True) -> None:
    # Ctrl-C goes to the whole process group; the parent decides, workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a bomb raises MemoryError, not OOM-kill
    _prepare_math_verify()
    settings = _VerifySettings(5.0, 6, 15, True)  # roomy (a timer firing mid-warm-up wastes it), yet bounded
    for prediction, gold in _WARM_UP if warm_up else _WARM_UP[:1]:
        _verify_guarded(prediction, gold, settings)


def _shutdown_pool(pool: multiprocessing.pool.Pool) -> None:
    # Nothing is in flight between batches, so terminating loses no work and never blocks on a
    # wedged worker (close+join would).
    pool.terminate()
    pool.join()


# ---------------------------------------------------------------------------------------------


class MathGrader:
    """Grades final answers: fast path, then math-verify in a process pool, with bounded time and size.

    Args:
        timeout_s: wall-clock limit per item for math-verify (gold parse + prediction parse +
            comparison). An item that runs out is wrong.
        max_chars: predictions or golds longer than this are wrong without being parsed.
        workers: pool processes; None (default) = the cores this process may run on
            (``os.sched_getaffinity``), at most :attr:`MAX_DEFAULT_WORKERS`. 0 grades in the calling
            process, which must then be on its main thread (a pool of one is used otherwise). Inside
            a daemonic process (a DataLoader worker) grading is always in-process, since such
            processes may not have children.
        numeric_rel_tol: relative tolerance for plain numbers on the fast path; 0 = exact.
        float_rounding, numeric_precision, strict: passed to ``math_verify.verify``.
        cache_size: verdicts kept per (prediction, gold) so repeated answers skip the pool; 0 = off.
        start_method: multiprocessing context; default ``forkserver`` where available, else
            ``spawn``. Both are safe with CUDA and DDP, unlike ``fork``.
        memory_limit_mb: address-space limit for pool workers, so a memory bomb fails as MemoryError.

    Picklable: the pool and cache are not pickled; a copy starts its own pool when first needed.
    Call :meth:`close` (or use as a context manager) to stop the pool; it is also stopped when the
    grader is garbage-collected or the interpreter exits.
    """

    # Default pool size cap: with the fast path deciding ~99% of MATH answers a few workers suffice,
    # and each holds sympy and math-verify in memory.
    MAX_DEFAULT_WORKERS = 4
    # Workers grade a few relations, sets and functions while starting (see _WARM_UP).
    WARM_UP = True
    # Extra deadline allowance while a fresh pool's workers import math-verify.
    STARTUP_ALLOWANCE_S = 30.0
    # The pool task; a class attribute so tests can substitute a misbehaving worker.
    _task = staticmethod(_verify_chunk)

    def __init__(
        self,
        timeout_s: float = 1.0,
        max_chars: int = 16_000,
        workers: Optional[int] = None,
        numeric_rel_tol: float = 0.0,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        cache_size: int = 65_536,
        start_method: Optional[str] = None,
        memory_limit_mb: Optional[int] = 4096,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"MathGrader: `timeout_s` must be > 0, got {timeout_s}.")
        if workers is None:
            workers = default_workers(self.MAX_DEFAULT_WORKERS)
        if workers < 0:
            raise ValueError(f"MathGrader: `workers` must be >= 0 (0 = in-process), got {workers}.")
        if max_chars < 1:
            raise ValueError(f"MathGrader: `max_chars` must be >= 1, got {max_chars}.")
        if numeric_rel_tol < 0:
            raise ValueError(f"MathGrader: `numeric_rel_tol` must be >= 0, got {numeric_rel_tol}.")
        available = multiprocessing.get_all_start_methods()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in available else "spawn"
        if start_method not in available:
            raise ValueError(f"MathGrader: `start_method` must be one of {available}, got {start_method!r}.")
        self.timeout_s = float(timeout_s)
        self.max_chars = int(max_chars)
        self.workers = int(workers)
        self.numeric_rel_tol = float(numeric_rel_tol)
        self.cache_size = int(cache_size)
        self.start_method = start_method
        self.memory_limit_mb = memory_limit_mb
        self._settings = _VerifySettings(self.timeout_s, int(float_rounding), int(numeric_precision), bool(strict))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pool: Optional[multiprocessing.pool.Pool] = None
        self._pool_started_at = 0.0
        self._finalizer: Optional[weakref.finalize] = None
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for runtime in ("_pool", "_pool_started_at", "_finalizer", "_cache", "_lock"):
            state.pop(runtime)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __enter__(self) -> "MathGrader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker pool now and wait until it grades (otherwise the first batch pays for it:
        a few seconds while workers import math-verify). A no-op when grading is in-process."""
        if self.workers > 0 and not multiprocessing.current_process().daemon:
            with self._lock:
                pool = self._ensure_pool()
                ready = pool.starmap_async(_verify_chunk, [([("0", "0")], self._settings)] * self.workers, chunksize=1)
                try:
                    ready.get(timeout=self.STARTUP_ALLOWANCE_S)
                except multiprocessing.TimeoutError:
                    self.close()
                    raise RuntimeError(
                        f"MathGrader: grading workers did not start within {self.STARTUP_ALLOWANCE_S:.0f} s "
                        f"(start_method={self.start_method!r}; a script run from stdin cannot be re-imported "
                        "by workers, so use a file or workers=0)."
                    ) from None

    def close(self) -> None:
        """Stop the worker pool (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown_pool once
        self._pool, self._finalizer = None, None

    # -- grading ------------------------------------------------------------------------------

    def grade(self, prediction: Optional[str], gold: str) -> bool:
        """Whether ``prediction`` equals ``gold``; never raises on model text."""
        return self.grade_batch([prediction], [gold])[0]

    def grade_batch(self, predictions: Sequence[Optional[str]], golds: Sequence[str]) -> list[bool]:
        """Grade pairs in order; the pairs the fast path and the cache leave go to the pool together."""
        if len(predictions) != len(golds):
            raise ValueError(f"grade_batch: {len(predictions)} predictions but {len(golds)} golds.")
        verdicts: list[Optional[bool]] = []
        pending: dict[tuple[str, str], list[int]] = {}
        for index, (prediction, gold) in enumerate(zip(predictions, golds)):
            verdict = self._quick_verdict(prediction, gold)
            if verdict is None:
                key = (prediction, gold)
                verdict = self._cache.get(key)
                if verdict is None:
                    pending.setdefault(key, []).append(index)  # type: ignore[arg-type]
                else:
                    self._cache.move_to_end(key)
            verdicts.append(verdict)
        if pending:
            keys = list(pending)
            for key, verdict in zip(keys, self._verify(keys)):
                for index in pending[key]:
                    verdicts[index] = verdict
        return [bool(verdict) for verdict in verdicts]

    def _quick_verdict(self, prediction: object, gold: object) -> Optional[bool]:
        if not isinstance(prediction, str) or not isinstance(gold, str):
            return False
        if len(prediction) > self.max_chars or len(gold) > self.max_chars:
            return False
        settings = self._settings
        return fast_verdict(
            prediction, gold, self.numeric_rel_tol, settings.float_rounding, settings.numeric_precision, settings.strict
        )

    def _remember(self, key: tuple[str, str], verdict: bool) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = verdict
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _verify(self, pairs: list[tuple[str, str]]) -> list[bool]:
        verdicts: list[Optional[bool]]
        on_main_thread = threading.current_thread() is threading.main_thread()
        daemonic = multiprocessing.current_process().daemon
        if on_main_thread and (self.workers == 0 or daemonic):
            _prepare_math_verify()
            verdicts = [_verify_guarded(prediction, gold, self._settings) for prediction, gold in pairs]
        elif daemonic:
            raise RuntimeError(
                "MathGrader: inside a daemonic process (e.g. a DataLoader worker) grading must run on "
                "that process's main thread: signals bound its time there and it may not start a pool."
            )
        else:
            with self._lock:
                verdicts = self._verify_in_pool(pairs)
        for key, verdict in zip(pairs, verdicts):
            if verdict is not None:  # a missed deadline may be load, not the item: do not remember it
                self._remember(key, verdict)
        return [bool(verdict) for verdict in verdicts]

    # -- pool ---------------------------------------------------------------------------------

    def _ensure_pool(self) -> multiprocessing.pool.Pool:
        if self._pool is None:
            context = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                # Workers fork from a server that already imported math-verify: restarts are cheap.
                context.set_forkserver_preload(["math_verify", __name__])
            self._pool = context.Pool(
                processes=max(1, self.workers),
                initializer=_init_worker,
                initargs=(self.memory_limit_mb, self.WARM_UP),
            )
            self._pool_started_at = time.monotonic()
            self._finalizer = weakref.finalize(self, _shutdown_pool, self._pool)
        return self._pool

    def _deadline(self, num_items: int) -> float:
        """Latest time a batch may take: every item may use its full timeout, twice over for
        scheduling slack, plus start-up time while a fresh pool imports math-verify."""
        processes = max(1, self.workers)
        startup = max(0.0, self.STARTUP_ALLOWANCE_S - (time.monotonic() - self._pool_started_at))
        return time.monotonic() + startup + 2 * self.timeout_s * math.ceil(num_items / processes) + 1.0

    def _run_round(self, pairs: list[tuple[str, str]], chunk_size: int) -> list[Optional[bool]]:
        """Submit chunks, collect what finishes before the deadline (None for the rest)."""
        pool = self._ensure_pool()
        deadline = self._deadline(len(pairs))
        starts = range(0, len(pairs), chunk_size)
        pending = [(start, pool.apply_async(self._task, (pairs[start : start + chunk_size], self._settings))) for start in starts]
        results: list[Optional[bool]] = [None] * len(pairs)
        for start, handle in pending:
            try:
                chunk = handle.get(timeout=max(0.0, deadline - time.monotonic()))
            except multiprocessing.TimeoutError:
                continue
            results[start : start + len(chunk)] = chunk
        if any(result is None for result in results):
            # A worker is wedged in C code the timer cannot interrupt, or died: replace the pool.
            logger.warning("MathGrader: a grading worker missed its deadline; restarting the pool.")
            self.close()
        return results

    def _verify_in_pool(self, pairs: list[tuple[str, str]]) -> list[Optional[bool]]:
        processes = max(1, self.workers)
        # About four chunks per worker balances load and limits what one wedged item takes down.
        chunk_size = max(1, math.ceil(len(pairs) / (4 * processes)))
        results = self._run_round(pairs, chunk_size)
        unfinished = [index for index, result in enumerate(results) if result is None]
        if unfinished and chunk_size > 1:
            # Innocent items that shared a chunk with the wedged one get a second chance, one by one.
            retried = self._run_round([pairs[index] for index in unfinished], 1)
            for index, result in zip(unfinished, retried):
                results[index] = result
        return results
