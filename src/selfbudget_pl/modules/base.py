"""What SFT and GRPO share: model loading, optimizer and schedule, validation by generation, export.

Subclasses add only their loss: :class:`~selfbudget_pl.modules.sft.SFTModule` (next-token loss on the
budget tag and solution) and :class:`~selfbudget_pl.modules.grpo.GRPOModule` (budget-guided GRPO).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch

from selfbudget_pl import internals
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.inference import generate_and_annotate
from selfbudget_pl.models import ModelLoader, export_pretrained
from selfbudget_pl.rollout.base import RolloutBackend, Rollouts, SamplingSettings
from selfbudget_pl.weights import is_sharded, iter_full_weights

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PolicyModule(L.LightningModule):
    """Base LightningModule for a causal LM that answers in the SelfBudgeter format.

    Args:
        model_loader: which checkpoint to load and how (dtype, LoRA, gradient checkpointing).
        optimizer: a partial optimizer (Hydra ``_partial_: true``), finished with the trainable params.
        warmup_steps / min_lr_ratio: the warmup + cosine schedule (stepped once per optimizer step).
        max_grad_norm: gradient clipping by global norm (None disables it).
        output_format: the answer format (tags, budget bounds).
        grader: checks final answers against gold (used in validation and rewards).
        rollout: a partial rollout backend, finished with ``(model=..., tokenizer=...)``.
        val_sampling: sampling settings for validation generation (greedy by default).
        export_dir: where ``on_train_end`` writes a ``save_pretrained`` export (None: no export).
        merge_lora_on_export: fold LoRA adapters into the exported weights.
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
        # (model, tokenizer) -> backend; the two-argument form tells LightningCLI which arguments come later.
        rollout: Optional[Callable[[torch.nn.Module, Any], RolloutBackend]] = None,
        val_sampling: Optional[SamplingSettings | dict] = None,
        export_dir: Optional[str] = None,
        merge_lora_on_export: bool = True,
    ) -> None:
        super().__init__()
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
        self.tokenizer = model_loader.load_tokenizer()
        self.model: Optional[torch.nn.Module] = None
        self._rollout_backend: Optional[RolloutBackend] = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Lightning calls this inside the strategy's init context (FSDP shards as it loads) and
        # again on resume; loading once keeps it idempotent.
        if self.model is None:
            # from_pretrained returns eval mode; Lightning toggles train/eval itself from here on.
            self.model = self.model_loader.load_model().train()
        self.shard_models()

    def shard_models(self) -> None:
        """Apply the strategy's own sharding to the policy and any other model this module holds (GRPO's
        reference): ``strategy=fsdp2`` carries a ``parallelize(model, mesh)`` plan
        (:class:`selfbudget_pl.strategies.FullyShardPlan`); other strategies wrap the module themselves
        (FSDP1, DDP) or not at all. Idempotent: a model already sharded is left as it is."""
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        if internals.fsdp_activation_checkpointing(strategy):
            # strategy=fsdp activation_checkpointing=true: Lightning wraps the layers in checkpoint
            # wrappers after this hook; a KV cache built in forward breaks their recompute.
            from selfbudget_pl.strategies import disable_kv_cache_in_training

            disable_kv_cache_in_training(self.model)
        parallelize = getattr(strategy, "parallelize", None)
        if parallelize is None:
            return
        mesh = trainer.strategy.device_mesh["data_parallel"]
        for name in ("model", "ref_model"):
            model = getattr(self, name, None)
            if model is not None:
                setattr(self, name, parallelize(model, mesh))

    def setup(self, stage: str) -> None:
        from selfbudget_pl.config import check_training_prompts
        from selfbudget_pl.strategies import check_strategy_supports

        check_strategy_supports(self, self.trainer.strategy)
        # The data is tokenised by now (Lightning sets the datamodule up first) and the weights load after.
        check_training_prompts(self, self.trainer.datamodule)

    @property
    def rollout_backend(self) -> RolloutBackend:
        if self._rollout_backend is None:
            if self.rollout_factory is None:
                from selfbudget_pl.rollout.hf import HFRolloutBackend

                self.rollout_factory = HFRolloutBackend
            self._rollout_backend = self.rollout_factory(model=self.model, tokenizer=self.tokenizer)
        return self._rollout_backend

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        total = self.total_optimizer_steps()
        if not math.isfinite(total):
            raise ValueError(
                "The LR schedule needs the run's length: set trainer.max_steps, or trainer.max_epochs with a "
                "dataloader of known length."
            )
        schedule = partial(
            warmup_cosine, warmup_steps=self.warmup_steps, total_steps=int(total), min_lr_ratio=self.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # "name": the tag LearningRateMonitor logs it under (else "lr-AdamW" at the top level).
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def total_optimizer_steps(self) -> float:
        """Optimizer steps this run will take (the length of the LR schedule and of reward annealing):
        Lightning's estimate (``max_steps``, or batches x epochs / ``accumulate_grad_batches``, whichever
        ends first); inf when neither bounds the run."""
        return float(self.trainer.estimated_stepping_batches)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.max_grad_norm
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # -- validation: generate, grade, measure budget adherence --------------------------------
    def on_validation_epoch_start(self) -> None:
        from selfbudget_pl.metrics import BudgetAdherence

        self._val_budget = BudgetAdherence().to(self.device)
        self._val_points: list[tuple[float, float, bool]] = []
        self._val_by_difficulty: list[tuple[object, float, bool]] = []
        self._val_lengths: list[float] = []
        self._val_budget_errors: list[float] = []

    def generate_and_score(
        self, batch: dict[str, Any], sampling: SamplingSettings, num_samples: int = 1, prefill: Optional[str] = None
    ) -> Rollouts:
        """Sample completions for a batch of prompts and annotate them (parse, grade, lengths)."""
        from selfbudget_pl.rollout.hf import HFRolloutBackend

        if isinstance(self.rollout_backend, HFRolloutBackend):
            # Validation can sample before any sync (SFT never syncs; the sanity check and trainer.validate
            # come before GRPO's on_train_start): the backend must know the FSDP root. Free for this backend.
            self.rollout_backend.sync_weights(*self.weights_source())
        return generate_and_annotate(
            self.rollout_backend, batch["prompt_ids"], sampling, self.output_format, self.grader, self.tokenizer,
            num_samples=num_samples, prefill=prefill, columns=rollout_columns(batch),
        )  # fmt: skip

    def validation_generation(self, batch: dict[str, Any]) -> Rollouts:
        from selfbudget_pl.metrics import update_from_rollouts

        from selfbudget_pl.callbacks.budget_metrics import budget_errors, completion_lengths

        rollouts = self.generate_and_score(batch, self.val_sampling)
        update_from_rollouts(self._val_budget, rollouts)
        for parsed, length, correct in zip(rollouts.parsed, rollouts.solution_lengths, rollouts.correct):
            if parsed.budget is not None:
                self._val_points.append((float(parsed.budget), float(length), bool(correct)))
        lengths = completion_lengths(rollouts)
        difficulties = rollouts.columns.get("difficulty") or [None] * len(rollouts)
        for difficulty, length, correct in zip(difficulties, lengths, rollouts.correct):
            known = difficulty is not None and difficulty == difficulty  # NaN: unknown
            self._val_by_difficulty.append((difficulty if known else None, length, bool(correct)))
        self._val_lengths.extend(lengths)
        self._val_budget_errors.extend(budget_errors(rollouts))
        return rollouts

    def on_validation_epoch_end(self) -> None:
        values = self._val_budget.compute()
        self.log_dict({f"val/budget/{key}": value for key, value in values.items()}, sync_dist=False)
        if "accuracy" in values:
            self.log("val/accuracy", values["accuracy"], prog_bar=True)
        self._log_validation_figures()

    def _log_validation_figures(self) -> None:
        """At every validation: the budget-vs-length scatter and the per-difficulty plot as images, and
        histograms of completion length and relative budget error (rank 0's completions)."""
        from selfbudget_pl.callbacks.budget_metrics import log_histograms

        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_figure") or not self.trainer.is_global_zero:
            return
        from selfbudget_pl.plots import budget_vs_length_figure, difficulty_figure

        if self._val_points:
            figure = budget_vs_length_figure(self._val_points)
            experiment.add_figure("val/budget_vs_length", figure, global_step=self.global_step)
        if any(difficulty is not None for difficulty, _, _ in self._val_by_difficulty):
            figure = difficulty_figure({"validation": self._val_by_difficulty}, title="tokens and accuracy by difficulty")
            experiment.add_figure("val/by_difficulty", figure, global_step=self.global_step)
        log_histograms(experiment, "val", self._val_lengths, self._val_budget_errors, self.global_step)

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
        """``save_pretrained`` the current weights and tokenizer (full weights; rank 0 writes).

        Under FSDP every rank must call it: the shards are gathered collectively, then rank 0 loads
        them into a fresh copy of the model (LoRA included, so the merge works as unsharded).
        """
        model = self.model
        full = full_state_dict(*self.weights_source())
        if not self.trainer.is_global_zero:
            return None
        if full is not None:
            model = self.model_loader.load_model()
            model.load_state_dict(full)
        path = export_pretrained(model, self.tokenizer, out_dir, merge_lora=self.merge_lora_on_export)
        log.info("exported model to %s", path)
        return path


def full_state_dict(root: torch.nn.Module, prefix: str) -> Optional[dict[str, torch.Tensor]]:
    """The unsharded weights of ``root``'s submodule at ``prefix`` (keys without it, as in that
    submodule's ``state_dict()``, LoRA adapters separate), on CPU, when ``root`` is sharded by FSDP
    (wrapper or ``fully_shard``); None when it is not (single device, DDP).

    Collective under FSDP: every rank must call it. The weights are gathered one FSDP unit or parameter at
    a time (:func:`selfbudget_pl.weights.iter_full_weights`, which the vLLM weight sync streams from too)
    and only rank 0 keeps them (the others get an empty dict), so one full copy sits in host memory
    rather than one per rank.
    """
    if not is_sharded(root):
        return None
    keep = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in iter_full_weights(root, prefix, merge_lora=False):
        if keep:
            state[name] = tensor.to("cpu", copy=True)
    return state


ROLLOUT_COLUMNS = ("id", "problem", "answer", "difficulty", "b_max", "source", "budget")


def rollout_columns(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """The per-prompt dataset columns of a batch that travel with its rollouts (tensors become lists)."""
    return {
        key: batch[key].tolist() if isinstance(batch[key], torch.Tensor) else list(batch[key])
        for key in ROLLOUT_COLUMNS
        if key in batch
    }


def sampling_settings(value: Optional[SamplingSettings | dict], **defaults: Any) -> SamplingSettings:
    if isinstance(value, SamplingSettings):
        return value
    return SamplingSettings(**{**defaults, **dict(value or {})})
