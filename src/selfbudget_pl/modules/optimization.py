"""The optimizer and learning-rate schedule both modules train with: linear warmup, then cosine decay,
stepped once per optimizer step over the run's optimizer steps."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def training_progress(step: int, total_steps: float, steps_per_batch: int = 1) -> float:
    """Fraction of training done at optimizer step ``step`` of ``total_steps``, in [0, 1], as the reward's
    annealing reads it: a batch of rollouts is scored before its ``steps_per_batch`` optimizer steps, so the
    last batch is scored at 1. 0 when the run's length is unknown (``total_steps`` infinite)."""
    if not math.isfinite(total_steps) or total_steps <= 0:
        return 0.0
    return min(max(step / max(total_steps - steps_per_batch, 1.0), 0.0), 1.0)


def optimizer_and_schedule(
    params: Iterable[torch.nn.Parameter],
    optimizer: Callable[..., torch.optim.Optimizer],
    total_steps: float,
    warmup_steps: int,
    min_lr_ratio: float,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: ``optimizer`` (a partial) over ``params``, with the warmup +
    cosine schedule over ``total_steps`` optimizer steps."""
    if not math.isfinite(total_steps):
        raise ValueError(
            "The LR schedule needs the run's length: set trainer.max_steps, or trainer.max_epochs with a "
            "dataloader of known length."
        )
    built = optimizer(params=list(params))
    schedule = partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=int(total_steps), min_lr_ratio=min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(built, schedule)
    # "name": the tag LearningRateMonitor logs it under (else "lr-AdamW" at the top level).
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}
