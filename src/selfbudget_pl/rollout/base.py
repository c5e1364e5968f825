"""One interface for sampling completions, for training (GRPO), evaluation and generation.

A backend turns prompts into :class:`Rollouts`; callbacks then annotate them in place (parsed output,
correctness, solution lengths, rewards) before the loss is built. Every list in a ``Rollouts`` has one
entry per completion, ordered prompt by prompt: prompt 0's ``num_samples`` completions first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from selfbudget_pl.format import ParsedOutput


@dataclass
class SamplingSettings:
    """How to sample. ``temperature=0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None


@dataclass
class Rollouts:
    """Completions for a batch of prompts, plus what callbacks learn about them."""

    prompt_ids: list[list[int]]  # one per completion (shared within a group)
    completion_ids: list[list[int]]  # generated tokens, EOS/padding stripped
    completions: list[str]  # decoded completion text (including any pre-filled budget prefix)
    truncated: list[bool]  # stopped by max_new_tokens rather than EOS/stop string
    group_index: list[int]  # index of the prompt each completion answers
    columns: dict[str, list[Any]] = field(default_factory=dict)  # dataset columns, repeated per completion
    # Filled by annotation/reward callbacks:
    parsed: list[ParsedOutput] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    solution_lengths: list[int] = field(default_factory=list)  # tokens after the budget tag
    rewards: Optional[torch.Tensor] = None  # [num_completions], float32
    reward_components: dict[str, list[float]] = field(default_factory=dict)
    generation_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


class RolloutBackend(ABC):
    """Samples completions. ``prefill`` (e.g. ``<budget>300</budget><solution>``) is appended to every
    prompt and counted as part of the completion text, so a pre-filled budget parses like a generated one."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        sampling: SamplingSettings,
        prefill: Optional[str] = None,
        columns: Optional[dict[str, Sequence[Any]]] = None,
    ) -> Rollouts:
        """Sample ``num_samples`` completions for each prompt (token ids, unpadded)."""

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Make the backend sample from the policy's current weights (no-op when it shares them).

        ``model`` is the policy itself, or the (FSDP-sharded) module that holds it at attribute path
        ``prefix``; see :meth:`selfbudget_pl.modules.base.PolicyModule.weights_source`.
        """
