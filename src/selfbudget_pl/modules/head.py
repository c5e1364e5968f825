"""The LM head in chunks: log-probs and entropies of chosen tokens straight from the hidden states.

Scoring ``C`` completion tokens through the model's own head materialises ``[C, V]`` logits, a
temperature-scaled copy, and in backward the same again for their gradients: at a 152k vocabulary and
8k tokens that is 5 GB per copy in fp32. :func:`head_logprobs` computes ``lm_head``, temperature,
log-softmax, the gather and the entropy ``chunk_tokens`` rows at a time and keeps only the hidden
states and one float per token for backward, which recomputes each chunk's logits; the head's extra
memory is ``O(chunk_tokens x V)`` however many tokens are scored.

:func:`chunked_head` runs it in the model's own ``forward`` (the head module's forward is swapped for
the call), so FSDP's hooks gather and reshard the head's weight as usual, LoRA and activation
checkpointing are untouched, and the model's output ``logits`` are the per-token log-probs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

DEFAULT_CHUNK_TOKENS = 512


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias) / temperature)[target]`` and the entropy, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk_tokens: int):
        device_type = hidden.device.type
        # The ambient autocast decides the matmul dtype (bf16-mixed: bf16 compute, fp32 master weights);
        # everything after the matmul is fp32, as autocast runs softmax.
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        normaliser = torch.empty_like(logprobs)
        with torch.autocast(device_type, enabled=False):
            cast_weight, cast_bias = _cast(weight, compute), _cast(bias, compute)
            for rows in _chunks(hidden.shape[0], chunk_tokens):
                logits = _logits(hidden[rows], cast_weight, cast_bias, compute, temperature)
                lse = torch.logsumexp(logits, dim=-1)
                normaliser[rows] = lse
                logprobs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse
                logits.sub_(lse[:, None])  # log-probs, in place
                entropy[rows] = -logits.exp().mul_(logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser)
        ctx.settings = (temperature, chunk_tokens, compute)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        hidden, weight, bias, targets, normaliser = ctx.saved_tensors
        temperature, chunk_tokens, compute = ctx.settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            cast_weight, cast_bias = _cast(weight, compute), _cast(bias, compute)
            for rows in _chunks(hidden.shape[0], chunk_tokens):
                # d logp[target] / d logits = onehot(target) - softmax, times the temperature's 1/T.
                grad_logits = _logits(hidden[rows], cast_weight, cast_bias, compute, temperature)
                grad_logits.sub_(normaliser[rows, None]).exp_().neg_()
                grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), targets[rows]] += 1.0
                grad_logits.mul_(grad_logprobs[rows, None] / temperature)
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(compute)
                if needs_hidden:
                    grad_hidden[rows] = (grad_logits @ cast_weight).to(hidden.dtype)
                if needs_weight and compute == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows].float())  # no [V, H] temporary
                elif needs_weight:
                    grad_weight += grad_logits.t() @ hidden[rows].to(compute)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None,
        )  # fmt: skip


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C, H]`` hidden states, a ``[V, H]`` head -> ``([C], [C])`` float32 log-probs of ``targets`` under
    ``softmax(logits / temperature)`` (differentiable in ``hidden``, ``weight``, ``bias``) and the
    entropies of those distributions (no gradient)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return _ChunkedHeadLogprobs.apply(hidden, weight, bias, targets, float(temperature), int(chunk_tokens))


class HeadScores:
    """What a :func:`chunked_head` call leaves beside the model output: the entropies of its tokens."""

    entropy: Optional[torch.Tensor] = None


@contextmanager
def chunked_head(
    model: torch.nn.Module,
    targets: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Iterator[HeadScores]:
    """Within the block, ``model(...)`` returns as ``logits`` the ``[C]`` log-probs of ``targets`` (not
    ``[..., V]`` logits): its head gets the hidden states it would project, ``select`` picks the ``[C, H]``
    rows that predict ``targets``, and :func:`head_logprobs` scores them. The entropies land on the
    yielded :class:`HeadScores`."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"the chunked head needs a plain nn.Linear output layer, not {type(head).__name__}")
    scores = HeadScores()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # head.weight is read here, inside the model's forward: under FSDP it is the gathered weight.
        logprobs, scores.entropy = head_logprobs(
            select(hidden), head.weight, targets, head.bias, temperature, chunk_tokens
        )
        return logprobs

    head.forward = forward
    try:
        yield scores
    finally:
        del head.forward  # back to the class's forward


def supports_chunked_head(model: torch.nn.Module) -> bool:
    """Whether :func:`chunked_head` can run ``model`` (an output layer that is a plain ``nn.Linear``)."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter is not None and type(getter()) is torch.nn.Linear


def _cast(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.to(dtype)


def _logits(hidden, weight, bias, compute: torch.dtype, temperature: float) -> torch.Tensor:
    logits = hidden.to(compute) @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))
