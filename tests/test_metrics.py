"""BudgetAdherence: values on hand-worked examples, rank correlation, buckets, state merging, and the
per-step callback inside a training loop."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from selfbudget_pl.callbacks.budget_metrics import BudgetMetricsCallback
from selfbudget_pl.callbacks.reward import RolloutHook, Scores
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.metrics import KEYS, BudgetAdherence, average_ranks, spearman, update_from_rollouts
from selfbudget_pl.rewards.annotate import annotate
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import Rollouts


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]


def test_spearman_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3).item() == pytest.approx(1.0)
    assert spearman(x, -x).item() == pytest.approx(-1.0)
    # with ties: Pearson correlation of the average ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]
    ties = spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])).item()
    assert ties == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(spearman(torch.ones(4), x[:4]).item())  # constant input
    assert math.isnan(spearman(x[:1], x[:1]).item())


def test_budget_adherence_values():
    metric = BudgetAdherence()
    metric.update(
        budgets=[100, 100, None, 200],
        lengths=[95, 130, 40, 200],
        correct=[True, False, False, True],
        difficulty=[1, 2, 3, None],
        format_ok=[True, True, False, True],
        truncated=[False, True, False, False],
    )
    values = metric.compute()
    assert set(values) == set(KEYS)
    assert values["accuracy"].item() == pytest.approx(0.5)
    assert values["mean_length"].item() == pytest.approx((95 + 130 + 40 + 200) / 4)
    assert values["budget_mae"].item() == pytest.approx((5 + 30 + 0) / 3)  # budgeted completions only
    assert values["budget_rel_error"].item() == pytest.approx((0.05 + 0.3 + 0) / 3)
    assert values["within_10"].item() == pytest.approx(2 / 3)
    assert values["within_20"].item() == pytest.approx(2 / 3)
    assert values["format_error_rate"].item() == pytest.approx(0.25)
    assert values["truncation_rate"].item() == pytest.approx(0.25)
    assert values["spearman_budget_length"].item() == pytest.approx(spearman(
        torch.tensor([100.0, 100.0, 200.0]), torch.tensor([95.0, 130.0, 200.0])).item())
    assert math.isnan(values["spearman_budget_difficulty"].item())  # both budgeted+difficulty rows have b=100


def test_empty_metric_gives_nan_not_an_error():
    values = BudgetAdherence().compute()
    assert all(math.isnan(value.item()) for value in values.values())


def test_difficulty_buckets():
    metric = BudgetAdherence(difficulty_buckets=[2, 1, 5])
    metric.update(budgets=[10, 20, 30, 40], lengths=[10, 10, 10, 10], correct=[1, 0, 1, 1], difficulty=[1, 2, 3, 9])
    values = metric.compute()
    assert values["difficulty_1/accuracy"].item() == 1.0
    assert values["difficulty_2/accuracy"].item() == 0.0
    assert values["difficulty_5/accuracy"].item() == 1.0
    assert values["difficulty_5/budget_mae"].item() == 20.0
    assert values["spearman_budget_difficulty"].item() == pytest.approx(1.0)
    assert values["accuracy"].item() == pytest.approx(0.75)  # difficulty 9 is past every edge: overall only


def test_merged_states_equal_one_metric():
    """What DDP does with ``cat`` states: the union of every process's completions."""
    batches = [
        dict(budgets=[10, 20], lengths=[12, 18], correct=[1, 0], difficulty=[1, 2]),
        dict(budgets=[30, None, 50], lengths=[25, 7, 60], correct=[1, 1, 0], difficulty=[3, 4, 5]),
    ]
    whole = BudgetAdherence(difficulty_buckets=[2, 5])
    parts = [BudgetAdherence(difficulty_buckets=[2, 5]) for _ in batches]
    for part, batch in zip(parts, batches):
        whole.update(**batch)
        part.update(**batch)
    parts[0].merge_state(parts[1])
    merged, expected = parts[0].compute(), whole.compute()
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, equal_nan=True), key


def test_update_rejects_ragged_columns():
    with pytest.raises(ValueError, match="`correct` has 1 entries"):
        BudgetAdherence().update(budgets=[1, 2], lengths=[1, 2], correct=[True])


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def make_rollouts(fmt: OutputFormat) -> Rollouts:
    completions = [fmt.render(30, " 1+1=2 \\boxed{2} "), fmt.render(30, " \\boxed{3} "), "<budget>5"]
    n = len(completions)
    return Rollouts(
        prompt_ids=[[1]] * n, completion_ids=[[2]] * n, completions=completions, finish_reasons=["eos", "eos", "length"],
        group_index=[0] * n, columns={"answer": ["2"] * n, "difficulty": [1.0, 2.0, 2.0]},
    )


def test_update_from_rollouts():
    fmt = OutputFormat()
    rollouts = make_rollouts(fmt)
    annotations = annotate(rollouts, fmt, MathGrader(workers=0), CharTokenizer())
    metric = BudgetAdherence()
    update_from_rollouts(metric, rollouts, annotations)
    values = metric.compute()
    assert values["accuracy"].item() == pytest.approx(1 / 3)
    assert values["format_error_rate"].item() == pytest.approx(1 / 3)
    assert values["truncation_rate"].item() == pytest.approx(1 / 3)
    lengths = annotations.solution_lengths[:2]
    assert values["budget_mae"].item() == pytest.approx(sum(abs(n - 30) for n in lengths) / 2)


class MetricsModule(pl.LightningModule):
    """Every training step hands ``rollouts_of(output_format)`` to the rollout hooks, scored as GRPO would
    (annotated by the scorer; ``annotate_in_scorer=False``: a scorer that rewards without grading)."""

    def __init__(self, rollouts_of=make_rollouts, annotate_in_scorer: bool = True):
        super().__init__()
        self.annotate_in_scorer = annotate_in_scorer
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.output_format, self.grader, self.tokenizer = OutputFormat(), MathGrader(workers=0), CharTokenizer()
        self.rollouts_of = rollouts_of

    def training_step(self, batch, batch_idx):
        rollouts = self.rollouts_of(self.output_format)
        annotations = annotate(rollouts, self.output_format, self.grader, self.tokenizer) if self.annotate_in_scorer else None
        scores = Scores(rewards=torch.zeros(len(rollouts)), annotations=annotations)
        for callback in self.trainer.callbacks:
            if isinstance(callback, RolloutHook):
                callback.on_rollouts(self.trainer, self, rollouts, scores)
        return self.weight**2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def logged_by(callback: BudgetMetricsCallback, module: MetricsModule, steps: int) -> dict:
    """What ``callback`` logged over ``steps`` training steps of ``module``."""
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    return trainer.logged_metrics


@pytest.mark.parametrize("annotate_in_scorer", [True, False])
def test_callback_logs_per_step_and_per_bucket(annotate_in_scorer):
    callback = BudgetMetricsCallback(difficulty_buckets=[1, 2])
    logged = logged_by(callback, MetricsModule(annotate_in_scorer=annotate_in_scorer), steps=2)
    assert float(logged["rollout/budget/accuracy"]) == pytest.approx(1 / 3)
    assert len(callback.metric.budget) == 0  # reset after every step: each log covers one step's rollouts
    assert float(logged["rollout/budget/difficulty_1/accuracy"]) == 1.0
    assert float(logged["rollout/budget/difficulty_2/format_error_rate"]) == pytest.approx(0.5)
    assert {f"rollout/budget/{key}" for key in KEYS} <= set(logged)


# -- the collapse detector ---------------------------------------------------------------------------


def test_understated_rate_counts_own_well_formed_budgets_below_the_fraction():
    columns = dict(
        budgets=[1, 10, 50, 1, 1, None, 30, 15],
        lengths=[120, 30, 40, 120, 120, 50, 100, 30],
        correct=[True] * 8,
        difficulty=[3, 2, 4, 3, 3, 2, 4, 2],
        format_ok=[True, True, True, True, False, False, True, True],
        prefilled=[False, False, False, True, False, False, False, False],
    )
    metric = BudgetAdherence(difficulty_buckets=[2, 3, 4])
    metric.update(**columns)
    values = metric.compute()
    # own and well-formed: rows 0, 1, 2, 6, 7; below half the length: 0 (1 < 60), 1 (10 < 15), 6 (30 < 50);
    # not row 2 (50 >= 20) nor row 7 (15 is exactly half); a pre-filled (3) or malformed (4) budget is not the model's
    assert values["understated_rate"].item() == pytest.approx(3 / 5)
    assert values["difficulty_2/understated_rate"].item() == pytest.approx(1 / 2)
    assert values["difficulty_3/understated_rate"].item() == 1.0
    assert values["difficulty_4/understated_rate"].item() == pytest.approx(1 / 2)
    stricter = BudgetAdherence(understated_fraction=0.25)
    stricter.update(**columns)
    assert stricter.compute()["understated_rate"].item() == pytest.approx(1 / 5)  # only 1 < 30
    only_prefilled = BudgetAdherence()
    only_prefilled.update(budgets=[1], lengths=[120], correct=[True], prefilled=[True])
    assert math.isnan(only_prefilled.compute()["understated_rate"].item())


def collapsed_rollouts(fmt: OutputFormat) -> Rollouts:
    """A collapsed model's rollouts: budget 1 and a long solution on difficulty 3; difficulty 2 honest or pre-filled."""
    solution = " 1+1=2;?2-1=1;?2-1=1;?2-1=1 \\boxed{2} "
    return Rollouts(
        prompt_ids=[[1]] * 4, completion_ids=[[2]] * 4, completions=[fmt.render(b, solution) for b in (1, 1, 40, 1)],
        finish_reasons=["eos"] * 4, group_index=[0, 0, 1, 1],
        columns={"answer": ["2"] * 4, "difficulty": [3.0, 3.0, 2.0, 2.0], "prefilled": [False, False, False, True]},
    )


def test_callback_logs_the_collapse_per_difficulty():
    logged = logged_by(BudgetMetricsCallback(difficulty_buckets=[2, 3]), MetricsModule(collapsed_rollouts), steps=1)
    assert float(logged["rollout/budget/understated_rate"]) == pytest.approx(2 / 3)  # the pre-filled one left out
    assert float(logged["rollout/budget/difficulty_3/understated_rate"]) == 1.0
    assert float(logged["rollout/budget/difficulty_2/understated_rate"]) == 0.0  # budget 40 for ~35 tokens
