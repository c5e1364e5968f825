"""One interface for sampling completions, for training (GRPO), evaluation and generation.

A backend turns prompts (each optionally pre-filled with a budget, encoded here for every backend) into
:class:`Rollouts`, the record of what was sampled; grading and rewards return their findings beside it
(:mod:`selfbudget_pl.rewards.annotate`, :mod:`selfbudget_pl.callbacks.reward`). Every list in a ``Rollouts``
has one entry per completion, ordered prompt by prompt: prompt 0's ``num_samples`` completions first.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import torch


@dataclass
class SamplingSettings:
    """How to sample. ``temperature=0`` means greedy. ``logprobs``: record the sampler's log-prob of each
    sampled token (:attr:`Rollouts.sampler_logprobs`); a backend whose engine returns them anyway (vLLM)
    records them always, the HF sampler only when asked (it costs a log-softmax per step)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: bool = False


def sampling_settings(value: Optional[SamplingSettings | dict], **defaults: Any) -> SamplingSettings:
    """``value`` as :class:`SamplingSettings` (a config mapping fills in over ``defaults``)."""
    if isinstance(value, SamplingSettings):
        return value
    return SamplingSettings(**{**defaults, **dict(value or {})})


@dataclass(frozen=True)
class EngineLimits:
    """The most a run sends one rank's sampler, so that an engine with a KV cache of its own (vLLM) is sized
    for the run rather than for the model (whose position limit, 131,072 for R1-Distill, no cache fits):
    TRL passes ``max_prompt_length + max_completion_length`` and the batch the same way.

    Args:
        max_prompt_tokens: the longest prompt, a pre-filled budget included.
        prompt_key: the setting that bounds prompts, named when one does not fit.
        max_new_tokens: the longest completion, over every kind of call the run makes.
        max_num_seqs: the most completions one call samples (a training step's, a validation batch's).
    """

    max_prompt_tokens: int
    prompt_key: str
    max_new_tokens: int
    max_num_seqs: int

    @property
    def max_model_len(self) -> int:
        """Positions one sequence may take: the longest prompt plus the longest completion."""
        return self.max_prompt_tokens + self.max_new_tokens

    def engine_sizes(self, max_model_len: Optional[int], max_num_seqs: Optional[int]) -> tuple[int, int]:
        """``(max_model_len, max_num_seqs)`` an engine takes: the config's where it sets them, else these limits."""
        return max_model_len or self.max_model_len, max_num_seqs or self.max_num_seqs


def engine_limits(max_prompt_tokens: int, prompt_key: str, calls: Sequence[tuple[int, int]]) -> EngineLimits:
    """The :class:`EngineLimits` of a run whose sampling ``calls`` are, per kind, ``(completions per call,
    max_new_tokens)``: a GRPO step's prompts per rank x ``num_generations``, a validation batch."""
    if not calls:
        raise ValueError("engine_limits: a run that samples makes at least one kind of call")
    return EngineLimits(
        max_prompt_tokens=max_prompt_tokens,
        prompt_key=prompt_key,
        max_new_tokens=max(new_tokens for _, new_tokens in calls),
        max_num_seqs=max(completions for completions, _ in calls),
    )


# Why a completion ended: the sampler drew a stop token (EOS, or another id in the backend's stop set),
# a stop string was completed, or the length limit (max_new_tokens) cut it off.
FinishReason = Literal["eos", "stop", "length"]
FINISH_REASONS: tuple[str, ...] = ("eos", "stop", "length")


@dataclass
class Rollouts:
    """Completions for a batch of prompts, as sampled.

    The record of each completion is what was sampled, nothing guessed afterwards: ``completion_ids``
    are the tokens before the stop token, ``stop_token_ids`` the stop token the sampler drew (``None``
    when it drew none: a stop string or the length limit ended the completion), and ``finish_reasons``
    which of the three ended it. The loss trains on ``completion_ids + [stop_token_id]``, and
    ``sampler_logprobs`` holds the sampler's log-prob of each of those tokens, under the distribution it drew
    them from (temperature applied): the loss compares them with the trainer's own when they come from
    another engine. ``[]``: the sampler recorded none.
    """

    prompt_ids: list[list[int]]  # one per completion (shared within a group)
    completion_ids: list[list[int]]  # sampled tokens up to (not including) the stop token
    completions: list[str]  # decoded completion text (including any pre-filled budget prefix)
    finish_reasons: list[str]  # FinishReason per completion
    group_index: list[int]  # index of the prompt each completion answers
    stop_token_ids: list[Optional[int]] = field(default_factory=list)  # [] means None for every completion
    sampler_logprobs: list[list[float]] = field(default_factory=list)  # per sampled token (stop token included)
    columns: dict[str, list[Any]] = field(default_factory=dict)  # dataset columns, repeated per completion
    generation_seconds: float = 0.0
    progress: float = 0.0  # fraction of training done when these were sampled (GRPO sets it; rewards anneal on it)

    def __post_init__(self) -> None:
        if not self.stop_token_ids:
            self.stop_token_ids = [None] * len(self.completion_ids)
        unknown = set(self.finish_reasons) - set(FINISH_REASONS)
        if unknown or not len(self.finish_reasons) == len(self.completion_ids) == len(self.stop_token_ids):
            raise ValueError(
                f"Rollouts: one finish reason (of {FINISH_REASONS}) and one stop token per completion; got "
                f"{len(self.finish_reasons)} reasons {sorted(unknown) or ''} and {len(self.stop_token_ids)} stop "
                f"tokens for {len(self.completion_ids)} completions"
            )
        if self.sampler_logprobs and [len(row) for row in self.sampler_logprobs] != [
            len(self.sampled_ids(index)) for index in range(len(self))
        ]:
            raise ValueError("Rollouts: sampler_logprobs needs one log-prob per sampled token, stop token included")

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def truncated(self) -> list[bool]:
        """Completions cut off by the length limit (they never finished their answer)."""
        return [reason == "length" for reason in self.finish_reasons]

    def sampled_ids(self, index: int) -> list[int]:
        """Every token the sampler drew for completion ``index``, its stop token included: what the loss scores."""
        stop = self.stop_token_ids[index]
        return self.completion_ids[index] + ([stop] if stop is not None else [])

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


# One prefix for every prompt, one per prompt, or one per completion (num_prompts x num_samples, a prompt's
# in a row); None: that prompt or completion starts from nothing pre-filled.
Prefill = Union[None, str, Sequence[Optional[str]]]


class RolloutBackend(ABC):
    """Samples completions. A pre-filled budget (e.g. ``<budget>300</budget><solution>``) is appended to
    its prompt's tokens and starts its completions' text, so it parses like a generated one; this class
    does that for every backend, which only samples (:meth:`sample`)."""

    tokenizer: Any = None  # what encodes pre-filled text; a backend that is never pre-filled may have none
    # Samples with its own copy of the weights and its own kernels (and dtype), so its log-probs are not the
    # trainer's: GRPO's sampler correction (``enabled: auto``) turns on for such a backend.
    separate_engine: bool = False

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        sampling: SamplingSettings,
        prefill: Prefill = None,
        columns: Optional[dict[str, Sequence[Any]]] = None,
    ) -> Rollouts:
        """Sample ``num_samples`` completions for each prompt (token ids, unpadded).

        ``prefill``'s tokens are appended to their prompt (so they are in ``Rollouts.prompt_ids``, what the
        model was conditioned on) and its text starts each completion string; ``columns`` (one value per
        prompt) are repeated per completion, and ``columns["prefilled"]`` says which completions were.
        """
        started = time.perf_counter()
        prefills = per_completion(prefill, len(prompt_ids), num_samples)
        encoded = {text: encode_prefill(self.tokenizer, text) for text in set(prefills)}  # a group's G share theirs
        contexts = [list(prompt_ids[index // num_samples]) + encoded[text] for index, text in enumerate(prefills)]
        rollouts = self.sample(contexts, num_samples, sampling)
        rollouts.completions = [(text or "") + completion for text, completion in zip(prefills, rollouts.completions)]
        rollouts.columns = repeat_columns(columns, len(prompt_ids), num_samples)
        rollouts.columns["prefilled"] = [text is not None for text in prefills]
        rollouts.generation_seconds = time.perf_counter() - started
        return rollouts

    @abstractmethod
    def sample(self, contexts: list[list[int]], num_samples: int, sampling: SamplingSettings) -> Rollouts:
        """One completion per context; ``contexts`` holds each prompt ``num_samples`` times in a row (so
        ``group_index`` is ``index // num_samples``). Completion texts are the decoded completion ids."""

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Make the backend sample from the policy's current weights (no-op when it shares them).

        ``model`` is the policy itself, or the (FSDP-sharded) module that holds it at attribute path
        ``prefix``; see :meth:`selfbudget_pl.modules.base.PolicyModule.weights_source`.
        """

    def mark_stale(self, model: torch.nn.Module, prefix: str = "") -> None:
        """The policy's weights changed (an optimizer step). A backend with its own copy of the weights syncs
        them lazily, before its next ``generate`` (several steps between two rollouts cost one sync); this
        default, for backends whose sync is only bookkeeping, syncs at once."""
        self.sync_weights(model, prefix)


# What a sampler returns per context: the completion's ids (stop token excluded), why it ended, the stop token.
Sample = tuple[list[int], str, Optional[int]]


def rollouts_from_samples(
    contexts: list[list[int]],
    samples: Sequence[Sample],
    num_samples: int,
    tokenizer: Any,
    sampler_logprobs: Optional[list[list[float]]] = None,
) -> Rollouts:
    """The :class:`Rollouts` of one sample per context (``num_samples`` contexts per prompt, in a row), with
    texts decoded from the ids, so that ids and text agree exactly whichever backend sampled them;
    ``sampler_logprobs``: per completion, the sampler's log-prob of each sampled token (None: not recorded)."""
    completion_ids = [ids for ids, _, _ in samples]
    return Rollouts(
        prompt_ids=contexts,
        completion_ids=completion_ids,
        completions=[tokenizer.decode(ids, skip_special_tokens=False) for ids in completion_ids],
        finish_reasons=[reason for _, reason, _ in samples],
        stop_token_ids=[stop for _, _, stop in samples],
        group_index=[index // num_samples for index in range(len(contexts))],
        sampler_logprobs=sampler_logprobs or [],
    )


def per_completion(prefill: Prefill, num_prompts: int, num_samples: int) -> list[Optional[str]]:
    """``prefill`` as one entry per completion, a prompt's ``num_samples`` in a row (empty strings count as none)."""
    if prefill is None or isinstance(prefill, str):
        return [prefill or None] * (num_prompts * num_samples)
    prefills = [text or None for text in prefill]
    if len(prefills) == num_prompts:
        return [text for text in prefills for _ in range(num_samples)]
    if len(prefills) != num_prompts * num_samples:
        raise ValueError(
            f"{len(prefills)} prefills for {num_prompts} prompts x {num_samples} samples: "
            f"give one per prompt ({num_prompts}) or one per completion ({num_prompts * num_samples})"
        )
    return prefills


def encode_prefill(tokenizer: Any, prefill: Optional[str]) -> list[int]:
    """The tokens a pre-filled text adds after a prompt: encoded on its own, without special tokens, so it
    tokenizes the same way in training, evaluation and streaming generation."""
    return tokenizer.encode(prefill, add_special_tokens=False) if prefill else []


def repeat_columns(
    columns: Optional[dict[str, Sequence[Any]]], num_prompts: int, num_samples: int
) -> dict[str, list[Any]]:
    """Dataset columns (one value per prompt) repeated so there is one value per completion."""
    repeated = {}
    for name, values in (columns or {}).items():
        if len(values) != num_prompts:
            raise ValueError(f"column {name!r} has {len(values)} values for {num_prompts} prompts")
        repeated[name] = [value for value in values for _ in range(num_samples)]
    return repeated


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the generation config's (chat checkpoints often list
    several, e.g. Qwen's <|im_end|> and <|endoftext|>), else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """With a seed, sample from a private RNG stream (seeded with it) so the global one (and training) is
    untouched; without one, from the global stream."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
