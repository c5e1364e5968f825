"""The sizes the memory plan needs from a model's config: layers, widths, heads, vocabulary, positions,
and exact parameter counts from a skeleton built on the meta device (no memory, no weights read).

A hub model's ``config.json`` comes from a local directory, the hub cache or the hub; a tiny model's from
its sizes in the model YAML (its vocabulary is ``tiny.vocab_size``, exact with ``pad_vocab`` and an upper
bound without); ``memory_plan.model_config`` names a ``config.json`` to use instead (planning offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen2Config

from selfbudget_pl import internals
from selfbudget_pl.schema import ConfigError
from selfbudget_pl.config.startup import read_model_config
from selfbudget_pl.tiny_model import TinyModelSpec


class ModelConfigUnavailable(ConfigError):
    """The model's config cannot be read here (an export not written yet, a hub id without network)."""


@dataclass(frozen=True)
class Architecture:
    """A decoder-only model's sizes, as the plan uses them.

    Args:
        name: where the sizes came from, for the table.
        layers / hidden / intermediate / heads / kv_heads / head_dim / vocab: the config's sizes.
        max_positions: the model's position limit (vLLM's ``max_model_len`` when the rollout leaves it null).
        dtype: the checkpoint's stored dtype (what ``dtype: auto`` loads), or None.
        parameters: every parameter, tied ones once.
        layer_parameters: one decoder layer's parameters (an FSDP unit).
        root_parameters: the rest (embeddings, final norm, an untied head): the root FSDP unit.
        linear_shapes: ``(module name, in_features, out_features)`` of every Linear (what LoRA adapts).
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    dtype: Optional[str]
    parameters: int
    layer_parameters: int
    root_parameters: int
    linear_shapes: tuple[tuple[str, int, int], ...]

    def lora_parameters(self, rank: int, target_modules: list[str]) -> int:
        """Parameters LoRA adds at ``rank`` on the Linear layers whose last name is in ``target_modules``."""
        wanted = set(target_modules)
        return sum(rank * (fan_in + fan_out) for name, fan_in, fan_out in self.linear_shapes
                   if name.rsplit(".", 1)[-1] in wanted)  # fmt: skip

    @property
    def largest_matrix(self) -> int:
        """Elements of the largest weight: the embedding or a Linear (an untied head)."""
        return max([self.vocab * self.hidden, *(fan_in * fan_out for _, fan_in, fan_out in self.linear_shapes)])

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token across every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def model_architecture(model: Mapping[str, Any], config_file: Optional[str] = None) -> Architecture:
    """The sizes of the model the model group (plain mapping) names, or of ``config_file`` when given."""
    if config_file:
        config, name = AutoConfig.from_pretrained(config_file), str(config_file)
    elif model.get("name_or_path"):
        name = str(model["name_or_path"])
        config = read_model_config(name, bool(model.get("trust_remote_code")))
        if config is None:
            raise ModelConfigUnavailable(
                f"memory plan: cannot read the config of model.name_or_path={name} (no local copy, no network); "
                "give its config.json with memory_plan.model_config=<path>"
            )
    else:
        config, name = tiny_config(dict(model.get("tiny") or {})), "model.tiny"
    return architecture_of(config, name)


def tiny_config(tiny: Mapping[str, Any]) -> PretrainedConfig:
    """The config the tiny model would be built with, from its sizes alone (no tokenizer trained)."""
    spec = TinyModelSpec(**tiny)
    return Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, dtype="float32",
    )  # fmt: skip


def architecture_of(config: PretrainedConfig, name: str) -> Architecture:
    """Read the sizes off ``config`` and count parameters on a meta-device skeleton."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parameters = sum(parameter.numel() for parameter in skeleton.parameters())
    layer_names = set(internals.no_split_modules(skeleton))
    layer_counts = [sum(p.numel() for p in module.parameters()) for module in skeleton.modules()
                    if type(module).__name__ in layer_names]  # fmt: skip
    layer_parameters = max(layer_counts, default=0)
    linear_shapes = tuple(
        (module_name, module.in_features, module.out_features)
        for module_name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)
    )  # fmt: skip
    heads = int(text.num_attention_heads)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return Architecture(
        name=name,
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
        max_positions=int(text.max_position_embeddings),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        parameters=parameters,
        layer_parameters=layer_parameters,
        root_parameters=parameters - sum(layer_counts),
        linear_shapes=linear_shapes,
    )
