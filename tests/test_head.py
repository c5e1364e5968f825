"""The chunked LM head: the same log-probs, entropies and gradients as the whole-logits computation."""

from __future__ import annotations

import pytest
import torch

from selfbudget_pl.modules.head import chunked_head, head_logprobs, supports_chunked_head


def _inputs(tokens: int = 11, hidden: int = 16, vocab: int = 50, bias: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    offset = torch.randn(vocab, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(vocab, (tokens,), generator=generator)
    return states, weight, offset, targets


def _whole(states, weight, offset, targets, temperature):
    logits = states @ weight.t() + (offset if offset is not None else 0.0)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _grads(fn, inputs, upstream):
    states, weight, offset, targets = inputs
    logprobs, entropy = fn(states, weight, offset, targets)
    params = [t for t in (states, weight, offset) if t is not None]
    return logprobs.detach(), entropy.detach(), torch.autograd.grad((logprobs * upstream).sum(), params)


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_whole_logits_in_values_and_gradients(chunk, bias):
    inputs = _inputs(bias=bias)
    upstream = torch.randn(11, generator=torch.Generator().manual_seed(1))  # any weighting of the tokens
    temperature = 0.6
    expected = _grads(lambda s, w, b, t: _whole(s, w, b, t, temperature), inputs, upstream)
    got = _grads(lambda s, w, b, t: head_logprobs(s, w, t, b, temperature, chunk), inputs, upstream)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)
    for mine, theirs in zip(got[2], expected[2]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert float(expected[2][1].abs().max()) > 1e-2  # the weight's gradient is not trivially zero


def test_follows_autocast_like_the_model_head():
    # bf16-mixed: fp32 master weights, the matmul in bf16 (as nn.Linear under autocast), softmax in fp32.
    inputs = _inputs(tokens=9, vocab=40)
    upstream = torch.ones(9)

    def reference(states, weight, offset, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(states, weight)
        return _whole(logits.float(), torch.eye(40), None, targets, 1.0)

    expected = _grads(reference, inputs, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda s, w, b, t: head_logprobs(s, w, t, None, 1.0, 4), inputs, upstream)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    for mine, theirs in zip(got[2], expected[2]):
        assert mine.dtype == theirs.dtype == torch.float32  # gradients land in the master weights' dtype
        torch.testing.assert_close(mine, theirs, atol=2e-2, rtol=2e-2)  # bf16 products, summed in another order


def test_inside_a_model_forward_the_output_is_the_token_logprobs(model_loader):
    model = model_loader.load_model()
    assert supports_chunked_head(model) and model.config.tie_word_embeddings
    input_ids = torch.randint(model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    targets = input_ids[:, 1:].reshape(-1)
    logits = model(input_ids=input_ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
    expected, _ = _whole(logits, torch.eye(logits.shape[1]), None, targets, 0.7)
    (grad_expected,) = torch.autograd.grad(expected.sum(), model.model.embed_tokens.weight)

    def select(hidden):
        return hidden[:, :-1].reshape(-1, hidden.shape[-1])

    with chunked_head(model, targets, select, temperature=0.7, chunk_tokens=5) as scores:
        logprobs = model(input_ids=input_ids).logits
    assert logprobs.shape == targets.shape and scores.entropy.shape == targets.shape
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=0)
    # Tied embeddings: the head's gradient reaches the input embedding it shares its weight with.
    (grad,) = torch.autograd.grad(logprobs.sum(), model.model.embed_tokens.weight)
    torch.testing.assert_close(grad, grad_expected, atol=1e-5, rtol=1e-5)
    # After the block the head is the model's own again.
    assert model(input_ids=input_ids).logits.shape == (2, 7, model.config.vocab_size)
