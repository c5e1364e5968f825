"""The training task: compose config -> data, model, callbacks, trainer -> fit.

``train(cfg)`` is a plain function (tests call it directly); ``main`` is the Hydra entry point used by
the root ``train.py`` and the ``selfbudget-train`` console script.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from selfbudget_pl.callbacks.hparams import RunConfigHParams
from selfbudget_pl.config.checks import ConfigError, check_train_config
from selfbudget_pl.config.overrides import open_trainer_overrides
from selfbudget_pl.launcher_env import check_process_count
from selfbudget_pl.memory.fit import report_memory_plan
from selfbudget_pl.strategies import check_strategy_supports

log = logging.getLogger(__name__)

# configs/ sits at the repository root (the package is installed editable from a checkout).
CONFIG_DIR = os.environ.get("SELFBUDGET_CONFIGS", str(Path(__file__).resolve().parents[2] / "configs"))


def instantiate_dict(section: DictConfig | None) -> list[Any]:
    """Instantiate every named entry of a dict-of-configs group (callbacks, loggers); null entries are off."""
    if not section:
        return []
    return [instantiate(entry, _convert_="object") for entry in section.values() if entry and "_target_" in entry]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train as ``cfg`` says; return the final logged metrics and the objects that were built."""
    check_train_config(cfg)  # every bad value named by its key, before any model or data is loaded
    plan_settings = instantiate(cfg.memory_plan) if cfg.get("memory_plan") else None
    if plan_settings is not None and plan_settings.enabled:
        report_memory_plan(cfg, plan_settings)  # what each device and host will hold; refuses what cannot fit
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True)

    output_format = instantiate(cfg.output_format)
    model_loader = instantiate(cfg.model, _convert_="object")
    module = instantiate(
        cfg.module,
        model_loader=model_loader,
        output_format=output_format,
        grader=instantiate(cfg.grader),
        rollout=instantiate(cfg.rollout),
        _convert_="object",
    )
    datamodule = instantiate(cfg.data, output_format=output_format, _convert_="object")
    datamodule.connect(module.tokenizer)

    # The reward callback runs before the metrics callbacks: they read the rewards it fills in.
    callbacks = instantiate_dict(DictConfig({"reward": cfg.get("reward")})) + instantiate_dict(cfg.get("callbacks"))
    callbacks.append(RunConfigHParams(cfg))  # the resolved config (and final metrics) in TensorBoard's HParams tab
    # srun or torchrun started as many processes as the Trainer will expect (Lightning's checks raise later).
    check_process_count(cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1))
    strategy = instantiate(cfg.strategy, model=model_loader)  # fsdp/fsdp2 shard the model's own layers
    check_strategy_supports(module, strategy)  # before any process starts: GRPO under FSDP1 cannot work
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate_dict(cfg.get("logger")) or False,
        strategy=strategy,
        _convert_="object",
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        metrics, _ = train(cfg)
    except ConfigError as error:  # a sentence for the user, not a traceback; every rank stops
        if rank_zero_only.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})


def main() -> None:
    """``python train.py`` / ``selfbudget-train``: Hydra overrides, where any Lightning Trainer argument
    may be given as typed (``trainer.fast_dev_run=true``), not only with Hydra's ``+``."""
    try:
        sys.argv = [sys.argv[0], *open_trainer_overrides(sys.argv[1:])]
    except ConfigError as error:
        sys.exit(f"error: {error}")
    _hydra_main()
