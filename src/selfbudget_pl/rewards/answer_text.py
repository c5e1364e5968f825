"""Rules on the text of a final answer, applied before any parser sees it: no sympy, linear time.

- :func:`normalise_answer` and :func:`plain_number`: the spelling and exact value that the grader's
  fast path compares.
- :func:`malformed`: LaTeX whose groups do not close (``\\begin{pmatrix} 1 & 2``, ``\\frac{1}{``) is
  wrong as written; math-verify would otherwise match a fragment of it.
- :func:`too_costly`: answers that make sympy compute huge numbers (power towers, factorials of
  computed numbers, binomials choosing a computed number of items, deep nesting), and program text (``__import__('os')``, ``exec("...")``), are wrong
  without being parsed. None is a MATH-style final answer; rejecting them here keeps a batch's grading
  time from depending on what a policy emits.
- :func:`foreign_digits`: digits are ASCII ``0-9``. An answer with a decimal digit of another script
  (Arabic-Indic ``١٢``, Devanagari ``१२``, full-width ``１２``, mathematical bold ``𝟏𝟐``) is not read as
  a number: it is correct only when it is the gold string itself. A documented choice: MATH, GSM8K and
  AMC golds are ASCII, and a reward that accepted look-alike digits would teach a policy nothing and
  open one more way to be credited for text that is not the answer.
- :func:`divides_by_zero`: a literal division by zero is undefined, so wrong.
- :func:`shape` and :func:`aligned_for_math_verify`: the MATH convention for lists. A bare comma
  list of solutions is a set (order free: math-verify compares ``$2, 4, 6$`` as a FiniteSet); a
  bracketed pair is a tuple or interval (order and brackets matter); a set never equals a tuple or
  interval; ``x = 1, y = 2`` against a tuple is the tuple of its values in the written order; ``1,000``
  (3-digit groups) is one number, unless the gold is a list.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# Spacing/sizing commands and escaped dollar signs change nothing about the value;
# `(?![a-zA-Z])` keeps \leftarrow intact, `(?<!\\)` keeps a row break `\\` intact when a space follows it.
_NOISE = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|(?<!\\)\\[,;:! $]|~|\s+")
_FRACTION_VARIANTS = re.compile(r"\\[dt]frac(?![a-zA-Z])")

# Text that already carries its math delimiters.
_DELIMITED = re.compile(r"\$|\\boxed|\\fbox|\\\(|\\\[")
MAX_DEPTH = 12  # nested groups ({, (, [) beyond this are not an answer (and cost math-verify seconds)
_MAX_NUMBER_CHARS = 64  # longer "numbers" are not answers; leave them to the bounded path

# ASCII digits only (re.ASCII): \d would also match ١٢ and １２, which Fraction() reads as 12.
# Thousands groups need a non-zero lead digit: "0,111" is not 111.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[1-9]\d{0,2}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+", re.ASCII)
THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?", re.ASCII)
_FRACTION_LITERAL = re.compile(
    r"([+-]?)(?:\\frac(?:\{([+-]?\d{1,20})\}\{(\d{1,20})\}|(\d)(\d))|(\d{1,20})/(\d{1,20}))", re.ASCII
)

# A numeric power tower (9^{9^{9}}, 9**9**9, 2^3^2), an exponent literal of 5+ digits on a number,
# and the factorial of a 4+-digit number: each asks sympy for a number with millions of digits.
_NUMERIC_TOWER = re.compile(r"\d\s*(?:\^|\*\*)\s*\{?\s*\(?\s*\d+\s*(?:\^|\*\*)", re.ASCII)
_HUGE_EXPONENT = re.compile(r"\d\s*\}?\s*(?:\^|\*\*)\s*\{?\s*\(?\s*\d{5,}", re.ASCII)
_HUGE_FACTORIAL = re.compile(r"\d{4,}\s*!", re.ASCII)
# binomial(n, k) costs about k multiplications of numbers that grow with it, so only the number chosen
# matters: a power or a 4+-digit k is a huge product whatever n is.
_BINOMIAL = re.compile(r"\\[dt]?binom(?![a-zA-Z])")
_CHOOSE = re.compile(r"\\choose(?![a-zA-Z])")
_COMPUTED_OR_LARGE = re.compile(r"\^|\*\*|\d{4}", re.ASCII)
_ENVIRONMENT = re.compile(r"\\(begin|end)\s*\{([^{}]*)\}")
_SIZED = re.compile(r"\\(left|right)(?![a-zA-Z])")
_LABEL = re.compile(r"([a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?)=(.+)", re.ASCII)


def normalise_answer(text: str) -> str:
    """Canonical spelling for string comparison: math delimiters, spacing commands, ``\\left``/
    ``\\right``, ``\\$``, whitespace and a trailing full stop removed; ``\\dfrac``/``\\tfrac`` ->
    ``\\frac``."""
    s = strip_delimiters(text)
    s = _FRACTION_VARIANTS.sub(r"\\frac", s)
    return _NOISE.sub("", s).rstrip(".")


def strip_delimiters(text: str) -> str:
    """``text`` without surrounding whitespace and one pair of outer math delimiters (``$..$``, ``\\(..\\)``)."""
    s = text.strip()
    for opening, closing in _MATH_DELIMITERS:
        if len(s) >= len(opening) + len(closing) and s.startswith(opening) and s.endswith(closing):
            return s[len(opening) : len(s) - len(closing)].strip()
    return s


def is_bare(text: str) -> bool:
    """Whether ``text`` is a bare answer (``2, 4, 6``, ``$\\frac12$``) rather than text that carries
    its own math delimiters (a sentence with ``$...$``, a ``\\boxed{}``), in which math-verify's
    extraction finds the answer and the list rules here do not apply."""
    return not _DELIMITED.search(strip_delimiters(text))


def plain_number(text: str) -> Optional[Fraction]:
    """The exact value of a plain decimal (``-12``, ``1,000``, ``3.50``, ``.5``), else None.

    Commas count only as thousands separators in 3-digit groups (``1,000``); ``1,5`` is not a number.
    """
    if len(text) > _MAX_NUMBER_CHARS or not _PLAIN_NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def rational_literal(text: str) -> Optional[Fraction]:
    """The exact value of a plain number or a fraction literal (``\\frac{3}{4}``, ``\\frac34``,
    ``-3/4``) in normalised text, else None (zero denominators included)."""
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


def foreign_digits(text: str) -> bool:
    """Whether ``text`` has a digit character other than ASCII ``0-9`` (see the module doc)."""
    return not text.isascii() and any(char.isdecimal() and not char.isascii() for char in text)


def malformed(text: str, brackets: bool = True) -> Optional[str]:
    """Why ``text`` is not well-formed LaTeX, or None: unbalanced ``{}``, ``\\{ \\}``, ``\\left``/
    ``\\right``, ``\\begin``/``\\end``, and with ``brackets`` (for a bare answer, not prose with
    "1)" in it) ``(``/``[`` against ``)``/``]`` (counted together, so half-open intervals balance)."""
    bracket_check, braces, escaped_braces, brackets = brackets, 0, 0, 0
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            following = text[position + 1]
            escaped_braces += (following == "{") - (following == "}")
            if escaped_braces < 0:
                return "'\\}' before its '\\{'"
            position += 2
            continue
        braces += (char == "{") - (char == "}")
        brackets += (char in "([") - (char in ")]")
        if braces < 0:
            return "'}' before its '{'"
        if brackets < 0 and bracket_check:
            return "a closing bracket before its opening one"
        position += 1
    if braces or escaped_braces or (brackets and bracket_check):
        return "a group that is never closed"
    environments: list[str] = []
    for kind, name in _ENVIRONMENT.findall(text):
        if kind == "begin":
            environments.append(name.strip())
        elif not environments or environments.pop() != name.strip():
            return f"\\end{{{name}}} without its \\begin"
    if environments:
        return f"\\begin{{{environments[-1]}}} without its \\end"
    sizes = [kind for kind in _SIZED.findall(text)]
    if sizes.count("left") != sizes.count("right"):
        return "\\left without \\right (or the reverse)"
    return None


_ZERO_DENOMINATOR = re.compile(r"/\s*[+-]?0+(?![\d.])|\\[dt]?frac\s*\{\s*[^{}]*\}\s*\{\s*[+-]?0+\s*\}|\\[dt]?frac\s*\d0(?!\d)", re.ASCII)


def divides_by_zero(text: str) -> bool:
    """Whether ``text`` divides by a literal zero (``4 0/0``, ``\\frac{1}{0}``): undefined, so never equal
    to anything. (sympy's ``nan``/``zoo`` compared against numbers gave True now and then.)"""
    return bool(_ZERO_DENOMINATOR.search(text))


_PROGRAM_TEXT = re.compile(r'__|"|`')


def too_costly(text: str) -> Optional[str]:
    """Why parsing ``text`` could take unbounded time, or would be wasted, or None (see the module doc)."""
    if _PROGRAM_TEXT.search(text) and is_bare(text):  # prose around $...$ may quote ("the answer is "12"")
        return "program text (a dunder name, a double quote or a backtick): never a math answer"
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth -= 1
    if deepest > MAX_DEPTH:
        return f"groups nested {deepest} deep (more than {MAX_DEPTH})"
    if _NUMERIC_TOWER.search(text):
        return "a numeric power tower"
    if _HUGE_EXPONENT.search(text):
        return "an exponent of 5 or more digits"
    if _HUGE_FACTORIAL.search(text):
        return "the factorial of a number of 4 or more digits"
    if any(_numeric_and_large(chosen) for chosen in _binomial_choices(text)):
        return "a binomial choosing a computed power or a 4+-digit number of items"
    for closing in re.finditer(r"[)}]\s*!(?!=)", text):
        opening = _opening_of(text, closing.start())
        group = text[opening : closing.start()] if opening is not None else ""
        if re.search(r"\^|\*\*|\d{4}", group) and not re.search(r"[a-zA-Z]", group.replace("\\frac", "")):
            return "the factorial of a computed power or a 4+-digit number"
    return None


def _numeric_and_large(group: str) -> bool:
    """Whether ``group`` holds a power or a 4+-digit number and no variable (``n^2`` stays symbolic)."""
    return bool(_COMPUTED_OR_LARGE.search(group)) and not re.search(r"[a-zA-Z]", group.replace("\\frac", ""))


def _binomial_choices(text: str) -> list[str]:
    """The lower argument of each ``\\binom{n}{k}`` (``\\dbinom``, ``\\tbinom``) and ``{n \\choose k}``."""
    choices = []
    for command in _BINOMIAL.finditer(text):
        upper_end = _argument_end(text, command.end())
        choices.append(text[upper_end : _argument_end(text, upper_end)])
    commands = list(_CHOOSE.finditer(text))
    for command, following in zip(commands, commands[1:] + [None]):
        # k runs to the end of the enclosing group; stopping at the next \choose keeps this linear
        depth, position, stop = 0, command.end(), following.start() if following else len(text)
        while position < stop and depth >= 0:
            depth += (text[position] == "{") - (text[position] == "}")
            position += 1
        choices.append(text[command.end() : position])
    return choices


def _argument_end(text: str, start: int) -> int:
    """Where the LaTeX argument starting at ``start`` (a braced group or one character, after spaces) ends."""
    position = start
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return min(position + 1, len(text))
    depth = 0
    for end in range(position, len(text)):
        depth += (text[end] == "{") - (text[end] == "}")
        if depth == 0:
            return end + 1
    return len(text)


def _opening_of(text: str, close_at: int) -> Optional[int]:
    depth = 0
    for position in range(close_at, -1, -1):
        char = text[position]
        if char in ")}":
            depth += 1
        elif char in "({":
            depth -= 1
            if depth == 0:
                return position
    return None


def split_top_level(text: str, separator: str = ",") -> Optional[list[str]]:
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


def _encloses(text: str) -> bool:
    """Whether the first character's bracket closes at the last character."""
    depth = 0
    for position, char in enumerate(text):
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
            if depth == 0:
                return position == len(text) - 1
    return False


def shape(text: str) -> str:
    """``"set"`` (a bare comma list, ``\\{...\\}``), ``"tuple"`` (``(a, b)``, ``[a, b)``: a tuple or an
    interval) or ``"single"``. ``1,000`` (no space after the comma) is a single number; ``1, 000`` a list."""
    if THOUSANDS.fullmatch(strip_delimiters(text).replace("\\!", "")):
        return "single"
    text = normalise_answer(text)
    if text.startswith("\\{") and text.endswith("\\}"):
        return "set"
    if text[:1] in "([" and text[-1:] in ")]" and _encloses(text):
        inner = split_top_level(text[1:-1])
        return "tuple" if inner is not None and len(inner) > 1 else "single"
    parts = split_top_level(text)
    return "set" if parts is not None and len(parts) > 1 else "single"


def _labelled_values(normalised: str) -> Optional[list[str]]:
    """The values of ``x=1,y=2`` in the written order, or None unless every element is labelled."""
    parts = split_top_level(normalised)
    if parts is None or len(parts) < 2:
        return None
    values = [_LABEL.fullmatch(part) for part in parts]
    if not all(values):
        return None
    return [match[2] for match in values]  # type: ignore[index]


def aligned_for_math_verify(prediction: str, gold: str) -> Optional[tuple[str, str]]:
    """The pair as math-verify should see it under the MATH list convention, or None when the shapes
    alone make it wrong (a set against a tuple or interval). Texts are returned as given unless a
    rule rewrites them (labels dropped into a tuple, ``2,500`` spaced into a list)."""
    if not (is_bare(prediction) and is_bare(gold)):
        return prediction, gold
    pred_norm, gold_norm = normalise_answer(prediction), normalise_answer(gold)
    pred_shape, gold_shape = shape(prediction), shape(gold)
    if gold_shape == "tuple" and pred_shape == "set":
        values = _labelled_values(pred_norm)
        if values is None:
            return None
        prediction = "(" + ",".join(values) + ")"
    elif pred_shape == "tuple" and gold_shape == "set":
        values = _labelled_values(gold_norm)
        if values is None:
            return None
        gold = "(" + ",".join(values) + ")"
    elif gold_shape == "set" and pred_shape == "single" and THOUSANDS.fullmatch(pred_norm):
        prediction = pred_norm.replace(",", ", ")  # against a list, "2,500" is the list 2, 500
    return prediction, gold
