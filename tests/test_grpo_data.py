"""GRPOModule on the project's own GRPO batches (BudgetMathDataModule in ``grpo`` mode, synthetic sums)."""

from __future__ import annotations

import functools

import lightning as L
import torch

from selfbudget_pl.callbacks.reward import RewardScorer, Scores
from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.data.synthetic import SyntheticSource
from selfbudget_pl.modules.grpo import GRPOModule


class LengthReward(RewardScorer):
    """Shorter is better; also checks that every dataset column arrives once per completion."""

    def __init__(self) -> None:
        self.columns: list[dict] = []

    def score(self, rollouts, pl_module) -> Scores:
        self.columns.append(rollouts.columns)
        return Scores(rewards=-torch.tensor([float(len(ids)) for ids in rollouts.completion_ids]))


def fit(module: GRPOModule, data: BudgetMathDataModule, hook: L.Callback, max_steps: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[hook],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


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
    assert fit(module, data, reward, max_steps=2).global_step == 2
    for columns in reward.columns:
        assert {"id", "answer", "b_max"} <= set(columns)
        ids = columns["id"]
        assert len(ids) == 6 and ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5]


class RecordRollouts(LengthReward):
    def score(self, rollouts, pl_module) -> Scores:
        self.rollouts = getattr(self, "rollouts", []) + [rollouts]
        return super().score(rollouts, pl_module)


def test_prefilled_budgets_start_whole_groups_below_b_max(model_loader, tokenizer):
    data = BudgetMathDataModule(train=[SyntheticSource(split="train", size=8, seed=0)], mode="grpo", batch_size=4,
                                reference_b_max=True)  # pre-filled budgets are drawn below a cap
    data.connect(tokenizer)
    module = GRPOModule(
        model_loader=model_loader, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), num_generations=2,
        sampling=dict(temperature=1.0, max_new_tokens=4), prefill_fraction=1.0, prefill_budget_range=(0.5, 0.9),
    )  # fmt: skip
    recorder = RecordRollouts()
    fit(module, data, recorder, max_steps=1)
    (rollouts,) = recorder.rollouts
    assert all(rollouts.columns["prefilled"])
    for index, text in enumerate(rollouts.completions):
        budget = module.output_format.parse(text + "\\boxed{1}").budget
        b_max = rollouts.columns["b_max"][index]
        assert text.startswith(module.output_format.budget_prefix(budget))
        assert 0.5 * b_max - 1 <= budget <= 0.9 * b_max + 1
        # The prefix is conditioning, not a trained completion: it sits at the end of the prompt ids.
        prefix_ids = tokenizer.encode(module.output_format.budget_prefix(budget), add_special_tokens=False)
        assert rollouts.prompt_ids[index][-len(prefix_ids):] == prefix_ids
    # Both completions of a group share one budget.
    assert rollouts.completions[0].split("</budget>")[0] == rollouts.completions[1].split("</budget>")[0]
    off = GRPOModule(model_loader=model_loader, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    assert off.choose_prefills([10, 20], 2, None) == [None] * 10


def test_prefill_draw_completion_gives_each_of_a_groups_completions_its_own_budget(model_loader):
    """``prefill_draw=completion``: a pre-filled prompt's G completions draw their N apart, inside the range;
    ``prompt``: they share one. Whether a prompt is pre-filled stays a whole group's draw in both."""
    def budgets(draw: str) -> list[list[int | None]]:
        module = GRPOModule(
            model_loader=model_loader, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), num_generations=4,
            prefill_fraction=0.5, prefill_budget_range=(0.5, 1.5), prefill_draw=draw,
        )  # fmt: skip
        prefixes = module.choose_prefills([200] * 16 + [None], 17, torch.Generator().manual_seed(0))
        parsed = [module.output_format.parse(text + "\\boxed{1}").budget if text else None for text in prefixes]
        return [parsed[start : start + 4] for start in range(0, len(parsed), 4)]

    shared, apart = budgets("prompt"), budgets("completion")
    for groups in (shared, apart):
        assert groups[-1] == [None] * 4  # a prompt without b_max is never pre-filled
        assert all(len({budget is None for budget in group}) == 1 for group in groups)
        assert 2 <= sum(group[0] is not None for group in groups) <= 14
        assert all(100 <= budget <= 300 for group in groups for budget in group if budget is not None)
    prefilled = [group for group in apart if group[0] is not None]
    assert all(len(set(group)) > 1 for group in prefilled)
    assert all(len(set(group)) == 1 for group in shared)
    # The same prompts are pre-filled either way: the draw of which prompts comes first.
    assert [group[0] is None for group in shared] == [group[0] is None for group in apart]
    # The shared draw takes (pick, spread) pairs per prompt from the generator, as before the per-completion
    # draw existed, so seeded runs recorded then sample the same pre-filled budgets now.
    pairs = torch.rand(17, 2, generator=torch.Generator().manual_seed(0)).tolist()
    expected = [round(200 * (0.5 + spread)) if pick < 0.5 else None for pick, spread in pairs[:16]] + [None]
    assert [group[0] for group in shared] == expected
