"""A synthetic task that needs no files: sums of k operands, solved one step at a time.

Problem ``3+5+7``; reference reasoning ``3+5=8;?8-5=3;8+7=15;\\boxed{15}``: one ``a+b=c;`` step per
operand after the first, each followed by ``checks_min..checks_max`` redundant checks (``?c-b=a;``).
The required reasoning grows with k (the difficulty), while the checks add length that never helps:
a model fine-tuned on these solutions has length variance that RL can remove. The defaults (operands
1..9, k 2..6, 0-2 checks) are what a ~0.3M-parameter model learns in minutes on a CPU; wider operand
ranges or larger k make the harder variant.

``wording="story"`` states the same sum as a word problem (``Mia has 3 shells. Mia finds 5 more shells. ...
How many shells does Mia have now?``), the task a pretrained chat model half-solves in prose; the reference
reasoning and the answer are the same.

Splits cannot share problems: every problem's operands are assigned to train, val or test by a stable
hash, and each split only draws problems assigned to it (from its own seeded stream).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Mapping

from selfbudget_pl.data.records import MathRecord
from selfbudget_pl.schema import Findings, Schema, check_arguments, check_ordered, spec

SPLITS = ("train", "val", "test")
WORDINGS = ("symbols", "story")
_MAX_DRAWS_PER_ROW = 10_000
_NAMES = ("Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "beads")
_GAINS = ("gets", "finds", "buys", "is given", "wins")


def split_of(problem: str, heldout_fraction: float) -> str:
    """The split a problem belongs to: ``val`` and ``test`` each get ``heldout_fraction`` of problems."""
    digest = hashlib.blake2b(problem.encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    if position < heldout_fraction:
        return "val"
    if position < 2 * heldout_fraction:
        return "test"
    return "train"


def sum_reasoning(operands: list[int], rng: random.Random, checks_min: int, checks_max: int) -> str:
    """Running partial sums with random redundant checks after each step, ending in ``\\boxed{sum}``."""
    steps, total = [], operands[0]
    for operand in operands[1:]:
        previous, total = total, total + operand
        steps.append(f"{previous}+{operand}={total};")
        for _ in range(rng.randint(checks_min, checks_max)):
            steps.append(rng.choice((f"?{total}-{operand}={previous};", f"?{total}-{previous}={operand};")))
    steps.append(f"\\boxed{{{total}}}")
    return "".join(steps)


def sum_story(operands: list[int], rng: random.Random) -> str:
    """The sum as a word problem: one person, one kind of item, a gain per operand after the first."""
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    sentences = [f"{name} has {operands[0]} {items}."]
    for step, operand in enumerate(operands[1:]):
        sentences.append(f"{'Then ' if step else ''}{name} {rng.choice(_GAINS)} {operand} more {items}.")
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences)


@dataclass
class SyntheticSourceSchema(Schema):
    """The arguments of :class:`SyntheticSource` (a ``data`` source) and what each allows."""

    TARGETS = ("selfbudget_pl.data.synthetic.SyntheticSource", "selfbudget_pl.data.sources.SyntheticSource")

    size: int = spec(ge=1)
    split: str = spec(choices=SPLITS)
    seed: int = spec()
    operand_min: int = spec(ge=0)
    operand_max: int = spec(ge=0)
    k_min: int = spec(ge=2, note="a sum has at least two operands")
    k_max: int = spec(ge=2)
    checks_min: int = spec(ge=0)
    checks_max: int = spec(ge=0)
    heldout_fraction: float = spec(gt=0, lt=0.5, note="the share held out for val, and again for test")
    wording: str = spec(choices=WORDINGS)
    name: str = spec()

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        for low, high in (("operand_min", "operand_max"), ("k_min", "k_max"), ("checks_min", "checks_max")):
            check_ordered(node, key, findings, low, high)


class SyntheticSource:
    """Generates ``size`` sum problems for one split. Every knob of the task is an argument.

    Args:
        size: number of rows (problems may repeat within a split, each time with fresh checks).
        split: ``train`` | ``val`` | ``test``; decides which problems may be drawn (see module doc).
        seed: seeds this split's random stream (combined with ``split``, so splits differ anyway).
        operand_min/operand_max: operand range, inclusive.
        k_min/k_max: number of operands, drawn uniformly; it is the row's difficulty.
        checks_min/checks_max: redundant checks after each step, drawn uniformly per step.
        heldout_fraction: share of all problems reserved for val, and the same share for test.
        wording: ``symbols`` (``3+5+7``) or ``story`` (a word problem of the same sum).
        name: prefix of ids and of the ``source`` field.
    """

    def __init__(
        self,
        size: int = 20_000,
        split: str = "train",
        seed: int = 0,
        operand_min: int = 1,
        operand_max: int = 9,
        k_min: int = 2,
        k_max: int = 6,
        checks_min: int = 0,
        checks_max: int = 2,
        heldout_fraction: float = 0.1,
        wording: str = "symbols",
        name: str = "synthetic",
    ) -> None:
        check_arguments(SyntheticSourceSchema, locals(), "SyntheticSource")
        self.size = size
        self.split = split
        self.seed = seed
        self.operand_min, self.operand_max = operand_min, operand_max
        self.k_min, self.k_max = k_min, k_max
        self.checks_min, self.checks_max = checks_min, checks_max
        self.heldout_fraction = heldout_fraction
        self.wording = wording
        self.name = name

    def __repr__(self) -> str:
        return f"SyntheticSource(split={self.split!r}, size={self.size}, k={self.k_min}..{self.k_max})"

    def load(self, **_: Any) -> list[MathRecord]:
        """Generate the rows (deterministic for given arguments). Options for file sources are ignored."""
        # A string seed is hashed deterministically by `random`, so each split has its own stream.
        rng = random.Random(f"{self.seed}:{self.split}")
        # Stories draw from a stream of their own: either wording gives the same sums in the same order.
        story_rng = random.Random(f"{self.seed}:{self.split}:story")
        records: list[MathRecord] = []
        for index in range(self.size):
            operands = self._draw_operands(rng)
            reasoning = sum_reasoning(operands, rng, self.checks_min, self.checks_max)
            problem = sum_story(operands, story_rng) if self.wording == "story" else "+".join(map(str, operands))
            records.append(
                MathRecord(
                    id=f"{self.name}/{self.split}/{index}",
                    problem=problem,
                    answer=str(sum(operands)),
                    solution=reasoning,
                    difficulty=float(len(operands)),
                    source=f"{self.name}/{self.split}",
                )
            )
        return records

    def _draw_operands(self, rng: random.Random) -> list[int]:
        k = rng.randint(self.k_min, self.k_max)
        for _ in range(_MAX_DRAWS_PER_ROW):
            operands = [rng.randint(self.operand_min, self.operand_max) for _ in range(k)]
            if split_of("+".join(map(str, operands)), self.heldout_fraction) == self.split:
                return operands
        raise ValueError(
            f"SyntheticSource: no {self.split} problem with k={k} found in {_MAX_DRAWS_PER_ROW} draws; "
            f"operands {self.operand_min}..{self.operand_max} give too few problems for "
            f"heldout_fraction={self.heldout_fraction}"
        )

