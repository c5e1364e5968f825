"""Stage 1 (cold start): supervised fine-tuning on budget-labelled responses.

The loss is next-token cross-entropy on the response only (budget tag, solution and EOS); the prompt
is masked with -100 by the collator. Validation adds greedy generation, graded, with budget metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from selfbudget_pl.modules.base import PolicyModule


class SFTModule(PolicyModule):
    """Cold-start SFT. All arguments are those of :class:`PolicyModule`, plus:

    Args:
        generate_in_validation: also run greedy generation on validation batches (budget metrics).
    """

    def __init__(self, *args: Any, generate_in_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generate_in_validation = generate_in_validation
        self._step_started = time.perf_counter()

    def _lm_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        tokens = int(batch["attention_mask"].sum())
        seconds = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/tokens_per_s", tokens / seconds)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # batch_size given: Lightning cannot infer it from this batch's dict and warns in every SFT log.
        self.log("val/loss", self._lm_loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["input_ids"]))
        if self.generate_in_validation:
            self.validation_generation(batch)
