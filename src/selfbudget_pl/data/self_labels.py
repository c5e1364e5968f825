"""Cold-start targets from the model's own correct answers (the paper's stage-1 data).

For each problem the base model samples ``k`` plain answers (no budget format yet); the ones whose final
``\\boxed{}`` answer grades correct are kept, one is chosen (shortest or random), and it becomes the
record's reference solution, labelled with its own token length as budget and b_max. Problems with no
correct sample are dropped and counted (their b_max is infinite: the paper leaves them out of SFT).
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

from selfbudget_pl.data.budget_labels import label_records
from selfbudget_pl.data.records import DroppedRows, MathRecord
from selfbudget_pl.format import OutputFormat, extract_boxed
from selfbudget_pl.inference import encode_prompts
from selfbudget_pl.rollout.base import RolloutBackend, SamplingSettings

CHOICES = ("shortest", "random")


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
    output_format: Optional[OutputFormat] = None,
    round_to: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    dropped: Optional[DroppedRows] = None,
) -> list[MathRecord]:
    """Label ``records`` with the model's own correct answers; see the module docstring."""
    if choose not in CHOICES:
        raise ValueError(f"choose={choose!r} is not one of {CHOICES}")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    sampling = sampling or SamplingSettings(temperature=0.6, max_new_tokens=4096, seed=seed)
    rng = random.Random(seed)
    kept: list[MathRecord] = []
    for start in range(0, len(records), batch_size):
        batch = list(records[start : start + batch_size])
        prompt_ids = encode_prompts([r["problem"] for r in batch], tokenizer, prompt_template, system_prompt)
        rollouts = backend.generate(prompt_ids, num_samples=samples, sampling=sampling)
        finished = [not truncated for truncated in rollouts.truncated]
        answers = [extract_boxed(text) for text in rollouts.completions]
        golds = [batch[group]["answer"] for group in rollouts.group_index]
        verdicts = grader.grade_batch(answers, golds)
        for index, record in enumerate(batch):
            correct = [
                text.strip()
                for text, group, ok, done in zip(rollouts.completions, rollouts.group_index, verdicts, finished)
                if group == index and ok and done
            ]
            if not correct:
                if dropped is not None:
                    dropped.add("self_label", "no_correct_sample", record["id"])
                continue
            if choose == "shortest":
                solution = min(correct, key=lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
            else:
                solution = rng.choice(correct)
            kept.append({**record, "solution": solution})
    return label_records(kept, tokenizer, output_format or OutputFormat(), round_to, dropped, scope="self_label")
