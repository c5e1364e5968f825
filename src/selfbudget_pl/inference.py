"""Prompts in, scored completions out: the step validation, evaluation and the pipeline share.

``generate_and_annotate`` samples through any :class:`~selfbudget_pl.rollout.base.RolloutBackend` and
returns, beside the rollouts, what the metrics need (parsed output, correctness, solution lengths), so a
LightningModule and a plain script score completions the same way.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.annotate import Annotations, annotate
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts, SamplingSettings


def generate_and_annotate(
    backend: RolloutBackend,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingSettings,
    output_format: OutputFormat,
    grader: Any,
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
