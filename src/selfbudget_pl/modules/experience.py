"""GRPO's experience: a batch of rollouts as training tensors (prompts left-padded, completions
right-padded, advantages, and the log-probs the update compares against), sliced into mini- and
micro-batches."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional

import torch

from selfbudget_pl.rollout.base import Rollouts
from selfbudget_pl.tensors import pad


@dataclass
class Experience:
    """Rollouts as training tensors: prompts left-padded, completions right-padded (EOS included
    where the model emitted it, so learning when to stop is part of the objective)."""

    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T]
    advantages: torch.Tensor  # [N]
    old_logprobs: Optional[torch.Tensor] = None  # [N, T], when the policy moves before these are trained on
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T], when beta > 0
    sampler_logprobs: Optional[torch.Tensor] = None  # [N, T], the sampler's own, when it recorded them

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def rows(self, start: int, stop: int) -> "Experience":
        """Completions ``start:stop``, with padding trimmed to their own longest prompt and completion."""
        prompt_width = int(self.prompt_mask[start:stop].sum(1).max())
        completion_width = max(1, int(self.completion_mask[start:stop].sum(1).max()))

        def completion_part(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else tensor[start:stop, :completion_width]

        return Experience(
            prompt_ids=self.prompt_ids[start:stop, self.prompt_ids.shape[1] - prompt_width :],
            prompt_mask=self.prompt_mask[start:stop, self.prompt_mask.shape[1] - prompt_width :],
            completion_ids=completion_part(self.completion_ids),
            completion_mask=completion_part(self.completion_mask),
            advantages=self.advantages[start:stop],
            old_logprobs=completion_part(self.old_logprobs),
            ref_logprobs=completion_part(self.ref_logprobs),
            sampler_logprobs=completion_part(self.sampler_logprobs),
        )

    def chunks(self, size: int) -> Iterator["Experience"]:
        """Consecutive pieces of at most ``size`` completions (see :meth:`rows`)."""
        for start in range(0, len(self), size):
            yield self.rows(start, min(start + size, len(self)))

    def micro_batches(
        self, max_completions: Optional[int] = None, max_tokens: Optional[int] = None
    ) -> Iterator["Experience"]:
        """Consecutive pieces of at most ``max_completions`` completions holding at most ``max_tokens`` tokens
        (each completion's prompt and completion tokens: the packed forward, which holds a group's prompt once,
        holds no more); a completion longer than ``max_tokens`` goes alone. None: no bound."""
        sizes = (self.prompt_mask.sum(1) + self.completion_mask.sum(1)).tolist()
        start = 0
        while start < len(self):
            stop, tokens = start + 1, sizes[start]
            while (
                stop < len(self)
                and (max_completions is None or stop - start < max_completions)
                and (max_tokens is None or tokens + sizes[stop] <= max_tokens)
            ):
                tokens += sizes[stop]
                stop += 1
            yield self.rows(start, stop)
            start = stop

    def to(self, device: torch.device | str) -> "Experience":
        """The same experience with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: None if t is None else t.to(device) for name, t in moved.items()})

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_mask.sum() + self.completion_mask.sum())


def experience_from_rollouts(
    rollouts: Rollouts, advantages: torch.Tensor, pad_token_id: int, mask_truncated: bool = False
) -> Experience:
    """Pad rollouts into tensors: every sampled token, the stop token the sampler drew included (so
    learning when to stop is part of the objective). ``mask_truncated``: completions cut off by the length
    limit stay out of the loss (their mask is zero). The sampler's log-probs come along when it recorded them."""
    completions = [rollouts.sampled_ids(index) for index in range(len(rollouts))]
    # min_width 1: a batch whose completions are all empty still has a token axis.
    prompt_ids, prompt_mask = pad(rollouts.prompt_ids, pad_token_id, left=True, min_width=1)
    completion_ids, completion_mask = pad(completions, pad_token_id, min_width=1)
    if mask_truncated:
        completion_mask = completion_mask * ~torch.tensor(rollouts.truncated, dtype=torch.bool)[:, None]
    sampler_logprobs = None
    if rollouts.sampler_logprobs:
        sampler_logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, values in enumerate(rollouts.sampler_logprobs):
            sampler_logprobs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return Experience(
        prompt_ids, prompt_mask, completion_ids, completion_mask, advantages, sampler_logprobs=sampler_logprobs
    )
