"""Cold-start labels and budget caps from the model's own correct answers (the paper's stage-1 data).

For each problem the base model samples ``k`` plain answers (no budget format yet) to the prompt it will
be trained on; the finished ones whose stated answer (a box, ``#### x``, "the answer is x", else the last
number written: :func:`~selfbudget_pl.data.answers.stated_answer`) the grader accepts are kept, one is
chosen (shortest or random), and it becomes the record's cold-start target, labelled with its own token
length as budget and ``b_max``.
Correctness is the grader's verdict, never string equality with the gold answer (``\\frac12`` for
``1/2`` is correct). A problem with no correct sample keeps ``b_max = None`` (no cap) and no target:
the paper leaves it out of SFT and in the RL set. Every record also carries how many of its samples were
correct (``samples_correct`` of ``samples``), so the same run measures the base model's accuracy, per
difficulty where the data has one (:func:`accuracy_by_difficulty`).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from selfbudget_pl.data.answers import boxed_solution, stated_answer
from selfbudget_pl.data.budget_labels import label_record, labelled_ids, read_jsonl, write_jsonl
from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.data.records import DroppedRows, MathRecord
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rollout.base import EngineLimits, RolloutBackend, SamplingSettings, engine_limits

log = logging.getLogger(__name__)
CHOICES = ("shortest", "random")
SCOPE = "self_label"


@dataclass
class SelfLabels:
    """What a labelling run produced: one record per problem, and the counts it prints.

    ``records``: every problem; labelled ones carry ``response``/``budget``/``b_max``, the others only
    ``b_max`` (the chosen answer's length when one was correct but cannot be a target, else None).
    """

    records: list[MathRecord] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def summary(self, dropped: Optional[DroppedRows] = None) -> str:
        """``problems N, solved S, labelled L, no cap U, samples correct C of K`` plus the dropped rows per cause."""
        line = ", ".join(f"{key} {self.counts[key]}" for key in ("problems", "solved", "labelled", "no_cap"))
        line += f", samples correct {self.counts['samples_correct']} of {self.counts['samples']}"
        causes = dropped.by_reason(SCOPE) if dropped is not None else {}
        return line + (f"; not labelled: {', '.join(f'{k} {v}' for k, v in sorted(causes.items()))}" if causes else "")


def accuracy_by_difficulty(records: Sequence[Mapping[str, Any]]) -> dict[Optional[float], tuple[int, int]]:
    """The base model's correct finished samples and samples per difficulty (None: records without one),
    over the records that carry the counts (a label file from before they were written has none)."""
    table: dict[Optional[float], list[int]] = {}
    for record in records:
        if record.get("samples") is None:
            continue
        difficulty = record.get("difficulty")
        known = difficulty is not None and not math.isnan(difficulty)
        counts = table.setdefault(float(difficulty) if known else None, [0, 0])
        counts[0] += record["samples_correct"]
        counts[1] += record["samples"]
    return {difficulty: (right, total) for difficulty, (right, total) in table.items()}


def labelling_limits(
    records: Sequence[MathRecord],
    tokenizer: Any,
    sampling: SamplingSettings,
    samples: int,
    batch_size: int,
    prompt_template: str = "{problem}",
    system_prompt: Optional[str] = None,
    chat_template: Optional[bool] = None,
) -> Optional[EngineLimits]:
    """What :func:`label_from_samples` sends its sampler at most, so that an engine with a KV cache of its
    own (vLLM) is sized for this run rather than for the model's position limit: the longest problem's
    prompt plus ``max_new_tokens``, and one batch's ``samples`` completions per problem. None when there is
    nothing to label."""
    if not records:
        return None
    prompts = encode_prompts([r["problem"] for r in records], tokenizer, prompt_template, system_prompt, chat_template)
    longest = max(range(len(records)), key=lambda index: len(prompts[index]))
    return engine_limits(
        len(prompts[longest]),
        f"the longest problem's prompt (id {records[longest]['id']}; leave it out with --limit or a smaller file)",
        [(min(batch_size, len(records)) * samples, sampling.max_new_tokens)],
    )


def label_from_samples(
    records: Sequence[MathRecord],
    backend: RolloutBackend,
    tokenizer: Any,
    grader: Any,
    samples: int = 4,
    choose: str = "shortest",
    sampling: Optional[SamplingSettings] = None,
    prompt_template: str = "{problem}",
    system_prompt: Optional[str] = None,
    chat_template: Optional[bool] = None,
    output_format: Optional[OutputFormat] = None,
    round_to: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    dropped: Optional[DroppedRows] = None,
    on_batch: Optional[Callable[[list[MathRecord]], Any]] = None,
) -> SelfLabels:
    """Label ``records`` with the model's own correct answers; see the module docstring. Problems left
    without a target are counted in ``dropped`` (scope ``self_label``) by cause. ``on_batch`` receives each
    batch's records as soon as they are labelled (the script appends them to its output, so a killed run
    loses at most one batch)."""
    if choose not in CHOICES:
        raise ValueError(f"choose={choose!r} is not one of {CHOICES}")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    output_format = output_format or OutputFormat()
    sampling = sampling or SamplingSettings(temperature=0.6, max_new_tokens=4096, seed=seed)
    dropped = dropped if dropped is not None else DroppedRows()
    rng = random.Random(seed)
    result = SelfLabels()
    for start in range(0, len(records), batch_size):
        batch = list(records[start : start + batch_size])
        prompt_ids = encode_prompts(
            [r["problem"] for r in batch], tokenizer, prompt_template, system_prompt, chat_template
        )
        rollouts = backend.generate(prompt_ids, num_samples=samples, sampling=sampling)
        # A chat model's plain answer often has no filled box: its prose or "####" answer is graded too.
        answers = [stated_answer(text) for text in rollouts.completions]
        golds = [batch[group]["answer"] for group in rollouts.group_index]
        verdicts = grader.grade_batch(answers, golds)
        for index, problem in enumerate(batch):
            result.counts["problems"] += 1
            mine = [i for i, group in enumerate(rollouts.group_index) if group == index]
            # An empty completion holds no solution to learn from, whatever a lenient grader said of it.
            texts = {i: rollouts.completions[i].strip() for i in mine}
            # The target ends in its answer's box, so it parses as the format asks (one line added where
            # the model stated the answer in prose).
            correct = [
                boxed_solution(texts[i], answers[i]) for i in mine if verdicts[i] and not rollouts.truncated[i] and texts[i]
            ]
            record: MathRecord = {**problem, "samples_correct": len(correct), "samples": len(mine)}
            result.counts["samples_correct"] += len(correct)
            result.counts["samples"] += len(mine)
            if not correct:
                reason = "only_truncated_correct" if any(verdicts[i] for i in mine) else "no_correct_sample"
                result.records.append(_uncapped(record, dropped, reason, result.counts))
                continue
            result.counts["solved"] += 1
            if choose == "shortest":
                solution = min(correct, key=lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
            else:
                solution = rng.choice(correct)
            labelled = label_record({**record, "solution": solution}, tokenizer, output_format, round_to)
            if not output_format.parse(labelled["response"]).well_formed:
                # The answer's own text breaks the format (it writes a tag, say): it cannot be a target,
                # but it was correct, so its length is still the question's cap.
                dropped.add(SCOPE, "target_does_not_parse", record["id"])
                result.records.append({**record, "b_max": labelled["b_max"]})
                continue
            result.counts["labelled"] += 1
            result.records.append(labelled)
        if on_batch is not None:
            on_batch(result.records[start:])
        log.info("labelled %d of %d problems: %d solved, samples correct %d of %d", result.counts["problems"],
                 len(records), result.counts["solved"], result.counts["samples_correct"], result.counts["samples"])  # fmt: skip
    return result


def label_to_file(
    records: Sequence[MathRecord], path: str | Path, *, restart: bool = False, **label_kwargs: Any
) -> tuple[list[MathRecord], SelfLabels]:
    """:func:`label_from_samples` into the JSONL file ``path``, resumable: each batch is appended as soon as
    it is labelled and a rerun labels only the problems not yet written (``restart``: all of them again).
    Returns every row the file now holds for ``records`` and this run's labels (its counts)."""
    path = Path(path)
    if restart:
        path.unlink(missing_ok=True)
    done = labelled_ids(path)
    if done:
        log.info("resuming: %d problems already labelled in %s (restart relabels them)", len(done), path)
    todo = [record for record in records if str(record["id"]) not in done]
    result = label_from_samples(todo, on_batch=lambda batch: write_jsonl(batch, path, append=True), **label_kwargs)
    written = [row for row in read_jsonl(path) if str(row["id"]) in done] if done else []
    return [*written, *result.records], result


def require_solved(records: Sequence[Mapping[str, Any]], path: str | Path, summary: str) -> None:
    """Stop a pipeline before stage 1 when no problem was solved: an all-uncapped file holds no cold-start
    target and no cap for GRPO."""
    if records and not any(record.get("b_max") is not None for record in records):
        raise ValueError(
            f"no problem of {len(records)} in {path} was solved ({summary}): no cold-start target and no cap; "
            "sample more (samples), longer (max_new_tokens), or check the prompt and the grader on a few completions"
        )


def _uncapped(record: MathRecord, dropped: DroppedRows, reason: str, counts: Counter) -> MathRecord:
    dropped.add(SCOPE, reason, record["id"])
    counts["no_cap"] += 1
    return {**record, "b_max": None}
