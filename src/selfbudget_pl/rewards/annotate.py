"""The one place completions are parsed, graded and measured, for rewards, validation and evaluation.

:func:`annotate` returns the :class:`Annotations` of a batch of rollouts (the rollouts stay what was
sampled), and :func:`generate_and_annotate` samples them first, so a LightningModule and a plain script
score completions the same way; :func:`resolve_annotations` gives reward functions the same lists, taken
from their keyword arguments when the caller annotated already, computed otherwise (a reward used on its
own, TRL style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat, ParsedOutput, count_solution_tokens
from selfbudget_pl.rewards.grader import Grader, answer_text_of
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts, SamplingSettings


def grade_parsed(parsed: Sequence[ParsedOutput], golds: Sequence[object], grader: Grader) -> list[bool]:
    """Correctness per completion: only a well-formed completion with a gold answer can be right.
    Golds may be text or numbers (JSON ``27.0`` in AMC files), which are graded as those numbers."""
    texts = [answer_text_of(gold) for gold in golds]
    gradable = [
        index
        for index, (output, text) in enumerate(zip(parsed, texts))
        if output.well_formed and text is not None and text.strip()
    ]
    correct = [False] * len(parsed)
    verdicts = grader.grade_batch([parsed[i].answer for i in gradable], [texts[i] for i in gradable])
    for index, verdict in zip(gradable, verdicts):
        correct[index] = bool(verdict)
    return correct


def solution_length(completion: str, parsed: ParsedOutput, tokenizer: Any, completion_ids: Optional[Sequence[int]] = None) -> int:
    """Tokens spent on the solution: the text after ``</budget>`` under ``tokenizer``. Without a budget
    tag, the whole completion: its generated ``completion_ids`` when known (exact, and free even for
    a megabyte of text), else its token count."""
    if parsed.solution is None and completion_ids is not None:
        return len(completion_ids)
    text = parsed.solution if parsed.solution is not None else completion
    if not isinstance(text, str):
        return 0
    # Lone surrogates (possible in untrusted text, never in decoded tokens) make fast tokenizers raise.
    return count_solution_tokens(text.encode("utf-8", errors="replace").decode("utf-8"), tokenizer)


@dataclass
class Annotations:
    """What grading learned about each completion of a :class:`Rollouts`, in its order.

    Args:
        parsed: the completion read by the output format (budget, solution, answer, format error).
        correct: the answer matches the gold one (only a well-formed completion can be right).
        solution_lengths: tokens spent on the solution (after the budget tag).
        finished: neither cut off by the length limit nor left with its solution block open.
    """

    parsed: list[ParsedOutput]
    correct: list[bool]
    solution_lengths: list[int]
    finished: list[bool]

    def __len__(self) -> int:
        return len(self.parsed)


def annotate(rollouts: Rollouts, output_format: OutputFormat, grader: Grader, tokenizer: Any) -> Annotations:
    """Parse, grade and measure every completion. Gold answers: ``rollouts.columns["answer"]``."""
    if "answer" not in rollouts.columns:
        raise ValueError(
            "annotate: rollouts.columns has no 'answer' column; the DataModule must pass gold answers "
            f"through (columns present: {sorted(rollouts.columns)})."
        )
    parsed = [output_format.parse(completion) for completion in rollouts.completions]
    ids = rollouts.completion_ids if len(rollouts.completion_ids) == len(parsed) else [None] * len(parsed)
    return Annotations(
        parsed=parsed,
        correct=grade_parsed(parsed, rollouts.columns["answer"], grader),
        solution_lengths=[
            solution_length(completion, output, tokenizer, completion_ids)
            for completion, output, completion_ids in zip(rollouts.completions, parsed, ids)
        ],
        finished=finished_solutions(parsed, rollouts.truncated, output_format),
    )


def generate_and_annotate(
    backend: RolloutBackend,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    output_format: OutputFormat,
    grader: Grader,
    tokenizer: Any,
    num_samples: int = 1,
    prefill: Optional[str] = None,
    columns: Optional[dict[str, Sequence[Any]]] = None,
) -> tuple[Rollouts, Annotations]:
    """Sample ``num_samples`` completions per prompt, and their annotations (parse, grade, lengths).

    ``columns`` are dataset columns, one value per prompt; ``answer`` is needed for grading.
    """
    rollouts = backend.generate(
        prompt_ids, num_samples=num_samples, sampling=sampling, prefill=prefill, columns=columns
    )
    return rollouts, annotate(rollouts, output_format, grader, tokenizer)


def finished_solutions(parsed: Sequence[ParsedOutput], truncated: Sequence[bool], output_format: OutputFormat) -> list[bool]:
    """Per completion, whether its answer was finished: not cut off by the length limit, and its solution
    block closed (a completion that stopped mid-solution may still hold a correct ``\\boxed{}``).
    Backends keep a matched stop string in the text, so ``</solution>`` as a stop string still counts."""
    return [
        not cut and output.solution is not None and output_format.solution_close in output.solution
        for output, cut in zip(parsed, truncated)
    ]


def resolve_annotations(
    completions: Sequence[str],
    columns: dict[str, Any],
    output_format: Optional[OutputFormat] = None,
    grader: Optional[Grader] = None,
) -> tuple[list[ParsedOutput], list[bool], list[int]]:
    """``(parsed, correct, solution_lengths)`` for a reward function's call.

    Uses the ``parsed``/``correct``/``solution_lengths`` keyword arguments when given. Otherwise parses
    with ``output_format`` (default :class:`OutputFormat`), grades against the ``answer`` column with
    ``grader`` (required then), and takes lengths from ``completion_ids`` (TRL passes them; they count
    the budget tag too, which is the best available without a tokenizer).
    """
    parsed = columns.get("parsed")
    if parsed is None:
        parsed = [(output_format or OutputFormat()).parse(completion) for completion in completions]
    correct = columns.get("correct")
    if correct is None:
        if grader is None or "answer" not in columns:
            raise ValueError(
                "This reward needs correctness: pass `correct=[...]`, or give the reward a `grader` and "
                "pass the gold `answer` column."
            )
        correct = grade_parsed(parsed, columns["answer"], grader)
    lengths = columns.get("solution_lengths")
    if lengths is None:
        if columns.get("completion_ids") is None:
            raise ValueError("This reward needs lengths: pass `solution_lengths=[...]` or `completion_ids=[...]`.")
        lengths = [len(ids) for ids in columns["completion_ids"]]
    if not len(parsed) == len(correct) == len(lengths) == len(completions):
        raise ValueError(
            f"Reward inputs disagree in length: {len(completions)} completions, {len(parsed)} parsed, "
            f"{len(correct)} correct, {len(lengths)} solution_lengths."
        )
    return list(parsed), [bool(c) for c in correct], [int(n) for n in lengths]
