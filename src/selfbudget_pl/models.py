"""Model and tokenizer loading, shared by SFT, GRPO, evaluation and generation.

Everything goes through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``:
the tiny model is just a local directory, so the same code loads a hub checkpoint on a GPU machine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import save_file

from selfbudget_pl.checkpoints import check_tokenizer_files
from selfbudget_pl.tiny_model import TinyModelSpec, ensure_tiny_model

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class LoraSettings:
    """LoRA adapters (peft). ``enabled=false`` trains every weight."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelLoader:
    """Knows which checkpoint to load and how (dtype, LoRA, checkpointing); loads on demand.

    Trained weights are the optimizer's master copy, so they load in ``dtype`` (float32 in every shipped
    config): AdamW's updates at a GRPO learning rate (1e-6) are far below a bf16 weight's resolution and
    round away. Compute runs in bf16 through ``trainer.precision=bf16-mixed`` or FSDP's mixed-precision
    policy, which cast for the forward and leave the master weights alone. Weights nothing steps (the
    LoRA base, GRPO's reference model) load in ``frozen_dtype``.

    Args:
        name_or_path: a hub id or a local directory; None means "build the tiny model" from ``tiny``.
        tiny: sizes of the tiny model (see :class:`TinyModelSpec`), used when ``name_or_path`` is None.
        dtype: dtype of the trained weights (the master copy): float32 | bfloat16 | float16 | auto.
        frozen_dtype: dtype of weights that are never trained: the base under LoRA and GRPO's reference
            model (None: ``dtype``). bfloat16 halves their memory at no cost to the updates.
        lora: LoRA settings (dict or :class:`LoraSettings`).
        gradient_checkpointing: recompute activations in backward to save memory.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``sdpa``, ``flash_attention_2``).
        trust_remote_code: passed to ``from_pretrained``.
        cache_dir: where tiny models are built.
        allow_low_precision_training: opt in to training bfloat16/float16 weights with a plain optimizer
            (``torch.optim``), which the start-up checks otherwise refuse (most small updates round away in
            those dtypes; see :func:`selfbudget_pl.config.startup.check_low_precision_training`). LoRA
            with a low-precision frozen base needs no opt-in.
    """

    def __init__(
        self,
        name_or_path: Optional[str] = None,
        tiny: Optional[dict[str, Any]] = None,
        dtype: str = "float32",
        frozen_dtype: Optional[str] = None,
        lora: Optional[dict[str, Any] | LoraSettings] = None,
        gradient_checkpointing: bool = False,
        attn_implementation: Optional[str] = "sdpa",
        trust_remote_code: bool = False,
        cache_dir: Optional[str] = None,
        allow_low_precision_training: bool = False,
    ) -> None:
        for key, value in (("dtype", dtype), ("frozen_dtype", frozen_dtype or dtype)):
            if value not in _DTYPES:
                raise ValueError(f"model.{key}={value!r} is not one of {sorted(_DTYPES)}")
        self.name_or_path = name_or_path
        self.tiny = TinyModelSpec(**(tiny or {}))
        self.dtype = dtype
        self.frozen_dtype = frozen_dtype or dtype
        self.lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**dict(lora or {}))
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.cache_dir = cache_dir
        self.allow_low_precision_training = allow_low_precision_training

    @property
    def path(self) -> str:
        """The directory or hub id to load from (builds the tiny model when needed)."""
        if self.name_or_path:
            return str(self.name_or_path)
        return str(ensure_tiny_model(self.tiny, self.cache_dir))

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        check_tokenizer_files(self.path)
        tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        if tokenizer.pad_token is None:
            # Decoder-only checkpoints often ship without one; EOS is the usual stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self, frozen: bool = False) -> torch.nn.Module:
        """The model to train (its trained weights in ``dtype``, a LoRA base in ``frozen_dtype``), or with
        ``frozen=True`` a copy nothing will train (every weight in ``frozen_dtype``, no adapters)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, **self._model_kwargs(frozen))
        return self._prepare(model, frozen)

    def build_empty_model(self, frozen: bool = False) -> torch.nn.Module:
        """The model :meth:`load_model` returns, built from its config on the meta device: the same modules,
        dtypes, adapters and generation config, no storage, no weights read. For ranks that receive their
        shards from the rank that loaded (:func:`selfbudget_pl.strategies.fill_from_rank_zero`)."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        kwargs = self._model_kwargs(frozen)
        if kwargs["dtype"] == "auto":  # from_config has no "auto": the checkpoint's own dtype, as from_pretrained reads it
            kwargs["dtype"] = getattr(config, "dtype", None) or torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        if (Path(self.path) / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(self.path)
        return self._prepare(model, frozen)

    def _model_kwargs(self, frozen: bool) -> dict[str, Any]:
        base_dtype = self.frozen_dtype if frozen or self.lora.enabled else self.dtype
        kwargs: dict[str, Any] = {"dtype": _DTYPES[base_dtype], "trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def _prepare(self, model: torch.nn.Module, frozen: bool) -> torch.nn.Module:
        """Freeze, checkpoint and adapt a freshly built model as the settings say."""
        if frozen:
            return model.requires_grad_(False)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora.enabled:
            model = apply_lora(model, self.lora)
            if self.dtype != "auto":
                # The adapters are what the optimizer steps: their master copy is ``dtype``, whatever the base's.
                for param in model.parameters():
                    if param.requires_grad:
                        param.data = param.data.to(_DTYPES[self.dtype])
        return model

    def load_skeleton(self) -> torch.nn.Module:
        """The architecture without its weights (on the meta device): the config, generation config and
        checkpoint name a backend that loads the checkpoint itself (vLLM) reads, for none of the memory."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        model.name_or_path = self.path
        try:
            model.generation_config = GenerationConfig.from_pretrained(self.path)
        except OSError:  # a checkpoint without generation_config.json: the model config's tokens
            model.generation_config = GenerationConfig.from_model_config(config)
        return model.requires_grad_(False)


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # needed with gradient checkpointing and frozen embeddings
    return model


def export_pretrained(model: torch.nn.Module, tokenizer, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Write a directory that ``from_pretrained`` (transformers or vLLM) loads directly.

    With ``merge_lora`` the adapters are folded into a copy of the weights, so the export needs no peft.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def export_streamed(
    weights: Iterable[tuple[str, torch.Tensor]],
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    write: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
) -> Optional[Path]:
    """Write a directory ``from_pretrained`` (transformers or vLLM) loads, from ``(checkpoint name, full
    tensor)`` pairs as they arrive (:func:`selfbudget_pl.weights.iter_full_weights` with LoRA merged):
    host memory holds one safetensors shard of at most ``max_shard_bytes`` (or one larger tensor), never the
    whole model, and no fresh copy of it is loaded.

    Args:
        weights: the pairs; under FSDP every rank must consume them (gathering is collective).
        model: the policy (a peft model's base is used): its config and generation config are written,
            and tied weights (an output embedding that is the input one) are left for loading to tie again.
        tokenizer: saved beside the weights.
        out_dir: the directory to write.
        write: False on ranks that only take part in the gathering (nothing is written, None returned).
        max_shard_bytes: the largest shard file.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = set(base.get_expanded_tied_weights_keys()) if getattr(text, "tie_word_embeddings", False) else set()
    out_dir = Path(out_dir)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size, dtype = 0, None
    for name, tensor in weights:
        if not write or name in tied:
            continue
        if shard and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
            files.append(_write_shard(shard, out_dir, len(files)))
            shard, size = {}, 0
        shard[name] = tensor.to("cpu", copy=True).contiguous()
        size += tensor.numel() * tensor.element_size()
        dtype = dtype or (tensor.dtype if tensor.is_floating_point() else None)
    if not write:
        return None
    if shard or not files:
        files.append(_write_shard(shard, out_dir, len(files)))
    _name_shards(files, out_dir)
    if dtype is not None:
        config.dtype = dtype  # what the files hold, as save_pretrained records it
    config.save_pretrained(out_dir)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _write_shard(shard: dict[str, torch.Tensor], out_dir: Path, index: int) -> tuple[Path, list[str]]:
    path = out_dir / f".shard-{index:05d}.safetensors"
    save_file(shard, str(path), metadata={"format": "pt"})
    return path, list(shard)


def _name_shards(files: list[tuple[Path, list[str]]], out_dir: Path) -> None:
    """Give the shards their final names: ``model.safetensors`` alone, else numbered with an index file."""
    if len(files) == 1:
        os.replace(files[0][0], out_dir / "model.safetensors")
        return
    weight_map, total = {}, 0
    for number, (path, names) in enumerate(files, start=1):
        final = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        total += path.stat().st_size
        os.replace(path, out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
