"""A training run at a real model's shape, measured: peak RSS, time of each step, weights moved.

Takes the same Hydra overrides as ``python train.py``; for the real-shape GRPO smoke run:

    python benchmarks/smoke_real_shape.py experiment=grpo_math model=qwen2.5_0.5b_shape trainer=cpu \\
        trainer.precision=bf16-mixed rollout=hf trainer.max_steps=2 module.sampling.max_new_tokens=256 \\
        data.batch_size=2 data.num_workers=0 module.export_dir=null

Prints one JSON object: the peak resident memory of the process (``ru_maxrss``), each training step's
wall time (batch start to batch end: sampling, reward, update), the dtypes of the trained weights and the
trainer's precision, and the share of trained tensors and elements that differ from the checkpoint the
run started from (loaded again after training, so the comparison costs no memory during it).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from selfbudget_pl.train import CONFIG_DIR, train


class StepTimer(L.Callback):
    """Wall time of every training batch (GRPO: one step of sampling, reward and update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def weights_moved(module: torch.nn.Module) -> dict[str, float]:
    """Share of trained tensors / elements that differ from the checkpoint the run loaded."""
    start = dict(module.model_loader.load_model().named_parameters())
    changed = [
        (param.detach() != start[name].detach().to(param.dtype))
        for name, param in module.model.named_parameters()
        if param.requires_grad
    ]
    return {
        "tensors_changed": sum(bool(flags.any()) for flags in changed) / len(changed),
        "elements_changed": sum(int(flags.sum()) for flags in changed) / sum(flags.numel() for flags in changed),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": f"{__name__}.StepTimer"}
    started = time.perf_counter()
    metrics, objects = train(cfg)
    total = time.perf_counter() - started
    module, trainer = objects["module"], objects["trainer"]
    timer = next(callback for callback in trainer.callbacks if isinstance(callback, StepTimer))
    model = module.model
    report = {
        "overrides": sys.argv[1:],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_seconds": timer.seconds,
        "run_seconds": total,
        "global_step": trainer.global_step,
        "precision": str(trainer.precision),
        "trained_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "hidden_size": model.config.hidden_size,
        "layers": model.config.num_hidden_layers,
        "threads": torch.get_num_threads(),
        "metrics": {key: round(value, 4) for key, value in sorted(metrics.items())},
        **weights_moved(module),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
