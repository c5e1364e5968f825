"""The HF sampler's own log-probs (both decoders): recorded only when asked, and equal to the trainer's
recomputed ones on the same weights, stop tokens included; GRPO's sampler correction then runs on rollout=hf."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.rollout.base import Rollouts, SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend

from .test_grpo import EVEN_FIRST_TOKEN, PROMPTS, FirstTokenReward, _loader, _module, _trainer
from .test_grpo import sharp_loader  # noqa: F401  (the fixture)

SAMPLING = dict(temperature=0.7, max_new_tokens=10, seed=3)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]


def _module_and_backend(loader, decoder: str) -> tuple[GRPOModule, HFRolloutBackend]:
    module = GRPOModule(
        model_loader=loader, optimizer=functools.partial(torch.optim.AdamW), num_generations=4, sampling=SAMPLING
    )
    module.configure_model()
    backend = HFRolloutBackend(module.model, module.tokenizer, decoder=decoder)
    # One token in 23 ends a completion: some end on a stop token the sampler drew, some at the length limit.
    backend.eos_token_ids = list(range(5, module.model.config.vocab_size, 23))
    return module, backend


@pytest.mark.parametrize("decoder", ["fused", "generate"])
def test_recorded_log_probs_equal_the_trainers_stop_tokens_included(sharp_loader, prompt_ids, decoder):
    module, backend = _module_and_backend(sharp_loader, decoder)
    rollouts = backend.generate(prompt_ids, 4, SamplingSettings(**SAMPLING, logprobs=True))
    stops = [stop for stop in rollouts.stop_token_ids if stop is not None]
    assert 0 < len(stops) < len(rollouts)  # both endings are exercised
    assert [len(row) for row in rollouts.sampler_logprobs] == [len(rollouts.sampled_ids(i)) for i in range(16)]
    experience = module.make_experience(rollouts, torch.zeros(len(rollouts)))
    mask = experience.completion_mask.bool()
    trainer = module.score_completions(module.model, experience)  # at the sampling temperature
    torch.testing.assert_close(experience.sampler_logprobs[mask], trainer[mask], atol=1e-4, rtol=0)
    assert float(experience.sampler_logprobs[mask].max()) < 0.0  # real log-probs, not zeros


@pytest.mark.parametrize("decoder", ["fused", "generate"])
def test_log_probs_are_recorded_only_when_asked_and_do_not_change_the_samples(sharp_loader, prompt_ids, decoder):
    _, backend = _module_and_backend(sharp_loader, decoder)
    plain = backend.generate(prompt_ids, 4, SamplingSettings(**SAMPLING))
    recorded = backend.generate(prompt_ids, 4, SamplingSettings(**SAMPLING, logprobs=True))
    assert plain.sampler_logprobs == []
    assert recorded.completion_ids == plain.completion_ids and recorded.stop_token_ids == plain.stop_token_ids


@pytest.mark.parametrize("decoder", ["fused", "generate"])
def test_top_k_is_part_of_the_recorded_distribution(sharp_loader, prompt_ids, decoder):
    # Under top-k the drawn token's probability is renormalised over the k kept tokens: never below the
    # temperature-only probability the trainer scores, and above it wherever the cut tokens had mass.
    module, backend = _module_and_backend(sharp_loader, decoder)
    rollouts = backend.generate(prompt_ids, 4, SamplingSettings(**SAMPLING, top_k=5, logprobs=True))
    experience = module.make_experience(rollouts, torch.zeros(len(rollouts)))
    mask = experience.completion_mask.bool()
    recorded, trainer = experience.sampler_logprobs[mask], module.score_completions(module.model, experience)[mask]
    assert bool((recorded >= trainer - 1e-4).all()) and bool((recorded > trainer + 1e-3).any())


def test_the_correction_forced_on_trains_with_rollout_hf(sharp_loader, prompt_ids):
    module = _module(sharp_loader, sampler_correction=dict(enabled=True), rollout=None)
    trainer = _trainer(1, [FirstTokenReward(EVEN_FIRST_TOKEN)])
    trainer.fit(module, train_dataloaders=_loader(prompt_ids, 2))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("sampling/")}
    # The sampler is the trainer's own model: the ratio is 1 up to float rounding, nothing masked.
    assert metrics["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3), metrics
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(1.0, abs=1e-3), metrics
    assert abs(metrics["sampling/sampling_logp_difference/mean"]) < 1e-4 and metrics["sampling/capped_fraction"] == 0.0


class NoLogprobsBackend(HFRolloutBackend):
    """A sampler that records no log-probs, whatever the call asks (as a backend without them would)."""

    def sample(self, contexts: list[list[int]], num_samples: int, sampling: SamplingSettings) -> Rollouts:
        return super().sample(contexts, num_samples, replace(sampling, logprobs=False))


def test_a_correction_without_the_samplers_log_probs_is_still_refused(sharp_loader, prompt_ids):
    module = _module(sharp_loader, sampler_correction=dict(enabled=True), rollout=NoLogprobsBackend)
    with pytest.raises(ValueError, match="module.sampler_correction is on but the rollout backend"):
        _trainer(1, [FirstTokenReward(EVEN_FIRST_TOKEN)]).fit(module, train_dataloaders=_loader(prompt_ids, 2))
