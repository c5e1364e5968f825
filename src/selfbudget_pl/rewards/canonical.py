"""Canonical forms of short answers, so that :func:`~selfbudget_pl.rewards.grader.fast_verdict` can
decide more pairs without sympy.

A hand-written, bounded reader for a small subset of LaTeX: numbers, ``\\frac``, ``\\sqrt``, ``\\pi``,
single-letter variables, ``+ - \\cdot \\times /``, juxtaposition and powers; a trailing unit
(``\\text{ cm}``, ``\\mbox{ inches}^2``) or ``^\\circ``; ``a+bi``; and around them tuples, intervals,
sets, unions of intervals, ``\\pm``, matrices, ``\\text{word}`` and equations. No ``eval``, no sympy:
values are :class:`~fractions.Fraction` where rational arithmetic made them and floats otherwise,
letters are evaluated at three fixed points. Input is capped at :data:`MAX_CHARS` characters and
:data:`MAX_DEPTH` nested groups; anything outside the subset is None and goes to math-verify.

The forms model how math-verify 0.9 (latex2sympy2_extended 1.11) reads the same text, quirks
included, and :func:`decide` answers only where its verdict follows from them:

- False for values further apart than its rounding (``9`` against ``288\\pi``, ``\\frac{1}{3}``
  against ``0.33``); for a constant against an expression that varies with its letters (``2`` against
  ``8n^2+4n+1``); for one value against a collection of two or more (``(2,\\infty)``, a tuple, a
  matrix, ``1\\pm\\sqrt{19}``); for collections of another shape or with an element that differs; for
  a number against ``\\text{word}``, and a word against a sum; for a value against an equation that is
  no assignment (``5x - 7y + 11z + 4 = 0``).
- True only for equal rationals written as literals (``120^\\circ`` = ``120``,
  ``\\frac{270}7\\text{ degrees}`` = ``\\frac{270}{7}``, ``1\\frac{4}{5}`` = ``\\frac95``, ``x = 5`` = ``5``),
  collections of such, and a ``\\text{word}`` against the same word in another case.

Its quirks are modelled where they decide a verdict: it reads ``3, 5, 7`` (unboxed, by its number
regex) as 7 and ``-2,1`` as -2.1; ``4343_6`` as 4343; ``2^34`` as 2**34; ``(2,1)`` as a tuple but
``(1,2)`` as an interval; it drops a trailing unit word (``2\\pi r h`` is ``2\\pi r``); it cannot read
``\\$36`` at all. Where modelling is not worth it the text is declined: ``%``, ``$`` delimiters, a number
before ``(`` (``2(3)`` is 5 to it), a letter before ``(`` (a function), ``e`` and ``i`` outside
``a+bi``, expressions whose letters cancel (``x-x``). ``tests/test_grader.py`` checks every decision
against math-verify on ``grader/cases.jsonl`` and the benchmark's MATH-500 mix.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Optional, Union

MAX_CHARS = 200  # answers longer than this are not read here
MAX_DEPTH = 16  # nested groups ({}, (), \frac, \sqrt, ^) before giving up
_MAX_MAGNITUDE = 1e15  # values beyond this (or Fractions with huge parts) are not compared here
_MAX_EXPONENT = 64
_MAX_NUMBER_DIGITS = 15  # math-verify's Floats carry 15 significant digits; longer numbers are declined
_POINTS = 3  # evaluation points for letters

# Letters math-verify does not read as plain variables: e (Euler's number, 2e5), i (imaginary unit).
_RESERVED_LETTERS = frozenset("eiEI")
# Names sympy prints for its constants: \text{pi} equals \pi to math-verify (it compares the strings).
_CONSTANT_NAMES = frozenset({"pi", "oo", "nan", "zoo"})
_LETTER_VALUES = {
    letter: tuple(random.Random(1009 * ord(letter) + k).uniform(0.6, 2.4) for k in range(_POINTS))
    for letter in "abcdfghjklmnopqrstuvwxyz"
}

# latex2sympy2_extended's unit list (math_normalization.units), joined unescaped exactly as it does:
# math-verify drops a trailing unit word after a digit, '}' or space ("2\pi r h" -> "2\pi r").
_UNITS = (
    "integerpoint", "feet", "sue", "digit", "pound", "meal", "edge", "student", "children ticket",
    "multiple", "east", "degree", "mph", "kmph", "ft", "m square", " m east", "sq m", "deg", "mile",
    "q .", "monkey", "prime", "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per",
    "dm", "lt", "gain", "ab", "way", "west", "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t",
    "h", "no change", "men", "soldier", "pie", "bc", "excess", "st", "inches", "noon", "cent", "by",
    "gal", "kmh", "c", "acre", "rise", "a . m", "th", "π r 2", "sq", "mark", "l", "toy", "coin",
    "sq . m", "gallon", "° f", "profit", "minw", "yr", "women", "am", "pm", "hr", "cu cm", "square",
    "v â € ™", "are", "rupee", "rounds", "cubic", "cc", "mtr", "s", "ohm", "number", "kmph", "day",
    "hour", "minute", "min", "second", "man", "woman", "sec", "cube", "mt", "sq inch", "mp",
    "∏ cm ³", "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs", "kg", "g", "month",
    "km", "m", "cm", "mm", "apple", "liter", "loss", "yard", "pure", "year", "increase", "decrease",
    "d", "less", "Surface", "litre", "pi sq m", "s .", "metre", "meter", "inch",
)
_TRAILING_UNIT = re.compile(f"(\\d|\\}}|\\s)\\s*(?:(?:{'|'.join(_UNITS)})(?:s|es)?)\\s*$")
# Text math-verify's normaliser rewrites or reads its own way: decline it.
_REWRITTEN = re.compile(
    r"\$|%|~|\\\(|\\\[|\\boxed|\\fbox|\\math|\\displaystyle|\\ldots|percent|pct|(?<!\\)inf|(?<!\\)sqrt"
    r"|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z])"
    r"|[0-9.]\s+[0-9.]|[a-zA-Z]\s+[a-zA-Z]"  # "1 2" is 2 to math-verify; "\pi r" loses its space here
)
# What the grader hands math-verify unboxed, for its number regex rather than its LaTeX parser.
NUMBER_LIKE = re.compile(r"[\d\s.,+\-]+%?")
_RAW_NUMBER = re.compile(r"-?(?:[1-9]\d{0,2}(?:,\d{3})+|0|[1-9]\d*)(?:\.\d+)?|-?\.\d+")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox)\{\s*[a-zA-Z]+(?: [a-zA-Z]+)*\s*\}(?:\^\d|\{\^\d\})?\s*$")
_DEGREES = re.compile(r"\^(?:\\circ|\{\\circ\})$")
_MIXED_NUMBER = re.compile(r"(-?)(\d{1,6})\\frac\{(\d{1,6})\}\{(\d{1,6})\}")
_TEXT = re.compile(r"\\text\{(\(?)([a-zA-Z]+)(\)?)\}")
_MATRIX = re.compile(r"\\begin\{([pb])matrix\}(.*)\\end\{\1matrix\}")
_COMPLEX = re.compile(r"([+-]?(?:\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\}))?([+-])(\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\})?i")
_NUMBER = re.compile(r"(?:0|[1-9]\d*)(?:\.\d+)?|\.\d+")
# Letters joined by + or juxtaposition: left-hand sides latex2sympy2_extended.is_expr_of_only_symbols
# accepts for an assignment (it keeps x+x unevaluated, so that counts too).
_LETTERS_ONLY = re.compile(r"[a-zA-Z]+(?:\+[a-zA-Z]+)*")
# latex2sympy2_extended reads a whole "1,234,567" as one number; ",\!" and "{,}" become "," first.
_LATEX_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:(?:,\\!\s*|\{,\})\d{3})+(?:\.\d+)?")
# A leading \$ (math-verify extracts nothing from "\$36", 36 from "\$ 36").
_DOLLAR_NUMBER = re.compile(r"\\\$\s*(-?(?:[1-9]\d{0,2}(?:,(?:\\!)?\d{3})+|0|[1-9]\d*)(?:\.\d+)?)")
# math-verify's number and expression regexes (math_verify.parser.lazy_expr_regex), for answers it
# reads without its LaTeX parser: of "3, 5, 7" it keeps the number that ends last, 7; "-2,1" is -2.1.
_MV_NUMBER = (
    r"(?<!\d)(?:(?P<integer1>-?[1-9]\d{0,2}(?:[ ,]\d{3})+)(?P<decimal1>\.\d+)?|"
    r"(?P<integer2>-?\d+)(?P<decimal2>[.,]\d+)|(?P<decimal3>\.\d+)|(?P<integer3>-?\d+))"
    r"(?P<percent>\s*(?:%|[Pp]ercent|\s*[Pp]ercentage|\s*[Pp]ct))?"
)
_MV_OPERATORS = r"\+\-\*\×\/\^\(\)\÷"
_MV_EXPR_CHARS = r"[\d\.\s" + _MV_OPERATORS + r"]"
_MV_PREFIX = r"(?:^|\s|\=)(?:\*\*)?"
_MV_EXPR = re.compile(
    _MV_PREFIX + rf"(?P<expr>-?\(?-?\d{_MV_EXPR_CHARS}*[{_MV_OPERATORS}]{_MV_EXPR_CHARS}+\)?)"
    + r"(?:\*\*)?(?:\.|,|:|\s|\)|\$|$)"
)
_MV_NUMBER_ANCHORED = re.compile(_MV_PREFIX + r"[$€£¥₹]?" + _MV_NUMBER)
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_DIGIT = re.compile(r"\d")
_DIGITS = re.compile(r"\d+")
_SUBSCRIPT = re.compile(r"\d|\{\d+\}")
_MEMBERSHIP = re.compile(r"([a-zA-Z])\\in(?![a-zA-Z])(.+)")
_LEFT_HAND_NUMBER = re.compile(r"[\d-]|\\pi")
_LEFT_HAND_SYMBOLIC = re.compile(r"[/^]|\\frac")


_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Spacing/sizing commands and escaped dollar signs change nothing about the value;
# `(?![a-zA-Z])` keeps \leftarrow intact, `(?<!\\)` keeps a row break `\\` intact when a space follows it.
_NOISE = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|(?<!\\)\\[,;:! $]|~|\s+")
_FRACTION_VARIANTS = re.compile(r"\\[dt]frac(?![a-zA-Z])")


def normalise_answer(text: str) -> str:
    """Canonical spelling for string comparison: math delimiters, spacing commands, ``\\left``/
    ``\\right``, ``\\$``, whitespace and a trailing full stop removed; ``\\dfrac``/``\\tfrac`` ->
    ``\\frac``."""
    s = text.strip()
    for opening, closing in _MATH_DELIMITERS:
        if len(s) >= len(opening) + len(closing) and s.startswith(opening) and s.endswith(closing):
            s = s[len(opening) : len(s) - len(closing)]
            break
    s = _FRACTION_VARIANTS.sub(r"\\frac", s)
    return _NOISE.sub("", s).rstrip(".")


class _Decline(Exception):
    """The text leaves the subset read here (or its value cannot be computed safely)."""


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Value:
    """A real expression: its value at each evaluation point (equal for constants), its exact value
    when rational arithmetic made it, and how literal it is: 2 for a number, 1 for a fraction of two
    numbers or a mixed number (their negations too), 0 for anything else. Only literals are ever
    declared equal: math-verify reaches their exact value without algebra."""

    points: tuple[float, ...]
    exact: Optional[Fraction] = None
    letters: bool = False
    literal: int = 0
    word: bool = False  # a letter or a product of letters: math-verify may compare it with \text{...} by name

    @property
    def constant(self) -> bool:
        return not self.letters


def _checked(points: tuple[float, ...]) -> tuple[float, ...]:
    if not all(math.isfinite(p) and abs(p) <= _MAX_MAGNITUDE for p in points):
        raise _Decline
    return points


def _bounded(exact: Optional[Fraction]) -> Optional[Fraction]:
    if exact is None or abs(exact.numerator) > 10**30 or exact.denominator > 10**30:
        return None
    return exact


def _const(value: Fraction, literal: int = 2) -> Value:
    return Value(_checked((float(value),) * _POINTS), _bounded(value), False, literal)


def _combine(a: Value, b: Value, points: tuple[float, ...], exact: Optional[Fraction]) -> Value:
    return Value(_checked(points), _bounded(exact), a.letters or b.letters, 0)


def _add(a: Value, b: Value) -> Value:
    exact = a.exact + b.exact if a.exact is not None and b.exact is not None else None
    return _combine(a, b, tuple(x + y for x, y in zip(a.points, b.points)), exact)


def _neg(a: Value) -> Value:
    return Value(tuple(-x for x in a.points), None if a.exact is None else -a.exact, a.letters, a.literal)


def _mul(a: Value, b: Value) -> Value:
    exact = a.exact * b.exact if a.exact is not None and b.exact is not None else None
    value = _combine(a, b, tuple(x * y for x, y in zip(a.points, b.points)), exact)
    return Value(value.points, value.exact, value.letters, 0, a.word and b.word)


def _div(a: Value, b: Value) -> Value:
    if any(abs(y) < 1e-9 for y in b.points) or b.exact == 0:
        raise _Decline  # math-verify decides what 1/0 is
    exact = a.exact / b.exact if a.exact is not None and b.exact is not None else None
    value = _combine(a, b, tuple(x / y for x, y in zip(a.points, b.points)), exact)
    literal = 1 if a.literal == 2 and b.literal == 2 and value.exact is not None else 0
    return Value(value.points, value.exact, value.letters, literal)


def _pow(base: Value, exponent: Value) -> Value:
    n = exponent.exact
    if n is not None and n.denominator == 1 and abs(n) <= _MAX_EXPONENT:
        if base.exact == 0 and n < 0:
            raise _Decline
        exact = base.exact ** int(n) if base.exact is not None and base.exact.denominator < 10**6 else None
        try:
            points = tuple(x ** int(n) for x in base.points)
        except (OverflowError, ZeroDivisionError):
            raise _Decline from None
        return _combine(base, exponent, points, exact)
    if not all(x > 0 for x in base.points) or any(abs(y) > _MAX_EXPONENT for y in exponent.points):
        raise _Decline
    try:
        points = tuple(x**y for x, y in zip(base.points, exponent.points))
    except OverflowError:
        raise _Decline from None
    return _combine(base, exponent, points, None)


def _sqrt(a: Value) -> Value:
    if not all(x >= 0 for x in a.points) or (a.letters and not all(x > 0 for x in a.points)):
        raise _Decline
    return Value(_checked(tuple(math.sqrt(x) for x in a.points)), None, a.letters, 0)


# ---------------------------------------------------------------------------------------------
# Answer forms


@dataclass(frozen=True)
class Infinity:
    sign: int


Element = Union[Value, Infinity]


@dataclass(frozen=True)
class Complex:
    """``a+bi`` with real ``a``, ``b``; math-verify reads ``i`` as the imaginary unit or as a symbol
    depending on spacing, so only a differing part is ever decided."""

    real: Value
    imag: Value


@dataclass(frozen=True)
class Text:
    """``\\text{word}``: a symbol to math-verify, compared by lower-cased name."""

    name: str
    plain: bool  # no parentheses and at least two letters: the name is compared case-insensitively


@dataclass(frozen=True)
class Collection:
    """What math-verify makes of brackets and braces around elements:

    ``interval`` (proper: start < end; ``left_open``/``right_open``), ``tuple`` (ordered), ``set``
    (``\\{...\\}``, or ``a \\pm b`` as the two values), ``union`` (of proper intervals, in ``parts``),
    ``matrix`` (``shape``, entries row by row)."""

    kind: str
    elements: tuple[Element, ...] = ()
    left_open: bool = False
    right_open: bool = False
    shape: tuple[int, int] = (0, 0)
    parts: tuple["Collection", ...] = ()


@dataclass(frozen=True)
class Equation:
    """``lhs = rhs`` whose sides differ by an expression in the letters (sympy keeps it an equation),
    or ``x \\in`` a collection. math-verify compares a predicted equation's right-hand side with a gold
    that is no equation, and an assignment's (``x = ...``, ``x+y = ...``, ``x \\in [a,b]``: only letters
    on the left) right-hand side with a prediction that is none; any other gold equation equals no
    single value."""

    rhs: Union[Value, Complex, "Collection"]
    assignment: bool


Form = Union[Value, Complex, Text, Collection, Equation]


class _Parser:
    """Recursive descent over normalised text (no spaces). Every method raises :class:`_Decline`
    on anything outside the subset."""

    def __init__(self, text: str) -> None:
        self.s, self.i, self.depth = text, 0, 0

    def peek(self, literal: str) -> bool:
        return self.s.startswith(literal, self.i)

    def take(self, literal: str) -> bool:
        if self.s.startswith(literal, self.i):
            self.i += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.take(literal):
            raise _Decline

    def command(self) -> Optional[str]:
        match = _COMMAND.match(self.s, self.i)
        return match.group() if match else None

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Decline

    def full(self) -> Value:
        value = self.expr()
        if self.i != len(self.s):
            raise _Decline
        return value

    # expr := ['+'|'-'] term (('+'|'-') term)*     (latex2sympy: additive > mp > unary > postfix)
    def expr(self) -> Value:
        value = self.term()
        while True:
            if self.take("+"):
                value = _add(value, self.term())
            elif self.take("-"):
                value = _add(value, _neg(self.term()))
            else:
                return value

    # term := unary (('\cdot'|'\times'|'/') unary)*   (juxtaposition binds tighter: 1/2x = 1/(2x))
    def term(self) -> Value:
        value = self.unary()
        while True:
            command = self.command()
            if command in ("\\cdot", "\\times"):
                self.i += len(command)
                value = _mul(value, self.unary())
            elif self.take("/"):
                value = _div(value, self.unary())
            else:
                return value

    def unary(self) -> Value:
        if self.take("-"):
            if self.peek("-") or self.peek("+"):
                raise _Decline
            return _neg(self.juxtaposition())
        if self.take("+"):
            if self.peek("-") or self.peek("+"):
                raise _Decline
        return self.juxtaposition()

    # juxtaposition := factor+ ; a number only first, '(' only first or after ')'
    def juxtaposition(self) -> Value:
        value = self.factor(first=True)
        while self.i < len(self.s) and self.s[self.i] not in "+-/,)]}&=" and not self.peek("\\\\"):
            command = self.command()
            if command in ("\\cdot", "\\times", "\\right", "\\end"):
                break
            previous_closed_paren = self.s[self.i - 1] == ")"
            if self.peek("(") and not previous_closed_paren:
                raise _Decline  # 2(3) is 5 to math-verify, f(x) a function
            value = _mul(value, self.factor(first=False))
        return value

    def factor(self, first: bool) -> Value:
        base = self.atom(first)
        if self.take("^"):
            if self.peek("^"):
                raise _Decline
            self.nested()
            exponent = self.exponent()
            self.depth -= 1
            if self.peek("^") or self.peek("_"):
                raise _Decline
            return _pow(base, exponent)
        return base

    def exponent(self) -> Value:
        if self.take("{"):
            value = self.expr()
            self.expect("}")
            return value
        match = _DIGITS.match(self.s, self.i)  # 2^34 is 2**34 to math-verify
        if match and len(match.group()) <= 2:
            self.i = match.end()
            return _const(Fraction(match.group()), literal=0)
        return self.letter()

    def letter(self) -> Value:
        if self.i < len(self.s) and self.s[self.i].isascii() and self.s[self.i].isalpha():
            char = self.s[self.i]
            if char in _RESERVED_LETTERS:
                raise _Decline
            self.i += 1
            return Value(_LETTER_VALUES[char.lower()], None, True, 0, True)  # math-verify lower-cases symbols
        raise _Decline

    def atom(self, first: bool) -> Value:
        if self.i >= len(self.s):
            raise _Decline
        char = self.s[self.i]
        if char.isdigit() or char == ".":
            if not first:
                raise _Decline  # \pi2, x2, )2: read differently or not at all
            match = _NUMBER.match(self.s, self.i)
            if not match or len(match.group().replace(".", "").lstrip("0")) > _MAX_NUMBER_DIGITS:
                raise _Decline
            self.i = match.end()
            if self.peek("\\frac") or self.peek("."):
                raise _Decline  # 2\frac{1}{2}: a mixed number or a product, depending on the fraction
            if self.take("_"):  # 4343_6: math-verify keeps the digits and drops the base
                base = _SUBSCRIPT.match(self.s, self.i)
                if not base:
                    raise _Decline
                self.i = base.end()
                return _const(Fraction(match.group()), literal=0)
            return _const(Fraction(match.group()))
        if char in "({":
            closing = ")" if char == "(" else "}"
            self.i += 1
            self.nested()
            value = self.expr()
            self.depth -= 1
            self.expect(closing)
            return Value(value.points, value.exact, value.letters, value.literal if char == "{" else 0, value.word)
        if char == "\\":
            command = self.command()
            if command == "\\pi":
                self.i += 3
                return Value((math.pi,) * _POINTS)
            if command == "\\frac":
                self.i += 5
                self.nested()
                numerator = self.argument(single_digit=True)
                denominator = self.argument(single_digit=False)
                self.depth -= 1
                return _div(numerator, denominator)
            if command == "\\sqrt":
                self.i += 5
                self.nested()
                value = _sqrt(self.argument(single_digit=True))
                self.depth -= 1
                return value
            raise _Decline
        return self.letter()

    def argument(self, single_digit: bool) -> Value:
        """A ``\\frac``/``\\sqrt`` argument: ``{expr}`` or digits. math-verify's normaliser reads
        ``\\frac123`` as 1/23 and ``\\sqrt23`` as sqrt(2)*3: one digit first, the rest of the digits second."""
        if self.take("{"):
            value = self.expr()
            self.expect("}")
            return value
        match = (_DIGIT if single_digit else _DIGITS).match(self.s, self.i)
        if not match:
            raise _Decline
        self.i = match.end()
        return _const(Fraction(match.group()))


def split_top_level(text: str, separator: str) -> Optional[list[str]]:
    """``text`` split at ``separator`` outside every bracket; None when the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
            if depth < 0:
                return None
        elif char == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    if depth != 0:
        return None
    parts.append(text[start:])
    return parts


def _split_top_level(text: str, separator: str) -> list[str]:
    parts = split_top_level(text, separator)
    if parts is None:
        raise _Decline
    return parts


def _scalar(text: str) -> Union[Value, Complex]:
    match = _COMPLEX.fullmatch(text)
    if match:
        real = _Parser(match[1]).full() if match[1] else _const(Fraction(0))
        imag = _Parser(match[3]).full() if match[3] else _const(Fraction(1))
        return Complex(real, imag if match[2] == "+" else _neg(imag))
    mixed = _MIXED_NUMBER.fullmatch(text)  # math-verify reads 1\frac{4}{5} as 9/5 and -1\frac12 as -3/2
    if mixed:
        if int(mixed[4]) == 0:
            raise _Decline
        value = int(mixed[2]) + Fraction(int(mixed[3]), int(mixed[4]))
        return _const(-value if mixed[1] else value, literal=1)
    value = _Parser(text).full()
    if value.letters:
        spread = max(value.points) - min(value.points)
        if spread <= 1e-6 * max(1.0, max(abs(p) for p in value.points)):
            raise _Decline  # x-x, x/x: constants to sympy; not worth modelling
    return value


def _plus_minus(text: str) -> tuple[Value, Value]:
    """The two values of ``a \\pm b`` (``\\pm b``: of ``-b`` and ``b``), distinct for sure."""
    pieces = text.split("\\pm")
    if len(pieces) != 2 or not pieces[1]:
        raise _Decline
    centre = _scalar(pieces[0]) if pieces[0] else _const(Fraction(0))
    offset = _scalar(pieces[1])
    if not isinstance(centre, Value) or not isinstance(offset, Value):
        raise _Decline
    if offset.constant and (offset.exact == 0 or abs(offset.points[0]) < 1e-6):
        raise _Decline  # 5\pm0 is {5}
    return _add(centre, offset), _add(centre, _neg(offset))


def _element(text: str) -> Element:
    if text in ("\\infty", "+\\infty", "-\\infty"):
        return Infinity(-1 if text.startswith("-") else 1)
    value = _scalar(text)
    if not isinstance(value, Value):
        raise _Decline
    return value


def _position(element: Element) -> float:
    return element.sign * math.inf if isinstance(element, Infinity) else element.points[0]


def _less(a: Element, b: Element) -> Optional[bool]:
    """Whether a < b for sure (True/False), None when it cannot be told (letters, near-equal values)."""
    if any(isinstance(e, Value) and e.letters for e in (a, b)):
        return None
    if isinstance(a, Infinity) or isinstance(b, Infinity):
        low, high = _position(a), _position(b)
        return None if low == high else low < high
        return None
    if a.exact is not None and b.exact is not None:
        return a.exact < b.exact
    gap = b.points[0] - a.points[0]
    return None if abs(gap) <= 1e-9 * max(1.0, abs(a.points[0])) else gap > 0


def _bracketed(text: str) -> Optional[Collection]:
    """A tuple, interval or set written with brackets, or None when the brackets are a group."""
    if text.startswith("\\{") and text.endswith("\\}"):
        inner, kind = text[2:-2], "set"
    elif text[:1] in "([" and text[-1:] in ")]":
        inner, kind = text[1:-1], "bracket"
    else:
        return None
    if "\\{" in inner or "\\}" in inner:
        raise _Decline
    try:
        parts = _split_top_level(inner, ",")
    except _Decline:
        return None  # "(a+5)(b+2)": the first bracket closes early
    if len(parts) < 2:
        return None
    if kind == "set":  # math-verify spreads a \pm element into its two values
        values = [_plus_minus(part) if "\\pm" in part else (_element(part),) for part in parts]
        return Collection("set", tuple(value for pair in values for value in pair))
    elements = tuple(_element(part) for part in parts)
    left_open, right_open = text[0] == "(", text[-1] == ")"
    if len(elements) > 2:
        if left_open != right_open:
            raise _Decline  # (1,2,3] is no tuple to math-verify
        return Collection("tuple", elements)
    if any(isinstance(e, Value) and e.letters for e in elements):
        raise _Decline  # (x,y): an interval with symbolic ends
    order = _less(elements[0], elements[1])
    if order is None:
        raise _Decline
    if order:  # latex2sympy: a proper interval; sympy opens an infinite end whatever its bracket
        left_open = left_open or isinstance(elements[0], Infinity)
        right_open = right_open or isinstance(elements[1], Infinity)
        return Collection("interval", elements, left_open, right_open)
    if left_open == right_open:  # (2,1) and [2,1] are tuples to latex2sympy; [2,2] would be {2}
        if not left_open and _less(elements[1], elements[0]) is not True:
            raise _Decline
        if any(isinstance(e, Infinity) for e in elements):
            raise _Decline
        return Collection("tuple", elements)
    raise _Decline  # (2,1]: an empty interval


def _matrix(body: str) -> Collection:
    rows = [_split_top_level(row, "&") for row in body.split("\\\\")]
    if len(rows) > 1 and rows[-1] == [""]:
        rows.pop()  # a trailing row break
    width = len(rows[0])
    if any(len(row) != width for row in rows) or len(rows) * width < 2:
        raise _Decline
    entries = []
    for row in rows:
        for entry in row:
            value = _scalar(entry)
            if not isinstance(value, Value):
                raise _Decline
            entries.append(value)
    return Collection("matrix", tuple(entries), shape=(len(rows), width))


def _parse(text: str) -> Form:
    """The form of normalised text (no spaces, no delimiters); raises _Decline."""
    match = _MATRIX.fullmatch(text)
    if match:
        return _matrix(match[2])
    if "\\begin" in text or "\\end" in text:
        raise _Decline
    match = _TEXT.fullmatch(text)
    if match:
        if bool(match[1]) != bool(match[3]) or match[2].lower() in _CONSTANT_NAMES:
            raise _Decline
        return Text(match[2].lower(), plain=not match[1] and len(match[2]) > 1)
    if "\\text" in text:
        raise _Decline
    if "\\cup" in text:
        parts = tuple(_bracketed(part) for part in text.split("\\cup"))
        if not all(part is not None and part.kind == "interval" for part in parts):
            raise _Decline
        return Collection("union", parts=parts)  # type: ignore[arg-type]
    collection = _bracketed(text)
    if collection is not None:
        return collection
    member = _MEMBERSHIP.fullmatch(text)
    if member:  # x \in [a,b]: an assignment of the collection to x
        collection = _parse(member[2])
        if member[1] in _RESERVED_LETTERS or not isinstance(collection, Collection):
            raise _Decline
        return Equation(collection, assignment=True)
    if "\\pm" in text:
        return Collection("set", _plus_minus(text))
    if "=" in text:
        lhs_text, _, rhs_text = text.partition("=")
        if not lhs_text or not rhs_text or "=" in rhs_text:
            raise _Decline  # a chain a=b=c is an And of equations
        lhs, rhs = _scalar(lhs_text), _scalar(rhs_text)
        if not isinstance(lhs, Value) or not isinstance(rhs, Value):
            raise _Decline
        difference = _add(lhs, _neg(rhs))
        if not difference.letters or max(difference.points) - min(difference.points) <= 1e-6:
            raise _Decline  # 2=2 or x=x: sympy evaluates the equation to a truth value
        if _LETTERS_ONLY.fullmatch(lhs_text):
            return Equation(rhs, assignment=True)
        if _LEFT_HAND_NUMBER.search(lhs_text) and not _LEFT_HAND_SYMBOLIC.search(lhs_text):
            return Equation(rhs, assignment=False)  # a number (or -1) on the left: not only symbols
        raise _Decline  # x/y, (x+y)z: only symbols too, in ways not worth modelling
    return _scalar(text)


def _raw_number(raw: str) -> Value:
    """The number math-verify's regexes take from text it does not box (``3, 5, 7`` -> 7)."""
    candidates = [(m.end(), -m.start(), 1, m) for m in _MV_EXPR.finditer(raw)]
    candidates += [(m.end(), -m.start(), 0, m) for m in _MV_NUMBER_ANCHORED.finditer(raw)]
    if not candidates:
        raise _Decline
    best = max(candidates, key=lambda c: c[:3])
    if best[2] or best[3]["percent"]:
        raise _Decline  # an arithmetic expression (sympy evaluates it) or a percentage
    groups = best[3].groupdict()
    integer = next((groups[f"integer{k}"] for k in (1, 2, 3) if groups[f"integer{k}"]), "")
    decimal = next((groups[f"decimal{k}"] for k in (1, 2, 3) if groups[f"decimal{k}"]), "")
    integer = integer.replace(",", "").replace(" ", "").lstrip("0") or "0"
    digits = (integer + decimal).replace("-", "").replace(".", "").replace(",", "").lstrip("0")
    if len(digits) > _MAX_NUMBER_DIGITS:
        raise _Decline
    value = Fraction(integer + decimal.replace(",", "."))
    plain = _RAW_NUMBER.fullmatch(raw) is not None and value == Fraction(raw.replace(",", ""))
    return _const(value, literal=2 if plain else 0)


def canonical_form(answer: str) -> Optional[Form]:
    """The form of a raw answer (as it would be boxed), or None when it is outside the subset.
    Forms of short answers are cached (a GRPO group repeats its gold and often its answers)."""
    if len(answer) > 2 * MAX_CHARS:
        return None  # not even a cache entry
    return _canonical_form(answer)


@lru_cache(maxsize=8192)
def _canonical_form(answer: str) -> Optional[Form]:
    raw = answer.strip()
    if not raw or len(raw) > MAX_CHARS or not raw.isascii():
        return None
    try:
        dollars = _DOLLAR_NUMBER.fullmatch(raw)
        if dollars:  # never equal to math-verify unless spaced; differing values are unequal either way
            number = dollars[1].replace(",", "").replace("\\!", "")
            if len(number.replace("-", "").replace(".", "").lstrip("0")) > _MAX_NUMBER_DIGITS:
                return None
            return _const(Fraction(number), literal=0)
        if _REWRITTEN.search(raw):
            return None
        if NUMBER_LIKE.fullmatch(raw):  # read by math-verify's number regex, not its LaTeX parser
            return _raw_number(raw)
        if _LATEX_THOUSANDS.fullmatch(raw):
            number = raw.replace("\\!", "").replace("{,}", "").replace(",", "").replace(" ", "")
            if len(number.replace("-", "").replace(".", "")) > _MAX_NUMBER_DIGITS:
                return None
            return _const(Fraction(number))
        unit = _UNIT_TEXT.search(raw)
        if unit and unit.start() == 0:
            unit = None  # the whole answer is text
        if unit:
            raw = raw[: unit.start()].strip()
            if "\\text" in raw or "\\mbox" in raw:
                return None  # math-verify would strip from the first \\text
        if _TRAILING_UNIT.search(raw):
            return None
        text = normalise_answer(raw)
        if not text or len(text) > MAX_CHARS:
            return None
        degrees = _DEGREES.search(text)
        if degrees:
            value = _scalar(text[: degrees.start()])
            return value if isinstance(value, Value) and value.constant else None
        if unit:
            value = _scalar(text)
            return value if isinstance(value, Value) else None
        form = _parse(text)
        if isinstance(form, Text) and any(char.isspace() for char in raw):
            return None  # \text{ even } may keep its spaces in the symbol's name
        return form
    except (_Decline, RecursionError, ValueError, ZeroDivisionError, OverflowError):
        return None


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True)
class Settings:
    """math-verify's comparison settings (and the fast path's own relative tolerance)."""

    float_rounding: int = 6
    numeric_precision: int = 15
    strict: bool = True
    numeric_rel_tol: float = 0.0

    def tolerance(self, a: float, b: float) -> float:
        """Values further apart than this are unequal to math-verify: it rounds Floats to
        ``float_rounding`` places and chops below ``numeric_precision`` digits; on top, what the
        fast path's ``numeric_rel_tol`` would forgive."""
        scale = max(abs(a), abs(b))
        return 10.0 ** (1 - min(self.float_rounding, self.numeric_precision)) + (1e-9 + self.numeric_rel_tol) * scale


def _values(a: Value, b: Value, settings: Settings) -> Optional[bool]:
    if a.constant and b.constant:
        if a.literal and b.literal and a.exact is not None and a.exact == b.exact:
            return True
        gap = abs(a.points[0] - b.points[0])
        return False if gap > settings.tolerance(a.points[0], b.points[0]) else None
    if a.constant != b.constant:
        return False  # a constant is no expression that varies with its variables
    if not settings.strict:
        return None  # math-verify renames variables when not strict
    if any(abs(x - y) > settings.tolerance(x, y) for x, y in zip(a.points, b.points)):
        return False
    return None


def _elements(a: Element, b: Element, settings: Settings) -> Optional[bool]:
    if isinstance(a, Infinity) or isinstance(b, Infinity):
        if isinstance(a, Infinity) and isinstance(b, Infinity):
            return a.sign == b.sign
        finite = b if isinstance(a, Infinity) else a
        return False if finite.constant else None
    return _values(a, b, settings)


def _all_pairs(first: tuple[Element, ...], second: tuple[Element, ...], settings: Settings) -> Optional[bool]:
    verdicts = [_elements(a, b, settings) for a, b in zip(first, second)]
    if False in verdicts:
        return False
    return True if all(verdicts) else None


def _distinct_values(elements: tuple[Element, ...]) -> Optional[list[Fraction]]:
    if not all(isinstance(e, Value) and e.constant and e.literal and e.exact is not None for e in elements):
        return None
    return [e.exact for e in elements]  # type: ignore[union-attr]


def _collections(a: Collection, b: Collection, settings: Settings) -> Optional[bool]:
    if a.kind == "matrix" or b.kind == "matrix":
        if a.kind != b.kind:
            return False  # a matrix is one element among a collection's two or more
        if a.shape != b.shape:
            return False
        return _all_pairs(a.elements, b.elements, settings)
    if a.kind == "union" or b.kind == "union":
        return None  # (0,2)\cup[2,5) is (0,5) to sympy
    if a.kind == "set" or b.kind == "set":
        if a.kind != b.kind:
            return None
        first, second = _distinct_values(a.elements), _distinct_values(b.elements)
        if first is None or second is None:
            return None
        return set(first) == set(second)
    if a.kind == "interval" and b.kind == "interval":
        if (a.left_open, a.right_open) != (b.left_open, b.right_open):
            return False
        return _all_pairs(a.elements, b.elements, settings)
    if a.kind == "tuple" and b.kind == "tuple":
        if len(a.elements) != len(b.elements):
            return False
        return _all_pairs(a.elements, b.elements, settings)
    # an interval against a tuple: an open interval is compared as its two ends, others are unequal
    interval, other = (a, b) if a.kind == "interval" else (b, a)
    if len(other.elements) != 2:
        return False
    if interval.left_open and interval.right_open:
        return _all_pairs(a.elements, b.elements, settings)
    return False


def _is_scalar(form: Form) -> bool:
    return isinstance(form, (Value, Complex, Text))


def _set_of_one(collection: Collection) -> bool:
    """Whether math-verify could find the collection equal to a single value ({a, a} is {a})."""
    if collection.kind != "set":
        return False
    if any(not isinstance(e, Value) or e.letters for e in collection.elements):
        return True
    values = [e.points[0] for e in collection.elements]  # type: ignore[union-attr]
    return any(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for i, x in enumerate(values) for y in values[i + 1 :])


def decide(prediction: Form, gold: Form, settings: Settings = Settings()) -> Optional[bool]:
    """math-verify's verdict on two forms where it is certain, else None."""
    if isinstance(prediction, Equation) and isinstance(gold, Equation):
        return None  # sympy compares, or solves, the two relations
    if isinstance(prediction, Equation):
        prediction = prediction.rhs
    elif isinstance(gold, Equation):
        if not gold.assignment:
            return False if _is_scalar(prediction) else None  # a set may equal the equation's solutions
        gold = gold.rhs
    if isinstance(prediction, Collection) and isinstance(gold, Collection):
        return _collections(prediction, gold, settings)
    if isinstance(prediction, Collection) or isinstance(gold, Collection):
        collection, other = (prediction, gold) if isinstance(prediction, Collection) else (gold, prediction)
        if _is_scalar(other) and not _set_of_one(collection):  # type: ignore[arg-type]
            return False
        return None
    if isinstance(prediction, Text) or isinstance(gold, Text):
        if isinstance(prediction, Text) and isinstance(gold, Text):
            return prediction.name == gold.name if prediction.plain and gold.plain else None
        other = gold if isinstance(prediction, Text) else prediction
        # math-verify compares a symbol with a product of symbols by their names joined (ab = \text{ab})
        return False if isinstance(other, Value) and not other.word else None
    if isinstance(prediction, Complex) or isinstance(gold, Complex):
        if isinstance(prediction, Complex) and isinstance(gold, Complex):
            real = _values(prediction.real, gold.real, settings)
            imag = _values(prediction.imag, gold.imag, settings)
            return False if False in (real, imag) else None
        complex_form = prediction if isinstance(prediction, Complex) else gold
        other = gold if isinstance(prediction, Complex) else prediction
        imaginary = complex_form.imag  # type: ignore[union-attr]
        real_only = isinstance(other, Value) and other.constant
        return False if real_only and _values(imaginary, _const(Fraction(0)), settings) is False else None
    return _values(prediction, gold, settings)  # type: ignore[arg-type]
