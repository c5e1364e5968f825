"""Weighted sum of reward functions, each component kept for logging (TRL's ``rewards/<name>/mean|std``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

RewardFunction = Callable[..., Sequence[Optional[float]]]


class WeightedRewards:
    """``total = nansum_i(weight_i * f_i(completions, **columns))``; a ``None`` from a function abstains.

    Args:
        functions: name -> reward function with TRL's signature ``f(completions, **columns)``; the
            name is the metric key (``rewards/<name>/mean``).
        weights: name -> weight; names left out weigh 1.0.
    """

    def __init__(self, functions: Mapping[str, RewardFunction], weights: Optional[Mapping[str, float]] = None) -> None:
        if not functions:
            raise ValueError("WeightedRewards: `functions` is empty; configure at least one reward function.")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(functions))
        if unknown:
            raise ValueError(f"WeightedRewards: `weights` names {unknown}, which are not in `functions` {sorted(functions)}.")
        for name, function in functions.items():
            if not callable(function):
                raise TypeError(f"WeightedRewards: reward `{name}` is not callable: {function!r}.")
        self.functions = dict(functions)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.functions}

    def __call__(self, completions: Sequence[str], **columns: Any) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Returns ``(total [N] float32, {name: [N] floats with NaN for abstentions})``."""
        components: dict[str, list[float]] = {}
        for name, function in self.functions.items():
            values = list(function(completions=completions, **columns))
            if len(values) != len(completions):
                raise ValueError(f"Reward `{name}` returned {len(values)} values for {len(completions)} completions.")
            row = [math.nan if value is None else float(value) for value in values]
            if any(math.isinf(value) for value in row):
                raise ValueError(f"Reward `{name}` returned an infinite value; return None to abstain instead.")
            components[name] = row
        table = torch.tensor([components[name] for name in self.functions], dtype=torch.float32).reshape(
            len(self.functions), len(completions)
        )
        weights = torch.tensor([self.weights[name] for name in self.functions], dtype=torch.float32)
        total = torch.nansum(table * weights[:, None], dim=0)
        return total, components


def reward_statistics(components: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``rewards/<name>/std`` (NaN-ignoring, sample std as in TRL)."""
    stats: dict[str, float] = {}
    for name, values in components.items():
        kept = [value for value in values if not math.isnan(value)]
        mean = sum(kept) / len(kept) if kept else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else math.nan
        stats[f"rewards/{name}/mean"] = mean
        stats[f"rewards/{name}/std"] = std
    return stats
