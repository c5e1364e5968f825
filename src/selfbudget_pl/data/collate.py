"""Batches from tokenised examples (dicts made by the DataModule: record fields + ``prompt_ids``,
and for SFT ``response_ids``, which already end in EOS; id sequences may be lists or int arrays).

SFT batch: ``input_ids``/``attention_mask``/``labels`` [B, T], right-padded, ``labels`` = -100 on the
prompt and on padding, so exactly the response (budget tag, solution, EOS) is supervised; ``budget``
[B] long. GRPO batch: ``prompt_input_ids``/``prompt_attention_mask`` [B, P], left-padded (generation
appends on the right), plus python lists ``prompt_ids`` (unpadded), ``id``, ``problem``, ``answer``,
``difficulty``, ``b_max``, ``source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from selfbudget_pl.tensors import pad

IGNORE_INDEX = -100
# The record fields a GRPO (or SFT validation) batch carries per prompt, for rewards and metrics.
COLUMNS = ("id", "problem", "answer", "difficulty", "b_max", "source")


def record_columns(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """The :data:`COLUMNS` of a batch, one list each (what travels with its rollouts)."""
    return {key: list(batch[key]) for key in COLUMNS if key in batch}


@dataclass
class GRPOCollator:
    """Left-padded prompts plus the columns rewards and metrics need."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompt_ids = [np.asarray(example["prompt_ids"]).tolist() for example in examples]
        prompt_input_ids, prompt_attention_mask = pad(prompt_ids, self.pad_token_id, left=True)
        batch: dict[str, Any] = {
            "prompt_input_ids": prompt_input_ids,
            "prompt_attention_mask": prompt_attention_mask,
            "prompt_ids": prompt_ids,
        }
        for column in COLUMNS:
            batch[column] = [example.get(column) for example in examples]
        return batch


@dataclass
class SFTCollator:
    """Prompt + response, with the loss on the response only.

    With ``include_prompts`` (validation) the batch also carries everything :class:`GRPOCollator` makes,
    so one validation batch serves both the loss and greedy generation.
    """

    pad_token_id: int
    include_prompts: bool = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        sequences, targets = [], []
        for example in examples:
            prompt, response = np.asarray(example["prompt_ids"]), np.asarray(example["response_ids"])
            sequences.append(np.concatenate([prompt, response]))
            targets.append(np.concatenate([np.full(len(prompt), IGNORE_INDEX), response]))
        input_ids, attention_mask = pad(sequences, self.pad_token_id)
        labels, _ = pad(targets, IGNORE_INDEX)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "budget": torch.tensor([example["budget"] for example in examples], dtype=torch.long),
        }
        if self.include_prompts:
            batch.update(GRPOCollator(self.pad_token_id)(examples))
        return batch
