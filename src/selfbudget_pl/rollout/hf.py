"""Sampling on the training model itself (KV cache, left padding): transformers ``generate``, or for
Llama-style decoders the leaner loop of :mod:`selfbudget_pl.rollout.fused_decode`.

The backend shares the policy's weights, so there is nothing to sync after an optimizer step; it is
the default on CPU and for small models. For large models on GPUs see :mod:`selfbudget_pl.rollout.vllm`.

Under FSDP, ``sync_weights(root, prefix)`` tells the backend where the policy sits, and each ``generate``
call runs inside the forward of the FSDP units above it (:mod:`selfbudget_pl.rollout.fsdp_units`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from transformers import (
    LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)  # fmt: skip

from selfbudget_pl import internals
from selfbudget_pl.rollout import fused_decode
from selfbudget_pl.rollout.base import (
    EngineLimits, FinishReason, RolloutBackend, Rollouts, SamplingSettings, eos_token_ids, rollouts_from_samples,
    seeded,
)  # fmt: skip
from selfbudget_pl.rollout.fsdp_units import through_forward, units_above
from selfbudget_pl.schema import Schema, check_arguments, spec
from selfbudget_pl.tensors import pad
from selfbudget_pl.weights import is_sharded

log = logging.getLogger(__name__)
DECODERS = ("auto", "fused", "generate")


@dataclass
class HFRolloutSchema(Schema):
    """The arguments of :class:`HFRolloutBackend` (config group ``rollout``) and what each allows."""

    TARGETS = ("selfbudget_pl.rollout.hf.HFRolloutBackend",)
    INJECTED = ("model", "tokenizer", "limits")

    batch_size: int = spec(ge=1)
    decoder: str = spec(choices=DECODERS)


class HFRolloutBackend(RolloutBackend):
    """Samples completions from the training model.

    Args:
        model: a transformers causal LM, or a peft model wrapping one (sampling uses its adapters).
        tokenizer: the model's tokenizer (pad id, EOS, decoding, stop strings).
        limits: the run's sampling limits; unused: this sampler sizes its KV cache per call, from the call.
        batch_size: most sequences (prompts x samples) per ``generate`` call; bounds KV-cache memory.
        decoder: ``fused`` (the lean loop; Qwen2/Llama/Qwen3 only), ``generate`` (``model.generate``,
            any model), or ``auto``: fused where the model allows it, else generate.

    Sampled tokens' log-probs are recorded when a call asks (``SamplingSettings.logprobs``), from the
    distribution each token was drawn from, as vLLM records them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        limits: Optional[EngineLimits] = None,
        batch_size: int = 64,
        decoder: str = "auto",
    ) -> None:
        check_arguments(HFRolloutSchema, locals(), "HFRolloutBackend")
        self.decoder = decoder
        self._told_fallback = False
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self._root: Optional[torch.nn.Module] = None
        self._prefix = ""
        self._warned_root = False

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Nothing to copy (the weights are shared); remember where the policy sits (``model`` at ``prefix``,
        e.g. the FSDP root and ``"model."``), so sampling can unshard the FSDP units above it."""
        units_above(model, prefix, self.model)  # fail here, not mid-training, if the policy is not there
        self._root, self._prefix = model, prefix

    def sample(self, contexts: list[list[int]], num_samples: int, sampling: SamplingSettings) -> Rollouts:
        """One completion per context (see :meth:`RolloutBackend.sample`), ``batch_size`` contexts at a time."""
        root = self._root if self._root is not None else self.model
        units = units_above(root, self._prefix if self._root is not None else "", self.model)
        if self._root is None and not units and not self._warned_root and is_sharded(self.model):
            log.warning(
                "rollout: sampling a sharded (FSDP) model whose FSDP root is unknown; outside the root's "
                "forward its parameters are shards. Call sync_weights(root, prefix) first."
            )
            self._warned_root = True
        synced = is_sharded(self.model) and _world_size() > 1

        def sample() -> tuple[list[list[int]], list[list[float]]]:
            generated: list[list[int]] = []
            logprobs: list[list[float]] = []
            for start in range(0, len(contexts), self.batch_size):
                batch = contexts[start : start + self.batch_size]
                rows, row_logprobs = self._generate_batch(batch, sampling, synced)
                generated.extend(rows)
                logprobs.extend(row_logprobs or [])
            return generated, logprobs

        with _inference(root), seeded(sampling.seed, _device_of(self.model)):
            generated, logprobs = through_forward(units, sample)

        samples = [self._cut(row, sampling.stop) for row in generated]
        # Each completion's log-probs up to its end: its tokens, and the stop token when it drew one.
        recorded = [row[: len(ids) + (stop is not None)] for row, (ids, _, stop) in zip(logprobs, samples)]
        return rollouts_from_samples(contexts, samples, num_samples, self.tokenizer, recorded or None)

    def _generate_batch(
        self, contexts: list[list[int]], sampling: SamplingSettings, synced: bool = False
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """The sampled rows after each context (padded after their end), and with ``sampling.logprobs`` each
        token's log-prob under the distribution it was drawn from."""
        device = _device_of(self.model)
        input_ids, attention_mask = pad(contexts, self.pad_token_id, left=True)
        if self._fused():
            stopped = (lambda row: self._end_of_first_stop(row, sampling.stop) is not None) if sampling.stop else None
            return fused_decode.sample(
                self.model, input_ids.to(device), attention_mask.to(device), sampling,
                self.eos_token_ids, self.pad_token_id, stopped=stopped,
            )  # fmt: skip
        width = input_ids.shape[1]
        recorder = _LogprobRecorder() if sampling.logprobs else None
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            **self._generate_kwargs(sampling, recorder),
            # Sharded layers all-gather in every step: a rank whose rows have all finished must keep
            # stepping until every rank has. transformers turns this on only where it finds the private
            # marks torch (2.x) leaves on FSDP-managed modules; said here, it does not depend on them.
            **({"synced_gpus": True} if synced else {}),
        )
        generated = output[:, width:]
        return generated.tolist(), None if recorder is None else recorder.logprobs(generated).tolist()

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
            # An unchecked transformers costs the fused loop's 1.7-4x on every model: say so louder than for a
            # model the loop never supported.
            level = logging.INFO if internals.is_known_version("transformers") else logging.WARNING
            log.log(level, "rollout: sampling with model.generate (%s)", reason)
            self._told_fallback = True
        return False

    def _generate_kwargs(
        self, sampling: SamplingSettings, recorder: Optional["_LogprobRecorder"] = None
    ) -> dict[str, Any]:
        """``generate``'s arguments; with a ``recorder``, the warpers are passed as logits processors with it
        last (generate puts its own warpers after any processor it is given, where the recorder would see
        the logits before temperature)."""
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
        if recorder is not None:
            warpers = _warpers(sampling) if sampling.temperature > 0 else []
            kwargs["logits_processor"] = LogitsProcessorList([*warpers, recorder])
            if sampling.temperature > 0:
                kwargs.update(temperature=1.0, top_p=1.0, top_k=0)  # generate's own warpers off: ours run instead
        return kwargs

    def _cut(self, row: list[int], stop: Sequence[str]) -> tuple[list[int], FinishReason, Optional[int]]:
        """Split a sampled row at its end: the tokens before the stop token (which is returned apart,
        padding after it dropped), or up to the end of the first stop string; and why it ended."""
        first_eos = next((position for position, token in enumerate(row) if token in self.eos_token_ids), None)
        head = row if first_eos is None else row[:first_eos]
        # A row ended by a stop string is padded after it, and the pad id is often the EOS id.
        end = self._end_of_first_stop(head, stop)
        if end is not None:
            return row[:end], "stop", None
        if first_eos is not None:
            return head, "eos", row[first_eos]
        return row, "length", None

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


class _LogprobRecorder(LogitsProcessor):
    """The last of ``generate``'s logits processors: it keeps each step's log-softmax of the warped scores (the
    distribution the next token is drawn from) until the next step shows which token was drawn, so one
    ``[B, V]`` tensor is held, not one per step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # [B] per step: the drawn token's log-prob
        self.pending: Optional[torch.Tensor] = None  # [B, V]: the last step's, its token not yet seen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = scores.float().log_softmax(-1)
        return scores

    def logprobs(self, generated: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` log-probs of the ``n`` generated columns (the last one's read from the pending step)."""
        width = generated.shape[1]
        steps = list(self.steps)
        if self.pending is not None and len(steps) < width:
            steps.append(self.pending.gather(-1, generated[:, len(steps), None]).squeeze(-1))
        # A step generate ran and then undid (a deferred stop check) is recorded but not in the output.
        return torch.stack(steps, dim=1)[:, :width] if steps else torch.zeros(generated.shape)


def _warpers(sampling: SamplingSettings) -> list[LogitsProcessor]:
    """generate's sampling warpers, in its order (temperature, top-k, top-p), for ``sampling``."""
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return warpers


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; every submodule's mode is restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
