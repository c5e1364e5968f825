"""Run ``train(cfg)`` as one rank of a two-process CPU DDP job and write what that rank ended with.

    python -m tests.distributed_run <experiment> <output_dir> [overrides...]

An override written ``rank<N>:key=value`` is set on rank N alone (from ``LOCAL_RANK``, which Lightning's
launcher sets for the ranks it starts), after the small test settings, so a test can make the ranks' samples
differ by construction.

Lightning's DDP launcher re-runs this module once per extra rank; each rank writes
``<output_dir>/rank<N>.json`` (final metrics, a digest of its weights, the examples it trained on; rank 0 adds a digest of its export),
which tests/test_distributed.py compares across ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from omegaconf import OmegaConf, open_dict
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from selfbudget_pl.callbacks.reward import RolloutHook
from selfbudget_pl.train import train
from tests.test_train import compose_small


def count_allreduces(buckets, bucket):  # unannotated: DDP rejects the string annotations of this module
    """A DDP communication hook: DDP's own all-reduce of ``bucket`` (a ``dist.GradBucket``), its index noted
    in ``buckets`` (a list) first."""
    buckets.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


class RecordExamples(RolloutHook):
    """Keeps the starting weights' digest, an identity for every training example this rank saw (its
    dataset id, which GRPO batches carry, or a digest of its tokens for SFT batches), the gradient buckets
    DDP all-reduced and, under GRPO, the completion lengths it sampled in the last step."""

    def __init__(self) -> None:
        self.examples: list[Any] = []
        self.initial_sha256 = ""
        self.completion_lengths: list[int] = []  # GRPO: this rank's completion lengths in the last step
        self.allreduced_buckets: list[Any] = []  # "step": a training batch starts; an index: a bucket all-reduced

    def on_rollouts(self, trainer: L.Trainer, pl_module: L.LightningModule, rollouts: Any, scores: Any) -> None:
        self.completion_lengths = [len(rollouts.sampled_ids(index)) for index in range(len(rollouts))]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_sha256 = weights_digest(pl_module.model)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(self.allreduced_buckets, count_allreduces)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.allreduced_buckets.append("step")
        if "id" in batch:
            ids = batch["id"]
            self.examples.extend(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))
            return
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            self.examples.append(hashlib.sha1(ids[mask.bool()].numpy().tobytes()).hexdigest()[:16])


class EvenTokenReward:
    """Share of even token ids in a completion: a reward the untrained tiny model's samples differ on
    (the task rewards are all the format penalty for it), so GRPO advantages are non-zero and weights move."""

    __name__ = "even_tokens"

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **columns: Any) -> list[float]:
        return [sum(token % 2 == 0 for token in ids) / max(len(ids), 1) for ids in completion_ids]


def use_even_token_reward(cfg) -> None:
    """GRPO runs (``cfg`` opened for writing): score with :class:`EvenTokenReward`, synced across ranks."""
    if cfg.module.get("num_generations"):
        cfg.reward = {
            "_target_": "selfbudget_pl.callbacks.reward.RewardCallback",
            "functions": {"even_tokens": {"_target_": f"{__name__}.EvenTokenReward"}},
            "sync_dist": True,
        }


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, in key order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def shared_overrides(overrides: tuple[str, ...]) -> list[str]:
    """The Hydra overrides every rank applies (those without a ``rank<N>:`` prefix)."""
    return [override for override in overrides if not override.startswith("rank")]


def main(experiment: str, output_dir: str, *overrides: str) -> None:
    cfg = compose_small(experiment, Path(output_dir), "strategy=ddp", "trainer.devices=2", *shared_overrides(overrides))
    prefix = f"rank{os.environ.get('LOCAL_RANK', '0')}:"
    with open_dict(cfg):
        for key, value in (o.removeprefix(prefix).split("=", 1) for o in overrides if o.startswith(prefix)):
            OmegaConf.update(cfg, key, yaml.safe_load(value))
        cfg.callbacks.record_examples = {"_target_": f"{__name__}.RecordExamples"}
        cfg.module.export_dir = str(Path(output_dir, "export"))  # not the experiment's shared logs/ path
        use_even_token_reward(cfg)
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    recorder = next(callback for callback in trainer.callbacks if isinstance(callback, RecordExamples))
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "metrics": metrics,
        "initial_sha256": recorder.initial_sha256,
        "weights_sha256": weights_digest(objects["module"].model),
        "examples": recorder.examples,
        "completion_lengths": recorder.completion_lengths,
        "allreduced_buckets": recorder.allreduced_buckets,
    }
    if trainer.is_global_zero:
        from transformers import AutoModelForCausalLM

        result["export_sha256"] = weights_digest(AutoModelForCausalLM.from_pretrained(cfg.module.export_dir))
    Path(output_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
