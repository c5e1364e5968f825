"""The LightningModule SFT and GRPO share: it holds the policy, its tokenizer and its rollout backend
through a run (load, shard, sample, checkpoint, export) and wires in the shared optimizer
(:mod:`.optimization`) and validation record (:mod:`.validation`).

Subclasses add only their loss: :class:`~selfbudget_pl.modules.sft.SFTModule` (next-token loss on the
budget tag and solution) and :class:`~selfbudget_pl.modules.grpo.GRPOModule` (budget-guided GRPO).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy

from selfbudget_pl.config.checks import check_training_prompts
from selfbudget_pl.config.groups import PolicyModuleSchema
from selfbudget_pl.data.collate import record_columns
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.launcher_env import export_process_group_env
from selfbudget_pl.models import ModelLoader, export_pretrained, export_streamed
from selfbudget_pl.modules import packing
from selfbudget_pl.modules.head import DEFAULT_CHUNK_TOKENS
from selfbudget_pl.modules.optimization import optimizer_and_schedule
from selfbudget_pl.modules.validation_metrics import ValidationRecord
from selfbudget_pl.rewards.annotate import Annotations, generate_and_annotate
from selfbudget_pl.rollout.base import (
    EngineLimits, RolloutBackend, Rollouts, SamplingSettings, engine_limits, sampling_settings,
)  # fmt: skip
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.schema import check_arguments
from selfbudget_pl.strategies import check_strategy_supports, clip_gradients_by_norm, loads_once, shard_models
from selfbudget_pl.weights import full_state_dict, is_sharded, iter_full_weights

log = logging.getLogger(__name__)


class PolicyModule(L.LightningModule):
    """Base LightningModule for a causal LM that answers in the SelfBudgeter format.

    Args:
        model_loader: which checkpoint to load and how (dtype, LoRA, gradient checkpointing).
        optimizer: a partial optimizer (Hydra ``_partial_: true``), finished with the trainable params.
        warmup_steps / min_lr_ratio: the warmup + cosine schedule (stepped once per optimizer step).
        max_grad_norm: gradient clipping by global norm (None disables it).
        output_format: the answer format (tags, budget bounds).
        grader: checks final answers against gold (used in validation and rewards).
        rollout: a partial rollout backend, finished with ``(model=..., tokenizer=..., limits=...)``: the run's
            :class:`~selfbudget_pl.rollout.base.EngineLimits` (:meth:`engine_limits`).
        val_sampling: sampling settings for validation generation (greedy by default).
        export_dir: where ``on_train_end`` writes a ``save_pretrained`` export (None: no export).
        merge_lora_on_export: fold LoRA adapters into the exported weights.
        export_shard_gib: the largest safetensors file of the export (the most host memory it holds).
        packed_forward: run training forwards on packed tokens, with no padding (and each GRPO group's
            prompt once: :mod:`selfbudget_pl.modules.packing`; Qwen2, Llama and Qwen3, others run padded).
            Losses and gradients equal the padded forward's up to float rounding.
        head_chunk_tokens: tokens whose logits exist at once when scoring (the LM head, temperature,
            log-softmax, gather and entropy run chunk by chunk, backward too): the head's memory is
            ``head_chunk_tokens x vocabulary`` floats, not ``tokens x vocabulary``.
    """

    def __init__(
        self,
        model_loader: ModelLoader,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        max_grad_norm: Optional[float] = 1.0,
        output_format: Optional[OutputFormat] = None,
        grader: Any = None,
        # (model, tokenizer, limits) -> backend; the three-argument form tells LightningCLI which come later.
        rollout: Optional[Callable[[torch.nn.Module, Any, Optional[EngineLimits]], RolloutBackend]] = None,
        val_sampling: Optional[SamplingSettings | dict] = None,
        export_dir: Optional[str] = None,
        merge_lora_on_export: bool = True,
        export_shard_gib: float = 2.0,
        packed_forward: bool = True,
        head_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        check_arguments(PolicyModuleSchema, locals(), type(self).__name__)
        super().__init__()
        self.generate_in_validation = True  # SFT may validate on the loss alone
        self.model_loader = model_loader
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.max_grad_norm = max_grad_norm
        self.output_format = output_format or OutputFormat()
        self.grader = grader
        self.rollout_factory = rollout
        self.val_sampling = sampling_settings(val_sampling, temperature=0.0)
        self.export_dir = export_dir
        self.merge_lora_on_export = merge_lora_on_export
        self.export_shard_gib = export_shard_gib
        self.packed_forward = packed_forward
        self.head_chunk_tokens = head_chunk_tokens
        self._told_padded = False
        self.tokenizer = model_loader.load_tokenizer()
        self.model: Optional[torch.nn.Module] = None
        self._rollout_backend: Optional[RolloutBackend] = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Lightning calls this inside the strategy's init context (FSDP shards as it loads) and
        # again on resume; loading once keeps it idempotent.
        if self.model is None:
            # from_pretrained returns eval mode; Lightning toggles train/eval itself from here on.
            self.model = self.load_model().train()
        self.shard_models()

    def load_model(self, frozen: bool = False) -> torch.nn.Module:
        """The policy (or with ``frozen`` a copy nothing trains) as :class:`ModelLoader` loads it; under a
        strategy that loads once (:func:`selfbudget_pl.strategies.loads_once`) only rank 0 reads the
        checkpoint and the other ranks build it empty, to receive their shards when it is sharded."""
        trainer = self._trainer
        if trainer is not None and loads_once(trainer.strategy) and trainer.global_rank != 0:
            return self.model_loader.build_empty_model(frozen=frozen)
        return self.model_loader.load_model(frozen=frozen)

    def packable(self, model: torch.nn.Module) -> bool:
        """Whether ``model`` can run the packed forward (the first time it cannot, a warning says why)."""
        reason = packing.unsupported_reason(model)
        if reason is not None and not self._told_padded:
            log.warning("module.packed_forward: this model runs the padded forward instead (%s)", reason)
            self._told_padded = True
        return reason is None

    def shard_models(self) -> None:
        """Shard the models this module holds as the strategy says (:func:`selfbudget_pl.strategies.shard_models`)."""
        trainer = self._trainer  # None before a Trainer attaches (the `trainer` property would raise)
        shard_models(self, trainer.strategy if trainer is not None else None)

    def setup(self, stage: str) -> None:
        check_strategy_supports(self, self.trainer.strategy)
        # The data is tokenised by now (Lightning sets the datamodule up first) and the weights load after.
        check_training_prompts(self, self.trainer.datamodule)

    @property
    def rollout_backend(self) -> RolloutBackend:
        if self._rollout_backend is None:
            if self.rollout_factory is None:
                self.rollout_factory = HFRolloutBackend
            if self._trainer is not None and isinstance(self._trainer.strategy, ParallelStrategy):
                # A colocated engine joins the Trainer's process group from the environment, whichever
                # launcher started this process (vLLM's external launcher reads RANK, LOCAL_RANK, ...).
                export_process_group_env(self._trainer)
            self._rollout_backend = self.rollout_factory(
                model=self.model, tokenizer=self.tokenizer, limits=self.engine_limits()
            )
        return self._rollout_backend

    def engine_limits(self) -> Optional[EngineLimits]:
        """The most this run sends its sampler (:func:`~selfbudget_pl.rollout.base.engine_limits`): prompts up to
        ``data.max_prompt_length`` (or, where it is null, the data's longest prompt, measured at setup) plus the
        longest pre-filled budget, and :meth:`sampling_calls`. None without a datamodule (the engine then takes
        the model's limits)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return None
        prompt, key = getattr(datamodule, "max_prompt_length", None), "data.max_prompt_length"
        if prompt is None:
            lengths = [len(example["prompt_ids"]) for split in datamodule.datasets.values() for example in split]
            prompt, key = max(lengths, default=0), "data.max_prompt_length (null: the data's longest prompt)"
        return engine_limits(prompt + self.longest_prefill_tokens(datamodule), key, self.sampling_calls(datamodule))

    def longest_prefill_tokens(self, datamodule: Any) -> int:
        """Tokens the longest pre-filled budget adds to a prompt (none here: only GRPO pre-fills)."""
        return 0

    def sampling_calls(self, datamodule: Any) -> list[tuple[int, int]]:
        """``(completions, max_new_tokens)`` of each kind of sampling call this run makes: a validation batch."""
        return [(datamodule.val_batch_size, self.val_sampling.max_new_tokens)]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return optimizer_and_schedule(
            params, self.optimizer_factory, self.total_optimizer_steps(), self.warmup_steps, self.min_lr_ratio
        )

    def total_optimizer_steps(self) -> float:
        """Optimizer steps this run will take (the length of the LR schedule and of reward annealing):
        Lightning's estimate (``max_steps``, or batches x epochs / ``accumulate_grad_batches``, whichever
        ends first); inf when neither bounds the run."""
        return float(self.trainer.estimated_stepping_batches)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm
        if clip:
            clip_gradients_by_norm(self, optimizer, clip)

    # -- validation: generate, grade, record budget adherence -----------------------------------
    def on_validation_epoch_start(self) -> None:
        self.validation_record = ValidationRecord(self.device)
        # Validation samples from the weights being validated: a backend with its own copy (vLLM) loads them
        # before its next generate. SFT never marks it stale otherwise, and a resumed policy is not the
        # checkpoint the engine started from.
        if self.generate_in_validation:
            self.rollout_backend.mark_stale(*self.weights_source())

    def generate_and_score(
        self, batch: dict[str, Any], sampling: SamplingSettings, num_samples: int = 1, prefill: Optional[str] = None
    ) -> tuple[Rollouts, Annotations]:
        """Sample completions for a batch of prompts, and their annotations (parse, grade, lengths)."""
        if isinstance(self.rollout_backend, HFRolloutBackend):
            # Validation can sample before any sync (SFT never syncs; the sanity check and trainer.validate
            # come before GRPO's on_train_start): the backend must know the FSDP root. Free for this backend.
            self.rollout_backend.sync_weights(*self.weights_source())
        return generate_and_annotate(
            self.rollout_backend, batch["prompt_ids"], sampling, self.output_format, self.grader, self.tokenizer,
            num_samples=num_samples, prefill=prefill, columns=record_columns(batch),
        )  # fmt: skip

    def validation_generation(self, batch: dict[str, Any]) -> None:
        self.validation_record.add(*self.generate_and_score(batch, self.val_sampling))

    def on_validation_epoch_end(self) -> None:
        self.validation_record.log(self)

    # -- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # RNG streams are part of the training state: a resumed run samples what the
        # uninterrupted one would have.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng_states")
        if rng:
            self._rng_to_restore = rng["torch"]

    def on_train_start(self) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng is not None:
            torch.set_rng_state(rng)
            self._rng_to_restore = None

    def on_train_end(self) -> None:
        # Not on_fit_end: by then the strategy has torn down, and under FSDP the sharded model that the
        # export must gather from is no longer the one the strategy holds.
        if self.export_dir:
            self.export(self.export_dir)

    def weights_source(self) -> tuple[torch.nn.Module, str]:
        """Where the policy's full weights are read from, as ``(module, attribute prefix)``: the strategy's
        root and ``"model."`` when it shards (FSDP: reading is a collective), else the policy itself."""
        trainer = self._trainer
        root = trainer.strategy.model if trainer is not None else None
        if root is not None and is_sharded(root):
            return root, "model."
        return self.model, ""

    def export(self, out_dir: str | Path) -> Optional[Path]:
        """``save_pretrained``-style export of the current weights and tokenizer (full weights; rank 0 writes).

        The weights stream from wherever they live (:func:`selfbudget_pl.weights.iter_full_weights`: one
        FSDP unit gathered at a time, LoRA merged) into safetensors shards of ``export_shard_gib``: no
        fresh copy of the model is loaded and the host never holds the whole state dict. Under FSDP every
        rank must call it. LoRA adapters kept unmerged (``merge_lora_on_export=false``) are written by
        peft's ``save_pretrained`` instead.
        """
        root, prefix = self.weights_source()
        lora_unmerged = hasattr(self.model, "peft_config") and not self.merge_lora_on_export
        if lora_unmerged:
            full = full_state_dict(root, prefix)
            if not self.trainer.is_global_zero:
                return None
            model = self.model
            if full is not None:
                model = self.model_loader.load_model()
                model.load_state_dict(full)
            path = export_pretrained(model, self.tokenizer, out_dir, merge_lora=False)
        else:
            path = export_streamed(
                iter_full_weights(root, prefix, merge_lora=True), self.model, self.tokenizer, out_dir,
                write=self.trainer.is_global_zero, max_shard_bytes=int(self.export_shard_gib * 1024**3),
            )  # fmt: skip
        if path is not None:
            log.info("exported model to %s", path)
        return path
