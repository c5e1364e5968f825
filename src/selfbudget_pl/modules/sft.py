"""Stage 1 (cold start): supervised fine-tuning on budget-labelled responses.

The loss is next-token cross-entropy on the response only (budget tag, solution and EOS); the prompt
is masked with -100 by the collator. It runs on packed tokens as GRPO's log-probs do
(``module.packed_forward``), else through the model's own loss. Validation adds greedy generation,
graded, with budget metrics.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from selfbudget_pl.modules.base import PolicyModule
from selfbudget_pl.modules.logprobs import packed_sequence_nll


class SFTModule(PolicyModule):
    """Cold-start SFT. All arguments are those of :class:`PolicyModule`, plus:

    Args:
        generate_in_validation: also run greedy generation on validation batches (budget metrics).
    """

    def __init__(self, *args: Any, generate_in_validation: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generate_in_validation = generate_in_validation
        self._step_started = time.perf_counter()

    def lm_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The next-token loss on the batch's responses (the prompt is labelled ``-100``)."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        # Packing splits each row after its first token, so rows must be right-padded (as SFTCollator pads).
        right_padded = bool(attention_mask[:, 0].all())
        if self.packed_forward and right_padded and self.packable(self.model):
            return packed_sequence_nll(self.model, input_ids, attention_mask, labels, self.head_chunk_tokens)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        tokens = int(batch["attention_mask"].sum())
        seconds = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/tokens_per_s", tokens / seconds)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # batch_size given: Lightning cannot infer it from this batch's dict and warns in every SFT log.
        self.log("val/loss", self.lm_loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["input_ids"]))
        if self.generate_in_validation:
            self.validation_generation(batch)
