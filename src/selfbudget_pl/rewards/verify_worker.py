"""math-verify on one answer pair under a time limit, in this process or in a grading worker.

A worker is ``python -c "from selfbudget_pl.rewards.verify_worker import main; main()" FD MEMORY_MB``:
it imports only this module, math-verify and sympy (never torch, the training stack or the caller's
``__main__``), so it starts the same way under a script, ``python -c``, standard input or a notebook.
It reads ``(prediction, gold, timeout_s, settings)`` requests from the socket ``FD`` and answers each
with True, False or None (the time limit ran out).

math-verify is called as its README shows (:func:`as_documented`): a bare answer inside ``$...$``,
parsed with its default extraction config, gold first in ``verify(gold, prediction)``. Nothing is
``eval``-ed: it hands model text to its LaTeX grammar (ANTLR) and sympy's ``parse_expr`` only what its
number/operator regex matched.
"""

from __future__ import annotations

import re
import signal
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from selfbudget_pl.rewards.answer_text import is_bare, strip_delimiters


@dataclass(frozen=True)
class VerifySettings:
    """``math_verify.verify`` options."""

    float_rounding: int = 6
    numeric_precision: int = 15
    strict: bool = True


class _ItemTimeout(BaseException):
    """Raised by the interval timer. A BaseException so that math-verify's and sympy's
    ``except Exception`` clauses cannot swallow it and keep computing."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _ItemTimeout()


def prepare_math_verify() -> None:
    """Import math-verify and tell it we time out ourselves (its warnings say to do exactly that)."""
    from math_verify import grader as mv_grader
    from math_verify import parser as mv_parser

    mv_grader.TIMEOUT_WARNING_SHOWN = True
    mv_parser.TIMEOUT_WARNING_SHOWN = True


_BARE_PERCENT = re.compile(r"(?<!\\)%")


def as_documented(text: str) -> str:
    """``text`` as math-verify's README feeds it: a bare answer (outer ``$``/``\\(`` dropped) inside
    ``$...$``, with ``%`` escaped (a bare one is a LaTeX comment); text with its own delimiters as it is.
    (``\\boxed{}`` would do for lists too, but math-verify reads ``\\boxed{28\\%}`` as no number.)"""
    if not is_bare(text):
        return text
    inner = strip_delimiters(text)
    return "$" + _BARE_PERCENT.sub(r"\\%", inner) + "$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # A group of G completions shares one gold answer: parse it once per process.
    from math_verify import parse

    return parse(as_documented(gold), parsing_timeout=None)


def verify_pair(prediction: str, gold: str, timeout_s: float, settings: VerifySettings) -> Optional[bool]:
    """math-verify's verdict under one interval timer for the whole item (gold parse, prediction
    parse, comparison); None when the timer ran out. Must run on the main thread (signals).

    math-verify's own timeouts are off: they use whole seconds via ``signal.alarm``, one per call, and
    each call's cleanup would cancel an outer timer.
    """
    from math_verify import parse, verify

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            gold_parsed = _parse_gold(gold)
            pred_parsed = parse(as_documented(prediction), parsing_timeout=None)
            if not gold_parsed or not pred_parsed:
                return False
            return bool(
                verify(
                    gold_parsed, pred_parsed, float_rounding=settings.float_rounding,
                    numeric_precision=settings.numeric_precision, strict=settings.strict, timeout_seconds=None,
                )
            )
        except _ItemTimeout:
            return None
        except Exception:  # noqa: BLE001 - parse errors, RecursionError, MemoryError, sympy bugs: untrusted input is wrong
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:  # the timer fired during cleanup
        return None
    finally:
        signal.signal(signal.SIGALRM, previous)


# What reaches math-verify is mostly relations, sets and functions; their first use in a process loads
# sympy's solvers and set machinery (0.1-0.6 s an item). A worker pays that while starting.
WARM_UP = (
    ("1", "1"), ("3+y=2x", "y=2x+3"), ("8", r"x \in [-2,7]"), (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1,2]"),
    (r"\{1\pm\sqrt{5},-2\}", r"3\sqrt{5}"), (r"\cot x", r"\sin x"), (r"\frac{\sqrt{2}}{2}", "0.7071"), ("1+2i", "3"),
    ("2, 4, 6", "6, 4, 2"),
)


def warm_up(pairs: tuple[tuple[str, str], ...] = WARM_UP) -> None:
    prepare_math_verify()
    for prediction, gold in pairs:
        verify_pair(prediction, gold, 5.0, VerifySettings())  # roomy: a timer firing mid-warm-up wastes it


def main() -> None:
    """Worker loop: ``argv = [FD, MEMORY_MB, WARM_UP]``; answers ``"ready"`` once, then one reply per request."""
    import socket
    from multiprocessing.connection import Connection

    # Ctrl-C goes to the whole process group; the parent decides, workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, memory_limit_mb, do_warm_up = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a bomb raises MemoryError, not an OOM kill
    connection = Connection(socket.socket(fileno=fd).detach())
    warm_up(WARM_UP if do_warm_up else WARM_UP[:1])
    connection.send(("ready", "torch" in sys.modules))
    while True:
        try:
            prediction, gold, timeout_s, settings = connection.recv()
        except EOFError:  # the parent closed its end or died
            return
        connection.send(verify_pair(prediction, gold, timeout_s, settings))
