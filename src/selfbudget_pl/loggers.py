"""The TensorBoard logger runs use: Lightning's, with Lightning's own ``epoch`` scalar under ``train/`` beside
the other training scalars."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger (same arguments), with the ``epoch`` value Lightning adds to every
    logged step written as ``train/epoch``: every scalar then sits under a prefix naming its source."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        renamed = {("train/epoch" if key == "epoch" else key): value for key, value in metrics.items()}
        super().log_metrics(renamed, step)
