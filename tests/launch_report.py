"""A callback the launcher tests add to ``python train.py`` (``+callbacks.launch_report=...``): each rank writes
``<out_dir>/rank<N>.json`` at the end of training with what the test compares across ranks: the ranks and the
environment vLLM's external launcher read, the backend that sampled and how often it synced, the problems this
rank's rollouts answered, a digest of the weights, and the final metrics."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L

from selfbudget_pl.callbacks.reward import RolloutHook
from selfbudget_pl.weights import iter_full_weights

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


class LaunchReport(RolloutHook):
    """Records this rank's rollouts and writes the rank's report when training ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rollout_problems: list[str] = []
        self.batch_problems: list[str] = []
        self.completions = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, index: int) -> None:
        self.batch_problems.extend(batch["id"])

    def on_rollouts(self, trainer: L.Trainer, pl_module: L.LightningModule, rollouts: Any, scores: Any) -> None:
        self.rollout_problems.extend(sorted(set(rollouts.columns["id"])))
        self.completions += len(rollouts)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backend = pl_module.rollout_backend
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "env": {name: os.environ.get(name) for name in LAUNCHER_VARIABLES},
            "backend": type(backend).__name__,
            "num_syncs": getattr(backend, "num_syncs", None),
            "batch_problems": self.batch_problems,
            "rollout_problems": self.rollout_problems,
            "completions": self.completions,
            "weights_sha256": full_weights_digest(pl_module),
            "metrics": metrics,
            "finite": {key: math.isfinite(value) for key, value in metrics.items()},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1))


def full_weights_digest(pl_module: Any) -> str:
    """SHA-256 over the policy's full weights, in name order (a collective under FSDP: every rank calls it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(iter_full_weights(*pl_module.weights_source(), merge_lora=False), key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
