"""Sampling on the training model itself (KV cache, left padding): transformers ``generate``, or for
Llama-style decoders the leaner loop of :mod:`selfbudget_pl.rollout.fused_decode`.

The backend shares the policy's weights, so there is nothing to sync after an optimizer step; it is
the default on CPU and for small models. For large models on GPUs see :mod:`selfbudget_pl.rollout.vllm`.

Under FSDP the backend samples with the inner policy, whose ``generate`` never runs the forward of the
FSDP unit that holds it (the root wrapping the LightningModule): that unit's own parameters (embeddings,
final norm, lm_head) would be read as shards. ``sync_weights(root, prefix)`` tells the backend where the
policy sits; each ``generate`` call then runs inside that unit's forward (see :func:`_through_forward`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from transformers import (
    LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)  # fmt: skip

from selfbudget_pl import internals
from selfbudget_pl.rollout import fused_decode
from selfbudget_pl.tensors import pad
from selfbudget_pl.rollout.base import (
    EngineLimits, FinishReason, RolloutBackend, Rollouts, SamplingSettings, eos_token_ids, rollouts_from_samples,
    seeded,
)  # fmt: skip
from selfbudget_pl.weights import is_sharded

log = logging.getLogger(__name__)
DECODERS = ("auto", "fused", "generate")


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
        self._root: Optional[torch.nn.Module] = None
        self._prefix = ""
        self._warned_root = False

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Nothing to copy (the weights are shared); remember where the policy sits (``model`` at ``prefix``,
        e.g. the FSDP root and ``"model."``), so sampling can unshard the FSDP units above it."""
        _units_above(model, prefix, self.model)  # fail here, not mid-training, if the policy is not there
        self._root, self._prefix = model, prefix

    def sample(self, contexts: list[list[int]], num_samples: int, sampling: SamplingSettings) -> Rollouts:
        """One completion per context (see :meth:`RolloutBackend.sample`), ``batch_size`` contexts at a time."""
        root = self._root if self._root is not None else self.model
        units = _units_above(root, self._prefix if self._root is not None else "", self.model)
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
            generated, logprobs = _through_forward(units, sample)

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


def _units_above(root: torch.nn.Module, prefix: str, policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units from ``root`` down to ``policy`` (at attribute path ``prefix``) whose forward
    ``policy.generate`` does not run, outermost first: every FSDP1 wrapper on the way (``generate`` on a
    wrapper goes to the wrapped module), and FSDP2 ``fully_shard`` modules above the policy (the policy's
    own forward runs, with its hooks, in every step)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    names = [name for name in prefix.split(".") if name]
    module, units = root, []
    while True:
        if isinstance(module, FullyShardedDataParallel) or (isinstance(module, FSDPModule) and module is not policy):
            units.append(module)
        if module is policy:
            return units
        children = internals.child_modules(module)
        wrapped = next((children[name] for name in internals.TRANSPARENT_CHILDREN if name in children), None)
        if wrapped is not None:
            module = wrapped
        elif names and isinstance(children.get(names[0]), torch.nn.Module):
            module = children[names.pop(0)]
        else:
            raise ValueError(
                f"sync_weights: the module at {prefix!r} of {type(root).__name__} is not the model this "
                "backend samples with"
            )


def _through_forward(units: list[torch.nn.Module], sample: Callable[[], Any]) -> Any:
    """``sample()`` run inside the forward of every unit in ``units`` (outermost first), as Lightning runs
    ``training_step`` inside the root's forward: the unit's pre-forward gathers its own parameters, in the
    compute dtype of its mixed-precision policy, and nested units gather theirs in their own forwards, one
    layer at a time, during each decoding step.

    Why not ``summon_full_params(root, recurse=False)``: it gathers in full precision, so under mixed
    precision (``strategy.mixed_precision.param_dtype=bfloat16``) float32 embeddings feed bfloat16 layers
    and sampling fails ("mat1 and mat2 must have the same dtype"), and it gathers twice the bytes. Holding
    the unit's parameters for the whole call rather than per step costs nothing at peak (every step needs
    them) and gathers once; afterwards they are released (:func:`_release`), so between calls only the
    shards stay. A unit already in its forward (Lightning's ``training_step``/``validation_step`` under
    FSDP1 run inside the root's forward) has its parameters gathered: it is left as it is.
    """
    if not units:
        return sample()
    unit, inner_units = units[0], units[1:]
    if _in_forward(unit):
        return _through_forward(inner_units, sample)
    from torch.distributed.fsdp import FullyShardedDataParallel

    # The module whose forward the unit calls: the wrapped module (FSDP1), or the unit itself (FSDP2 hooks).
    target = internals.fsdp1_wrapped_module(unit) if isinstance(unit, FullyShardedDataParallel) else unit
    own_forward = target.__dict__.get("forward")
    results = []

    def restore() -> None:
        if own_forward is None:
            target.__dict__.pop("forward", None)
        else:
            target.forward = own_forward

    def redirected(*args: Any, **kwargs: Any) -> None:
        restore()  # forward calls made while sampling reach the real one
        results.append(_through_forward(inner_units, sample))

    target.forward = redirected
    try:
        unit()
    finally:
        restore()
    _release(unit)
    return results[0]


def _in_forward(unit: torch.nn.Module) -> bool:
    """Whether an FSDP unit is inside its forward (or backward): its parameters are gathered already."""
    training_state = internals.fsdp_training_state(unit)
    return training_state is not None and training_state != "IDLE"


def _release(unit: torch.nn.Module) -> None:
    """Free a unit's gathered parameters after the sampling forward. A root keeps them after its forward
    (for the backward that follows in training), but sampling has no backward. FSDP2 needs this for more
    than memory: a root left gathered after a no-grad forward took a wrong optimizer step next (seen on
    torch 2.13, tests/fsdp_rollout_run.py ``after_step``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(unit, FullyShardedDataParallel):
        unit.reshard()  # FSDP2: public, not recursive
        return
    internals.fsdp1_reshard(unit)


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
