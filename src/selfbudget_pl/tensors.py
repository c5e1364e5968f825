"""Token-id tensors for batches, rollouts and the packed forward: padding id sequences, and finding the rows
that repeat the one above (GRPO's G samples of one prompt sit in consecutive rows)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pad(
    sequences: Sequence[Sequence[int] | np.ndarray], value: int, left: bool = False, min_width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence (at least ``min_width``); returns ``(ids, attention_mask)`` as long
    tensors [B, T]. Used for batches, rollout prompts and GRPO experience alike."""
    width = max(min_width, max((len(sequence) for sequence in sequences), default=0))
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            continue
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def repeats_row_above(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: row i has the same ids and mask as row i - 1 (GRPO's G samples of one prompt sit
    in consecutive rows; the sampler and the packed forward compute such a prompt once)."""
    repeats = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    repeats[1:] = (ids[1:] == ids[:-1]).all(1) & (mask[1:] == mask[:-1]).all(1)
    return repeats
