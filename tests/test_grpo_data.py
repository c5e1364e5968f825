"""GRPOModule on the project's own GRPO batches (BudgetMathDataModule in ``grpo`` mode, synthetic sums)."""

from __future__ import annotations

import functools

import lightning as L
import torch

from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.data.synthetic import SyntheticSource
from selfbudget_pl.modules.grpo import GRPOModule


class LengthReward(L.Callback):
    """Shorter is better; also checks that every dataset column arrives once per completion."""

    def __init__(self) -> None:
        self.columns: list[dict] = []

    def on_rollouts(self, trainer, pl_module, rollouts) -> None:
        self.columns.append(rollouts.columns)
        rollouts.rewards = -torch.tensor([float(len(ids)) for ids in rollouts.completion_ids])


def test_two_steps_on_datamodule_batches_carry_the_columns(model_loader, tokenizer):
    data = BudgetMathDataModule(train=[SyntheticSource(split="train", size=8, seed=0)], mode="grpo", batch_size=2)
    data.connect(tokenizer)
    module = GRPOModule(
        model_loader=model_loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        num_generations=3,
        sampling=dict(temperature=1.0, max_new_tokens=4),
    )
    reward = LengthReward()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[reward],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    for columns in reward.columns:
        assert {"id", "answer", "b_max"} <= set(columns)
        ids = columns["id"]
        assert len(ids) == 6 and ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5]
