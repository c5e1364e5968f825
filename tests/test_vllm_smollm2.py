"""vLLM (CPU build) on a real pretrained checkpoint, SmolLM2-135M-Instruct (``model=smollm2_135m``: head size 64,
EOS = pad = <|im_end|>, chat-template prompts): greedy tokens equal the HF backend's, and still do after one
optimizer step and the weight sync. ``pytest -m vllm`` in the vLLM environment."""

from __future__ import annotations

import pytest
import torch

from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.rollout.base import SamplingSettings

from .test_vllm_engine import assert_same_rollouts, engine_logprobs, hf_logprobs, hf_rollouts, require_vllm

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is 17 + 25? Put the final answer in \\boxed{}.", "Tom has 3 apples and buys 5 more. How many apples?"]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=32)


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    require_vllm()


@pytest.fixture(scope="module")
def loader(smollm2_dir) -> ModelLoader:
    return ModelLoader(name_or_path=str(smollm2_dir))


@pytest.fixture(scope="module")
def tokenizer(loader):
    return loader.load_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return encode_prompts(QUESTIONS, tokenizer)


@pytest.fixture(scope="module")
def backend(loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    return VLLMRolloutBackend(loader.load_model(), tokenizer, dtype="float32", max_model_len=512, enforce_eager=True)


def test_greedy_and_prefilled_tokens_equal_the_hf_backend(backend, loader, tokenizer, prompts):
    model = loader.load_model().eval()
    backend.sync_weights(model)
    assert_same_rollouts(backend.generate(prompts, 1, GREEDY), hf_rollouts(model, tokenizer, prompts, GREEDY))
    prefill = OutputFormat().budget_prefix(50)
    engine = backend.generate(prompts, 1, GREEDY, prefill=prefill)
    assert_same_rollouts(engine, hf_rollouts(model, tokenizer, prompts, GREEDY, prefill=prefill))
    assert all(text.startswith(prefill) for text in engine.completions)


def test_after_a_step_and_a_sync_the_engine_follows_the_new_weights(backend, loader, tokenizer, prompts):
    model = loader.load_model()
    backend.sync_weights(model)
    before = backend.generate(prompts, 1, GREEDY)
    old = engine_logprobs(backend, prompts, before.completion_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor([prompts[0] + before.completion_ids[1]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    backend.mark_stale(model)
    model.eval()
    after = backend.generate(prompts, 1, GREEDY)
    assert_same_rollouts(after, hf_rollouts(model, tokenizer, prompts, GREEDY))
    new = engine_logprobs(backend, prompts, before.completion_ids)
    for engine_row, hf_row, old_row in zip(new, hf_logprobs(model, prompts, before.completion_ids), old):
        assert engine_row == pytest.approx(hf_row, abs=1e-3)
        assert max(abs(a - b) for a, b in zip(engine_row, old_row)) > 1e-2
