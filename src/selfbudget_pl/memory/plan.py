"""The terms of the memory plan: every large thing a run holds, per device and per host, with the keys that
shrink it, computed from the composed config and the model's sizes (:class:`~.architecture.Architecture`).

A device holds ``resident`` terms for the whole run (weights, gradients, optimizer state, the reference
model, vLLM's share) and, at different moments, the ``step`` terms (a training micro-batch's activations,
the head, gathered FSDP units), the ``optimizer`` terms (the update's temporaries), the ``rollout`` terms
(the sampler's KV cache) and, on CPU, the ``checkpoint`` terms (a resume checkpoint being written): its
peak is the resident sum plus the largest of these. A host holds ``load`` terms while the model loads,
``export`` terms while the final weights are written and ``checkpoint`` terms while a resume checkpoint
is, one at a time.

What the run sets is read where it is set: a key absent from the config takes the value the code uses
when it is absent (e.g. no ``module.micro_batch_tokens``: a micro-batch is ``module.micro_batch_size``
completions of the longest sequence; no ``rollout.max_num_seqs``: vLLM holds the rank's most completions
of one call at once, the run's :class:`~selfbudget_pl.rollout.base.EngineLimits` as the module passes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from selfbudget_pl.memory.architecture import Architecture
from selfbudget_pl.rollout.base import EngineLimits, SamplingSettings, engine_limits

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16", "16", "half")
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
DEVICE_MOMENTS = ("step", "optimizer", "rollout", "checkpoint")  # a device holds one of these at a time
HOST_MOMENTS = ("load", "export", "checkpoint")


@dataclass
class PlanSettings:
    """The ``memory_plan`` config group.

    Args:
        enabled: compute, print and check the plan at launch.
        device_memory_gib: memory per device to check against; None: the devices found (a CUDA device's
            total; on CPU the host's available memory shared by its ranks).
        host_memory_gib: memory per host; None: this host's at launch (``selfbudget-plan`` then skips it).
        on_overflow: ``error`` stops a run that cannot fit, ``warn`` logs and runs.
        device_reserve_gib: per GPU, what no term counts: CUDA context, NCCL buffers, allocator slack.
        vllm_profile_gib: inside vLLM's share, its activation profile and CUDA graphs (not KV cache).
        activation_elements: elements a decoder layer keeps per token for backward, per hidden and per
            intermediate unit, in the compute dtype (a SwiGLU layer on SDPA: the norms' outputs, q, k, v,
            attention output; gate, up, their activation and product).
        norm_float32_bytes: bytes per token and hidden unit that the RMSNorms keep in float32 (two norms,
            input and normalised copy each).
        model_config: a ``config.json`` to read the model's sizes from instead of ``model.name_or_path``.
    """

    enabled: bool = True
    device_memory_gib: Optional[float] = None
    host_memory_gib: Optional[float] = None
    on_overflow: str = "error"
    device_reserve_gib: float = 1.0
    vllm_profile_gib: float = 2.0
    activation_elements: dict[str, float] = field(default_factory=lambda: {"hidden": 10.0, "intermediate": 4.0})
    norm_float32_bytes: float = 16.0
    model_config: Optional[str] = None

    def __post_init__(self) -> None:
        if self.on_overflow not in ("error", "warn"):
            raise ValueError(f"memory_plan.on_overflow={self.on_overflow!r} is not one of: error, warn")


@dataclass(frozen=True)
class Term:
    """One thing a device or host holds: ``bytes`` during ``phase``, with the config keys that shrink it."""

    name: str
    bytes: float
    phase: str  # device: resident or one of DEVICE_MOMENTS; host: resident or one of HOST_MOMENTS
    detail: str
    keys: tuple[str, ...] = ()


@dataclass
class MemoryPlan:
    """Every term of a run, per device and per host, and what the run looks like."""

    summary: str
    world_size: int
    ranks_per_host: int
    on_gpu: bool
    device: list[Term]
    host: list[Term]
    notes: list[str] = field(default_factory=list)
    vllm_share: Optional[float] = None  # bytes vLLM takes of a device (gpu_memory_utilization x its memory)
    vllm_floor: Optional[float] = None  # bytes vLLM needs to start: weights, profile, one max_model_len sequence

    def phase_bytes(self, terms: list[Term], phase: str) -> float:
        return sum(term.bytes for term in terms if term.phase == phase)

    @property
    def device_peak(self) -> float:
        """Resident terms plus the largest of a training step, an optimizer update, a rollout, a checkpoint."""
        return self.phase_bytes(self.device, "resident") + max(self.phase_bytes(self.device, phase)
                                                               for phase in DEVICE_MOMENTS)  # fmt: skip

    @property
    def host_peak(self) -> float:
        """Host-resident terms plus the largest of loading, export and a checkpoint."""
        return self.phase_bytes(self.host, "resident") + max(self.phase_bytes(self.host, phase)
                                                             for phase in HOST_MOMENTS)  # fmt: skip

    def peak_terms(self, terms: list[Term], transient: tuple[str, ...]) -> list[Term]:
        """The terms that make up a peak: resident ones and the largest transient phase."""
        larger = max(transient, key=lambda phase: self.phase_bytes(terms, phase))
        return [term for term in terms if term.phase in ("resident", larger)]


@dataclass(frozen=True)
class RunShape:
    """What the plan reads from the composed config (plain mappings), with the code's defaults."""

    trainer: Mapping[str, Any]
    strategy: Mapping[str, Any]
    model: Mapping[str, Any]
    module: Mapping[str, Any]
    data: Mapping[str, Any]
    rollout: Mapping[str, Any]
    callbacks: Mapping[str, Any] = field(default_factory=dict)

    @property
    def grpo(self) -> bool:
        return str(self.module.get("_target_", "")).endswith("GRPOModule")

    @property
    def vllm(self) -> bool:
        return str(self.rollout.get("_target_", "")).endswith("VLLMRolloutBackend")

    @property
    def lora(self) -> bool:
        return bool((self.model.get("lora") or {}).get("enabled"))

    @property
    def strategy_name(self) -> str:
        return str(self.strategy.get("name", "auto"))


def plan_memory(shape: RunShape, arch: Architecture, settings: PlanSettings, world_size: int,
                ranks_per_host: int, on_gpu: bool, device_memory: Optional[float]) -> MemoryPlan:
    """The plan of the run ``shape`` describes, on ``world_size`` devices (``ranks_per_host`` per host),
    ``device_memory`` bytes each when known (vLLM's share is a fraction of it)."""
    trained_dtype = _dtype(shape.model.get("dtype", "float32"), arch)
    frozen_dtype = _dtype(shape.model.get("frozen_dtype") or shape.model.get("dtype", "float32"), arch)
    shards = _shard_counts(shape, world_size, ranks_per_host)
    compute = _compute_bytes(shape, trained_dtype)
    device = _trained_state(shape, arch, settings, trained_dtype, frozen_dtype, shards, world_size)
    device += _compute_copies(shape, arch, trained_dtype, compute, shards)
    device += _activations(shape, arch, settings, compute)
    device += _optimizer_update(shape, arch, trained_dtype, shards, on_gpu)
    device += _sampler(shape, arch, compute, on_gpu)
    checkpoint_device, checkpoint_host = _checkpoint(shape, arch, trained_dtype, frozen_dtype, shards, ranks_per_host,
                                                     on_gpu)  # fmt: skip
    plan = MemoryPlan(
        summary=_summary(shape, arch, world_size, ranks_per_host, compute, trained_dtype),
        world_size=world_size, ranks_per_host=ranks_per_host, on_gpu=on_gpu, device=device + checkpoint_device,
        host=_host_terms(shape, arch, trained_dtype, frozen_dtype, ranks_per_host) + checkpoint_host,
    )  # fmt: skip
    if shape.vllm:
        _add_vllm(plan, shape, arch, settings, on_gpu, device_memory)
    return plan


# -- trained weights, gradients, optimizer state, reference ------------------------------------------------

_SHARD_KEYS = ("strategy=fsdp2", "trainer.devices")


def _trained_state(shape: RunShape, arch: Architecture, settings: PlanSettings, trained_dtype: str,
                   frozen_dtype: str, shards: dict[str, int], world_size: int) -> list[Term]:
    trainable = _trainable_parameters(shape, arch)
    params, grads, states = shards["params"], shards["grads"], shards["optimizer"]
    by = lambda count: f" / {count} ranks" if count > 1 else ""  # noqa: E731
    terms = []
    if shape.lora:
        terms.append(Term("frozen base weights", arch.parameters * DTYPE_BYTES[frozen_dtype] / params, "resident",
                          f"{_count(arch.parameters)} x {frozen_dtype}{by(params)}",
                          ("model.frozen_dtype=bfloat16", *_SHARD_KEYS)))
    terms.append(Term("trained weights", trainable * DTYPE_BYTES[trained_dtype] / params, "resident",
                      f"{_count(trainable)} x {trained_dtype}{by(params)}", (*_SHARD_KEYS, "model.lora.enabled=true")))
    ddp = shape.strategy_name == "ddp" or (shape.strategy_name == "auto" and world_size > 1)
    # DDP's buckets are a second copy of the gradients (gradient_as_bucket_view is off).
    copies = 2 if ddp else 1
    terms.append(Term("gradients", copies * trainable * DTYPE_BYTES[trained_dtype] / grads, "resident",
                      f"{_count(trainable)} x {trained_dtype}{by(grads)}" + (" x 2 (DDP buckets)" if ddp else ""),
                      (*_SHARD_KEYS, "model.lora.enabled=true")))
    optimizer = _optimizer_name(shape)
    moments = _moments(shape)
    terms.append(Term("optimizer state", moments * trainable * DTYPE_BYTES[trained_dtype] / states, "resident",
                      f"{moments} x {_count(trainable)} x {trained_dtype}{by(states)} ({optimizer})",
                      (*_SHARD_KEYS, "model.lora.enabled=true")))
    if shape.grpo and float(shape.module.get("beta", 0.0) or 0.0) > 0 and not shape.lora:
        terms.append(Term("reference model", arch.parameters * DTYPE_BYTES[frozen_dtype] / params, "resident",
                          f"{_count(arch.parameters)} x {frozen_dtype}{by(params)} (beta > 0)",
                          ("module.beta=0", "model.frozen_dtype=bfloat16", *_SHARD_KEYS)))
    return terms


def _trainable_parameters(shape: RunShape, arch: Architecture) -> int:
    lora = shape.model.get("lora") or {}
    if shape.lora:
        return arch.lora_parameters(int(lora.get("r", 8)), list(lora.get("target_modules") or []))
    return arch.parameters


def _optimizer_name(shape: RunShape) -> str:
    return str((shape.module.get("optimizer") or {}).get("_target_", "torch.optim.AdamW")).rsplit(".", 1)[-1]


def _moments(shape: RunShape) -> int:
    """Tensors of optimizer state per parameter: Adam's two moments, else one (momentum)."""
    return 2 if "Adam" in _optimizer_name(shape) else 1


def _shard_counts(shape: RunShape, world_size: int, ranks_per_host: int) -> dict[str, int]:
    """Over how many ranks parameters, gradients and optimizer state are split."""
    name = shape.strategy_name
    if name == "fsdp2":
        return dict.fromkeys(("params", "grads", "optimizer"), world_size)
    if name == "fsdp":
        sharding = str(shape.strategy.get("sharding_strategy", "FULL_SHARD"))
        group = ranks_per_host if "HYBRID" in sharding else world_size
        if sharding == "NO_SHARD":
            group = 1
        params = 1 if sharding in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2") else group
        return {"params": params, "grads": group, "optimizer": group}
    return dict.fromkeys(("params", "grads", "optimizer"), 1)


# -- what exists only during a training step -----------------------------------------------------------------

def _compute_copies(shape: RunShape, arch: Architecture, trained_dtype: str, compute: int,
                    shards: dict[str, int]) -> list[Term]:
    """Weights in the compute dtype: FSDP's gathered units, or autocast's cast copies."""
    if shape.strategy_name in ("fsdp", "fsdp2"):
        held = shape.strategy.get("reshard_after_forward", True) and shards["params"] > 1
        if held:  # the root unit stays gathered through the step; a layer in use and the one prefetched
            unit = max(arch.layer_parameters, arch.root_parameters)
            size = (arch.root_parameters + 2 * arch.layer_parameters) * compute + unit * DTYPE_BYTES["float32"]
            detail = (f"root {_count(arch.root_parameters)} + 2 x layer {_count(arch.layer_parameters)} x {compute} B"
                      " + the largest unit's float32 gradient")
        else:
            size, detail = arch.parameters * compute, f"{_count(arch.parameters)} x {compute} B (kept gathered)"
        return [Term("gathered weights", size, "step", detail, ("strategy.reshard_after_forward=true",))]
    precision = str(shape.trainer.get("precision", "32-true"))
    if precision in MIXED_PRECISIONS and DTYPE_BYTES[trained_dtype] > compute and not shape.lora:
        # autocast keeps each cast weight until the step's autocast region ends
        size, detail = arch.parameters * compute, f"{_count(arch.parameters)} x {compute} B ({precision})"
        terms = [Term("autocast weight copies", size, "step", detail, ("strategy=fsdp2",))]
        if not shape.vllm and _samples(shape):  # the training model samples inside that region too
            terms.append(Term("autocast weight copies (sampling)", size, "rollout", detail, ("rollout=vllm",)))
        return terms
    return []


def _activations(shape: RunShape, arch: Architecture, settings: PlanSettings, compute: int) -> list[Term]:
    tokens, how, keys = micro_batch_tokens(shape, arch)
    per_layer = tokens * ((settings.activation_elements["hidden"] * arch.hidden
                           + settings.activation_elements["intermediate"] * arch.intermediate) * compute
                          + settings.norm_float32_bytes * arch.hidden)  # fmt: skip
    checkpointed = bool(shape.model.get("gradient_checkpointing")) or bool(
        shape.strategy.get("activation_checkpointing")) and shape.strategy_name in ("fsdp", "fsdp2")
    if checkpointed:
        size = arch.layers * tokens * arch.hidden * compute + per_layer
        detail = f"{how}; checkpointed: {arch.layers} layer inputs + 1 layer recomputed"
    else:
        size = arch.layers * per_layer
        detail = f"{how}; {arch.layers} layers kept"
        keys = (*keys, "model.gradient_checkpointing=true")
    terms = [Term("activations", size, "step", detail, keys)]
    # GRPO always scores through the chunked head; SFT does when its loss runs on packed tokens.
    if shape.grpo or shape.module.get("packed_forward"):
        chunk = min(int(shape.module.get("head_chunk_tokens", 512)), tokens)
        head = tokens * arch.hidden * compute + 3 * chunk * arch.vocab * DTYPE_BYTES["float32"]
        terms.append(Term("LM head (chunked)", head, "step",
                          f"3 x {chunk} x {arch.vocab} float32 + hidden states", ("module.head_chunk_tokens",)))
    else:  # the model's own head and loss: logits, their float32 copy, log-softmax and its gradient
        head = tokens * arch.vocab * (compute + 3 * DTYPE_BYTES["float32"])
        terms.append(Term("LM head (logits)", head, "step", f"{tokens} x {arch.vocab} x ({compute} + 12) B",
                          ("data.batch_size", "data.max_length")))
    return terms


def _optimizer_update(shape: RunShape, arch: Architecture, trained_dtype: str, shards: dict[str, int],
                      on_gpu: bool) -> list[Term]:
    """Adam's update divides by sqrt(v) out of place: torch's foreach kernels (its default on GPU) build sqrt(v)
    of every parameter at once; its per-tensor loop (on CPU) builds sqrt(v) and the quotient, one tensor at a
    time. Fused kernels, and the momentum of other optimizers, update in place."""
    optimizer = shape.module.get("optimizer") or {}
    if _moments(shape) < 2 or optimizer.get("fused"):
        return []
    trainable = _trainable_parameters(shape, arch)
    dtype_bytes = DTYPE_BYTES[trained_dtype] / shards["optimizer"]
    foreach = optimizer.get("foreach")
    if on_gpu if foreach is None else foreach:
        return [Term("optimizer update", trainable * dtype_bytes, "optimizer",
                     f"sqrt(v) of {_count(trainable)} x {trained_dtype}, all at once (foreach)",
                     ("+module.optimizer.fused=true", "module.optimizer.foreach=false", *_SHARD_KEYS))]
    largest = min(arch.largest_matrix, trainable)  # LoRA: its adapters, all of them together, bound it
    return [Term("optimizer update", 2 * largest * dtype_bytes, "optimizer",
                 f"sqrt(v) and the quotient of the largest tensor ({_count(largest)} x {trained_dtype}), per tensor",
                 ("+module.optimizer.fused=true", *_SHARD_KEYS))]


def micro_batch_tokens(shape: RunShape, arch: Architecture) -> tuple[int, str, tuple[str, ...]]:
    """Tokens in the largest forward/backward, how that was counted, and the keys that bound it."""
    if shape.grpo:
        if shape.module.get("micro_batch_tokens"):
            return int(shape.module["micro_batch_tokens"]), "module.micro_batch_tokens", ("module.micro_batch_tokens",)
        completions = completions_per_step(shape)
        micro = min(int(shape.module.get("micro_batch_size") or shape.module.get("mini_batch_size") or completions),
                    completions)
        length, length_how = longest_sequence(shape, arch)
        return (micro * length, f"{micro} completions x {length} tokens ({length_how})",
                ("module.micro_batch_size", "module.sampling.max_new_tokens", "data.max_prompt_length"))
    rows = int(shape.data.get("batch_size", 1))
    length = int(shape.data.get("max_length") or arch.max_positions)
    source = "data.max_length" if shape.data.get("max_length") else "max_position_embeddings"
    return rows * length, f"{rows} rows x {length} tokens ({source})", ("data.batch_size", "data.max_length")


def completions_per_step(shape: RunShape) -> int:
    """Completions one rank samples per step: its prompts times the group size."""
    return int(shape.data.get("batch_size", 1)) * int(shape.module.get("num_generations", 5))


def sampling_engine_limits(shape: RunShape, arch: Architecture) -> EngineLimits:
    """The :class:`EngineLimits` the module hands its sampler (:meth:`PolicyModule.engine_limits`), read from the
    config: prompts up to ``data.max_prompt_length`` (the data is not read here: where it is null, the model's
    positions less the longest completion), and each kind of call the run makes: a validation batch, and under
    GRPO a step's completions."""
    calls = sampling_calls(shape, validation=True)
    prompt = shape.data.get("max_prompt_length")
    if prompt:
        return engine_limits(int(prompt), "data.max_prompt_length", calls)
    room = max(arch.max_positions - max(new for _, new in calls), 0)
    return engine_limits(room, "max_position_embeddings (data.max_prompt_length is null)", calls)


def sampling_calls(shape: RunShape, validation: bool) -> list[tuple[int, int]]:
    """``(completions, max_new_tokens)`` of each kind of sampling call (:meth:`PolicyModule.sampling_calls`):
    a validation batch when ``validation``, and under GRPO a step's completions."""
    calls = []
    if validation:
        val_new = int((shape.module.get("val_sampling") or {}).get("max_new_tokens", SamplingSettings.max_new_tokens))
        calls.append((int(shape.data.get("val_batch_size") or shape.data.get("batch_size", 1)), val_new))
    if shape.grpo:
        train_new = int((shape.module.get("sampling") or {}).get("max_new_tokens", 8192))
        calls.append((completions_per_step(shape), train_new))
    return calls


def longest_sequence(shape: RunShape, arch: Architecture) -> tuple[int, str]:
    """Prompt plus completion at their limits, within the model's positions."""
    new = int((shape.module.get("sampling") or {}).get("max_new_tokens", 8192))
    prompt = shape.data.get("max_prompt_length")
    if prompt:
        return min(int(prompt) + new, arch.max_positions), "data.max_prompt_length + max_new_tokens"
    return arch.max_positions, "max_position_embeddings: data.max_prompt_length is null"


# -- sampling ------------------------------------------------------------------------------------------------

def _sampler(shape: RunShape, arch: Architecture, compute: int, on_gpu: bool) -> list[Term]:
    """The training model's own sampler (rollout=hf): its KV cache and last-token logits, for the largest of
    the run's calls (validation samples unless ``trainer.limit_val_batches=0``; SFT's only there, when it
    generates)."""
    if shape.vllm or not _samples(shape):
        return []
    calls = sampling_calls(shape, _validation_samples(shape))
    prompt = int(shape.data.get("max_prompt_length") or arch.max_positions)
    sizes = []
    for sequences, new in calls:
        sequences = min(sequences, int(shape.rollout.get("batch_size", 64)))
        length = min(prompt + new, arch.max_positions)
        size = sequences * (length * arch.kv_bytes_per_token(compute) + 2 * arch.vocab * DTYPE_BYTES["float32"])
        sizes.append((size, f"{sequences} sequences x {length} tokens"))
    size, detail = max(sizes)
    return [Term("sampler KV cache", size, "rollout", detail,
                 ("rollout.batch_size", "module.sampling.max_new_tokens", "module.val_sampling.max_new_tokens"))]


def _validation_samples(shape: RunShape) -> bool:
    return float(shape.trainer.get("limit_val_batches", 1.0)) != 0 and (
        shape.grpo or bool(shape.module.get("generate_in_validation", True)))


def _samples(shape: RunShape) -> bool:
    """Whether the run samples at all: GRPO every step, SFT in validation."""
    return shape.grpo or _validation_samples(shape)


def _add_vllm(plan: MemoryPlan, shape: RunShape, arch: Architecture, settings: PlanSettings, on_gpu: bool,
              device_memory: Optional[float]) -> None:
    """vLLM's weights and KV cache; on a GPU, the share it takes and the least it needs to start."""
    rollout = shape.rollout
    dtype = _dtype(rollout.get("dtype", "auto"), arch)
    weights = arch.parameters * DTYPE_BYTES[dtype]
    limits = sampling_engine_limits(shape, arch)
    length, sequences = limits.engine_sizes(rollout.get("max_model_len"), rollout.get("max_num_seqs"))
    length_how = "rollout.max_model_len" if rollout.get("max_model_len") else f"{limits.prompt_key} + max_new_tokens"
    sequences_how = "rollout.max_num_seqs" if rollout.get("max_num_seqs") else "the rank's most completions per call"
    per_sequence = length * arch.kv_bytes_per_token(DTYPE_BYTES[dtype])
    need = sequences * per_sequence
    phase = "rollout" if rollout.get("enable_sleep_mode") and on_gpu else "resident"
    plan.device.append(Term("vLLM weights", weights, phase, f"{_count(arch.parameters)} x {dtype}",
                            ("rollout.dtype=bfloat16",)))
    kv_keys = ("rollout.max_model_len", "rollout.max_num_seqs", "data.batch_size")
    if not on_gpu:
        kv = float(rollout.get("kv_cache_gb") or rollout.get("cpu_kv_cache_gb") or 0) * GIB
        plan.device.append(Term("vLLM KV cache", kv, phase, "rollout.kv_cache_gb / cpu_kv_cache_gb",
                                ("rollout.cpu_kv_cache_gb",)))
        return
    profile = settings.vllm_profile_gib * GIB
    plan.vllm_floor = weights + profile + per_sequence
    if rollout.get("kv_cache_gb"):
        plan.vllm_share = weights + profile + float(rollout["kv_cache_gb"]) * GIB
    elif device_memory is not None:
        plan.vllm_share = float(rollout.get("gpu_memory_utilization", 0.9)) * device_memory
    wanted = (f"{length} ({length_how}) x {sequences} ({sequences_how}) x "
              f"{arch.kv_bytes_per_token(DTYPE_BYTES[dtype]) // 1024} KiB")
    kv = need
    if plan.vllm_share is not None:
        # vLLM gives all of its share beyond weights and profile to the KV cache, whatever the run needs.
        kv = max(plan.vllm_share - weights - profile, 0.0)
        wanted = f"its share's rest; needs {need / GIB:.2f} GiB for {wanted}"
        if 0 < kv < need:
            plan.notes.append(
                f"vLLM's KV cache holds {kv / per_sequence:.1f} of the {sequences} sequences of {length} tokens "
                f"it may be sent: it will preempt (set rollout.max_model_len, rollout.max_num_seqs)"
            )
    plan.device.append(Term("vLLM KV cache", kv, phase, wanted, ("rollout.gpu_memory_utilization", *kv_keys)))
    plan.device.append(Term("vLLM profile and graphs", profile, phase, "memory_plan.vllm_profile_gib", ()))
    if rollout.get("enable_sleep_mode"):
        plan.host.append(Term("vLLM sleeping weights (pinned)", plan.ranks_per_host * weights, "resident",
                              f"{plan.ranks_per_host} ranks x {_count(arch.parameters)} x {dtype}",
                              ("rollout.enable_sleep_mode=false",)))


# -- resume checkpoints --------------------------------------------------------------------------------------

def _checkpoint(shape: RunShape, arch: Architecture, trained_dtype: str, frozen_dtype: str, shards: dict[str, int],
                ranks_per_host: int, on_gpu: bool) -> tuple[list[Term], list[Term]]:
    """A resume checkpoint (a ``*Checkpoint`` callback), per device and per host. A single file: rank 0
    serializes the weights and the optimizer state into memory before writing it (Lightning's atomic save),
    under FSDP after gathering them there. Sharded (FSDP's default here): each rank writes tensor by tensor
    from where they lie, a GPU's through host memory. On CPU the host's memory is the device's."""
    saver = next((entry for entry in shape.callbacks.values() if isinstance(entry, Mapping)
                  and str(entry.get("_target_", "")).endswith("Checkpoint")), None)  # fmt: skip
    if saver is None:
        return [], []
    keys: tuple[str, ...] = ("+callbacks.model_checkpoint.save_weights_only=true", "callbacks.model_checkpoint=null")
    fsdp = shape.strategy_name in ("fsdp", "fsdp2")
    if (shape.strategy_name == "fsdp" and shape.strategy.get("state_dict_type", "sharded") == "sharded") or (
            shape.strategy_name == "fsdp2" and shape.strategy.get("save_distributed_checkpoint", True)):
        tensor = arch.largest_matrix * DTYPE_BYTES[trained_dtype] / shards["params"]
        host = Term("checkpoint (sharded)", ranks_per_host * tensor, "checkpoint",
                    f"{ranks_per_host} ranks x the largest tensor's shard in host memory", ())
        return [], [host] if on_gpu else []
    trainable = _trainable_parameters(shape, arch)
    weights = arch.parameters * DTYPE_BYTES[trained_dtype]
    if shape.lora:
        weights = arch.parameters * DTYPE_BYTES[frozen_dtype] + trainable * DTYPE_BYTES[trained_dtype]
    state = 0 if saver.get("save_weights_only") else _moments(shape) * trainable * DTYPE_BYTES[trained_dtype]
    copies = 2 if fsdp else 1
    detail = "rank 0: weights" + ("" if saver.get("save_weights_only") else " + optimizer state") + " serialized"
    if fsdp:
        detail += ", and gathered before"
        keys += ("strategy.state_dict_type=sharded" if shape.strategy_name == "fsdp"
                 else "strategy.save_distributed_checkpoint=true",)  # fmt: skip
    term = Term("checkpoint (one file)", copies * (weights + state), "checkpoint", detail, keys)
    return ([] if on_gpu else [term]), [term]


# -- per host ------------------------------------------------------------------------------------------------

def _host_terms(shape: RunShape, arch: Architecture, trained_dtype: str, frozen_dtype: str,
                ranks_per_host: int) -> list[Term]:
    """Loading (each loading rank reads the checkpoint into host memory before it moves or shards it: every
    rank, or rank 0 alone under ``strategy.load_from_rank_zero``) and the export (streamed in shards of
    ``module.export_shard_gib``; LoRA kept unmerged: rank 0 gathers the state dict and loads a fresh model)."""
    base_dtype = frozen_dtype if shape.lora else trained_dtype
    once = (shape.strategy_name in ("fsdp", "fsdp2") and shape.strategy.get("load_from_rank_zero", True)
            and ranks_per_host > 1)
    loaders, who = (1, "rank 0 only") if once else (ranks_per_host, f"{ranks_per_host} ranks")
    load_keys = () if once else ("strategy=fsdp or fsdp2 (strategy.load_from_rank_zero=true)",)
    terms = [Term("loading: the model", loaders * arch.parameters * DTYPE_BYTES[base_dtype], "load",
                  f"{who} x {_count(arch.parameters)} x {base_dtype}", ("model.lora.enabled=true", *load_keys))]
    if shape.grpo and float(shape.module.get("beta", 0.0) or 0.0) > 0 and not shape.lora:
        terms.append(Term("loading: the reference model", loaders * arch.parameters * DTYPE_BYTES[frozen_dtype],
                          "load", f"{who} x {_count(arch.parameters)} x {frozen_dtype}", ("module.beta=0", *load_keys)))
    full = arch.parameters * DTYPE_BYTES[trained_dtype]
    if shape.lora and not shape.module.get("merge_lora_on_export", True):
        export, detail = 2 * full, "rank 0: gathered state dict + fresh model (LoRA unmerged)"
    else:
        shard = float(shape.module.get("export_shard_gib", 2.0)) * GIB
        largest = arch.vocab * arch.hidden * DTYPE_BYTES[trained_dtype]  # the embedding: the largest tensor
        export = min(shard, full) + largest
        detail = "rank 0: one streamed shard (module.export_shard_gib) + one gathered tensor"
    terms.append(Term("export", export, "export", detail, ("module.export_shard_gib",)))
    return terms


# -- helpers -------------------------------------------------------------------------------------------------

def _dtype(name: Any, arch: Architecture) -> str:
    """A dtype name; ``auto`` is the checkpoint's own (float32 when its config does not say)."""
    name = str(name)
    if name == "auto":
        return arch.dtype if arch.dtype in DTYPE_BYTES else "float32"
    return name


def _compute_bytes(shape: RunShape, trained_dtype: str) -> int:
    """Bytes of an activation: FSDP's param dtype, else the trainer's precision, else the weights'."""
    mixed = shape.strategy.get("mixed_precision") or {}
    if shape.strategy_name in ("fsdp", "fsdp2") and mixed.get("param_dtype"):
        return DTYPE_BYTES[str(mixed["param_dtype"])]
    if str(shape.trainer.get("precision", "32-true")) in HALF_PRECISIONS:
        return 2
    return DTYPE_BYTES[trained_dtype]


def _summary(shape: RunShape, arch: Architecture, world_size: int, ranks_per_host: int, compute: int,
             trained_dtype: str) -> str:
    stage = "GRPO" if shape.grpo else "SFT"
    training = "LoRA" if shape.lora else f"full, {trained_dtype} master weights"
    hosts = math.ceil(world_size / ranks_per_host)
    return (f"{arch.name} ({_count(arch.parameters)} parameters), {stage} ({training}), "
            f"strategy {shape.strategy_name} over {world_size} device(s) ({hosts} host(s) x {ranks_per_host}), "
            f"{compute}-byte compute, rollout {'vllm' if shape.vllm else 'hf'}")


def _count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)
