"""The one place configs are checked, before any model or data is loaded.

- :func:`check_train_config`: ``train()`` (``python train.py ...``), every group the modules read;
- :func:`check_eval_config`: ``selfbudget-eval``;
- :func:`check_generation`: ``selfbudget generate``.

Each raises :class:`ConfigError` listing every bad value as ``full.key=value: what is allowed`` and logs
values that are legal but surprising as warnings, once. Schemas: :mod:`selfbudget_pl.config.groups`;
checks across groups and against the machine: :mod:`selfbudget_pl.config.startup`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig

from selfbudget_pl.callbacks.reward import RewardCallback
from selfbudget_pl.config import groups
from selfbudget_pl.config.startup import (
    check_devices,
    check_length_limit,
    check_low_precision_training,
    check_room,
    check_trainer,
    model_facts,
)
from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.rewards.budget import BudgetGuidedReward
from selfbudget_pl.schema import UNRESOLVED, ConfigError, Findings, check_target, check_value

__all__ = [
    "ConfigError",
    "check_budget_caps",
    "check_eval_config",
    "check_eval_prompts",
    "check_generation",
    "check_train_config",
    "check_training_prompts",
    "longest_eval_prompt",
    "plain",
]

_POSITIVE = {"ge": 1, "note": "null: torch's default"}
_TARGET_GROUPS = ("module", "model", "data", "output_format", "reward", "grader", "rollout", "strategy", "memory_plan")


def check_train_config(cfg: DictConfig) -> None:
    """Check a composed ``train.yaml`` config; raise :class:`ConfigError` naming every bad value."""
    findings = Findings()
    plain_cfg = {group: plain(cfg.get(group)) for group in (*_TARGET_GROUPS, "callbacks", "trainer")}
    for group in _TARGET_GROUPS:
        if plain_cfg[group] is not None:
            check_target(plain_cfg[group], group, findings)
    for name, callback in (plain_cfg["callbacks"] or {}).items():
        if callback is not None:
            check_target(callback, f"callbacks.{name}", findings)
    _check_top_level(cfg, findings)

    model, module, data = plain_cfg["model"] or {}, plain_cfg["module"] or {}, plain_cfg["data"] or {}
    rollout, strategy = plain_cfg["rollout"] or {}, plain_cfg["strategy"] or {}
    check_trainer(findings, plain_cfg["trainer"] or {}, _gpu_hints(rollout, strategy))
    if str(module.get("_target_", "")).endswith("GRPOModule"):
        _check_manual_optimization(findings, plain_cfg["trainer"] or {})
    _check_single_activation_checkpointing(findings, model, strategy)
    warmup, max_steps = module.get("warmup_steps"), (plain_cfg["trainer"] or {}).get("max_steps")
    if isinstance(warmup, int) and isinstance(max_steps, int) and 0 < max_steps <= warmup:
        findings.warning("module.warmup_steps", warmup, f"is not below trainer.max_steps={max_steps}: the learning "
                         "rate never reaches module.optimizer.lr")
    if not findings.errors:  # the model's config is read only once the values that name it are sound
        facts = model_facts(model)
        prompt = data.get("max_prompt_length") if isinstance(data.get("max_prompt_length"), int) else None
        engine_limit = rollout.get("max_model_len") if _is_vllm(rollout) else None
        for name in ("sampling", "val_sampling"):
            settings = module.get(name)
            if isinstance(settings, Mapping):
                check_room(
                    findings, facts, settings.get("max_new_tokens"), f"module.{name}.max_new_tokens",
                    prompt, "data.max_prompt_length" if prompt is not None else None,
                    engine_limit, "rollout.max_model_len",
                )  # fmt: skip
        check_length_limit(findings, facts, data.get("max_length"), "data.max_length")
        check_low_precision_training(findings, model, module, facts)
    findings.raise_or_warn()


def check_eval_config(cfg: DictConfig, model_overrides: Optional[Mapping[str, Any]] = None) -> None:
    """Check a composed ``eval.yaml`` config (``model_overrides``: what ``evaluate()`` sets on the model)."""
    findings = Findings()
    model = {**(plain(cfg.get("model")) or {}), **dict(model_overrides or {})}
    check_target(model, "model", findings)
    for group in ("rollout", "grader", "output_format"):
        if cfg.get(group) is not None:
            check_target(plain(cfg.get(group)), group, findings)
    sampling = plain(cfg.get("sampling")) or {}
    check_value(sampling, Optional[groups.SamplingSchema], {}, "sampling", findings)
    for name, source in (plain(cfg.get("datasets")) or {}).items():
        if source is not None:
            check_target(source, f"datasets.{name}", findings)
    check_value(plain(cfg.get("batch_size")), int, {"ge": 1}, "batch_size", findings)
    check_value(plain(cfg.get("limit")), Optional[int], {"ge": 1, "note": "null: every problem"}, "limit", findings)
    check_value(plain(cfg.get("num_threads")), Optional[int], _POSITIVE, "num_threads", findings)
    rollout = plain(cfg.get("rollout")) or {}
    _check_device(findings, plain(cfg.get("device")) or "cpu", "device", ["`device=cpu`", *_gpu_hints(rollout, {})[1:]])
    if not findings.errors:
        engine_limit = rollout.get("max_model_len") if _is_vllm(rollout) else None
        check_room(findings, model_facts(model), sampling.get("max_new_tokens"), "sampling.max_new_tokens",
                   engine_limit=engine_limit, engine_key="rollout.max_model_len")
    findings.raise_or_warn()


def check_eval_prompts(
    cfg: DictConfig, model_overrides: Optional[Mapping[str, Any]], datasets: Mapping[str, Any], tokenizer: Any
) -> None:
    """Once the problems are loaded (not the weights): the longest prompt, with the longest pre-filled budget,
    plus ``sampling.max_new_tokens`` must fit the model's positions."""
    facts = model_facts({**(plain(cfg.get("model")) or {}), **dict(model_overrides or {})})
    new_tokens = plain(cfg.sampling).get("max_new_tokens")
    if facts.max_positions is None or not isinstance(new_tokens, int):
        return
    longest, key = longest_eval_prompt(cfg, datasets, tokenizer)
    findings = Findings()
    check_room(findings, facts, new_tokens, "sampling.max_new_tokens", longest, key)
    findings.raise_or_warn()


def longest_eval_prompt(cfg: DictConfig, datasets: Mapping[str, Any], tokenizer: Any) -> tuple[int, str]:
    """The longest evaluation prompt in tokens, with the longest pre-filled budget, and which it is."""
    from hydra.utils import instantiate

    longest, where = 0, ""
    for name, records in datasets.items():
        prompts = encode_prompts(
            [r["problem"] for r in records], tokenizer, cfg.prompt_template, cfg.get("system_prompt"), cfg.get("chat_template")
        )
        for record, ids in zip(records, prompts):
            if len(ids) > longest:
                longest, where = len(ids), f"{name} {record['id']}"
    budgets = plain(cfg.get("budget"))
    budgets = budgets if isinstance(budgets, list) else [budgets]
    output_format = instantiate(cfg.output_format)
    prefill = max(
        len(tokenizer.encode(output_format.budget_prefix(budget), add_special_tokens=False)) if budget else 0
        for budget in budgets or [None]
    )  # fmt: skip
    return longest + prefill, "the longest prompt" + (" with its pre-filled budget" if prefill else "") + f" ({where})"


def check_training_prompts(module: Any, datamodule: Any) -> None:
    """Once the data is tokenised and before the weights load (``PolicyModule.setup``): each split's longest
    prompt plus the ``max_new_tokens`` it is sampled with must fit the model's positions. This covers runs
    whose ``data.max_prompt_length`` is null, which :func:`check_train_config` cannot bound."""
    from dataclasses import asdict

    loader = module.model_loader
    facts = model_facts({"name_or_path": loader.name_or_path, "tiny": asdict(loader.tiny),
                         "trust_remote_code": loader.trust_remote_code})
    datasets = getattr(datamodule, "datasets", None) or {}
    if facts.max_positions is None:
        return
    sampled = {"val": ("module.val_sampling", module.val_sampling)}
    if getattr(module, "sampling", None) is not None:
        sampled["train"] = ("module.sampling", module.sampling)
    findings = Findings()
    for split, (key, settings) in sampled.items():
        examples = datasets.get(split) or []
        if not examples:
            continue
        longest = max(examples, key=lambda example: len(example["prompt_ids"]))
        check_room(findings, facts, settings.max_new_tokens, f"{key}.max_new_tokens", len(longest["prompt_ids"]),
                   f"the longest {split} prompt ({longest['id']})")
    findings.raise_or_warn()


def check_budget_caps(prefill_fraction: float, datamodule: Any, callbacks: Sequence[Any]) -> None:
    """GRPO, once the data is loaded: when no train row has a ``b_max``, the budget penalty (r_b) never fires
    and no prompt is pre-filled. Refuse that in one sentence, or warn when ``data.allow_uncapped`` says so."""
    examples = (getattr(datamodule, "datasets", None) or {}).get("train") or []
    if not examples or any(example.get("b_max") is not None for example in examples):
        return
    idle = [
        f"reward.functions.{name}.budget_penalty={function.budget_penalty}"
        for callback in callbacks if isinstance(callback, RewardCallback)
        for name, function in callback.rewards.functions.items()
        if isinstance(function, BudgetGuidedReward) and function.budget_penalty
    ]  # fmt: skip
    if prefill_fraction > 0:
        idle.append(f"module.prefill_fraction={prefill_fraction}")
    if not idle:
        return
    findings = Findings()
    what = f"no train row has a b_max (budget cap), so {' and '.join(idle)} do nothing"
    if getattr(datamodule, "allow_uncapped", False):
        findings.warning("data.allow_uncapped", True, what)
    else:
        findings.error(
            "data.b_max_labels", getattr(datamodule, "b_max_labels", None),
            f"{what}: point data.b_max_labels at the file `scripts/label_budgets.py --samples K` writes, set "
            "data.reference_b_max=true, or data.allow_uncapped=true to train without the cap on purpose",
        )  # fmt: skip
    findings.raise_or_warn()


def check_generation(
    model: Optional[str], max_tokens: int, temperature: float, device: str, dtype: str,
    prompt_tokens: Optional[int] = None,
) -> None:
    """Check ``selfbudget generate``'s options (named as typed, ``--max-tokens``); ``prompt_tokens``, when
    known (the tokenizer loads without the weights), must fit beside ``--max-tokens``."""
    findings = Findings()
    check_value(temperature, float, {"ge": 0, "note": "0 = greedy"}, "--temperature", findings)
    check_value(max_tokens, int, {"ge": 1}, "--max-tokens", findings)
    check_value(dtype, str, {"choices": ("float32", "bfloat16", "float16", "auto")}, "--dtype", findings)
    _check_device(findings, device, "--device", ["`--device cpu`"])
    if not findings.errors:
        facts = model_facts({"name_or_path": model})
        check_room(findings, facts, max_tokens, "--max-tokens", prompt_tokens,
                   "the prompt" if prompt_tokens is not None else None)
    findings.raise_or_warn("option")


def plain(node: Any) -> Any:
    """A config node as plain dicts and lists, interpolations resolved; a value that cannot be resolved
    here (e.g. ``${hydra:...}`` outside a Hydra run) becomes :data:`UNRESOLVED` and is not checked."""
    if isinstance(node, DictConfig):
        out = {}
        for key in node.keys():
            try:
                out[key] = plain(node[key])
            except Exception:
                out[key] = UNRESOLVED
        return out
    if isinstance(node, ListConfig):
        items = []
        for index in range(len(node)):
            try:
                items.append(plain(node[index]))
            except Exception:
                items.append(UNRESOLVED)
        return items
    return node


def _check_top_level(cfg: DictConfig, findings: Findings) -> None:
    check_value(plain(cfg.get("seed")), int, {}, "seed", findings)
    check_value(plain(cfg.get("num_threads")), Optional[int], _POSITIVE, "num_threads", findings)
    ckpt = plain(cfg.get("ckpt_path"))
    check_value(ckpt, Optional[str], {"note": "null: start fresh"}, "ckpt_path", findings)
    if isinstance(ckpt, str) and not Path(ckpt).exists():
        findings.error("ckpt_path", ckpt, "no such file or directory (a Lightning checkpoint to resume from)")


def _check_manual_optimization(findings: Findings, trainer: Mapping[str, Any]) -> None:
    """GRPO steps its optimizer itself (several steps per batch of rollouts), so Lightning's automatic
    clipping and accumulation do not apply; Lightning refuses them only once the model is loaded."""
    clip = trainer.get("gradient_clip_val")
    if isinstance(clip, (int, float)) and clip > 0:
        findings.error("trainer.gradient_clip_val", clip, "GRPO optimizes manually: clip with module.max_grad_norm")
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        findings.error(
            "trainer.accumulate_grad_batches", accumulate,
            "GRPO optimizes manually: set completions per optimizer step with module.mini_batch_size and per "
            "forward with module.micro_batch_size",
        )  # fmt: skip


def _check_single_activation_checkpointing(
    findings: Findings, model: Mapping[str, Any], strategy: Mapping[str, Any]
) -> None:
    """HF's gradient checkpointing inside the strategy's checkpoint wrappers recomputes every layer twice."""
    if model.get("gradient_checkpointing") is True and strategy.get("activation_checkpointing") is True:
        findings.error(
            "strategy.activation_checkpointing", True,
            "with model.gradient_checkpointing=true recomputes each decoder layer twice in backward: keep one, "
            "model.gradient_checkpointing=false or strategy.activation_checkpointing=false",
        )  # fmt: skip


def _check_device(findings: Findings, device: Any, key: str, hints: list[str]) -> None:
    """``device`` (a torch device string) must exist on this machine."""
    kind, _, index = str(device).partition(":")
    accelerator = "gpu" if kind == "cuda" else kind
    devices = [int(index)] if index.isdigit() else 1
    check_devices(findings, accelerator, devices, key, key, hints)


def _is_vllm(rollout: Mapping[str, Any]) -> bool:
    return str(rollout.get("_target_", "")).endswith("VLLMRolloutBackend")


def _gpu_hints(rollout: Mapping[str, Any], strategy: Mapping[str, Any]) -> list[str]:
    """What to add to a command to run it on CPU, given the groups it uses."""
    hints = ["`trainer=cpu`"]
    if _is_vllm(rollout):
        hints.append("`rollout=hf` (vLLM needs CUDA)")
    if strategy.get("name") == "fsdp":
        hints.append("`strategy=fsdp2` or `strategy=ddp` (Lightning's FSDP1 strategy is GPU-only)")
    return hints

