"""One schema per config group the code reads, field for field the constructor it configures.

``tests/test_config_checks.py`` fails when a constructor gains or loses an argument that its schema
does not (the ``TARGETS``/``INJECTED`` of each class below), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from selfbudget_pl.callbacks.progress import ProgressLinesSchema
from selfbudget_pl.data.datamodule import BudgetMathDataSchema
from selfbudget_pl.data.sources import HFSourceSchema, JsonlSourceSchema
from selfbudget_pl.data.synthetic import SyntheticSourceSchema
from selfbudget_pl.rewards.budget import BudgetGuidedRewardSchema
from selfbudget_pl.rewards.grader import MathGraderSchema
from selfbudget_pl.rollout.hf import HFRolloutSchema
from selfbudget_pl.schema import HYDRA_KEYS, REGISTRY, Findings, Schema, Target, check_node, not_blank, register, spec

# -- shared pieces -----------------------------------------------------------------------------------


def _pair_in_order(value: Any) -> Optional[str]:
    if len(value) != 2:
        return f"has {len(value)} entries, not 2"
    low, high = value
    return None if 0 < low <= high else "must satisfy 0 < low <= high"


def _two_betas(value: Any) -> Optional[str]:
    return None if len(value) == 2 else f"has {len(value)} entries, not 2"


def _not_empty(value: Any) -> Optional[str]:
    return None if len(value) else "is empty"


@dataclass
class SamplingSchema(Schema):
    """:class:`~selfbudget_pl.rollout.base.SamplingSettings` (``module.sampling``, ``module.val_sampling``,
    the evaluation's ``sampling``)."""

    TARGETS = ("selfbudget_pl.rollout.base.SamplingSettings",)

    temperature: float = spec(ge=0, note="0 = greedy")
    top_p: float = spec(gt=0, le=1)
    top_k: int = spec(ge=0, note="0 = off")
    max_new_tokens: int = spec(ge=1)
    stop: list[str] = spec()
    seed: Optional[int] = spec()
    logprobs: bool = spec(note="record the sampler's log-probs (GRPO's sampler correction asks for them itself)")


@dataclass
class TrainingSamplingSchema(SamplingSchema):
    """GRPO's rollout sampling: greedy is legal, but G identical completions teach nothing."""

    TARGETS = ()

    temperature: float = spec(
        ge=0,
        note="0 = greedy",
        warn=lambda t: (
            "greedy training rollouts: the G completions of a prompt are identical, so every advantage is 0 "
            "and no step changes the policy; sample with a temperature > 0 (the paper uses 0.6)"
        ) if t == 0 else None,
    )


@dataclass
class OptimizerSchema(Schema):
    """``module.optimizer``: any ``torch.optim``-style optimizer (``_partial_: true``); the usual
    arguments are checked, the rest pass through to it."""

    OPEN = True

    lr: float = spec(gt=0)
    weight_decay: float = spec(ge=0)
    betas: list[float] = spec(ge=0, lt=1, rule=_two_betas)
    eps: float = spec(gt=0)
    momentum: float = spec(ge=0)


@dataclass
class SamplerCorrectionSchema(Schema):
    """:class:`~selfbudget_pl.modules.losses.SamplerCorrection` (``module.sampler_correction``)."""

    TARGETS = ("selfbudget_pl.modules.losses.SamplerCorrection",)

    enabled: Union[str, bool] = spec(choices=("auto", True, False), note="auto: on for a sampler with its own engine")
    level: str = spec(choices=("token", "sequence"))
    mode: str = spec(choices=("truncate", "mask"), note="mask: a ratio above the cap drops its tokens; truncate: cut to it")
    cap: float = spec(gt=0)


# -- module ----------------------------------------------------------------------------------------


@dataclass
class PolicyModuleSchema(Schema):
    """:class:`~selfbudget_pl.modules.base.PolicyModule` (what SFT and GRPO share)."""

    INJECTED = ("model_loader", "output_format", "grader", "rollout")

    optimizer: OptimizerSchema = spec()
    warmup_steps: int = spec(ge=0)
    min_lr_ratio: float = spec(ge=0, le=1)
    max_grad_norm: Optional[float] = spec(gt=0, note="null: no clipping")
    val_sampling: Optional[SamplingSchema] = spec()
    export_dir: Optional[str] = spec(note="null: no export")
    merge_lora_on_export: bool = spec()
    export_shard_gib: float = spec(gt=0)
    packed_forward: bool = spec()
    head_chunk_tokens: int = spec(ge=1, note="tokens whose logits exist at once")


@dataclass
class SFTModuleSchema(PolicyModuleSchema):
    TARGETS = ("selfbudget_pl.modules.sft.SFTModule",)

    generate_in_validation: bool = spec()


@dataclass
class GRPOModuleSchema(PolicyModuleSchema):
    TARGETS = ("selfbudget_pl.modules.grpo.GRPOModule",)

    num_generations: int = spec(ge=2, note="G: GRPO's baseline is the group's mean")
    sampling: Optional[TrainingSamplingSchema] = spec()
    num_iterations: int = spec(ge=1)
    mini_batch_size: Optional[int] = spec(ge=1, note="null: the whole batch in one optimizer step")
    micro_batch_size: Optional[int] = spec(ge=1, note="null: a whole mini-batch per forward")
    micro_batch_tokens: Optional[int] = spec(ge=1, note="null: no bound on a forward's tokens")
    epsilon_low: float = spec(ge=0, lt=1, note="the ratio is clipped at 1 - epsilon_low")
    epsilon_high: float = spec(ge=0)
    beta: float = spec(ge=0, note="0: no KL term and no reference model")
    loss_aggregation: str = spec(choices=("token", "sequence", "dr_grpo"))
    scale_rewards: bool = spec()
    advantage_eps: float = spec(gt=0)
    rollout_seed: Optional[int] = spec(note="null: the global RNG")
    log_entropy: bool = spec()
    prefill_fraction: float = spec(ge=0, le=1)
    prefill_budget_range: list[float] = spec(rule=_pair_in_order)
    prefill_draw: str = spec(choices=("prompt", "completion"), note="who shares a pre-filled N: a prompt's G, or none")
    mask_truncated_completions: bool = spec()
    sampler_correction: Optional[SamplerCorrectionSchema] = spec(note="null: the defaults (auto)")


# -- model -----------------------------------------------------------------------------------------


@dataclass
class LoraSchema(Schema):
    TARGETS = ("selfbudget_pl.models.LoraSettings",)

    enabled: bool = spec()
    r: int = spec(ge=1)
    alpha: float = spec(gt=0)
    dropout: float = spec(ge=0, lt=1)
    target_modules: list[str] = spec(rule=_not_empty)


@dataclass
class TinyModelSchema(Schema):
    TARGETS = ("selfbudget_pl.tiny_model.TinyModelSpec",)

    vocab_size: int = spec(ge=1)
    hidden_size: int = spec(ge=1)
    intermediate_size: int = spec(ge=1)
    num_hidden_layers: int = spec(ge=1)
    num_attention_heads: int = spec(ge=1)
    num_key_value_heads: int = spec(ge=1)
    max_position_embeddings: int = spec(ge=1)
    tie_word_embeddings: bool = spec()
    corpus_size: int = spec(ge=1)
    seed: int = spec()
    format_tags: list[str] = spec()
    rope_theta: float = spec(gt=0)
    pad_vocab: bool = spec(note="fill the vocabulary up to vocab_size with unused entries")

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        hidden, heads, kv = node.get("hidden_size"), node.get("num_attention_heads"), node.get("num_key_value_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
            findings.error(f"{key}.hidden_size", hidden, f"must be a multiple of {key}.num_attention_heads={heads}")
        if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
            findings.error(f"{key}.num_attention_heads", heads, f"must be a multiple of {key}.num_key_value_heads={kv}")


@dataclass
class ModelLoaderSchema(Schema):
    TARGETS = ("selfbudget_pl.models.ModelLoader",)

    name_or_path: Optional[str] = spec(note="null: the tiny model built from `tiny`")
    tiny: Optional[TinyModelSchema] = spec()
    dtype: str = spec(choices=("float32", "bfloat16", "float16", "auto"))
    frozen_dtype: Optional[str] = spec(choices=("float32", "bfloat16", "float16", "auto"), note="null: dtype")
    lora: Optional[LoraSchema] = spec()
    gradient_checkpointing: bool = spec()
    attn_implementation: Optional[str] = spec()
    trust_remote_code: bool = spec()
    cache_dir: Optional[str] = spec()
    allow_low_precision_training: bool = spec()


# -- answer format, rewards, grader -----------------------------------------------------------------


@dataclass
class OutputFormatSchema(Schema):
    TARGETS = ("selfbudget_pl.format.OutputFormat", "selfbudget_pl.data.answers.FreeFormOutput")

    budget_open: str = spec(rule=not_blank)
    budget_close: str = spec(rule=not_blank)
    solution_open: str = spec(rule=not_blank)
    solution_close: str = spec(rule=not_blank)
    max_budget: int = spec(ge=1)
    max_chars: int = spec(ge=1)
    require_solution_block: bool = spec()

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        tags = [node.get(name) for name in ("budget_open", "budget_close", "solution_open", "solution_close")]
        if all(isinstance(tag, str) for tag in tags) and len(set(tags)) < len(tags):
            findings.error(key, tags, "the four tags must all differ")


@dataclass
class RewardCallbackSchema(Schema):
    TARGETS = ("selfbudget_pl.callbacks.reward.RewardCallback",)

    functions: dict[str, Target] = spec(rule=_not_empty)
    weights: Optional[dict[str, float]] = spec(note="names left out weigh 1.0")
    sync_dist: bool = spec()

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        functions, weights = node.get("functions"), node.get("weights")
        if isinstance(functions, Mapping) and isinstance(weights, Mapping):
            for name in weights:
                if name not in functions:
                    findings.error(f"{key}.weights.{name}", weights[name],
                                   f"names no reward function; {key}.functions has {sorted(functions)}")


@dataclass
class L1ExactRewardSchema(Schema):
    TARGETS = ("selfbudget_pl.rewards.length_control.L1ExactReward",)
    INJECTED = ("output_format", "grader")

    alpha: float = spec(ge=0)
    no_target_reward: float = spec()


@dataclass
class L1MaxRewardSchema(L1ExactRewardSchema):
    TARGETS = ("selfbudget_pl.rewards.length_control.L1MaxReward",)

    delta: float = spec()


@dataclass
class AccuracyRewardSchema(Schema):
    TARGETS = ("selfbudget_pl.rewards.simple.AccuracyReward",)
    INJECTED = ("output_format", "grader")

    correct_reward: float = spec()
    wrong_reward: float = spec()


@dataclass
class FormatRewardSchema(Schema):
    TARGETS = ("selfbudget_pl.rewards.simple.FormatReward",)
    INJECTED = ("output_format",)

    well_formed_reward: float = spec()
    malformed_reward: float = spec()


# -- rollout -----------------------------------------------------------------------------------------


@dataclass
class VLLMRolloutSchema(Schema):
    TARGETS = ("selfbudget_pl.rollout.vllm.VLLMRolloutBackend",)
    INJECTED = ("model", "tokenizer", "limits")
    OPEN = True  # further keys are vLLM engine arguments

    model_path: Optional[str] = spec(note="null: the policy's name_or_path")
    gpu_memory_utilization: float = spec(gt=0, le=1)
    kv_cache_gb: Optional[float] = spec(gt=0, note="null: gpu_memory_utilization on GPUs, cpu_kv_cache_gb on CPU")
    cpu_kv_cache_gb: float = spec(gt=0)
    enable_sleep_mode: bool = spec()
    max_model_len: Optional[int] = spec(ge=1, note="null: the run's longest prompt + max_new_tokens")
    max_num_seqs: Optional[int] = spec(ge=1, note="null: the rank's completions per sampling call")
    dtype: str = spec()
    seed: int = spec()


# -- data ------------------------------------------------------------------------------------------


# -- callbacks and strategy ----------------------------------------------------------------------------


@dataclass
class BudgetMetricsSchema(Schema):
    TARGETS = ("selfbudget_pl.callbacks.budget_metrics.BudgetMetricsCallback",)

    difficulty_buckets: Optional[list[float]] = spec()
    prefix: str = spec()
    histogram_prefix: Optional[str] = spec(note="null: no histograms")
    understated_fraction: float = spec(gt=0, note="understated_rate: own budgets below this fraction of their length")


# Thin subclasses of Lightning classes that take exactly their parent's arguments: Lightning checks them.
LIGHTNING_SUBCLASSES = (
    "selfbudget_pl.callbacks.checkpoint.StepCheckpoint",
    "selfbudget_pl.loggers.TensorBoardLogger",
)


@dataclass
class PlanSettingsSchema(Schema):
    TARGETS = ("selfbudget_pl.memory.plan.PlanSettings",)

    enabled: bool = spec()
    device_memory_gib: Optional[float] = spec(gt=0, note="null: the devices found")
    host_memory_gib: Optional[float] = spec(gt=0, note="null: this host's at launch")
    on_overflow: str = spec(choices=("error", "warn"))
    device_reserve_gib: float = spec(ge=0)
    vllm_profile_gib: float = spec(ge=0)
    activation_elements: dict[str, float] = spec()
    norm_float32_bytes: float = spec(ge=0)
    model_config: Optional[str] = spec(note="null: model.name_or_path's config")


@dataclass
class DDPSchema(Schema):
    TARGETS = ("selfbudget_pl.strategies.ddp_strategy",)
    OPEN = True  # further keys go to Lightning's DDPStrategy

    find_unused_parameters: bool = spec()
    static_graph: bool = spec()


@dataclass
class FSDPSchema(Schema):
    TARGETS = ("selfbudget_pl.strategies.fsdp_strategy",)
    INJECTED = ("model",)
    OPEN = True  # further keys go to Lightning's FSDPStrategy

    wrap_layers: Optional[list[str]] = spec(note="null: the model's _no_split_modules")
    activation_checkpointing: bool = spec()
    mixed_precision: Optional[dict[str, Optional[str]]] = spec()
    sharding_strategy: str = spec(choices=("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"))
    state_dict_type: str = spec(choices=("sharded", "full"))
    cpu_offload: bool = spec()
    load_from_rank_zero: bool = spec()


@dataclass
class FSDP2Schema(Schema):
    TARGETS = ("selfbudget_pl.strategies.fsdp2_strategy",)
    INJECTED = ("model",)
    OPEN = True  # further keys go to Lightning's ModelParallelStrategy

    wrap_layers: Optional[list[str]] = spec(note="null: the model's _no_split_modules")
    activation_checkpointing: bool = spec()
    mixed_precision: Optional[dict[str, Optional[str]]] = spec()
    reshard_after_forward: bool = spec()
    cpu_offload: bool = spec()
    save_distributed_checkpoint: bool = spec()
    load_from_rank_zero: bool = spec()


STRATEGY_OPTIONS: dict[str, Optional[type[Schema]]] = {"auto": None, "ddp": DDPSchema, "fsdp": FSDPSchema,
                                                        "fsdp2": FSDP2Schema}


@dataclass
class StrategySchema(Schema):
    """``selfbudget_pl.strategies.make_strategy``: ``name`` picks which options schema the rest follows."""

    TARGETS = ("selfbudget_pl.strategies.make_strategy",)
    INJECTED = ("model",)
    OPEN = True  # the options of the chosen strategy, checked in check_together

    name: str = spec(choices=tuple(STRATEGY_OPTIONS))

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        name = node.get("name", "auto")
        if name not in STRATEGY_OPTIONS:
            return  # reported by the `name` field
        options = {k: v for k, v in node.items() if k != "name" and k not in HYDRA_KEYS}
        schema = STRATEGY_OPTIONS[name]
        if schema is None:
            for option, value in options.items():
                findings.error(f"{key}.{option}" if key else option, value, "strategy 'auto' takes no options")
            return
        check_node(options, schema, key, findings)


register(
    SamplingSchema, SamplerCorrectionSchema, SFTModuleSchema, GRPOModuleSchema, LoraSchema, TinyModelSchema, ModelLoaderSchema,
    OutputFormatSchema, RewardCallbackSchema, BudgetGuidedRewardSchema, L1ExactRewardSchema, L1MaxRewardSchema,
    AccuracyRewardSchema, FormatRewardSchema, MathGraderSchema, HFRolloutSchema, VLLMRolloutSchema,
    BudgetMathDataSchema, JsonlSourceSchema, HFSourceSchema, SyntheticSourceSchema, BudgetMetricsSchema,
    ProgressLinesSchema, PlanSettingsSchema,
    StrategySchema,
)
# Strategy options are checked through StrategySchema (they have no `_target_` of their own).
ALL_SCHEMAS: tuple[type[Schema], ...] = (*dict.fromkeys(REGISTRY.values()), DDPSchema, FSDPSchema, FSDP2Schema)
