"""Answer grading: does a predicted final answer equal the gold one? Built to give no false credit,
since a reward that credits a wrong answer is one a policy learns to hack.

:class:`MathGrader` decides in steps:

1. Types and size: an answer that is a JSON number (gold ``27.0`` in AMC files) is graded as that
   number; anything else that is not text, or either side longer than ``max_chars``, is wrong.
2. Fast path (:func:`fast_verdict`, no sympy): equal strings after light normalisation, and plain
   numbers or fraction literals compared exactly (``1,000`` == ``1000.0``). The synthetic task and
   GSM8K never go further. Nothing more is kept here, because ``benchmarks/bench_grading_step.py``
   measured what it would buy (``benchmarks/RESULTS.md``): math-verify grades the paper's batch (8
   prompts x G = 5, MATH-500 answers) in 0.2-0.5 s with two workers, a few percent of a real step; only
   the toy's 128 integer answers per 0.3 s step need a fast path (0.04-0.17 s through math-verify,
   0.002 s here).
3. Text rules (:mod:`~selfbudget_pl.rewards.answer_text`): malformed LaTeX is wrong; digits other than
   ASCII are not digits; division by a literal zero is wrong; answers that would make sympy compute
   huge numbers are wrong unparsed; and lists follow the MATH convention (a bare comma list is a set, a bracketed pair a tuple or interval,
   a set never equals a tuple, ``x = 1, y = 2`` against a tuple is its values in order).
4. math-verify, called as its README shows (a bare answer inside ``$...$``), in worker processes
   (:mod:`~selfbudget_pl.rewards.grading_pool`) with a time limit per item. An item that runs out is
   retried once with ``retry_timeout_s``; if that runs out too it is wrong and counted
   (``grader/timeouts``, via :meth:`MathGrader.pop_metrics`). Timed-out verdicts are never cached.

Model text is untrusted: nothing here calls ``eval``/``sympify``; size is bounded by ``max_chars``,
time per item by the worker's timer and a hard deadline that replaces a wedged worker.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from numbers import Number
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from selfbudget_pl.rewards.answer_text import (
    aligned_for_math_verify,
    divides_by_zero,
    foreign_digits,
    is_bare,
    malformed,
    normalise_answer,
    plain_number,
    rational_literal,
    too_costly,
)
from selfbudget_pl.rewards.grading_pool import GraderUnavailableError, GradingPool
from selfbudget_pl.rewards.verify_worker import VerifySettings, prepare_math_verify, verify_pair
from selfbudget_pl.schema import Findings, Schema, check_arguments, check_ordered, spec

logger = logging.getLogger(__name__)

__all__ = ["Grader", "GraderUnavailableError", "MathGrader", "answer_text_of", "default_workers", "fast_verdict"]


@runtime_checkable
class Grader(Protocol):
    """Anything that can judge final answers. ``prediction`` None (no answer) is never correct."""

    def grade(self, prediction: Optional[str], gold: str) -> bool:
        """Whether ``prediction`` equals ``gold``."""
        ...

    def grade_batch(self, predictions: Sequence[Optional[str]], golds: Sequence[str]) -> list[bool]:
        """:meth:`grade` over pairs, in order."""
        ...


def answer_text_of(value: object) -> Optional[str]:
    """An answer as text: strings as they are, numbers (JSON ints and floats, Fractions, Decimals) in
    plain decimal notation (``27.0`` -> ``27.0``, ``1e-07`` -> ``0.0000001``); None for anything else
    (booleans, NaN, infinities, None)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, Number):
        return None
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        return format(Decimal(repr(value)) if isinstance(value, float) else Decimal(value), "f")  # type: ignore[arg-type]
    except (ArithmeticError, TypeError, ValueError):
        return None


def fast_verdict(prediction: str, gold: str, numeric_rel_tol: float = 0.0) -> Optional[bool]:
    """Decide without sympy when it is safe: True/False, or None when math-verify must look.

    Decides equal normalised strings (True), plain numbers (exactly, or within ``numeric_rel_tol``)
    and fraction literals against numbers or fractions, except a decimal against a fraction, where
    math-verify's rounding decides (0.333333 = 1/3 at 6 places).
    """
    pred, ref = normalise_answer(prediction), normalise_answer(gold)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    pred_value, ref_value = rational_literal(pred), rational_literal(ref)
    if pred_value is None or ref_value is None:
        return None
    if numeric_rel_tol > 0:
        return abs(pred_value - ref_value) <= Fraction(numeric_rel_tol) * max(abs(pred_value), abs(ref_value))
    if pred_value == ref_value:
        return True
    both_plain = plain_number(pred) is not None and plain_number(ref) is not None
    if both_plain or ("." not in pred and "." not in ref):
        return False
    return None


def default_workers(limit: int) -> int:
    """The cores this process may run on (its affinity mask, which a scheduler or taskset may have
    narrowed), between 1 and ``limit``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


@dataclass
class MathGraderSchema(Schema):
    """The arguments of :class:`MathGrader` (config group ``grader``) and what each allows."""

    TARGETS = ("selfbudget_pl.rewards.grader.MathGrader",)

    timeout_s: float = spec(gt=0)
    retry_timeout_s: float = spec(gt=0, note="a timed-out item is retried once with this limit")
    max_chars: int = spec(ge=1)
    workers: Optional[int] = spec(ge=0, note="0: in the calling process; null: a default from the CPU count")
    numeric_rel_tol: float = spec(ge=0)
    float_rounding: int = spec(ge=0)
    numeric_precision: int = spec(ge=1)
    strict: bool = spec()
    cache_size: int = spec(ge=0)
    memory_limit_mb: Optional[int] = spec(ge=1, note="null: no limit")
    startup_timeout_s: float = spec(gt=0)
    max_failed_starts: int = spec(ge=1)

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        check_ordered(node, key, findings, "timeout_s", "retry_timeout_s")


class MathGrader:
    """Grades final answers (see the module doc for the steps), with bounded time and size.

    Args:
        timeout_s: time limit per item for math-verify (gold parse + prediction parse + comparison).
        retry_timeout_s: the limit for the one retry of an item that ran out of ``timeout_s``; an item
            that runs out of both is wrong and counted in ``grader/timeouts``.
        max_chars: predictions or golds longer than this are wrong without being parsed.
        workers: grading processes; None (default) = the cores this process may run on
            (``os.sched_getaffinity``), at most :attr:`MAX_DEFAULT_WORKERS`. 0 grades in the calling
            process, which must then be on its main thread (a pool of one is used otherwise).
        numeric_rel_tol: relative tolerance for plain numbers on the fast path; 0 = exact.
        float_rounding, numeric_precision, strict: passed to ``math_verify.verify``.
        cache_size: verdicts kept per (prediction, gold) so repeated answers skip the pool; 0 = off.
        memory_limit_mb: address-space limit for workers, so a memory bomb fails as MemoryError.
        startup_timeout_s: how long a worker may take to start (import math-verify and warm up).
        max_failed_starts: workers that fail to start in a row before grading raises
            :class:`GraderUnavailableError` (never a silent "wrong").

    Picklable: the pool and cache are not pickled; a copy starts its own pool when first needed.
    Call :meth:`close` (or use as a context manager) to stop the pool; it is also stopped when the
    grader is garbage-collected or the interpreter exits.
    """

    # Default pool size cap: math-verify takes ~5-50 ms an item, so a few workers grade a step's answers.
    MAX_DEFAULT_WORKERS = 4
    # Workers grade a few relations, sets and functions while starting (verify_worker.WARM_UP).
    WARM_UP = True
    # The pool class; a class attribute so tests can substitute a misbehaving worker.
    pool_class = GradingPool

    def __init__(
        self,
        timeout_s: float = 1.0,
        retry_timeout_s: float = 5.0,
        max_chars: int = 16_000,
        workers: Optional[int] = None,
        numeric_rel_tol: float = 0.0,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        cache_size: int = 65_536,
        memory_limit_mb: Optional[int] = 4096,
        startup_timeout_s: float = 60.0,
        max_failed_starts: int = 3,
    ) -> None:
        check_arguments(MathGraderSchema, locals(), "MathGrader")
        if workers is None:
            workers = default_workers(self.MAX_DEFAULT_WORKERS)
        self.timeout_s = float(timeout_s)
        self.retry_timeout_s = float(retry_timeout_s)
        self.max_chars = int(max_chars)
        self.workers = int(workers)
        self.numeric_rel_tol = float(numeric_rel_tol)
        self.cache_size = int(cache_size)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_failed_starts = int(max_failed_starts)
        self._settings = VerifySettings(int(float_rounding), int(numeric_precision), bool(strict))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._pool: Optional[GradingPool] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._lock = threading.Lock()
        self._timeouts = 0
        self._retries = 0
        self._restarts_seen = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for runtime in ("_pool", "_finalizer", "_cache", "_lock", "_timeouts", "_retries", "_restarts_seen"):
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
        a few seconds while workers import math-verify). A no-op when grading is in-process.
        Raises :class:`GraderUnavailableError` when the workers cannot start."""
        if self.workers > 0:
            with self._lock:
                self._ensure_pool().start()

    def close(self) -> None:
        """Stop the worker pool (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # runs GradingPool.close once
        self._pool, self._finalizer = None, None

    def pop_metrics(self) -> dict[str, float]:
        """Counts since the last call, for logging: ``grader/timeouts`` (items wrong because math-verify
        ran out of time twice), ``grader/retries`` (items that ran out of ``timeout_s`` and were tried
        again) and ``grader/worker_restarts`` (workers replaced after missing an item's hard deadline)."""
        restarts = self._pool.restarts if self._pool is not None else 0
        metrics = {"grader/timeouts": float(self._timeouts), "grader/retries": float(self._retries),
                   "grader/worker_restarts": float(restarts - self._restarts_seen)}
        self._timeouts, self._retries, self._restarts_seen = 0, 0, restarts
        return metrics

    # -- grading ------------------------------------------------------------------------------

    def grade(self, prediction: Optional[str], gold: object) -> bool:
        """Whether ``prediction`` equals ``gold``; never raises on model text."""
        return self.grade_batch([prediction], [gold])[0]

    def grade_batch(self, predictions: Sequence[Optional[str]], golds: Sequence[object]) -> list[bool]:
        """Grade pairs in order; what the fast path, the text rules and the cache leave goes to
        math-verify together."""
        if len(predictions) != len(golds):
            raise ValueError(f"grade_batch: {len(predictions)} predictions but {len(golds)} golds.")
        verdicts: list[Optional[bool]] = []
        pending: dict[tuple[str, str], list[int]] = {}
        for index, (prediction, gold) in enumerate(zip(predictions, golds)):
            verdict, key = self._screen(prediction, gold)
            if key is not None:
                verdict = self._cache.get(key)
                if verdict is None:
                    pending.setdefault(key, []).append(index)
                else:
                    self._cache.move_to_end(key)
            verdicts.append(verdict)
        if pending:
            keys = list(pending)
            for key, verdict in zip(keys, self._verify(keys)):
                for index in pending[key]:
                    verdicts[index] = verdict
        return [bool(verdict) for verdict in verdicts]

    def _screen(self, prediction: object, gold: object) -> tuple[Optional[bool], Optional[tuple[str, str]]]:
        """(verdict, None) when decided here, else (None, the pair to hand math-verify)."""
        pred_text, gold_text = answer_text_of(prediction), answer_text_of(gold)
        if pred_text is None or gold_text is None:
            return False, None
        prediction = pred_text
        if len(prediction) > self.max_chars or len(gold_text) > self.max_chars:
            return False, None
        verdict = fast_verdict(prediction, gold_text, self.numeric_rel_tol)
        if verdict is not None:
            return verdict, None
        for text in (prediction, gold_text):
            if foreign_digits(text) or divides_by_zero(text) or malformed(text, brackets=is_bare(text)) or too_costly(text):
                return False, None
        aligned = aligned_for_math_verify(prediction, gold_text)
        if aligned is None:
            return False, None
        return None, aligned

    def _remember(self, key: tuple[str, str], verdict: bool) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = verdict
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _verify(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """math-verify's verdicts for distinct pairs: a timed-out item is retried once with the longer
        limit, then wrong and counted; only computed verdicts are cached."""
        verdicts = self._run(pairs, self.timeout_s)
        late = [index for index, verdict in enumerate(verdicts) if verdict is None]
        self._retries += len(late)
        if late:
            for index, verdict in zip(late, self._run([pairs[index] for index in late], self.retry_timeout_s)):
                verdicts[index] = verdict
        for key, verdict in zip(pairs, verdicts):
            if verdict is None:
                self._timeouts += 1
                logger.debug("MathGrader: %r against %r ran out of time twice; graded wrong.", *key)
            else:
                self._remember(key, verdict)
        return [bool(verdict) for verdict in verdicts]

    def _run(self, pairs: list[tuple[str, str]], timeout_s: float) -> list[Optional[bool]]:
        if self.workers == 0 and threading.current_thread() is threading.main_thread():
            prepare_math_verify()
            return [verify_pair(prediction, gold, timeout_s, self._settings) for prediction, gold in pairs]
        with self._lock:
            return self._ensure_pool().run([(p, g, timeout_s) for p, g in pairs], self._settings)

    def _ensure_pool(self) -> GradingPool:
        if self._pool is None:
            self._pool = self.pool_class(
                max(1, self.workers), self.memory_limit_mb, warm_up=self.WARM_UP,
                startup_timeout_s=self.startup_timeout_s, max_failed_starts=self.max_failed_starts,
            )
            self._finalizer = weakref.finalize(self, self._pool.close)
            self._restarts_seen = 0
        return self._pool
