"""Sampling with a colocated vLLM engine (same process, same GPU as training).

The engine loads the checkpoint from disk once, then receives the policy's current weights after every
optimizer step through :meth:`VLLMRolloutBackend.sync_weights`: streamed from
:func:`selfbudget_pl.weights.full_weight_chunks` (gathered per FSDP unit or parameter, LoRA merged in
arithmetically, under the HF checkpoint's names) and loaded a chunk at a time. Every rank has its own
engine and loads the full weights into it.

``vllm`` is imported only when the backend is built, so this module imports on CPU; install it with
``pip install -e .[vllm]``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import torch

from selfbudget_pl.rollout.base import RolloutBackend, Rollouts, SamplingSettings
from selfbudget_pl.rollout.hf import eos_token_ids, repeat_columns
from selfbudget_pl.weights import full_weight_chunks


def import_vllm() -> Any:
    """``import vllm``, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "rollout=vllm needs the vLLM package, which is not installed: run `pip install -e .[vllm]` on a "
            "CUDA machine, or use rollout=hf."
        ) from error
    return vllm


class VLLMRolloutBackend(RolloutBackend):
    """Samples completions with ``vllm.LLM`` colocated with training.

    Args:
        model: the policy being trained (its ``name_or_path`` is the checkpoint vLLM starts from).
        tokenizer: the policy's tokenizer (EOS ids and decoding, so texts match the HF backend's).
        model_path: checkpoint directory or hub id for vLLM; defaults to ``model.name_or_path``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); the rest is
            left to training.
        enable_sleep_mode: release vLLM's GPU memory (KV cache freed, weights offloaded to CPU) between
            rollouts, so the optimizer step has the whole GPU; costs a host-device copy per step.
        max_model_len: prompt + completion ceiling; defaults to the model config's.
        dtype: vLLM weights dtype (``auto`` follows the checkpoint).
        seed: engine seed; per-request seeds come from ``SamplingSettings.seed``.
        weight_sync_chunk_mb: the weight sync hands the engine this many MiB of tensors per
            ``load_weights`` call (an FSDP1 unit's end also closes a chunk).
        engine_kwargs: anything else ``vllm.LLM`` accepts (e.g. ``enforce_eager``, ``max_num_seqs``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_path: Optional[str] = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        max_model_len: Optional[int] = None,
        dtype: str = "auto",
        seed: int = 0,
        weight_sync_chunk_mb: float = 512,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        self.weight_sync_chunk_bytes = max(1, int(weight_sync_chunk_mb * 2**20))
        self.tokenizer = tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        # In-process engine: the weights sync hands tensors to the model directly, without pickling
        # them to an engine-core process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One engine per training rank, each sampling for that rank's prompts.
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += torch.distributed.get_rank()
        self.llm = vllm.LLM(
            model=model_path or model.name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            **engine_kwargs,
        )
        self._sampling_params = vllm.SamplingParams
        self._asleep = False

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int,
        sampling: SamplingSettings,
        prefill: Optional[str] = None,
        columns: Optional[dict[str, Sequence[Any]]] = None,
    ) -> Rollouts:
        """Sample ``num_samples`` completions per prompt; one vLLM request per completion, each with its
        own seed (``sampling.seed + i``) so a seeded call is reproducible whatever the batching."""
        started = time.perf_counter()
        self._wake()
        prefill_ids = self.tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
        contexts = [list(prompt) + prefill_ids for prompt in prompt_ids for _ in range(num_samples)]
        params = [
            self._sampling_params(**sampling_params_kwargs(sampling, self.eos_token_ids, index))
            for index in range(len(contexts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in contexts], sampling_params=params, use_tqdm=False
        )
        self._sleep()
        rollouts = rollouts_from_outputs(outputs, contexts, num_samples, self.tokenizer, self.eos_token_ids, prefill)
        rollouts.columns = repeat_columns(columns, len(prompt_ids), num_samples)
        rollouts.generation_seconds = time.perf_counter() - started
        return rollouts

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Load the policy's current weights into the engine (call after every optimizer step).

        ``model`` is the policy, or under FSDP the sharded root that holds it at ``prefix`` (the
        LightningModule's ``trainer.model`` and ``"model."``): then this is a collective, and every rank
        gathers the full weights and loads them into its own engine.
        """
        self._wake()
        for chunk in full_weight_chunks(model, prefix, merge_lora=True, max_bytes=self.weight_sync_chunk_bytes):
            self._load_weights(chunk)
        # Cached prompt prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        self._sleep()

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        if worker is not None:
            # In-process engine (as TRL's colocate mode): the tensors are copied on-device, no transfer.
            worker.model_runner.model.load_weights(weights)
        else:
            on_cpu = [(name, tensor.detach().cpu()) for name, tensor in weights]
            self.llm.apply_model(lambda engine_model: engine_model.load_weights(on_cpu))

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.enable_sleep_mode:
            # Level 1 keeps a CPU copy of the weights, so a generate() with no sync in between
            # (validation before the first step) still samples from real weights.
            self.llm.sleep(level=1)
            self._asleep = True


def sampling_params_kwargs(sampling: SamplingSettings, eos_token_ids: Sequence[int], index: int = 0) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments for one completion (the ``index``-th of the call)."""
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # 0 disables it, as in transformers
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop),
        "stop_token_ids": list(eos_token_ids),
        "include_stop_str_in_output": True,
        "seed": None if sampling.seed is None else sampling.seed + index,
    }


def rollouts_from_outputs(
    outputs: Sequence[Any],
    contexts: list[list[int]],
    num_samples: int,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    prefill: Optional[str] = None,
) -> Rollouts:
    """Turn vLLM ``RequestOutput``s (one per completion, in request order) into :class:`Rollouts`.

    Completion texts are decoded here from the token ids (not vLLM's text), so ids and text agree exactly
    as in :class:`~selfbudget_pl.rollout.hf.HFRolloutBackend`.
    """
    completion_ids, finish_reasons, stop_token_ids = [], [], []
    for request in outputs:
        completion = request.outputs[0]
        ids = list(completion.token_ids)
        stop_token = None
        if completion.finish_reason == "length":
            reason = "length"
        elif isinstance(completion.stop_reason, str):  # a stop string; its tokens are kept, as HF keeps them
            reason = "stop"
        else:  # EOS (stop_reason None) or one of stop_token_ids: vLLM keeps that token last in token_ids
            reason = "eos"
            if ids and ids[-1] in eos_token_ids:
                stop_token = ids.pop()
        completion_ids.append(ids)
        finish_reasons.append(reason)
        stop_token_ids.append(stop_token)
    return Rollouts(
        prompt_ids=contexts,
        completion_ids=completion_ids,
        completions=[(prefill or "") + tokenizer.decode(ids, skip_special_tokens=False) for ids in completion_ids],
        finish_reasons=finish_reasons,
        stop_token_ids=stop_token_ids,
        group_index=[index // num_samples for index in range(len(contexts))],
    )
