"""Log-probs (and entropies) of completion tokens under a model, as the GRPO update needs them, and
the SFT loss through the same path: the packed or padded forward, then the LM head a chunk at a time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from selfbudget_pl.data.collate import IGNORE_INDEX
from selfbudget_pl.modules import packing
from selfbudget_pl.modules.head import chunked_head, supports_chunked_head
from selfbudget_pl.modules.losses import entropy_from_logits, token_logprobs


class PromptsAndCompletions(Protocol):
    """Rows as these forwards take them: prompts left-padded, completions right-padded, masks marking
    real tokens (GRPO's :class:`~selfbudget_pl.modules.experience.Experience` is one)."""

    prompt_ids: torch.Tensor  # [n, P]
    prompt_mask: torch.Tensor  # [n, P]
    completion_ids: torch.Tensor  # [n, T]
    completion_mask: torch.Tensor  # [n, T]


@dataclass(frozen=True)
class _Continuations:
    """Right-padded sequences split after their first token, so every later token is a completion token."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


def completion_logprobs(
    model: torch.nn.Module, micro: PromptsAndCompletions, temperature: float, chunk_tokens: int, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, T]`` log-probs of the completion tokens under ``model`` at the sampling ``temperature`` (the
    distribution they were drawn from; 0 at padding), and the ``[C]`` entropies of those distributions
    at the real tokens (no gradient).

    ``packed``: the forward runs on packed tokens (:mod:`.packing`), else padded. The head runs in chunks
    of ``chunk_tokens`` from the hidden states (:mod:`.head`), so no ``[C, V]`` logits exist at once; a
    model whose output layer is not a plain ``nn.Linear`` gets its full logits, scored chunk by chunk."""
    mask = micro.completion_mask.bool()
    targets = micro.completion_ids[mask]
    temperature = temperature if temperature > 0 else 1.0
    if packed:
        batch = packing.pack(micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask)
        forward, select = partial(packing.packed_forward, model, batch), packing.completion_rows
    else:
        forward = partial(_padded_forward, model, micro)
        select = partial(_padded_completion_rows, mask=mask)
    if supports_chunked_head(model):
        with chunked_head(model, targets, select, temperature, chunk_tokens) as scores:
            logprobs = forward()
        entropy = scores.entropy
    else:
        logits = select(forward()) / temperature
        logprobs = token_logprobs(logits, targets, chunk_tokens)
        with torch.no_grad():
            entropy = entropy_from_logits(logits, chunk_tokens)
    return packing.unpack(logprobs, mask), entropy


def packed_sequence_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """The mean next-token negative log-likelihood of the tokens whose label is not ``IGNORE_INDEX`` in
    right-padded ``[n, L]`` rows (transformers' causal-LM loss), on packed tokens: the padding is never
    computed, and no ``[tokens, V]`` logits exist at once."""
    rows = _Continuations(input_ids[:, :1], attention_mask[:, :1], input_ids[:, 1:], attention_mask[:, 1:])
    logprobs, _ = completion_logprobs(model, rows, 1.0, chunk_tokens, packed=True)
    scored = labels[:, 1:] != IGNORE_INDEX
    return -(logprobs * scored).sum() / scored.sum().clamp(min=1)


def _padded_forward(model: torch.nn.Module, micro: PromptsAndCompletions) -> torch.Tensor:
    """The model's output over each row's prompt then completion, ``[n, T + 1, ...]`` from the last
    prompt token on (the positions that predict completion tokens, and one more)."""
    input_ids = torch.cat([micro.prompt_ids, micro.completion_ids], dim=1)
    attention_mask = torch.cat([micro.prompt_mask, micro.completion_mask], dim=1)
    # Positions as in generation, where left padding does not advance them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=micro.completion_ids.shape[1] + 1, use_cache=False,
    ).logits  # fmt: skip


def _padded_completion_rows(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[C, ...]`` rows of :func:`_padded_forward`'s output (or of the hidden states it projects) that
    predict each real completion token, row by row as ``mask`` orders them."""
    return states[:, :-1][mask]
