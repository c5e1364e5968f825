"""The GRPO loss pieces on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from selfbudget_pl.modules.losses import (
    SamplerCorrection, entropy_from_logits, group_advantages, policy_loss, sampler_weights, token_logprobs,
)


def test_group_advantages_match_hand_computed_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(rewards, group_size=4, eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = torch.tensor([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)


def test_dr_grpo_advantages_are_only_centred():
    rewards = torch.tensor([3.0, 1.0, 5.0, 5.0])
    torch.testing.assert_close(group_advantages(rewards, 2, scale_by_std=False), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_zero_variance_groups_give_zero_advantage_with_scaling():
    rewards = torch.tensor([0.7, 0.7, 0.7, -1.0, -1.0, -1.0])
    assert torch.equal(group_advantages(rewards, 3), torch.zeros(6))


def test_group_advantages_reject_bad_group_sizes():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(3), 1)


def test_token_logprobs_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 5))
    logp = torch.log_softmax(logits, dim=-1)
    expected = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    torch.testing.assert_close(token_logprobs(logits, targets, chunk_rows=4), expected)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=4), (-(logp.exp() * logp).sum(-1)).float())


def test_token_logprobs_gradient_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 4))
    token_logprobs(logits, targets, chunk_rows=3).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def _rollout_tensors(seed: int = 0):
    torch.manual_seed(seed)
    logits = torch.randn(4, 6, 9, requires_grad=True)
    targets = torch.randint(0, 9, (4, 6))
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])
    return logits, targets, mask, advantages


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_single_iteration_loss_gradient_is_the_policy_gradient(aggregation):
    logits, targets, mask, advantages = _rollout_tensors()
    logprobs = token_logprobs(logits, targets)
    policy_loss(logprobs, logprobs.detach(), advantages, mask, aggregation=aggregation).loss.backward()
    clipped_grad = logits.grad.clone()

    logits.grad = None
    logprobs = token_logprobs(logits, targets)
    weighted = -(logprobs * advantages[:, None] * mask)
    if aggregation == "token":
        plain = weighted.sum() / mask.sum()
    elif aggregation == "sequence":
        plain = (weighted.sum(1) / mask.sum(1)).mean()
    else:
        plain = weighted.sum() / (mask.shape[0] * mask.shape[1])
    plain.backward()
    torch.testing.assert_close(clipped_grad, logits.grad)


def test_clipping_stops_gradient_only_where_the_ratio_left_the_trust_region():
    old = torch.zeros(1, 4)
    # ratios 0.5, 0.9, 1.1, 1.5 with eps 0.2: the outer two are outside [0.8, 1.2]
    logprobs = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]])).requires_grad_()
    mask = torch.ones(1, 4)

    positive = policy_loss(logprobs, old, torch.tensor([1.0]), mask)
    positive.loss.backward()
    # With A > 0 only the ratio above 1 + eps is clipped (no incentive to push it higher).
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[0.5, 0.9, 1.1, 0.0]]) / 4)
    assert positive.clip_high.item() == pytest.approx(0.25)
    assert positive.clip_low.item() == 0.0

    logprobs.grad = None
    negative = policy_loss(logprobs, old, torch.tensor([-1.0]), mask)
    negative.loss.backward()
    # With A < 0 only the ratio below 1 - eps is clipped.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.9, 1.1, 1.5]]) / 4)
    assert negative.clip_low.item() == pytest.approx(0.25)
    assert negative.clip_high.item() == 0.0
    assert negative.clip_region.item() == pytest.approx(0.25)


def test_clip_higher_widens_only_the_upper_bound():
    old = torch.zeros(1, 2)
    logprobs = torch.log(torch.tensor([[1.25, 0.75]]))
    narrow = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2)
    wide = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.28)
    assert narrow.clip_high.item() == pytest.approx(0.5)
    assert wide.clip_high.item() == 0.0
    # -(min(1.2, 1.25) + min(0.8, 0.75)) / 2 vs -(1.25 + 0.75) / 2
    assert narrow.loss.item() == pytest.approx(-(1.2 + 0.75) / 2)
    assert wide.loss.item() == pytest.approx(-1.0)


def test_aggregations_weigh_completions_as_documented():
    # Two completions with per-token loss 1 (ratio 1, advantage -1): lengths 1 and 3, ceiling 4.
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([-1.0, -1.0])
    weights = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # per-token loss 2 in the short one
    logprobs = torch.log(weights.clamp(min=1e-9))
    old = torch.zeros(2, 3)
    wide = dict(eps_low=10.0, eps_high=10.0)
    token = policy_loss(logprobs, old, advantages, mask, aggregation="token", **wide).loss
    sequence = policy_loss(logprobs, old, advantages, mask, aggregation="sequence", **wide).loss
    dr_grpo = policy_loss(logprobs, old, advantages, mask, aggregation="dr_grpo", max_length=4, **wide).loss
    assert token.item() == pytest.approx((2 + 3) / 4)
    assert sequence.item() == pytest.approx((2 / 1 + 3 / 3) / 2)
    assert dr_grpo.item() == pytest.approx((2 + 3) / 4 / 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_micro_batches_with_a_shared_normaliser_sum_to_the_full_batch(aggregation):
    logits, targets, mask, advantages = _rollout_tensors(seed=1)
    logprobs = token_logprobs(logits, targets).detach()
    old = logprobs + 0.1 * torch.randn_like(logprobs)
    full = policy_loss(logprobs, old, advantages, mask, aggregation=aggregation).loss
    normaliser = mask.sum().item() if aggregation == "token" else float(mask.shape[0])
    parts = [
        policy_loss(logprobs[s], old[s], advantages[s], mask[s], aggregation=aggregation, normaliser=normaliser,
                    max_length=mask.shape[1]).loss
        for s in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(sum(parts), full)


def test_kl_penalty_is_k3_and_enters_the_loss_with_beta():
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.ones(1, 2)
    k3 = (0.5 - math.log(0.5) - 1.0 + 0.0) / 2  # exp(ref - lp) - (ref - lp) - 1 per token, then mean
    without = policy_loss(logprobs, logprobs, torch.tensor([1.0]), mask, ref_logprobs=ref, beta=0.0)
    with_beta = policy_loss(logprobs, logprobs, torch.tensor([1.0]), mask, ref_logprobs=ref, beta=0.1)
    assert without.kl.item() == pytest.approx(k3)
    assert with_beta.loss.item() == pytest.approx(without.loss.item() + 0.1 * k3)
    assert policy_loss(logprobs, logprobs, torch.tensor([1.0]), mask).kl is None


def test_padding_with_extreme_log_probs_cannot_poison_the_loss():
    logprobs = torch.tensor([[-1.0, -500.0]], requires_grad=True)  # position 1 is padding
    old = torch.tensor([[-1.0, 0.0]])
    ref = torch.tensor([[-1.2, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    result = policy_loss(logprobs, old, torch.tensor([1.0]), mask, ref_logprobs=ref, beta=0.1)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(result.kl)
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0.0


def test_unknown_aggregation_is_named_in_the_error():
    with pytest.raises(ValueError, match="'mean'"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), aggregation="mean")


# -- the sampler correction: weights for a sampler whose log-probs are not the trainer's -------------------

# Two completions: 3 tokens and 2 tokens (then padding). Trainer minus sampler log-probs per token:
TRAINER = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
GAPS = torch.tensor([[0.5, 0.2, 0.1, 0.0], [-0.3, 0.1, 0.0, 0.0]])
SAMPLER = TRAINER - GAPS + torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 9.0, 9.0]])  # padding differs: ignored
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_sequence_level_weights_are_the_completions_ratio_cut_or_masked_at_the_cap(mode):
    correction = SamplerCorrection(enabled=True, level="sequence", mode=mode, cap=2.0)
    result = sampler_weights(TRAINER, SAMPLER, MASK, correction)
    first, second = math.exp(0.8), math.exp(-0.2)  # exp(0.5 + 0.2 + 0.1) > cap, exp(-0.3 + 0.1) < cap
    kept = 2.0 if mode == "truncate" else 0.0
    expected = torch.tensor([[kept, kept, kept, 0.0], [second, second, 0.0, 0.0]])
    torch.testing.assert_close(result.weights, expected)
    assert float(result.ratio_mean) == pytest.approx((first + second) / 2)
    assert float(result.ratio_max) == pytest.approx(first)
    assert float(result.capped) == pytest.approx(0.5)
    assert float(result.logprob_gap) == pytest.approx((0.5 + 0.2 + 0.1 + 0.3 + 0.1) / 5)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_token_level_weights_are_each_tokens_ratio(mode):
    result = sampler_weights(TRAINER, SAMPLER, MASK, SamplerCorrection(level="token", mode=mode, cap=1.5))
    ratios = torch.exp(GAPS) * MASK
    over = math.exp(0.5)  # the only token ratio above 1.5
    expected = ratios.clone()
    expected[0, 0] = 1.5 if mode == "truncate" else 0.0
    torch.testing.assert_close(result.weights, expected)
    assert float(result.ratio_max) == pytest.approx(over)
    assert float(result.capped) == pytest.approx(1 / 5)
    assert float(result.ratio_mean) == pytest.approx(float(ratios.sum()) / 5)


def test_a_huge_sequence_gap_masks_without_overflow():
    trainer = torch.zeros(1, 4000)
    result = sampler_weights(trainer, trainer - 0.5, torch.ones(1, 4000), SamplerCorrection(cap=3.0))
    assert torch.isfinite(result.ratio_max) and float(result.weights.abs().sum()) == 0.0


def test_sampler_weights_scale_each_tokens_loss_with_the_normaliser_unchanged():
    logprobs = TRAINER.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    weights = sampler_weights(TRAINER, SAMPLER, MASK, SamplerCorrection(level="token", mode="truncate", cap=1.5)).weights
    plain = policy_loss(logprobs, TRAINER, advantages, MASK)
    weighted = policy_loss(logprobs, TRAINER, advantages, MASK, sampler_weights=weights)
    (grad_plain,) = torch.autograd.grad(plain.loss, logprobs)
    (grad_weighted,) = torch.autograd.grad(weighted.loss, logprobs)
    # On-policy the per-token gradient is -A / tokens; the weight multiplies it, the 5 tokens still divide it.
    torch.testing.assert_close(grad_weighted, grad_plain * weights)
    torch.testing.assert_close(grad_plain, -advantages[:, None] * MASK / 5)


def test_a_correction_setting_outside_its_choices_is_named():
    with pytest.raises(ValueError, match="level='sentence'"):
        SamplerCorrection(level="sentence")
    with pytest.raises(ValueError, match="cap=0"):
        SamplerCorrection(cap=0)
