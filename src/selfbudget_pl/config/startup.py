"""Start-up checks that need more than one config group or a look at the machine, run before any model
or data is loaded: room in the model's positions for prompt + completion, devices that exist, a GPU
experiment on a CPU-only machine, low-precision weights under a plain optimizer, Lightning's own
Trainer arguments.

The model's position limit and dtype come from its config (``AutoConfig``, or the tiny model's sizes
in our own config), never from loading its weights.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from selfbudget_pl.schema import Findings
from selfbudget_pl.tiny_model import TinyModelSpec

log = logging.getLogger(__name__)

LOW_PRECISION = ("bfloat16", "float16")
# Arguments train() passes to the Trainer itself, from other config groups.
TRAINER_INJECTED = {"callbacks": "callbacks", "logger": "logger", "strategy": "strategy"}


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says, read without its weights (None: could not be read)."""
    max_positions: Optional[int]
    dtype: Optional[str]  # the checkpoint's own dtype (what ``dtype: auto`` loads)
    source: str  # where the facts came from, for messages


def model_facts(model: Mapping[str, Any]) -> ModelFacts:
    """Position limit and stored dtype of the model ``model`` (the model group's plain mapping) names."""
    path = model.get("name_or_path")
    if not path:
        tiny = dict(model.get("tiny") or {})
        limit = tiny.get("max_position_embeddings", TinyModelSpec.max_position_embeddings)
        return ModelFacts(limit, "float32", "model.tiny.max_position_embeddings")
    config = read_model_config(str(path), bool(model.get("trust_remote_code")))
    if config is None:  # an export not written yet, no network: loading the model will say so
        return ModelFacts(None, None, str(path))
    limit = next(
        (getattr(config, name) for name in ("max_position_embeddings", "n_positions", "max_sequence_length")
         if isinstance(getattr(config, name, None), int)),
        None,
    )  # fmt: skip
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
    return ModelFacts(limit, dtype, f"{path} config.json")


def read_model_config(path: str, trust_remote_code: bool) -> Any:
    """The model's ``config.json`` (a local directory, the hub cache, else the hub itself), or None."""
    from transformers import AutoConfig

    looks_local = Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    attempts = (True,) if looks_local else (True, False)  # the cache first: no network wait when it is there
    for local_only in attempts:
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
        except Exception as error:
            reason = error
    log.debug("start-up checks: cannot read the config of %s (%s); its limits are not checked", path, reason)
    return None


def check_room(
    findings: Findings,
    facts: ModelFacts,
    new_tokens: Optional[int],
    new_tokens_key: str,
    prompt_tokens: Optional[int] = None,
    prompt_key: Optional[str] = None,
    engine_limit: Optional[int] = None,
    engine_key: Optional[str] = None,
) -> None:
    """Prompt + completion must fit the model's positions (and the rollout engine's ``max_model_len``)."""
    limits = [(facts.max_positions, f"the model's max_position_embeddings={facts.max_positions} ({facts.source})")]
    if engine_limit is not None and engine_key is not None:
        limits.append((engine_limit, f"{engine_key}={engine_limit}"))
    if not isinstance(new_tokens, int):
        return
    for limit, what in limits:
        if limit is None:
            continue
        if prompt_tokens is not None and prompt_key is not None:
            total = prompt_tokens + new_tokens
            if total > limit:
                findings.error(
                    new_tokens_key, new_tokens,
                    f"with {prompt_key}={prompt_tokens} that is {total} tokens, more than {what}; "
                    f"lower {new_tokens_key} or {prompt_key}",
                )  # fmt: skip
                return
        elif new_tokens >= limit:
            findings.error(
                new_tokens_key, new_tokens,
                f"leaves no room for the prompt within {what}; lower {new_tokens_key} below {limit}",
            )  # fmt: skip
            return


def check_length_limit(findings: Findings, facts: ModelFacts, value: Optional[int], key: str) -> None:
    """A whole-sequence length setting (e.g. ``data.max_length``) must fit the model's positions."""
    if isinstance(value, int) and facts.max_positions is not None and value > facts.max_positions:
        findings.error(
            key, value, f"is more than the model's max_position_embeddings={facts.max_positions} ({facts.source})"
        )


def check_low_precision_training(findings: Findings, model: Mapping[str, Any], module: Mapping[str, Any],
                                 facts: ModelFacts) -> None:
    """bf16/fp16 trainable weights stepped in place by a plain ``torch.optim`` optimizer lose most updates
    (at lr 1e-6 an update is below bf16's resolution for most weights); refuse unless opted in."""
    # model.dtype is what the optimizer steps (the LoRA adapters under LoRA); frozen_dtype is the rest.
    dtype = model.get("dtype", "float32")
    loaded = facts.dtype if dtype == "auto" else dtype
    optimizer = str((module.get("optimizer") or {}).get("_target_", ""))
    if (
        loaded not in LOW_PRECISION
        or model.get("allow_low_precision_training")
        or not optimizer.startswith("torch.optim.")
    ):
        return
    stored = " (the checkpoint's dtype)" if dtype == "auto" else ""
    findings.error(
        "model.dtype", dtype,
        f"loads the trainable weights in {loaded}{stored}, and module.optimizer ({optimizer}) updates them in place "
        f"in {loaded}: most small updates round away. Load them in float32 (model.dtype=float32; compute in "
        f"bf16 with trainer.precision=bf16-mixed or strategy=fsdp2's mixed_precision; model.frozen_dtype={loaded} "
        f"keeps untrained weights, such as a LoRA base, small), or set model.allow_low_precision_training=true "
        f"to train in {loaded} anyway",
    )  # fmt: skip


def check_trainer(findings: Findings, trainer: Mapping[str, Any], gpu_hints: Sequence[str]) -> None:
    """Lightning's own arguments (any of them, as typed), step limits, devices that exist, a GPU to run on."""
    from lightning.pytorch import Trainer

    known = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    for name, value in trainer.items():
        if name == "_target_":
            continue
        if name in TRAINER_INJECTED:
            findings.error(f"trainer.{name}", value, f"is set from the `{TRAINER_INJECTED[name]}` config group")
        elif name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean trainer.{close[0]}?" if close else ""
            findings.error(f"trainer.{name}", value, f"is not an argument of lightning.pytorch.Trainer{hint}")
    for name, what in (("max_steps", "-1 (no step limit: max_epochs decides)"),
                       ("max_epochs", "-1 or null (no epoch limit)")):
        value = trainer.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1):
            findings.error(f"trainer.{name}", value, f"must be an integer >= 1, or {what}")
    if trainer.get("max_steps") == -1 and trainer.get("max_epochs") == -1:
        findings.error("trainer.max_epochs", -1, "with trainer.max_steps=-1 training never ends, and the learning-rate "
                       "schedule needs a length: set trainer.max_steps or trainer.max_epochs")
    check_devices(findings, trainer.get("accelerator", "auto"), trainer.get("devices", "auto"), "trainer.accelerator",
                  "trainer.devices", gpu_hints)


def check_devices(findings: Findings, accelerator: Any, devices: Any, accelerator_key: str, devices_key: str,
                  gpu_hints: Sequence[str]) -> None:
    """A GPU accelerator on a machine with no CUDA GPU, or more devices than the machine has."""
    import torch

    accelerator = str(accelerator).lower()
    wants_gpu = accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        fix = " and ".join(gpu_hints)
        findings.error(
            accelerator_key, accelerator,
            f"this machine has no CUDA GPU (torch.cuda.is_available() is False): to run on CPU add {fix}",
        )  # fmt: skip
        return
    on_gpu = wants_gpu or (accelerator == "auto" and torch.cuda.is_available())
    available = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
    what = f"{available} CUDA GPU(s)" if on_gpu else f"{available} CPU core(s)"
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices == 0 or devices < -1:
            findings.error(devices_key, devices, "must be a positive count, -1 or 'auto' (every device), or a list of ids")
        elif devices > available:
            findings.error(devices_key, devices, f"asks for more devices than this machine has ({what})")
    elif isinstance(devices, (list, tuple)):
        missing = [index for index in devices if not isinstance(index, int) or not 0 <= index < available]
        if missing:
            findings.error(devices_key, list(devices), f"names device(s) {missing} that do not exist ({what})")
