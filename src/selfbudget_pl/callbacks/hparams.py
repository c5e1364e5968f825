"""The run's resolved config in TensorBoard's HParams tab, with its final metrics.

Lightning fills ``hparams.yaml`` and the HParams tab from ``module.hparams``; our modules are built from
config objects, so that was ``{}``. :func:`log_run_config` writes the whole resolved config instead (at
the start, so a crashed run still has it) and, after training, once more with the final metrics, so
runs can be compared by any config value against any final metric. :class:`RunConfigHParams` does both
at the right moments (``train.train`` and ``selfbudget-lightning`` add it): the second at
``on_train_end``, while the event file is still open (after ``fit`` returns Lightning has closed it, and
writing then would start a second event file).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from selfbudget_pl import internals


class RunConfigHParams(pl.Callback):
    """Logs ``config`` as the run's hyperparameters when fitting starts, and with the final metrics at its end."""

    def __init__(self, config: DictConfig | Mapping[str, Any]) -> None:
        self.config = config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_run_config(trainer, self.config)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {key: value for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        log_run_config(trainer, self.config, metrics)


def resolved_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain containers, interpolations resolved where they can be (Hydra's runtime ones
    cannot outside a Hydra run: then left as written)."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError:
        return OmegaConf.to_container(cfg, resolve=False)


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics worth a column in the HParams tab: finite, and not per difficulty bucket."""
    kept = {}
    for key, value in metrics.items():
        value = float(value)
        if math.isfinite(value) and "/difficulty_" not in key:
            kept[key] = value
    return kept


def log_run_config(trainer: pl.Trainer, config: DictConfig | Mapping[str, Any],
                   metrics: Optional[Mapping[str, Any]] = None) -> None:  # fmt: skip
    """Record ``config`` as the run's hyperparameters in every logger (``hparams.yaml`` for TensorBoard),
    and with ``metrics`` also the HParams-tab entry that pairs them with those final values."""
    params = resolved_config(config)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)  # without metrics: hparams.yaml only, no placeholder scalar
        if metrics is not None and isinstance(logger, LightningTensorBoardLogger) and trainer.is_global_zero:
            _write_hparams_session(logger, final_metrics(metrics), trainer.global_step)
        logger.save()


def _write_hparams_session(logger: LightningTensorBoardLogger, metrics: Mapping[str, float], step: int) -> None:
    """The HParams plugin's summaries. The metric values come from the scalars already logged under the
    same tags, so no extra scalar point is written (Lightning's ``log_hyperparams(params, metrics)``
    would add one at step 0)."""
    from torch.utils.tensorboard.summary import hparams

    # Flattened and sanitised as Lightning's log_hyperparams does (nested keys joined with "/").
    params = internals.tensorboard_hparams(logger)
    experiment, start, end = hparams(params, dict(metrics))
    writer = internals.tensorboard_file_writer(logger.experiment)
    for summary in (experiment, start, end):
        writer.add_summary(summary, step)
    logger.experiment.flush()
