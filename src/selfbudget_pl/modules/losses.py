"""The GRPO loss as pure functions: group-relative advantages, token log-probs, the clipped objective.

Nothing here knows about Lightning, models or rollouts, so each piece is tested on hand-made tensors.
Shapes: ``N`` completions, ``T`` completion positions (right-padded, ``mask`` marks real tokens),
``V`` vocabulary entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

Aggregation = Literal["token", "sequence", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = ("token", "sequence", "dr_grpo")
CORRECTION_LEVELS: tuple[str, ...] = ("token", "sequence")
CORRECTION_MODES: tuple[str, ...] = ("truncate", "mask")
CORRECTION_SWITCHES: tuple[Union[str, bool], ...] = ("auto", True, False)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion against the others sampled for the same prompt.

    Args:
        rewards: ``[N]``, ordered group by group (``group_size`` completions per prompt).
        group_size: completions per prompt (GRPO's G).
        scale_by_std: divide by the group's standard deviation (GRPO); False is Dr. GRPO, which
            keeps the raw centred reward so groups with little spread are not amplified.
        eps: added to the std so near-constant groups stay finite.

    Returns ``[N]`` float32; a group whose rewards are all equal gets 0 everywhere (no signal).
    """
    if group_size < 2:
        raise ValueError(f"num_generations={group_size}: GRPO needs at least 2 completions per prompt for a baseline")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    # Exactly zero, not mean-rounding noise divided by eps: these groups carry no signal.
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0).view(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Log-probability of each target token: ``[..., V]`` logits, ``[...]`` targets -> ``[...]`` float32.

    Equal to ``log_softmax(logits).gather(targets)`` but never materialises a float32 copy of the
    whole ``[N, T, V]`` tensor: the normaliser is a logsumexp over ``chunk_rows`` positions at a time.
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    rows = logits.reshape(-1, logits.shape[-1]).split(chunk_rows)
    normaliser = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in rows])
    return picked - normaliser.view_as(picked)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy (nats) of the categorical at each position: ``[..., V]`` -> ``[...]`` float32.

    Chunked over positions for the same memory reason as :func:`token_logprobs`.
    """
    entropies = []
    for chunk in logits.reshape(-1, logits.shape[-1]).split(chunk_rows):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(entropies).view(logits.shape[:-1])


@dataclass
class PolicyLoss:
    """The scalar to backpropagate and what to log about it (detached token means)."""

    loss: torch.Tensor
    clip_low: torch.Tensor  # tokens whose ratio fell under 1 - eps_low with a negative advantage
    clip_high: torch.Tensor  # tokens whose ratio rose over 1 + eps_high with a positive advantage
    clip_region: torch.Tensor  # either of the two: the tokens that got no gradient
    kl: Optional[torch.Tensor]  # k3 estimate of KL(policy || reference), when a reference is given


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "token",
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    max_length: Optional[int] = None,
    normaliser: Optional[float] = None,
    sampler_weights: Optional[torch.Tensor] = None,
) -> PolicyLoss:
    """The clipped GRPO surrogate (PPO ratio, one advantage per completion), optionally + beta * KL.

    Args:
        logprobs: ``[N, T]`` current policy log-probs of the sampled tokens (with grad).
        old_logprobs: ``[N, T]`` log-probs under the policy that sampled them (detached). With a single
            update per rollout batch pass ``logprobs.detach()``: the ratio is 1 and the gradient is the
            plain policy gradient.
        advantages: ``[N]``, from :func:`group_advantages`.
        mask: ``[N, T]`` 1 for completion tokens, 0 for padding.
        eps_low / eps_high: the clip range ``[1 - eps_low, 1 + eps_high]`` (DAPO's clip-higher when
            ``eps_high > eps_low``).
        aggregation: how token losses become one number. ``token``: mean over every token of the
            batch (DAPO; long completions weigh more). ``sequence``: mean over completions of each
            completion's token mean (original GRPO; biased towards short wrong answers).
            ``dr_grpo``: token sum divided by a constant ``max_length`` per completion (Dr. GRPO; unbiased).
        ref_logprobs / beta: reference-policy log-probs and the KL coefficient (k3 estimator).
        max_length: the constant of ``dr_grpo`` (the generation ceiling); defaults to ``T``.
        normaliser: what the summed loss is divided by. Defaults to this batch's own count (tokens for
            ``token``, completions otherwise); pass the whole mini-batch's count when accumulating
            gradients over micro-batches, so their sum equals the loss of the mini-batch in one piece.
        sampler_weights: ``[N, T]`` importance weights for a sampler other than the trainer
            (:func:`sampler_weights`), multiplying each token's loss, KL term included (as TRL does); the
            normaliser is unchanged, so a masked token counts in it but adds nothing.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    # Log-ratios are zeroed at padding before exp(): padding log-probs can be anything (-1e3 from a
    # trained model, 0 where a cache was never filled), and inf * 0 would be NaN.
    real = mask.bool()
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(torch.where(real, logprobs - old_logprobs, 0.0))
    advantages = advantages.to(logprobs.dtype).unsqueeze(1)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.min(unclipped, clipped)

    kl = None
    if ref_logprobs is not None:
        log_ratio_ref = torch.where(real, ref_logprobs - logprobs, 0.0)
        per_token_kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        if beta:
            per_token = per_token + beta * per_token_kl
        kl = _masked_mean(per_token_kl.detach(), mask)
    if sampler_weights is not None:
        per_token = per_token * sampler_weights.to(per_token.dtype)

    if aggregation == "token":
        total = (per_token * mask).sum()
        denominator = normaliser if normaliser is not None else mask.sum().clamp(min=1.0)
    elif aggregation == "sequence":
        total = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).sum()
        denominator = normaliser if normaliser is not None else logprobs.shape[0]
    else:
        total = (per_token * mask).sum() / (max_length if max_length is not None else logprobs.shape[1])
        denominator = normaliser if normaliser is not None else logprobs.shape[0]

    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (advantages < 0)
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
        clip_low, clip_high, clip_region = (_masked_mean(flag.to(mask.dtype), mask) for flag in (low, high, low | high))
    return PolicyLoss(total / denominator, clip_low, clip_high, clip_region, kl)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class SamplerCorrection:
    """How the loss corrects for a sampler whose log-probs differ from the trainer's (another engine, other
    kernels, another dtype): each token's loss is weighted by ``pi_trainer / pi_sampler`` of its token
    (``level="token"``) or of its whole completion (``"sequence"``, the product over its tokens), and a
    ratio above ``cap`` is cut to ``cap`` (``mode="truncate"``, TIS) or drops its tokens from the loss
    (``"mask"``). ``enabled="auto"``: on for a backend that samples from its own copy of the weights."""

    enabled: Union[str, bool] = "auto"
    level: str = "sequence"
    mode: str = "mask"
    cap: float = 3.0

    def __post_init__(self) -> None:
        known = (self.enabled in CORRECTION_SWITCHES, self.level in CORRECTION_LEVELS, self.mode in CORRECTION_MODES)
        if not all(known):
            raise ValueError(
                f"sampler correction enabled={self.enabled!r}, level={self.level!r}, mode={self.mode!r}: enabled is one "
                f"of {CORRECTION_SWITCHES}, level of {CORRECTION_LEVELS}, mode of {CORRECTION_MODES}"
            )
        if not self.cap > 0:
            raise ValueError(f"sampler correction cap={self.cap} must be > 0")


@dataclass
class SamplerWeights:
    """Importance weights for the sampler/trainer mismatch, and what to log about them (detached)."""

    weights: torch.Tensor  # [N, T], 0 at padding and at masked tokens
    logprob_gap: torch.Tensor  # mean |trainer - sampler| log-prob over real tokens (TRL's sampling_logp_difference)
    ratio_mean: torch.Tensor  # mean ratio over tokens (token level) or completions (sequence level), before the cap
    ratio_max: torch.Tensor
    capped: torch.Tensor  # share of those ratios above the cap (truncated or masked)


def sampler_weights(
    trainer_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    correction: SamplerCorrection,
) -> SamplerWeights:
    """Weights ``[N, T]`` that turn the loss on the sampler's tokens into an estimate under the trainer's
    policy (TRL's ``vllm_importance_sampling_correction``, verl's ``rollout_correction``).

    Args:
        trainer_logprobs: ``[N, T]`` log-probs of the sampled tokens under the weights that sampled them, as
            the trainer computes them (detached).
        sampler_logprobs: ``[N, T]`` the same tokens' log-probs as the sampler reported them.
        mask: ``[N, T]`` 1 for completion tokens.
        correction: level, truncate or mask, and the cap.
    """
    real = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(real, trainer_logprobs.float() - sampler_logprobs.float(), 0.0)
        if correction.level == "sequence":
            log_ratio = log_ratio.sum(dim=1, keepdim=True)
            units = real.any(dim=1, keepdim=True)
        else:
            units = real
        # exp() of a large sum overflows to inf; the cap decides anyway, so clamp first (1e4 > any cap).
        ratio = torch.exp(log_ratio.clamp(max=math.log(1e4)))
        above = ratio > correction.cap
        kept = torch.where(above, 0.0, ratio) if correction.mode == "mask" else ratio.clamp(max=correction.cap)
        weights = kept.expand_as(trainer_logprobs) * real
        counted = ratio[units.expand_as(ratio)]
        gap = (trainer_logprobs.float() - sampler_logprobs.float()).abs()[real]
        empty = torch.zeros((), device=trainer_logprobs.device)
        return SamplerWeights(
            weights=weights,
            logprob_gap=gap.mean() if gap.numel() else empty,
            ratio_mean=counted.mean() if counted.numel() else empty,
            ratio_max=counted.max() if counted.numel() else empty,
            capped=above[units.expand_as(above)].float().mean() if counted.numel() else empty,
        )
