"""Stage 2: online GRPO with the budget-guided reward.

One training step, for a batch of prompts:

1. sample G = ``num_generations`` completions per prompt from the current policy (the rollout backend);
2. score them: the one :class:`~selfbudget_pl.callbacks.reward.RewardScorer` among the callbacks (the
   ``reward`` config group) returns their rewards and annotations, which every
   :class:`~selfbudget_pl.callbacks.reward.RolloutHook` (the budget metrics) then sees;
3. advantages: each reward minus its group's mean, divided by the group's std (``scale_rewards``; off
   is Dr. GRPO);
4. update: the clipped surrogate ``-min(r A, clip(r) A)`` on every completion token, aggregated per
   ``loss_aggregation``, plus ``beta`` x KL(policy || reference) when ``beta > 0``;
   ``num_iterations`` passes over the rollouts, one optimizer step per ``mini_batch_size`` completions,
   gradients accumulated over ``micro_batch_size`` completions at a time;
5. after every optimizer step the backend gets the new weights (a no-op for the HF backend).

Paper defaults (``configs/module/grpo.yaml``): G = 5, temperature 0.6, beta = 0 (no reference model,
no KL), one iteration (ratio = 1, so clipping never triggers and the loss is the plain policy gradient).

Under DDP or FSDP each rank samples for its own prompts (the DistributedSampler gives every rank a
different slice of the batch) with its own rollout seed, and all G completions of a prompt are drawn
on the rank that holds it: a group never straddles ranks, so step 3 is local and exact, with no
gather. Gradients are all-reduced once per optimizer step (micro-batches before the last accumulate
locally), so every rank takes the same step; with token aggregation the loss is divided by the tokens of
every rank, so that step is the one a single process would take over all of them. The logged scalars are
averaged across ranks (min/max lengths: reduced with min/max).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, ContextManager, Optional

import torch
from lightning.pytorch.strategies import ParallelStrategy
from peft import PeftModel

from selfbudget_pl.callbacks.reward import RewardScorer, RolloutHook, Scores
from selfbudget_pl.config.checks import check_budget_caps
from selfbudget_pl.config.groups import GRPOModuleSchema
from selfbudget_pl.data.collate import record_columns
from selfbudget_pl.modules.base import PolicyModule
from selfbudget_pl.modules.experience import Experience, experience_from_rollouts
from selfbudget_pl.modules.logprobs import completion_logprobs
from selfbudget_pl.modules.losses import (
    Aggregation, PolicyLoss, SamplerCorrection, SamplerWeights, group_advantages, policy_loss,
    sampler_weights,
)  # fmt: skip
from selfbudget_pl.modules.optimization import training_progress
from selfbudget_pl.modules.step_metrics import EXTREME_METRICS, accumulate, rollout_metrics, token_means, update_metrics
from selfbudget_pl.rollout.base import Rollouts, SamplingSettings, encode_prefill, sampling_settings
from selfbudget_pl.schema import check_arguments


class GRPOModule(PolicyModule):
    """Budget-guided GRPO. All arguments of :class:`PolicyModule`, plus:

    Args:
        num_generations: completions per prompt (G); the group that defines each advantage's baseline.
        sampling: rollout sampling (temperature, top_p, top_k, max_new_tokens, stop).
        num_iterations: passes over each batch of rollouts (PPO epochs); >1 reuses samples off-policy.
        mini_batch_size: completions per optimizer step (None: all of a batch's rollouts in one step).
        micro_batch_size: completions per forward/backward (None: a whole mini-batch at once).
        micro_batch_tokens: tokens one forward/backward may hold (prompt + completion of each completion; a
            longer completion goes alone), so a few long completions do not share one forward (None: no bound).
            The split does not change the step: every micro-batch divides by the mini-batch's normaliser.
        epsilon_low / epsilon_high: the ratio clip range ``[1 - epsilon_low, 1 + epsilon_high]``.
        beta: KL coefficient; > 0 adds a reference policy (the adapters switched off under LoRA,
            otherwise a frozen copy of the starting weights).
        loss_aggregation: ``token`` (DAPO), ``sequence`` (original GRPO) or ``dr_grpo``.
        scale_rewards: divide advantages by the group std (GRPO); False is Dr. GRPO.
        advantage_eps: added to the group std.
        rollout_seed: sampling seed, combined with the step and rank so each step draws fresh samples
            and a resumed run draws the same ones as an uninterrupted run (None: the global RNG).
        log_entropy: log the policy's mean token entropy (one extra log-softmax over the vocabulary).
        prefill_fraction: share of prompts whose G completions all start from a pre-filled budget
            ``<budget>N</budget><solution>``, N drawn uniformly from ``prefill_budget_range`` x the
            prompt's b_max (prompts without b_max are never pre-filled). The precise-budget reward
            then trains the model to follow budgets it did not choose, which is what pre-filling at
            inference relies on; 0 (the paper's setting as we read it) trains on own budgets only.
        prefill_budget_range: ``(low, high)`` fractions of b_max that pre-filled budgets span.
        prefill_draw: ``prompt``: one N per pre-filled prompt, shared by its G completions; ``completion``:
            each of its G completions draws its own N, so the group's rewards differ by how closely each
            answer followed its N (with one shared N, answers of one length all score alike and the
            advantages carry nothing about N).
        mask_truncated_completions: leave completions cut off by ``max_new_tokens`` out of the loss
            (TRL's option): their reward says nothing about an answer the model never got to finish.
            They still count in their group's baseline.
        sampler_correction: importance weights for a sampler whose log-probs are not the trainer's
            (:class:`~selfbudget_pl.modules.losses.SamplerCorrection`: on/off/auto, token or sequence level,
            truncate or mask, the cap); ``auto`` turns it on for a backend with its own engine (vLLM).
    """

    def __init__(
        self,
        *args: Any,
        num_generations: int = 5,
        sampling: Optional[SamplingSettings | dict] = None,
        num_iterations: int = 1,
        mini_batch_size: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
        micro_batch_tokens: Optional[int] = None,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        loss_aggregation: Aggregation = "token",
        scale_rewards: bool = True,
        advantage_eps: float = 1e-4,
        rollout_seed: Optional[int] = 0,
        log_entropy: bool = True,
        prefill_fraction: float = 0.0,
        prefill_budget_range: tuple[float, float] = (0.5, 1.0),
        prefill_draw: str = "prompt",
        mask_truncated_completions: bool = False,
        sampler_correction: Optional[SamplerCorrection | dict] = None,
        **kwargs: Any,
    ) -> None:
        check_arguments(GRPOModuleSchema, locals(), "GRPOModule")
        super().__init__(*args, **kwargs)
        # Several optimizer steps per batch of rollouts; the rollout backend syncs before the next rollout.
        self.automatic_optimization = False
        self.num_generations = num_generations
        self.sampling = sampling_settings(sampling, temperature=0.6, max_new_tokens=8192)
        self.num_iterations = num_iterations
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.beta = beta
        self.loss_aggregation = loss_aggregation
        self.scale_rewards = scale_rewards
        self.advantage_eps = advantage_eps
        self.rollout_seed = rollout_seed
        self.log_entropy = log_entropy
        low, high = prefill_budget_range
        self.prefill_fraction = prefill_fraction
        self.prefill_budget_range = (float(low), float(high))
        self.prefill_draw = prefill_draw
        self.mask_truncated_completions = mask_truncated_completions
        if not isinstance(sampler_correction, SamplerCorrection):
            sampler_correction = SamplerCorrection(**dict(sampler_correction or {}))
        self.sampler_correction = sampler_correction
        self.ref_model: Optional[torch.nn.Module] = None
        # The reference is rebuilt from the base checkpoint (configure_model, on resume too), never saved:
        # checkpoints would otherwise carry a second full copy of the weights that nothing trains.
        self.register_state_dict_post_hook(_drop_reference_weights)
        self.register_load_state_dict_post_hook(_reference_weights_not_expected)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # The data is loaded by now: a run whose rows carry no b_max would train without the cap unnoticed.
        check_budget_caps(self.prefill_fraction, self.trainer.datamodule, self.trainer.callbacks)

    def configure_model(self) -> None:
        super().configure_model()
        if self.beta > 0 and self.ref_model is None and not _is_peft(self.model):
            # Loaded from the same checkpoint as the policy: the KL anchor is where training started.
            self.ref_model = self.load_model(frozen=True).eval()
            self.shard_models()  # strategy=fsdp2: the reference is sharded like the policy

    def train(self, mode: bool = True) -> "GRPOModule":
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # Lightning switches every submodule to train mode; the reference stays fixed
        return self

    def on_train_start(self) -> None:
        super().on_train_start()
        # A resumed run's policy is not the checkpoint the backend loaded from disk.
        self.rollout_backend.mark_stale(*self.weights_source())

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollouts, scores = self.sample_and_reward(batch)
        if self.active_correction() is not None and not rollouts.sampler_logprobs:
            raise ValueError(
                f"module.sampler_correction is on but the rollout backend ({type(self.rollout_backend).__name__}) "
                "recorded no log-probs of its sampled tokens, so the trainer/sampler ratio cannot be computed: "
                "set module.sampler_correction.enabled=false, or use a backend that records them (rollout=vllm or hf)."
            )
        advantages = group_advantages(
            scores.rewards.to(self.device), self.num_generations, self.scale_rewards, self.advantage_eps
        )
        experience = self.make_experience(rollouts, advantages)
        started = time.perf_counter()
        stats = self.update_policy(experience)
        tokens_per_s = stats.pop("tokens") / max(time.perf_counter() - started, 1e-9)
        metrics = {
            **rollout_metrics(rollouts, scores, self.num_generations),
            **update_metrics(stats),
            "train/tokens_per_s": tokens_per_s,
        }
        grader_metrics = getattr(self.grader, "pop_metrics", None)  # MathGrader's grader/timeouts; others may have none
        if grader_metrics is not None:
            metrics.update(grader_metrics())
        # Each rank saw different prompts: log the mean over ranks, not rank 0's share; extremes are
        # the extremes over ranks.
        for reduce_fx in ("min", "max"):
            extremes = {name: metrics.pop(name) for name in EXTREME_METRICS[reduce_fx] if name in metrics}
            self.log_dict(extremes, on_step=True, batch_size=len(rollouts), sync_dist=True, reduce_fx=reduce_fx)
        self.log_dict(metrics, on_step=True, batch_size=len(rollouts), sync_dist=True)

    def sample_and_reward(self, batch: dict[str, Any]) -> tuple[Rollouts, Scores]:
        """Sample G completions per prompt and score them; the rollout hooks (metrics) see both."""
        # The sampler's own log-probs when the correction compares them (the HF sampler records them only then).
        sampling = replace(self.sampling, logprobs=self.sampling.logprobs or self.active_correction() is not None)
        generator = None
        if self.rollout_seed is not None:
            step_seed = self.rollout_seed + 100_003 * self.global_step + 1_009 * self.global_rank
            sampling = replace(sampling, seed=step_seed)
            generator = torch.Generator().manual_seed(step_seed)
        columns = record_columns(batch)
        prefills = self.choose_prefills(columns.get("b_max"), len(batch["prompt_ids"]), generator)
        # A pre-filled budget is part of the prompt (never trained) but of the text that gets parsed.
        rollouts = self.rollout_backend.generate(
            batch["prompt_ids"], num_samples=self.num_generations, sampling=sampling, prefill=prefills, columns=columns
        )
        rollouts.progress = self.training_progress(len(rollouts))
        scorer = self.reward_scorer()
        scores = scorer.score(rollouts, self)
        if scores.rewards.shape != (len(rollouts),):
            raise ValueError(
                f"{type(scorer).__name__}.score returned rewards of shape {tuple(scores.rewards.shape)} "
                f"for {len(rollouts)} completions: one reward per completion."
            )
        for callback in self.trainer.callbacks:
            if isinstance(callback, RolloutHook):
                callback.on_rollouts(self.trainer, self, rollouts, scores)
        return rollouts, scores

    def reward_scorer(self) -> RewardScorer:
        """The one reward scorer among the trainer's callbacks (the ``reward`` config group builds it)."""
        scorers = [callback for callback in self.trainer.callbacks if isinstance(callback, RewardScorer)]
        if len(scorers) != 1:
            raise RuntimeError(
                f"GRPO needs exactly one reward scorer among the trainer's callbacks, found {len(scorers)} "
                f"({[type(scorer).__name__ for scorer in scorers]}): configure one with the `reward` config group."
            )
        return scorers[0]

    def choose_prefills(
        self, b_max: Optional[list[Optional[int]]], num_prompts: int, generator: Optional[torch.Generator]
    ) -> list[Optional[str]]:
        """Per completion (a prompt's G in a row), a budget prefix to start from, or None (the model's own
        budget). A prompt is pre-filled or not as a whole; its G share one N or draw one each (``prefill_draw``)."""
        size = self.num_generations
        if self.prefill_fraction <= 0 or b_max is None:
            return [None] * (num_prompts * size)
        # Per prompt: whether it is pre-filled and its (first) spread, as runs made before the per-completion
        # draw drew them, so their seeds sample the same budgets; the other completions' spreads come after.
        draws = torch.rand(num_prompts, 2, generator=generator)
        picks, spreads = draws[:, 0].tolist(), draws[:, 1:].expand(num_prompts, size)
        if self.prefill_draw == "completion":
            spreads = torch.cat([spreads[:, :1], torch.rand(num_prompts, size - 1, generator=generator)], dim=1)
        spreads = spreads.tolist()
        return [
            self.output_format.budget_prefix(self.prefill_budget(cap, spread))
            if cap and pick < self.prefill_fraction else None
            for cap, pick, row in zip(b_max, picks, spreads) for spread in row
        ]  # fmt: skip

    def prefill_budget(self, cap: int, spread: float) -> int:
        """The pre-filled budget for a prompt capped at ``cap``, ``spread`` (in [0, 1]) across the range."""
        low, high = self.prefill_budget_range
        return max(1, round(cap * (low + (high - low) * spread)))

    def longest_prefill_tokens(self, datamodule: Any) -> int:
        """Tokens the longest pre-filled budget adds to a prompt: the top of the range for the largest train cap."""
        caps = [example.get("b_max") or 0 for example in (datamodule.datasets.get("train") or [])]
        if self.prefill_fraction <= 0 or not any(caps):
            return 0
        prefix = self.output_format.budget_prefix(self.prefill_budget(max(caps), 1.0))
        return len(encode_prefill(self.tokenizer, prefix))

    def sampling_calls(self, datamodule: Any) -> list[tuple[int, int]]:
        """A validation batch's, and a training step's: this rank's prompts x ``num_generations``."""
        return [*super().sampling_calls(datamodule),
                (datamodule.batch_size * self.num_generations, self.sampling.max_new_tokens)]  # fmt: skip

    def make_experience(self, rollouts: Rollouts, advantages: torch.Tensor) -> Experience:
        """The rollouts as training tensors on the module's device (:func:`experience_from_rollouts`)."""
        pad_id = self.tokenizer.pad_token_id
        return experience_from_rollouts(rollouts, advantages, pad_id, self.mask_truncated_completions).to(self.device)

    def update_policy(self, experience: Experience) -> dict[str, float]:
        """``num_iterations`` passes of optimizer steps over ``experience``; returns token-weighted stats."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        mini_batch = self.mini_batch_size or len(experience)
        steps_per_batch = self.optimizer_steps_per_batch(len(experience))
        if steps_per_batch > 1:
            # The policy moves after the first step: ratios need the log-probs that sampled the tokens.
            experience.old_logprobs = self.score_completions(self.model, experience)
        if self.beta > 0:
            experience.ref_logprobs = self.reference_logprobs(experience)

        totals: dict[str, float] = defaultdict(float)
        for _ in range(self.num_iterations):
            for mini in experience.chunks(mini_batch):
                normaliser = self._normaliser(mini)
                micros = list(self.micro_batches(mini))
                for index, micro in enumerate(micros):
                    with self._gradient_sync(last=index == len(micros) - 1):
                        loss, entropy, weights = self.micro_batch_loss(micro, normaliser)
                        self.manual_backward(loss.loss)
                    accumulate(totals, micro, loss, entropy, weights)
                self.configure_gradient_clipping(optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                self.rollout_backend.mark_stale(*self.weights_source())  # synced before the next rollout
        return token_means(totals, steps_per_batch)

    def training_progress(self, num_completions: int) -> float:
        """Fraction of training done when a batch of ``num_completions`` rollouts is scored, in optimizer steps
        (:func:`~selfbudget_pl.modules.optimization.training_progress`); 0 when the run's length is unknown."""
        try:
            total = self.total_optimizer_steps()
        except Exception:  # noqa: BLE001 - Lightning raises several kinds for a loader of unknown length
            total = math.inf
        return training_progress(self.global_step, total, self.optimizer_steps_per_batch(num_completions))

    def optimizer_steps_per_batch(self, num_completions: int) -> int:
        """Optimizer steps one batch of rollouts takes: ``num_iterations`` x its mini-batches."""
        return self.num_iterations * -(-num_completions // (self.mini_batch_size or num_completions))

    def total_optimizer_steps(self) -> float:
        """Optimizer steps the run takes (see :meth:`PolicyModule.total_optimizer_steps`), counting every
        mini-batch and iteration of every batch: ``trainer.max_steps`` counts optimizer steps too, but
        Lightning's epoch-based estimate counts batches."""
        trainer = self.trainer
        bounded_by_steps = trainer.estimated_stepping_batches  # also loads the train dataloader
        if trainer.max_epochs == -1 or not math.isfinite(trainer.num_training_batches):
            return float(bounded_by_steps)
        per_epoch = sum(
            self.optimizer_steps_per_batch(prompts * self.num_generations)
            for prompts in epoch_batch_sizes(trainer.train_dataloader, int(trainer.num_training_batches))
        )
        total = per_epoch * max(trainer.max_epochs, 1)
        return float(min(total, trainer.max_steps) if trainer.max_steps > 0 else total)

    def micro_batches(self, experience: Experience) -> list[Experience]:
        """``experience`` in the pieces one forward takes (``micro_batch_size``, ``micro_batch_tokens``)."""
        return list(experience.micro_batches(self.micro_batch_size, self.micro_batch_tokens))

    def _gradient_sync(self, last: bool) -> ContextManager[None]:
        """All-reduce gradients only on a mini-batch's last backward; earlier ones accumulate locally."""
        strategy = self.trainer.strategy
        if last or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def micro_batch_loss(
        self, micro: Experience, normaliser: float
    ) -> tuple[PolicyLoss, Optional[torch.Tensor], Optional[SamplerWeights]]:
        """Forward the policy on one micro-batch and build its share of the mini-batch loss (with the sampler's
        importance weights when the correction is on)."""
        logprobs, entropy = self.completion_logprobs(self.model, micro)
        # The trainer's log-probs under the weights that sampled: scored before the first step, or these.
        old = micro.old_logprobs if micro.old_logprobs is not None else logprobs.detach()
        correction, weights = self.active_correction(), None
        if correction is not None:
            weights = sampler_weights(old, micro.sampler_logprobs, micro.completion_mask, correction)
        loss = policy_loss(
            logprobs, old, micro.advantages, micro.completion_mask,
            eps_low=self.epsilon_low, eps_high=self.epsilon_high, aggregation=self.loss_aggregation,
            ref_logprobs=micro.ref_logprobs, beta=self.beta,
            max_length=self.sampling.max_new_tokens, normaliser=normaliser,
            sampler_weights=None if weights is None else weights.weights,
        )  # fmt: skip
        return loss, (entropy.sum() if self.log_entropy else None), weights

    def active_correction(self) -> Optional[SamplerCorrection]:
        """The sampler correction when it applies: on, or ``auto`` with a backend that has its own engine."""
        enabled = self.sampler_correction.enabled
        if enabled == "auto":
            enabled = self.rollout_backend.separate_engine
        return self.sampler_correction if enabled else None

    # -- forward passes ------------------------------------------------------------------------
    def completion_logprobs(self, model: torch.nn.Module, micro: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropies of ``micro``'s completion tokens under ``model``
        (:func:`selfbudget_pl.modules.logprobs.completion_logprobs`, with this module's settings)."""
        packed = self.packed_forward and self.packable(model)
        return completion_logprobs(model, micro, self.sampling.temperature, self.head_chunk_tokens, packed)

    @torch.no_grad()
    def score_completions(self, model: torch.nn.Module, experience: Experience) -> torch.Tensor:
        """Log-probs of every completion token under ``model`` (no grad), ``[N, T]`` like the experience."""
        scores = torch.zeros(experience.completion_ids.shape, dtype=torch.float32, device=self.device)
        start = 0
        for micro in self.micro_batches(experience):
            logprobs, _ = self.completion_logprobs(model, micro)
            scores[start : start + len(micro), : logprobs.shape[1]] = logprobs
            start += len(micro)
        return scores

    def reference_logprobs(self, experience: Experience) -> torch.Tensor:
        if self.ref_model is not None:
            return self.score_completions(self.ref_model, experience)
        with self.model.disable_adapter():  # LoRA: the reference is the base model underneath
            return self.score_completions(self.model, experience)

    def _normaliser(self, mini: Experience) -> float:
        """What each rank divides its summed mini-batch loss by. ``token``: the mini-batch's completion tokens
        summed over ranks, over the number of ranks (DDP and FSDP average gradients over ranks), so the step
        is the token mean over every rank's tokens, as in one process: with each rank's own count, a rank
        with longer completions would weigh its tokens less. Otherwise the completions (equal on every rank)."""
        if self.loss_aggregation != "token":
            return float(len(mini))
        tokens = mini.completion_mask.sum().float()
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(tokens)  # every rank runs the same mini-batches: a matched collective
        return float(tokens.clamp(min=1)) / world

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_generation(batch)


def epoch_batch_sizes(loader: Any, num_batches: int) -> list[int]:
    """Prompts in each of an epoch's first ``num_batches`` batches on this rank (the sampler Lightning
    installed, e.g. a DistributedSampler, gives this rank's share)."""
    size, batch = len(loader.sampler), loader.batch_size
    if batch is None:  # a custom batch_sampler
        return [len(indices) for indices in loader.batch_sampler][:num_batches]
    sizes = [batch] * (size // batch) + ([size % batch] if size % batch and not loader.drop_last else [])
    return sizes[:num_batches]


def _drop_reference_weights(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [key for key in state_dict if key.startswith(prefix + "ref_model.")]:
        del state_dict[key]


def _reference_weights_not_expected(module: torch.nn.Module, incompatible_keys: Any) -> None:
    # Keys are relative to where load_state_dict was called: this module or a wrapper around it.
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not ("." + key).count(".ref_model.")]


def _is_peft(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


