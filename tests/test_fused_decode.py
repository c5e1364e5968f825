"""The fused sampling loop against transformers: same tokens as ``generate`` (greedy), same distribution
(sampled), same prefill and decode-step logits as the model's forward, on Qwen2, Llama (with and without
grouped-query attention), Qwen3, and LoRA; fallback to ``generate`` for other models and for transformers
versions it was not checked on."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from selfbudget_pl import internals
from selfbudget_pl.models import LoraSettings, apply_lora
from selfbudget_pl.rollout import fused_decode
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.tensors import pad

from .conftest import randomize_lora_b, sharpen

PAD = 0


def _random_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return sharpen(transformers.AutoModelForCausalLM.from_config(config).eval())


def _small(kind: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    if kind == "llama_gqa":
        return _random_model(transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "llama":
        return _random_model(transformers.LlamaConfig(num_attention_heads=4, **common))
    if kind == "qwen2":
        return _random_model(transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "qwen3":
        return _random_model(transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common))
    raise ValueError(kind)


def _prompts(vocab: int = 64) -> list[list[int]]:
    """Four prompts of different lengths; the 2nd and 4th repeated, as GRPO's G samples are (such rows
    share one prefill in the fused loop)."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in (2, 7, 4, 11)]
    return [prompts[0], prompts[1], prompts[1], prompts[2], prompts[3], prompts[3], prompts[3]]


def _generate(model, prompts, max_new_tokens: int, eos: list[int]) -> list[list[int]]:
    input_ids, mask = pad(prompts, PAD, left=True)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=PAD,
        )  # fmt: skip
    return output[:, input_ids.shape[1] :].tolist()


def _fused(model, prompts, max_new_tokens: int, eos: list[int], **sampling) -> list[list[int]]:
    input_ids, mask = pad(prompts, PAD, left=True)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, **{"temperature": 0.0, **sampling})
    tokens, _ = fused_decode.sample(model, input_ids, mask, settings, eos, PAD)
    return tokens


def _assert_greedy_matches_generate(model, prompts) -> None:
    unused = model.config.vocab_size - 1
    free = _generate(model, prompts, 24, eos=[unused])
    assert _fused(model, prompts, 24, eos=[unused]) == free
    # A token row 0 emits early becomes EOS: rows then finish at different steps (and leave the fused
    # batch), and the rest of each finished row is padding, exactly as generate pads it.
    eos = [next(token for token in free[0][2:] if token not in (PAD, unused))]
    expected = _generate(model, prompts, 24, eos=eos)
    assert _fused(model, prompts, 24, eos=eos) == expected
    assert PAD in expected[0] and any(PAD not in row for row in expected)


def test_greedy_matches_generate_on_the_tiny_qwen2(model_loader):
    model = sharpen(model_loader.load_model()).eval()
    assert fused_decode.unsupported_reason(model) is None
    _assert_greedy_matches_generate(model, _prompts(vocab=400))


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3"])
def test_greedy_matches_generate_on_other_llama_style_decoders(kind):
    model = _small(kind)
    assert fused_decode.unsupported_reason(model) is None
    _assert_greedy_matches_generate(model, _prompts())


def test_lora_adapters_are_sampled_and_can_be_disabled(model_loader):
    model = sharpen(model_loader.load_model()).eval()
    plain = _generate(model, _prompts(400), 16, eos=[1])
    peft_model = apply_lora(model, LoraSettings(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(2)
    randomize_lora_b(peft_model, 0.5)
    with_adapters = _generate(peft_model, _prompts(400), 16, eos=[1])
    assert with_adapters != plain
    assert _fused(peft_model, _prompts(400), 16, eos=[1]) == with_adapters
    with peft_model.disable_adapter():
        assert _fused(peft_model, _prompts(400), 16, eos=[1]) == plain


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.6)])
def test_sampled_tokens_follow_the_warped_distribution(settings):
    """The first sampled token of 6,000 rows against softmax(logits / T) cut by top-k / top-p, as
    transformers' warpers compute it."""
    model = _small("llama_gqa")
    prompt = _prompts()[1]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    warpers = transformers.LogitsProcessorList(
        [transformers.TemperatureLogitsWarper(settings["temperature"])]
        + ([transformers.TopKLogitsWarper(settings["top_k"])] if "top_k" in settings else [])
        + ([transformers.TopPLogitsWarper(settings["top_p"])] if "top_p" in settings else [])
    )
    expected = warpers(torch.tensor([prompt]), logits[None].clone())[0].softmax(-1)

    torch.manual_seed(0)
    rows = 6000
    tokens = torch.tensor(_fused(model, [prompt] * rows, 1, eos=[1], **settings))[:, 0]
    observed = torch.bincount(tokens, minlength=expected.numel()).float() / rows
    assert observed[expected == 0].sum() == 0  # nothing outside top-k / top-p is ever drawn
    total_variation = 0.5 * (observed - expected).abs().sum()
    assert total_variation < 0.05, total_variation


def test_seeded_backend_calls_repeat_and_differ_across_seeds(model_loader, tokenizer):
    backend = HFRolloutBackend(sharpen(model_loader.load_model()), tokenizer, decoder="fused")
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=5)
    first = backend.generate(_prompts(400), 3, sampling).completion_ids
    assert backend.generate(_prompts(400), 3, sampling).completion_ids == first
    sampling.seed = 6
    assert backend.generate(_prompts(400), 3, sampling).completion_ids != first


def test_other_architectures_fall_back_to_generate(tokenizer):
    gpt2 = _random_model(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    assert "gpt2" in fused_decode.unsupported_reason(gpt2)
    auto = HFRolloutBackend(gpt2, tokenizer, decoder="auto")
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=5)
    assert len(auto.generate([[5, 6, 7]], 1, greedy).completion_ids[0]) <= 5
    with pytest.raises(ValueError, match="decoder=fused cannot run this model: model_type 'gpt2'"):
        HFRolloutBackend(gpt2, tokenizer, decoder="fused").generate([[5, 6, 7]], 1, greedy)
    with pytest.raises(ValueError, match="HFRolloutBackend: decoder='vllm': must be one of 'auto', 'fused', 'generate'"):
        HFRolloutBackend(gpt2, tokenizer, decoder="vllm")


def _fused_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward's logits after prefilling ``ids[:, :-1]``, then after one cached decode step on
    the last token (one unpadded row)."""
    weights = fused_decode._Weights.read(model)
    length = ids.shape[1]
    positions = torch.arange(length)[None]
    cos, sin = weights.rotary(torch.empty(0, dtype=weights.dtype), positions)
    cos, sin = cos.unsqueeze(1).to(weights.dtype), sin.unsqueeze(1).to(weights.dtype)
    cache = fused_decode._KVCache(weights, 1, length, ids.device)
    causal = torch.ones(length - 1, length - 1, dtype=torch.bool).tril()
    prefill = weights.forward(ids[:, :-1], 0, cos, sin, cache, causal)
    step = weights.forward(ids[:, -1:], length - 1, cos, sin, cache, torch.ones(1, 1, 1, length, dtype=torch.bool))
    return prefill, step


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama_gqa", "qwen3"])
def test_prefill_and_decode_logits_equal_the_models_forward(kind):
    """Logits, not only argmaxes: a drift in one of transformers' formulas (norm, rotary, scaling) that
    leaves greedy tokens unchanged still fails here."""
    model = _small(kind)
    ids = torch.tensor([_prompts()[4] + [7, 19]])
    with torch.no_grad():
        expected = model(ids).logits[0]
    prefill, step = _fused_logits(model, ids)
    assert expected.abs().max() > 1  # sharpened: logits far from uniform
    torch.testing.assert_close(prefill[0], expected[-2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[0], expected[-1], rtol=1e-4, atol=1e-4)


def test_real_shape_attention_logits_equal_the_models_forward():
    """One decoder layer of DeepSeek-R1-Distill-Qwen-1.5B's shape (hidden 1536, 12 query and 2 key/value
    heads of 128, MLP 8960, rope theta 10,000, RMSNorm eps 1e-6) on a reduced vocabulary, positions into
    the hundreds: the head size and GQA ratio the real model runs with."""
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=1536, intermediate_size=8960, num_hidden_layers=1, num_attention_heads=12,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 512, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits[0]
    prefill, step = _fused_logits(model, ids)
    torch.testing.assert_close(prefill[0], expected[-2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[0], expected[-1], rtol=1e-4, atol=1e-4)


def test_an_unchecked_transformers_version_falls_back_to_generate_and_says_so_once(monkeypatch, caplog, tokenizer):
    model = _small("qwen2")
    assert fused_decode.unsupported_reason(model) is None
    real = internals.installed_version
    monkeypatch.setattr(internals, "installed_version", lambda library: "99.0" if library == "transformers" else real(library))
    reason = fused_decode.unsupported_reason(model)
    assert reason == internals.unknown_version_message("transformers", "99.0")

    def never(*args, **kwargs):
        raise AssertionError("the fused loop ran on an unchecked transformers version")

    monkeypatch.setattr(fused_decode, "sample", never)
    backend = HFRolloutBackend(model, tokenizer, decoder="auto")
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=6)
    with caplog.at_level(logging.INFO, logger="selfbudget_pl.rollout.hf"):
        for _ in range(2):
            assert len(backend.generate(_prompts()[:2], 1, greedy).completion_ids) == 2
    told = [record for record in caplog.records if "model.generate" in record.getMessage()]
    assert [record.getMessage() for record in told] == [f"rollout: sampling with model.generate ({reason})"]
    assert told[0].levelno == logging.WARNING  # it costs speed on every model, unlike an unsupported architecture
    with pytest.raises(ValueError, match="decoder=fused cannot run this model: transformers 99.0"):
        HFRolloutBackend(model, tokenizer, decoder="fused").generate(_prompts()[:1], 1, greedy)
