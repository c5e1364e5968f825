"""Lightning's ModelCheckpoint without its warning for manually optimized modules.

Under manual optimization Lightning warns on every saved step that the checkpoint holds the weights
*after* the optimizer step, with a code example for saving the state before it. For GRPO that is the
state to save: its optimizer steps all finish inside ``training_step``, so ``global_step`` and the weights
agree and a resume continues from there (tests/test_resume.py). The warning is silenced for that reason
only; every other warning of the callback still shows.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

_AFTER_STEP_WARNING = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


class StepCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` (same arguments) that saves manually optimized
    modules after their optimizer steps without warning each time."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_AFTER_STEP_WARNING)
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
