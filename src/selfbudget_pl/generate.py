"""Streaming generation for a person: the model's budget first, then the reasoning, with an ETA.

:func:`stream_generation` decodes token by token with a KV cache and yields small events:

- :class:`BudgetEvent` as soon as ``</budget>`` closes (or at once when the budget is pre-filled), so a
  caller can say how long the answer will take before it is written: the paper's "anticipate
  generation time";
- :class:`TokenEvent` per decoded piece of text, with the measured tokens/s and the ETA against the budget;
- :class:`DoneEvent` once, at EOS, at the ``max_tokens`` ceiling, or on Ctrl-C (``reason="interrupted"``).

The loop is a plain ``past_key_values`` loop rather than ``model.generate`` with a streamer: every token
passes through our hands, so the ceiling is exact and an interrupt never leaves a thread behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from selfbudget_pl.data.prompts import encode_prompt
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rollout.base import encode_prefill, eos_token_ids


@dataclass(frozen=True)
class BudgetEvent:
    """The budget the answer will be held to: the model's own forecast or the pre-filled one."""

    budget: int
    source: Literal["model", "prefill"]


@dataclass(frozen=True)
class TokenEvent:
    """A newly decoded piece of the answer (the pieces add up to :attr:`DoneEvent.text`, less any prefill).

    ``n_tokens`` counts every generated token so far; ``solution_tokens`` only those after the budget
    tag (what the budget is measured against; None before the budget is known). ``eta_s`` is the time
    left at the measured rate until the budget is spent (None without a budget, 0 once it is overspent).
    """

    text: str
    n_tokens: int
    solution_tokens: Optional[int]
    tokens_per_s: float
    eta_s: Optional[float]


@dataclass(frozen=True)
class DoneEvent:
    """The whole response (a pre-filled budget prefix included) and why generation stopped."""

    text: str
    n_tokens: int
    reason: Literal["eos", "ceiling", "interrupted"]


Event = Union[BudgetEvent, TokenEvent, DoneEvent]

# transformers 5.2x renamed the KV cache from `past_key_values` to `cache` (the old name warns, and goes in 5.40).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def stream_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    output_format: Optional[OutputFormat] = None,
    max_tokens: int = 1024,
    budget: Optional[int] = None,
    temperature: float = 0.0,
    seed: Optional[int] = None,
) -> Iterator[Event]:
    """Generate an answer to ``prompt`` (built by :func:`~selfbudget_pl.data.prompts.build_prompt`), yielding events.

    Args:
        model: a transformers causal LM (eval mode is set here).
        tokenizer: its tokenizer (the prompt is encoded with :func:`~selfbudget_pl.data.prompts.encode_prompt`).
        output_format: the budget/solution tags (default :class:`OutputFormat`).
        max_tokens: hard ceiling on generated tokens; never exceeded.
        budget: pre-fill ``<budget>N</budget><solution>`` after the prompt instead of letting the model choose.
        temperature: 0 is greedy; otherwise plain softmax sampling at this temperature.
        seed: seeds a private generator for sampling (the global RNG is untouched).

    Ctrl-C while the model runs ends the stream with ``DoneEvent(reason="interrupted")`` carrying the
    partial text, so callers get what was produced instead of a traceback.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget={budget!r} must be a positive int")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    output_format = output_format or OutputFormat()
    device = next(model.parameters()).device
    stop_ids = set(eos_token_ids(model, tokenizer))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    prefix = output_format.budget_prefix(budget) if budget is not None else ""
    context = encode_prompt(prompt, tokenizer) + encode_prefill(tokenizer, prefix)  # as the rollout backends do
    decoder = _IncrementalDecoder(tokenizer)
    text = prefix
    generated = 0
    # Generated tokens at the moment the budget became known: the solution starts there.
    budget_known_at: Optional[int] = 0 if budget is not None else None
    awaiting_budget, closing = budget is None, output_format.budget_close
    if budget is not None:
        yield BudgetEvent(budget, "prefill")

    reason: Literal["eos", "ceiling", "interrupted"] = "ceiling"
    was_training = model.training
    model.eval()
    started = first_token_at = time.perf_counter()
    try:
        output = _forward(model, input_ids=torch.tensor([context], device=device))
        while True:
            token = _next_token(output.logits[0, -1], temperature, generator)
            if token in stop_ids:
                reason = "eos"
                break
            generated += 1
            if generated == 1:
                first_token_at = time.perf_counter()
            piece = decoder.push(token)
            if piece:
                text += piece
                # Only the tail can hold a newly closed tag; scanning all the text would be quadratic.
                if awaiting_budget and closing in text[-len(piece) - len(closing) :]:
                    awaiting_budget = False  # the first closing tag decides, well-formed or not
                    budget = output_format.parse(text).budget
                    if budget is not None:
                        budget_known_at = generated
                        yield BudgetEvent(budget, "model")
                yield _token_event(piece, generated, budget, budget_known_at, started, first_token_at)
            if generated >= max_tokens:
                break
            cache = {_CACHE_FIELD: getattr(output, _CACHE_FIELD)}
            output = _forward(model, input_ids=torch.tensor([[token]], device=device), **cache)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        model.train(was_training)
    rest = decoder.flush()
    if rest:  # so that the TokenEvent texts always add up to the DoneEvent text
        text += rest
        yield _token_event(rest, generated, budget, budget_known_at, started, first_token_at)
    yield DoneEvent(text, generated, reason)


@torch.no_grad()  # here rather than around the loop: the caller's code between events keeps its grad mode
def _forward(model: torch.nn.Module, **inputs: Any) -> Any:
    return model(use_cache=True, **inputs)


def _next_token(logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_event(
    piece: str, generated: int, budget: Optional[int], budget_known_at: Optional[int], started: float, first: float
) -> TokenEvent:
    now = time.perf_counter()
    # The first token also pays for the prompt's forward pass; the decode rate is measured after it.
    rate = (generated - 1) / (now - first) if generated > 1 and now > first else generated / max(now - started, 1e-9)
    solution_tokens = generated - budget_known_at if budget_known_at is not None else None
    eta = None
    if budget is not None and solution_tokens is not None and rate > 0:
        eta = max(0, budget - solution_tokens) / rate
    return TokenEvent(piece, generated, solution_tokens, rate, eta)


class _IncrementalDecoder:
    """Turns a stream of token ids into text pieces without re-decoding everything each step.

    A byte-level BPE token can end in the middle of a UTF-8 character; such text (ending in U+FFFD) is
    held back until the next token completes it. Each step decodes only the tokens since the last
    emitted piece, plus the one before them, so merges across the boundary come out right.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window re-decoded each step
        self.read_offset = 0  # tokens up to here have been emitted

    def _decode(self, start: int, end: Optional[int] = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.prefix_offset, self.read_offset)
        after = self._decode(self.prefix_offset)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        before = self._decode(self.prefix_offset, self.read_offset)
        after = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]
