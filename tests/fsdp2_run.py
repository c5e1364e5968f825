"""Run ``train(cfg)`` under ``strategy=fsdp2`` (Lightning's ModelParallelStrategy + ``fully_shard``) as
one of two torchrun CPU ranks (gloo), and write what this rank ended with.

    torchrun --nproc-per-node=2 -m tests.fsdp2_run <sft|grpo> <output_dir> [overrides...]

Every rank writes ``<output_dir>/<run>.rank<N>.json`` per run: the final metrics, a digest of its full
(gathered) weights, whether they were sharded, the examples it trained on, and on rank 0 a digest of the
export. ``sft`` trains under fsdp2 (activation checkpointing on), then the same run under DDP, then under
fsdp2 with bfloat16 mixed precision; ``grpo``
runs four trainings in the same processes: two steps, then one step that stops (writing a distributed
checkpoint), then a resume from that checkpoint to step two, then the two steps under DDP.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import open_dict

from selfbudget_pl.train import train
from selfbudget_pl.weights import is_sharded, iter_full_weights
from tests.distributed_run import RecordExamples, use_even_token_reward
from tests.test_train import compose_small


def full_digest(module: L.LightningModule) -> str:
    """SHA-256 over the policy's full weights in name order (gathered: a collective under FSDP2)."""
    root, prefix = module.weights_source()
    weights = {name: tensor.cpu().clone() for name, tensor in iter_full_weights(root, prefix, merge_lora=False)}
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordFullWeights(RecordExamples):
    """:class:`RecordExamples` with digests of the gathered weights (``state_dict()`` holds shards)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_sha256 = full_digest(pl_module)
        self.sharded = is_sharded(pl_module.model)
        reference = getattr(pl_module, "ref_model", None)
        self.reference_sharded = None if reference is None else is_sharded(reference)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final_sha256 = full_digest(pl_module)


class StopAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


FSDP2 = ("strategy=fsdp2", "strategy.mixed_precision=null")  # float32 on CPU: comparable with DDP


def run(experiment: str, output_dir: Path, name: str, *overrides: str, stop_at: int = 0, ckpt_path: str = "") -> dict:
    out = output_dir / name
    cfg = compose_small(experiment, out, "trainer.devices=2", *overrides)
    with open_dict(cfg):
        cfg.callbacks.record_examples = {"_target_": f"{__name__}.RecordFullWeights"}
        cfg.module.export_dir = str(out / "export")
        cfg.ckpt_path = ckpt_path or None
        if stop_at:
            cfg.callbacks.stop = {"_target_": f"{__name__}.StopAtStep", "step": stop_at}
        use_even_token_reward(cfg)
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    recorder = next(callback for callback in trainer.callbacks if isinstance(callback, RecordFullWeights))
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "metrics": metrics,
        "sharded": recorder.sharded,
        "reference_sharded": recorder.reference_sharded,
        "initial_sha256": recorder.initial_sha256,
        "weights_sha256": recorder.final_sha256,
        "examples": recorder.examples,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*")),
    }
    if trainer.is_global_zero:
        from transformers import AutoModelForCausalLM

        from tests.distributed_run import weights_digest

        result["export_sha256"] = weights_digest(AutoModelForCausalLM.from_pretrained(cfg.module.export_dir))
    Path(output_dir, f"{name}.rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))
    torch.distributed.barrier()
    return result


def main(kind: str, output_dir: str, *overrides: str) -> None:
    out = Path(output_dir)
    if kind == "sft":
        # Activation checkpointing on: the wrapped layers are sharded and recomputed in backward.
        run("sft_toy", out, "sft", *FSDP2, "strategy.activation_checkpointing=true", *overrides)
        run("sft_toy", out, "ddp", "strategy=ddp", *overrides)
        # bfloat16 compute (configs/strategy/fsdp2.yaml's policy) over float32 parameters.
        run("sft_toy", out, "bf16", *FSDP2, "strategy.mixed_precision={param_dtype:bfloat16,reduce_dtype:float32}",
            *overrides)  # fmt: skip
        return
    steps = ("trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1",
             "callbacks.model_checkpoint.save_top_k=-1")  # fmt: skip
    run("grpo_toy", out, "full", *FSDP2, *steps, *overrides)
    run("grpo_toy", out, "part", *FSDP2, *steps, *overrides, stop_at=1)
    run("grpo_toy", out, "resumed", *FSDP2, *steps, *overrides,
        ckpt_path=str(out / "part" / "checkpoints" / "step_step=1.ckpt"))  # fmt: skip
    run("grpo_toy", out, "ddp", "strategy=ddp", *steps, *overrides)


if __name__ == "__main__":
    main(*sys.argv[1:])
