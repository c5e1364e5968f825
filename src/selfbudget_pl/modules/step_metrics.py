"""What a GRPO step logs: TRL's rollout and update statistics under their TensorBoard names, and the
token-weighted accumulation of the update's statistics over micro-batches."""

from __future__ import annotations

from typing import Optional

import torch

from selfbudget_pl.callbacks.reward import Scores
from selfbudget_pl.modules.experience import Experience
from selfbudget_pl.modules.losses import PolicyLoss, SamplerWeights
from selfbudget_pl.rollout.base import Rollouts

# Logged with these reductions over ranks (every other metric is the mean over ranks).
SAMPLER_RATIO_MAX = "sampling/importance_sampling_ratio/max"  # logged when the sampler correction is on
EXTREME_METRICS = {"min": ("completions/min_length",), "max": ("completions/max_length", SAMPLER_RATIO_MAX)}


def rollout_metrics(rollouts: Rollouts, scores: Scores, group_size: int) -> dict[str, float]:
    """What TRL logs about a batch of rollouts, plus counts of dead weight (``rollout/unfinished``: cut
    off or solution block never closed, so scored as malformed). TRL's ``completions/*`` keep their
    names; its ``reward``, ``reward_std`` and ``frac_reward_zero_std`` join the per-function
    ``rewards/<name>/*`` as ``rewards/mean``, ``rewards/std`` and ``rewards/frac_zero_std``."""
    rewards = scores.rewards.float().view(-1, group_size)
    lengths = torch.tensor([len(rollouts.sampled_ids(index)) for index in range(len(rollouts))], dtype=torch.float32)
    zero_std = (rewards == rewards[:, :1]).all(dim=1)
    metrics = {
        "rewards/mean": float(rewards.mean()),
        "rewards/std": float(rewards.std(dim=1).mean()),
        "rewards/frac_zero_std": float(zero_std.float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": sum(rollouts.truncated) / len(rollouts),
        "rollout/prefilled_fraction": sum(rollouts.columns.get("prefilled", [])) / len(rollouts),
        "rollout/tokens_per_s": rollouts.num_generated_tokens / max(rollouts.generation_seconds, 1e-9),
    }
    if scores.annotations is not None:
        metrics["rollout/unfinished"] = float(sum(not done for done in scores.annotations.finished))
    return metrics


def update_metrics(stats: dict[str, float]) -> dict[str, float]:
    """The policy update's statistics under logged names: TRL's grouped ``clip_ratio/*`` as they are, the
    rest (``loss``, ``kl``, ``entropy``) under ``train/``."""
    return {name if "/" in name else f"train/{name}": value for name, value in stats.items()}


def accumulate(
    totals: dict[str, float],
    micro: Experience,
    loss: PolicyLoss,
    entropy: Optional[torch.Tensor],
    weights: Optional[SamplerWeights] = None,
) -> None:
    """Add one micro-batch's loss and per-token statistics (weighted by its tokens) to ``totals``; with the
    sampler correction, TRL's ``sampling/*`` (the log-prob gap, the ratio's mean and max) and the share of
    ratios above the cap."""
    tokens = float(micro.completion_mask.sum())
    totals["loss"] += float(loss.loss.detach())
    totals["completion_tokens"] += tokens
    totals["tokens"] += micro.num_tokens
    totals["clip_ratio/low_mean"] += float(loss.clip_low) * tokens
    totals["clip_ratio/high_mean"] += float(loss.clip_high) * tokens
    totals["clip_ratio/region_mean"] += float(loss.clip_region) * tokens
    if loss.kl is not None:
        totals["kl"] += float(loss.kl) * tokens
    if entropy is not None:
        totals["entropy"] += float(entropy)
    if weights is not None:
        totals["sampling/sampling_logp_difference/mean"] += float(weights.logprob_gap) * tokens
        totals["sampling/importance_sampling_ratio/mean"] += float(weights.ratio_mean) * tokens
        totals["sampling/capped_fraction"] += float(weights.capped) * tokens
        totals[SAMPLER_RATIO_MAX] = max(totals.get(SAMPLER_RATIO_MAX, 0.0), float(weights.ratio_max))


def token_means(totals: dict[str, float], optimizer_steps: int) -> dict[str, float]:
    """Token-weighted means of the per-token stats; the loss averaged over optimizer steps."""
    tokens = max(totals.pop("completion_tokens"), 1.0)
    kept = ("loss", "tokens", SAMPLER_RATIO_MAX)
    stats = {name: value / tokens for name, value in totals.items() if name not in kept}
    if SAMPLER_RATIO_MAX in totals:
        stats[SAMPLER_RATIO_MAX] = totals[SAMPLER_RATIO_MAX]
    stats["loss"] = totals["loss"] / optimizer_steps
    stats["tokens"] = totals["tokens"]
    return stats
