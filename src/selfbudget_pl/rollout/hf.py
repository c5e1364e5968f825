"""Sampling on the training model itself (KV cache, left padding): transformers ``generate``, or for
Llama-style decoders the leaner loop of :mod:`selfbudget_pl.rollout.fused_decode`.

The backend shares the policy's weights, so there is nothing to sync after an optimizer step; it is
the default on CPU and for small models. For large models on GPUs see :mod:`selfbudget_pl.rollout.vllm`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Optional, Sequence

import torch

from selfbudget_pl.data.collate import pad
from selfbudget_pl.rollout import fused_decode
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts, SamplingSettings

log = logging.getLogger(__name__)
DECODERS = ("auto", "fused", "generate")


class HFRolloutBackend(RolloutBackend):
    """Samples completions from the training model.

    Args:
        model: a transformers causal LM, or a peft model wrapping one (sampling uses its adapters).
        tokenizer: the model's tokenizer (pad id, EOS, decoding, stop strings).
        batch_size: most sequences (prompts x samples) per ``generate`` call; bounds KV-cache memory.
        decoder: ``fused`` (the lean loop; Qwen2/Llama/Qwen3 only), ``generate`` (``model.generate``,
            any model), or ``auto``: fused where the model allows it, else generate.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64, decoder: str = "auto") -> None:
        if batch_size < 1:
            raise ValueError(f"rollout.batch_size={batch_size} must be >= 1")
        if decoder not in DECODERS:
            raise ValueError(f"rollout.decoder={decoder!r} must be one of {DECODERS}")
        self.decoder = decoder
        self._told_fallback = False
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        sampling: SamplingSettings,
        prefill: Optional[str] = None,
        columns: Optional[dict[str, Sequence[Any]]] = None,
    ) -> Rollouts:
        """Sample ``num_samples`` completions per prompt.

        With ``prefill``, its tokens are appended to every prompt (and so appear in ``Rollouts.prompt_ids``,
        which is what the model was conditioned on), and its text starts every completion string.
        """
        started = time.perf_counter()
        prefill_ids = self.tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
        contexts = [list(prompt) + prefill_ids for prompt in prompt_ids for _ in range(num_samples)]
        generated: list[list[int]] = []
        with _inference(self.model), _seeded(sampling.seed, _device_of(self.model)):
            for start in range(0, len(contexts), self.batch_size):
                generated.extend(self._generate_batch(contexts[start : start + self.batch_size], sampling))

        completion_ids, truncated = [], []
        for row in generated:
            ids, finished = self._cut(row, sampling.stop)
            completion_ids.append(ids)
            truncated.append(not finished)
        texts = [(prefill or "") + self.tokenizer.decode(ids, skip_special_tokens=False) for ids in completion_ids]
        return Rollouts(
            prompt_ids=contexts,
            completion_ids=completion_ids,
            completions=texts,
            truncated=truncated,
            group_index=[index for index in range(len(prompt_ids)) for _ in range(num_samples)],
            columns=repeat_columns(columns, len(prompt_ids), num_samples),
            generation_seconds=time.perf_counter() - started,
        )

    def _generate_batch(self, contexts: list[list[int]], sampling: SamplingSettings) -> list[list[int]]:
        device = _device_of(self.model)
        input_ids, attention_mask = pad(contexts, self.pad_token_id, left=True)
        if self._fused():
            stopped = (lambda row: self._end_of_first_stop(row, sampling.stop) is not None) if sampling.stop else None
            return fused_decode.sample(
                self.model, input_ids.to(device), attention_mask.to(device), sampling,
                self.eos_token_ids, self.pad_token_id, stopped=stopped,
            )  # fmt: skip
        width = input_ids.shape[1]
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            **self._generate_kwargs(sampling),
        )
        return output[:, width:].tolist()

    def _fused(self) -> bool:
        """Whether this call uses the fused loop (asked per call: the model may be wrapped after init)."""
        if self.decoder == "generate":
            return False
        reason = fused_decode.unsupported_reason(self.model)
        if reason is None:
            return True
        if self.decoder == "fused":
            raise ValueError(f"rollout.decoder=fused cannot run this model: {reason}; use decoder=auto or generate")
        if not self._told_fallback:
            log.info("rollout: sampling with model.generate (%s)", reason)
            self._told_fallback = True
        return False

    def _generate_kwargs(self, sampling: SamplingSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids,
            # Gradient checkpointing turns the config's cache off; sampling always wants it.
            "use_cache": True,
        }
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if sampling.temperature > 0:
            # Every knob that changes the distribution is set explicitly: a hub generation_config
            # (repetition_penalty, top_k=20, ...) would otherwise fill them in, and the GRPO ratio
            # assumes samples come from softmax(logits / temperature) restricted only by top-k/top-p.
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                repetition_penalty=1.0,
            )
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _cut(self, row: list[int], stop: Sequence[str]) -> tuple[list[int], bool]:
        """Drop EOS and padding, or cut just after the first stop string; say whether it finished."""
        for position, token in enumerate(row):
            if token in self.eos_token_ids:
                return row[:position], True
        end = self._end_of_first_stop(row, stop)
        if end is not None:
            return row[:end], True
        return row, False

    def _end_of_first_stop(self, row: list[int], stop: Sequence[str]) -> Optional[int]:
        """Fewest leading tokens whose text contains a stop string (binary search over prefixes)."""

        def contains_stop(length: int) -> bool:
            text = self.tokenizer.decode(row[:length], skip_special_tokens=False)
            return any(string in text for string in stop)

        if not stop or not contains_stop(len(row)):
            return None
        low, high = 1, len(row)
        while low < high:
            middle = (low + high) // 2
            if contains_stop(middle):
                high = middle
            else:
                low = middle + 1
        return low


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a completion: the generation config's (chat checkpoints often list
    several, e.g. Qwen's <|im_end|> and <|endoftext|>), else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


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


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """With a seed, sample from a private RNG stream so the global one (and training) is untouched."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
