"""HFRolloutBackend on the tiny model: grouping, prefill, ceiling, stops, determinism, padding, LoRA."""

from __future__ import annotations

import pytest
import torch

from selfbudget_pl.models import LoraSettings, apply_lora
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.base import repeat_columns
from selfbudget_pl.rollout.hf import HFRolloutBackend

from .conftest import randomize_lora_b, sharpen


@pytest.fixture(scope="module")
def model(model_loader):
    return sharpen(model_loader.load_model())


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["the sum of 3+4", "how many", "what is the total cost of 12+30+7 so"]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def test_shapes_grouping_and_columns(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer, batch_size=4)  # 9 sequences: batches of 4, 4, 1
    columns = {"id": ["a", "b", "c"], "b_max": [10, 20, 30]}
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=6, seed=0)
    rollouts = backend.generate(prompts, 3, sampling, columns=columns)
    assert len(rollouts) == 9
    assert rollouts.group_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rollouts.prompt_ids == [p for p in prompts for _ in range(3)]
    assert rollouts.columns == {"id": list("aaabbbccc"), "b_max": [10] * 3 + [20] * 3 + [30] * 3, "prefilled": [False] * 9}
    assert all(len(ids) <= 6 for ids in rollouts.completion_ids)
    assert rollouts.generation_seconds > 0
    for ids, text, truncated in zip(rollouts.completion_ids, rollouts.completions, rollouts.truncated):
        assert text == tokenizer.decode(ids, skip_special_tokens=False)
        assert tokenizer.eos_token_id not in ids
        assert truncated == (len(ids) == 6)


def test_columns_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match="'id' has 2 values for 3 prompts"):
        repeat_columns({"id": [1, 2]}, num_prompts=3, num_samples=2)


def test_prefill_starts_every_completion_and_conditions_the_model(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    prefill = "<budget>12</budget><solution>"
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=5)
    rollouts = backend.generate(prompts, 2, sampling, prefill=prefill)
    prefill_ids = tokenizer.encode(prefill, add_special_tokens=False)
    assert all(text.startswith(prefill) for text in rollouts.completions)
    assert all(ids[-len(prefill_ids) :] == prefill_ids for ids in rollouts.prompt_ids)
    # The same tokens come out when the prefill is written into the prompt by hand.
    by_hand = backend.generate([p + prefill_ids for p in prompts], 2, sampling)
    assert by_hand.completion_ids == rollouts.completion_ids


def test_prefill_per_prompt_is_encoded_once_for_every_backend(model, tokenizer, prompts):
    """GRPO pre-fills some prompts and not others: one list, one place that encodes it (RolloutBackend)."""
    backend = HFRolloutBackend(model, tokenizer)
    prefills = ["<budget>7</budget><solution>", None, "<budget>30</budget><solution>"]
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=4)
    rollouts = backend.generate(prompts, 2, sampling, prefill=prefills)
    assert rollouts.columns["prefilled"] == [True, True, False, False, True, True]
    for index, group in enumerate(rollouts.group_index):
        prefix = prefills[group] or ""
        assert rollouts.completions[index].startswith(prefix)
        assert rollouts.prompt_ids[index] == prompts[group] + tokenizer.encode(prefix, add_special_tokens=False)
    assert rollouts.completions[2] == tokenizer.decode(rollouts.completion_ids[2], skip_special_tokens=False)
    with pytest.raises(ValueError, match="2 prefills for 3 prompts x 1 samples: give one per prompt"):
        backend.generate(prompts, 1, sampling, prefill=prefills[:2])


@pytest.mark.parametrize("decoder", ["generate", "fused"])
def test_prefill_per_completion_conditions_each_completion_on_its_own(model, tokenizer, prompts, decoder):
    """One prefix per completion (GRPO's ``prefill_draw=completion``): each completion is conditioned on, and
    its text starts with, its own, and greedy decoding from it equals decoding that context alone (the fused
    decoder shares one prompt pass per run of identical rows: rows of a group now differ)."""
    backend = HFRolloutBackend(model, tokenizer, decoder=decoder)
    prefills = ["<budget>7</budget><solution>", "<budget>300</budget><solution>", None, None,
                "<budget>12</budget><solution>", ""]  # fmt: skip
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=4)
    rollouts = backend.generate(prompts, 2, sampling, prefill=prefills)
    assert rollouts.columns["prefilled"] == [True, True, False, False, True, False]
    for index, prefix in enumerate(prefills):
        prefix_ids = tokenizer.encode(prefix or "", add_special_tokens=False)
        assert rollouts.prompt_ids[index] == prompts[index // 2] + prefix_ids
        assert rollouts.completions[index].startswith(prefix or "")
        alone = backend.generate([rollouts.prompt_ids[index]], 1, sampling)
        assert alone.completion_ids[0] == rollouts.completion_ids[index]
    with pytest.raises(ValueError, match="5 prefills for 3 prompts x 2 samples"):
        backend.generate(prompts, 2, sampling, prefill=prefills[:5])


def test_max_new_tokens_is_a_hard_ceiling(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    for max_new_tokens in (1, 7):
        sampling = SamplingSettings(temperature=1.5, max_new_tokens=max_new_tokens, seed=1)
        rollouts = backend.generate(prompts, 4, sampling)
        assert max(len(ids) for ids in rollouts.completion_ids) <= max_new_tokens
        # An untrained model almost never emits EOS: most completions hit the ceiling.
        assert any(rollouts.truncated)


def test_greedy_is_deterministic_and_seeds_reproduce_sampling(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    first = backend.generate(prompts, 2, greedy)
    assert backend.generate(prompts, 2, greedy).completion_ids == first.completion_ids
    assert all(first.completion_ids[i] == first.completion_ids[i + 1] for i in range(0, 6, 2))

    sampled = [
        backend.generate(prompts, 2, SamplingSettings(temperature=1.0, max_new_tokens=8, seed=seed)) for seed in (3, 3, 4)
    ]
    assert sampled[0].completion_ids == sampled[1].completion_ids
    assert sampled[0].completion_ids != sampled[2].completion_ids


def test_seeded_sampling_leaves_the_global_rng_alone(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    backend.generate(prompts, 2, SamplingSettings(temperature=1.0, max_new_tokens=4, seed=9))
    assert torch.equal(torch.rand(3), expected)


def test_left_padding_matches_unpadded_single_prompt_greedy(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
    batched = backend.generate(prompts, 1, greedy).completion_ids
    alone = [backend.generate([prompt], 1, greedy).completion_ids[0] for prompt in prompts]
    assert batched == alone


def test_stop_string_cuts_right_after_it(model, tokenizer, prompts):
    backend = HFRolloutBackend(model, tokenizer)
    greedy = dict(temperature=0.0, max_new_tokens=16)
    ids = backend.generate(prompts[:1], 1, SamplingSettings(**greedy)).completion_ids[0]
    text_of = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=False)  # noqa: E731
    # Stop on the text of a generated token that is whole characters and has not occurred before it.
    cut = next(
        k + 1
        for k in range(1, len(ids) - 1)
        if "\ufffd" not in text_of(ids[k : k + 1]) and text_of(ids[k : k + 1]) not in text_of(ids[:k])
    )
    stop = text_of(ids[cut - 1 : cut])
    stopped = backend.generate(prompts[:1], 1, SamplingSettings(**greedy, stop=[stop]))
    assert stopped.completion_ids[0] == ids[:cut]
    assert stopped.completions[0].endswith(stop)
    assert stopped.truncated == [False]
    assert stopped.finish_reasons == ["stop"] and stopped.stop_token_ids == [None]
    assert stopped.sampled_ids(0) == ids[:cut]  # the loss scores exactly the sampled tokens
    # Beside a row that runs on, the stopped row is padded after its stop string (the pad id may be an
    # EOS id): it still ended by its stop string, with no stop token drawn.
    both = backend.generate([prompts[0], prompts[2]], 1, SamplingSettings(**greedy, stop=[stop]))
    assert both.completion_ids[0] == ids[:cut]
    assert both.finish_reasons[0] == "stop" and both.stop_token_ids[0] is None


def test_a_stop_token_ends_a_completion_and_travels_beside_it(model, tokenizer, prompts):
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    free = HFRolloutBackend(model, tokenizer).generate(prompts[:1], 1, greedy).completion_ids[0]
    # Declare the 3rd greedy token an end-of-turn token, as chat checkpoints list several EOS ids.
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[2]]
    try:
        backend = HFRolloutBackend(model, tokenizer)
    finally:
        model.generation_config.eos_token_id = original
    rollouts = backend.generate(prompts[:1], 1, greedy)
    first = free.index(free[2])
    assert rollouts.completion_ids == [free[:first]]
    assert rollouts.truncated == [False]
    # The stop token that was drawn (not the tokenizer's EOS, not the pad id) travels with the rollout.
    assert free[2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert rollouts.finish_reasons == ["eos"] and rollouts.stop_token_ids == [free[2]]
    assert rollouts.sampled_ids(0) == free[: first + 1]


def test_restores_train_mode_and_keeps_gradients_off(model, tokenizer, prompts):
    model.train()
    HFRolloutBackend(model, tokenizer).generate(prompts, 1, SamplingSettings(temperature=0.0, max_new_tokens=2))
    assert model.training
    model.eval()
    HFRolloutBackend(model, tokenizer).generate(prompts, 1, SamplingSettings(temperature=0.0, max_new_tokens=2))
    assert not model.training


def test_generates_with_a_peft_model_and_gradient_checkpointing(model_loader, tokenizer, prompts):
    base = sharpen(model_loader.load_model())
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    peft_model = randomize_lora_b(apply_lora(base, LoraSettings(enabled=True, r=4)), 0.5)
    peft_model.train()
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=5)
    with_adapters = HFRolloutBackend(peft_model, tokenizer).generate(prompts, 2, greedy)
    with peft_model.disable_adapter():
        without = HFRolloutBackend(peft_model, tokenizer).generate(prompts, 2, greedy)
    assert with_adapters.completion_ids != without.completion_ids  # the adapters are sampled from
    assert len(with_adapters) == 6 and peft_model.training
