"""Reward functions, their weighted composition, the reward callback and the reward configs."""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from selfbudget_pl.callbacks.reward import RewardCallback, RewardScorer, Scores
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.modules.optimization import training_progress
from selfbudget_pl.rewards.annotate import annotate, resolve_annotations
from selfbudget_pl.rewards.budget import BudgetGuidedReward, annealed, cosine_interpolation
from selfbudget_pl.rewards.combine import WeightedRewards, reward_statistics
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rewards.length_control import L1ExactReward, L1MaxReward
from selfbudget_pl.rewards.simple import AccuracyReward, FormatReward
from selfbudget_pl.rollout.base import Rollouts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FORMAT = OutputFormat()


def completion(budget: int, answer: str = "7") -> str:
    return FORMAT.render(budget, f" 3+4=7 \\boxed{{{answer}}} ")


# -- the SelfBudgeter reward, against method.md's formula ------------------------------------------


def reference_reward(well_formed, budget, length, correct, b_max, alpha, peak="alpha"):
    """method.md's parameterisation (peak alpha: Formula 2; peak fixed: delta = 0.1), written out
    independently of the implementation."""
    if not well_formed:
        return -1.0
    if peak == "alpha":
        t = max(0.0, (1 - alpha) * budget) if correct else (1 + alpha) * budget
    else:
        t = budget * 0.9 if correct else budget * 1.1
    r0, rx = (1.0, 0.5) if correct else (-0.5, -1.0)
    width = alpha * budget
    x = min(abs(length - t), width)
    value = rx + (r0 - rx) * (1 + math.cos(math.pi * x / width)) / 2
    return value + (-0.5 if b_max is not None and budget > b_max else 0.0)


@pytest.mark.parametrize("peak", ["alpha", "fixed"])
@pytest.mark.parametrize("correct", [True, False])
@pytest.mark.parametrize("length", [0, 45, 90, 100, 110, 150, 400, 10_000])
@pytest.mark.parametrize("progress", [0.0, 0.5, 0.9, 1.0])
def test_budget_guided_matches_method_formula(peak, correct, length, progress):
    reward = BudgetGuidedReward(peak=peak)
    alpha = 6.0 + (0.1 - 6.0) * progress
    for b_max in (None, 50, 100, 1000):
        expected = reference_reward(True, 100, length, correct, b_max, alpha, peak)
        assert reward.score(True, 100, length, correct, b_max, progress) == pytest.approx(expected)


def test_alpha_peak_rewards_shorter_correct_answers_early_and_settles_late():
    reward = BudgetGuidedReward()  # peak="alpha", the paper's reading and the default
    early = [reward.score(True, 100, length, True, progress=0.0) for length in (20, 50, 90, 120)]
    assert early == sorted(early, reverse=True) and early[0] > early[-1]  # shorter is better while alpha >= 1
    assert reward.best_length(100, True, 0.0) == 0.0 and reward.best_length(100, False, 0.0) == pytest.approx(700)
    assert reward.best_length(100, True, 1.0) == pytest.approx(90) and reward.best_length(100, False, 1.0) == pytest.approx(110)
    late = {length: reward.score(True, 100, length, True, progress=1.0) for length in (80, 90, 100)}
    assert late[90] == pytest.approx(1.0) and late[80] < 1.0 and late[100] < 1.0
    wrong = {length: reward.score(True, 100, length, False, progress=1.0) for length in (100, 110, 120)}
    assert wrong[110] == pytest.approx(-0.5) and wrong[100] < -0.5 and wrong[120] < -0.5
    # the fixed peak has no length preference early on beyond the budget's own point
    fixed = BudgetGuidedReward(peak="fixed")
    assert fixed.score(True, 100, 90, True, progress=0.0) > fixed.score(True, 100, 20, True, progress=0.0)


def test_linear_shape_costs_every_token_of_forecast_error():
    cosine = BudgetGuidedReward(peak="fixed", delta=0.0, alpha_start=0.5, alpha_schedule="constant")
    linear = BudgetGuidedReward(peak="fixed", delta=0.0, alpha_start=0.5, alpha_schedule="constant", shape="linear")
    assert linear.score(True, 100, 125, True) == pytest.approx(0.75)  # half the width: half the range
    assert linear.score(True, 100, 150, True) == linear.score(True, 100, 400, True) == pytest.approx(0.5)
    # near the peak the cosine is flat, the line is not
    assert 1.0 - cosine.score(True, 100, 102, True) < 0.01 < 1.0 - linear.score(True, 100, 102, True)


def test_budget_cost_charges_correct_answers_for_their_own_budget():
    reward = BudgetGuidedReward(peak="fixed", budget_cost=0.3)
    base = BudgetGuidedReward(peak="fixed")
    assert reward.score(True, 50, 45, True, b_max=100, progress=1.0) == pytest.approx(1.0 - 0.15)
    assert reward.score(True, 100, 90, True, b_max=100, progress=1.0) == pytest.approx(1.0 - 0.3)
    # capped at the full cost (r_b charges for the rest), and absent without a cap, when wrong, or pre-filled
    assert reward.score(True, 200, 180, True, b_max=100, progress=1.0) == pytest.approx(1.0 - 0.3 - 0.5)
    for kwargs in ({"b_max": None}, {"b_max": 100, "prefilled": True}):
        assert reward.score(True, 50, 45, True, progress=1.0, **kwargs) == base.score(True, 50, 45, True, progress=1.0)
    assert reward.score(True, 50, 55, False, b_max=100, progress=1.0) == base.score(True, 50, 55, False, b_max=100, progress=1.0)
    with pytest.raises(ValueError, match=r"- `budget_cost` must be >= `wrong_max`"):
        BudgetGuidedReward(budget_cost=0.6)
    with pytest.raises(ValueError, match="budget_cost"):
        BudgetGuidedReward(budget_cost=-0.1)


def test_prefilled_budget_is_never_charged_the_cap_penalty():
    reward = BudgetGuidedReward()
    own = reward.score(True, 100, 110, False, b_max=50, progress=1.0)
    prefilled = reward.score(True, 100, 110, False, b_max=50, progress=1.0, prefilled=True)
    assert own == pytest.approx(-1.0) and prefilled == pytest.approx(-0.5)
    # a wrong answer far from a pre-filled budget above b_max scores no lower than... a wrong answer
    assert reward.score(True, 100, 900, False, b_max=50, progress=1.0, prefilled=True) == pytest.approx(-1.0)
    assert reward.score(True, 100, 900, False, b_max=50, progress=1.0, prefilled=True) > -1.5
    values = reward(completions=["a", "b"], parsed=[FORMAT.parse(completion(100))] * 2, correct=[False, False],
                    solution_lengths=[110, 110], b_max=[50, 50], prefilled=[False, True], progress=1.0)
    assert values == pytest.approx([-1.0, -0.5])


def test_truncated_or_unclosed_completions_get_the_format_penalty():
    reward = BudgetGuidedReward()
    closed = completion(100)
    unclosed = closed.replace("</solution>", "")
    parsed = [FORMAT.parse(text) for text in (closed, closed, unclosed)]
    assert all(p.well_formed for p in parsed)  # the parser alone accepts all three
    values = reward(completions=[closed, closed, unclosed], parsed=parsed, correct=[True] * 3,
                    solution_lengths=[90] * 3, truncated=[False, True, False], progress=1.0)
    assert values == pytest.approx([1.0, -1.0, -1.0])
    # the callback's `finished` column, when given, decides
    assert reward(completions=[unclosed], parsed=parsed[2:], correct=[True], solution_lengths=[90],
                  finished=[True], progress=1.0) == pytest.approx([1.0])


def test_budget_guided_peaks_under_budget_when_correct_and_over_when_wrong():
    reward = BudgetGuidedReward()
    assert reward.score(True, 100, 90, True, progress=1.0) == pytest.approx(1.0)
    assert reward.score(True, 100, 110, False, progress=1.0) == pytest.approx(-0.5)
    assert reward.score(True, 100, 300, True, progress=1.0) == pytest.approx(0.5)  # outside the width: s_min
    # a correct answer over its cap still beats every wrong one (the constraint)
    assert reward.score(True, 100, 300, True, b_max=10, progress=1.0) >= reward.score(True, 100, 110, False)


def test_budget_guided_call_uses_annotations_and_penalises_malformed():
    reward = BudgetGuidedReward()
    parsed = [FORMAT.parse(completion(100)), FORMAT.parse("no tags at all"), FORMAT.parse(completion(100))]
    values = reward(
        completions=["a", "b", "c"], parsed=parsed, correct=[True, False, False], solution_lengths=[90, 5, 110],
        b_max=[None, None, float("inf")], progress=1.0,
    )
    assert values == pytest.approx([1.0, -1.0, -0.5])


def test_budget_cap_nan_or_none_means_no_cap():
    reward = BudgetGuidedReward()
    capped = reward.score(True, 100, 90, True, b_max=50, progress=1.0)
    assert capped == pytest.approx(0.5)
    assert reward.score(True, 100, 90, True, b_max=float("nan"), progress=1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule, mid", [("linear", 3.05), ("cosine", 3.05), ("constant", 6.0)])
def test_alpha_schedules(schedule, mid):
    assert annealed(6.0, 0.1, 0.0, schedule) == pytest.approx(6.0)
    assert annealed(6.0, 0.1, 0.5, schedule) == pytest.approx(mid)
    assert annealed(6.0, 0.1, 1.0, schedule) == pytest.approx(0.1 if schedule != "constant" else 6.0)
    assert annealed(6.0, 0.1, 7.0, schedule) == annealed(6.0, 0.1, 1.0, schedule)  # progress is clamped


def test_cosine_schedule_differs_from_linear_off_the_midpoint():
    assert annealed(6.0, 0.1, 0.25, "cosine") > annealed(6.0, 0.1, 0.25, "linear")


def test_cosine_interpolation_endpoints():
    assert cosine_interpolation(0, 10, 1.0, 0.5) == 1.0
    assert cosine_interpolation(10, 10, 1.0, 0.5) == 0.5
    assert cosine_interpolation(5, 10, 1.0, 0.5) == pytest.approx(0.75)


def test_constraint_violation_names_the_fields():
    with pytest.raises(ValueError, match=r"`correct_min` \+ `budget_penalty` - `budget_cost` must be >= `wrong_max`"):
        BudgetGuidedReward(correct_min=0.1, budget_penalty=-1.0, wrong_max=-0.5)
    with pytest.raises(ValueError, match="alpha_schedule"):
        BudgetGuidedReward(alpha_schedule="exponential")
    with pytest.raises(ValueError, match=r"BudgetGuidedReward: alpha_end=0.0: must be a finite number > 0"):
        BudgetGuidedReward(alpha_end=0.0)
    with pytest.raises(ValueError, match=r"peak='moving': must be one of 'alpha', 'fixed'"):
        BudgetGuidedReward(peak="moving")
    with pytest.raises(ValueError, match="shape='gaussian'"):
        BudgetGuidedReward(shape="gaussian")


def test_budget_guided_standalone_grades_itself():
    reward = BudgetGuidedReward(grader=MathGrader(workers=0))
    completions = [completion(10, r"\frac{1}{2}"), completion(10, "0.3")]
    values = reward(completions=completions, answer=["0.5", "0.5"], completion_ids=[[0] * 9, [0] * 11])
    assert values[0] > 0 > values[1]


# -- L1 / DAPO / simple --------------------------------------------------------------------------


def test_l1_exact_and_max():
    parsed = [FORMAT.parse(completion(1000))] * 3
    kwargs = dict(parsed=parsed, correct=[True, True, False], solution_lengths=[1000, 3000, 1000])
    assert L1ExactReward()(["x"] * 3, **kwargs) == pytest.approx([1.0, 1.0 - 0.0003 * 2000, 0.0])
    assert L1MaxReward()(["x"] * 3, **kwargs) == pytest.approx([0.5, 0.0, 0.0])
    # the target_length column overrides the completion's own budget
    with_target = L1MaxReward()(["x"] * 3, target_length=[3000, 3000, 3000], **kwargs)
    assert with_target == pytest.approx([1.0, 0.5, 0.0])


def test_l1_without_any_target_gets_no_target_reward():
    kwargs = dict(parsed=[FORMAT.parse("no budget")], correct=[False], solution_lengths=[10])
    assert L1ExactReward(no_target_reward=-2.0)(["no budget"], **kwargs) == [-2.0]


def test_accuracy_and_format():
    parsed = [FORMAT.parse(completion(5)), FORMAT.parse("<budget>-5</budget>")]
    assert AccuracyReward()(["a", "b"], correct=[True, False]) == [1.0, 0.0]
    assert FormatReward()(["a", "b"], parsed=parsed) == [0.0, -1.0]
    assert FormatReward()([completion(5), "junk"]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="grader"):
        AccuracyReward()(["a"])


def test_rewards_pickle_with_stable_names():
    for reward in (BudgetGuidedReward(), L1ExactReward(), L1MaxReward(), AccuracyReward(), FormatReward()):
        copy = pickle.loads(pickle.dumps(reward))
        assert copy.__name__ == copy.name == reward.name


def test_resolve_annotations_needs_correctness_or_grader():
    with pytest.raises(ValueError, match="needs correctness"):
        resolve_annotations(["x"], {"solution_lengths": [1]})
    with pytest.raises(ValueError, match="needs lengths"):
        resolve_annotations(["x"], {"correct": [True]})
    with pytest.raises(ValueError, match="disagree in length"):
        resolve_annotations(["x", "y"], {"correct": [True], "solution_lengths": [1, 2]})


# -- composition -------------------------------------------------------------------------------


def trl_style_length_penalty(completions, **kwargs):
    """A reward written for TRL: ignores the columns it does not know; abstains on empty text."""
    return [None if not text else -len(text) / 100 for text in completions]


def test_weighted_rewards_sum_with_weights_and_nan_abstention():
    combined = WeightedRewards(
        {"accuracy": AccuracyReward(), "length": trl_style_length_penalty}, {"accuracy": 2.0}
    )
    total, components = combined(["abcd", ""], correct=[True, False], answer=["1", "2"], progress=0.3)
    assert total.dtype == torch.float32
    assert total.tolist() == pytest.approx([2.0 - 0.04, 0.0])
    assert components["accuracy"] == [1.0, 0.0]
    assert components["length"][0] == pytest.approx(-0.04) and math.isnan(components["length"][1])
    stats = reward_statistics(components)
    assert stats["rewards/accuracy/mean"] == 0.5
    assert stats["rewards/accuracy/std"] == pytest.approx(math.sqrt(0.5))
    assert stats["rewards/length/mean"] == pytest.approx(-0.04) and math.isnan(stats["rewards/length/std"])


def test_weighted_rewards_rejects_bad_configs_and_outputs():
    with pytest.raises(ValueError, match=r"\['typo'\]"):
        WeightedRewards({"accuracy": AccuracyReward()}, {"typo": 1.0})
    with pytest.raises(ValueError, match="`short` returned 1 values for 2"):
        WeightedRewards({"short": lambda completions, **_: [1.0]})(["a", "b"])
    with pytest.raises(ValueError, match="infinite"):
        WeightedRewards({"inf": lambda completions, **_: [math.inf]})(["a"])


# -- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["selfbudgeter", "l1_exact", "l1_max", "correctness"])
def test_reward_configs_instantiate(name):
    callback = instantiate(OmegaConf.load(CONFIGS / "reward" / f"{name}.yaml"))
    assert isinstance(callback, RewardCallback)
    assert set(callback.rewards.weights) == set(callback.rewards.functions)


def test_selfbudgeter_config_holds_the_paper_defaults():
    callback = instantiate(OmegaConf.load(CONFIGS / "reward" / "selfbudgeter.yaml"))
    configured = callback.rewards.functions["budget_guided"]
    assert vars(configured) == vars(BudgetGuidedReward())  # every constant spelled out, equal to the code's


def test_grader_and_callbacks_configs_instantiate(tmp_path):
    grader = instantiate(OmegaConf.load(CONFIGS / "grader" / "math_verify.yaml"))
    assert isinstance(grader, MathGrader) and grader._pool is None  # no pool until first use
    callbacks_cfg = OmegaConf.merge(
        {"paths": {"output_dir": str(tmp_path)}}, {"callbacks": OmegaConf.load(CONFIGS / "callbacks" / "default.yaml")}
    )
    callbacks = {name: instantiate(cfg) for name, cfg in callbacks_cfg.callbacks.items()}
    assert callbacks["model_checkpoint"].dirpath == str(tmp_path / "checkpoints")
    assert callbacks["budget_metrics"].metric.difficulty_buckets == [1, 2, 3, 4, 5, 6]


# -- the callback inside a real training loop ------------------------------------------------------


class CharTokenizer:
    """One token per character: enough for counting solution tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


class HookedModule(pl.LightningModule):
    """What GRPO does, minus the policy: make rollouts, score them with the one scorer, use the rewards."""

    def __init__(self, completions, answers):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.output_format, self.grader, self.tokenizer = FORMAT, MathGrader(workers=0), CharTokenizer()
        self.completions, self.answers = completions, answers
        self.seen: list[tuple[Rollouts, Scores]] = []

    def training_step(self, batch, batch_idx):
        n = len(self.completions)
        rollouts = Rollouts(
            prompt_ids=[[1]] * n, completion_ids=[[2] * (len(c) + 1) for c in self.completions],
            completions=list(self.completions), finish_reasons=["eos"] * n, group_index=[0] * n,
            columns={"answer": list(self.answers), "b_max": [None] * n, "problem": ["q"] * n},
            progress=training_progress(self.global_step, self.trainer.max_steps),  # the module knows its schedule
        )
        (scorer,) = [callback for callback in self.trainer.callbacks if isinstance(callback, RewardScorer)]
        scores = scorer.score(rollouts, self)
        self.seen.append((rollouts, scores))
        return (self.weight * scores.rewards.mean()) ** 2 + self.weight**2

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_reward_callback_in_a_training_loop():
    completions = [completion(40, r"\frac{1}{2}"), completion(40, "3"), "<budget>1e99</budget> \\boxed{0.5}",
                   "no tags \\boxed{0.5}"]
    module = HookedModule(completions, ["0.5"] * 4)
    callback = RewardCallback({"budget_guided": BudgetGuidedReward(), "accuracy": AccuracyReward()},
                              {"accuracy": 0.0})
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)

    rollouts, scores = module.seen[-1]
    annotations = scores.annotations
    assert annotations.correct == [True, False, False, False]
    assert [p.well_formed for p in annotations.parsed] == [True, True, False, False]
    assert annotations.solution_lengths[0] == len(completions[0].split("</budget>", 1)[1])
    assert annotations.solution_lengths[2] == len(" \\boxed{0.5}")  # after the (bad) budget tag
    assert annotations.solution_lengths[3] == len(rollouts.completion_ids[3])  # no budget tag: all generated tokens
    assert annotations.finished == [True, True, False, False]  # the last two never close a solution block
    assert scores.rewards.dtype == torch.float32
    assert scores.rewards.tolist() == pytest.approx(scores.components["budget_guided"])
    assert scores.components["budget_guided"][2:] == [-1.0, -1.0]
    logged = trainer.logged_metrics
    assert float(logged["rewards/accuracy/mean"]) == pytest.approx(1 / 4)
    assert "rewards/budget_guided/std" in logged
    # the tolerance narrowed as training progressed: same completions, lower reward at the last step
    first, last = module.seen[0][1].rewards[0].item(), module.seen[-1][1].rewards[0].item()
    assert first > last


def test_training_progress_falls_back_to_zero():
    assert training_progress(5, float("inf")) == 0.0  # a run of unknown length
    # steps 0..19: the last batch of rollouts (step 19, one optimizer step per batch) is scored at 1
    assert training_progress(5, 20) == pytest.approx(5 / 19)
    assert training_progress(19, 20) == 1.0
    assert training_progress(19, 20, steps_per_batch=4) == 1.0  # reached at step 16 already
    assert training_progress(16, 20, steps_per_batch=4) == 1.0 and training_progress(15, 20, steps_per_batch=4) < 1.0


def test_annotate_requires_the_answer_column():
    rollouts = Rollouts(prompt_ids=[[1]], completion_ids=[[1]], completions=["x"], finish_reasons=["eos"], group_index=[0])
    with pytest.raises(ValueError, match="'answer'"):
        annotate(rollouts, FORMAT, MathGrader(workers=0), CharTokenizer())


@pytest.mark.parametrize("name, peak, shape, cost, floor, cost_on, band", [
    ("selfbudgeter", "alpha", "cosine", 0.0, None, "budget", 0.0), ("selfbudgeter_fixed", "fixed", "cosine", 0.0, None, "budget", 0.0),
    ("selfbudgeter_forecast", "fixed", "linear", 0.3, None, "budget", 0.0), ("selfbudgeter_honest", "fixed", "linear", 0.3, 0.1, "spent", 0.04),
])  # fmt: skip
def test_named_reward_forms_compose(name, peak, shape, cost, floor, cost_on, band):
    reward = budget_form(name)
    assert (reward.peak, reward.shape, reward.budget_cost, reward.correct_floor, reward.cost_on, reward.band) == (
        peak, shape, cost, floor, cost_on, band)  # fmt: skip
    # the band stays inside the ±10% the evaluation counts: every length in [low b, high b] has b within 10% of it
    low, high = 1 - reward.delta - reward.band, 1 - reward.delta + reward.band
    assert reward.peak != "fixed" or (1 / low - 1 <= 0.1 and 1 - 1 / high <= 0.1)
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        toy = compose("train", overrides=["experiment=grpo_toy"]).reward.functions.budget_guided
    assert vars(instantiate(toy)) == vars(budget_form("selfbudgeter_honest"))  # the toy's default form


# -- the exits a length reward invites, closed by the honest form ------------------------------------


@functools.lru_cache(maxsize=None)
def budget_form(name: str) -> BudgetGuidedReward:
    """The budget-guided reward of ``configs/reward/<name>.yaml`` as training composes it (defaults merged)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"reward={name}"])
    return instantiate(cfg.reward).rewards.functions["budget_guided"]


BUDGET_FORMS = sorted(
    path.stem for path in (CONFIGS / "reward").glob("*.yaml") if "budget_guided" in path.read_text()
)
GAMEABLE_FORMS = ("selfbudgeter", "selfbudgeter_fixed", "selfbudgeter_forecast")  # kept as they were, exits and all


def honest_scores(reward: BudgetGuidedReward, b_max: int, progress: float) -> list[float]:
    """Every correct answer whose own budget is within its cap and whose length is within the tolerance
    (whole token counts, and the tolerance's two edges themselves)."""
    alpha = reward.alpha(progress)
    scores = []
    for budget in range(1, b_max + 1):
        peak, width = reward.best_length(budget, True, progress), alpha * budget
        lengths = [*range(max(1, math.ceil(peak - width)), math.floor(peak + width) + 1), peak + width]
        scores += [reward.score(True, budget, length, True, b_max, progress) for length in lengths + [max(0.0, peak - width)]]
    return scores


def best_honest_score(reward: BudgetGuidedReward, length: int, b_max: int, progress: float) -> float:
    """The best correct answer of this length with an honest budget (over the cap or not)."""
    return max(reward.score(True, budget, length, True, b_max, progress) for budget in range(1, 4 * length + 10)
               if abs(length - reward.best_length(budget, True, progress)) <= reward.alpha(progress) * budget)


def absurd_scores(reward: BudgetGuidedReward, b_max: int, progress: float) -> dict[tuple[int, int], float]:
    """Correct answers whose own budget is below half their length (the collapse: budget 1, 100-130 tokens)."""
    return {
        (budget, length): reward.score(True, budget, length, True, b_max, progress)
        for budget in (1, 2, 3, 5, 8, 13, 21, 34, 55)
        for length in range(2 * budget, 2 * b_max, 7)
    }


def collapse_margin(reward: BudgetGuidedReward, b_max: int, progress: float) -> float:
    """How far the best absurd budget stays below the worst honest answer (negative: the exit is open)."""
    return min(honest_scores(reward, b_max, progress)) - max(absurd_scores(reward, b_max, progress).values())


@pytest.mark.parametrize("b_max", [120, 200])
@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_stated_budget_of_one_scores_below_every_honest_answer(b_max, progress):
    reward = budget_form("selfbudgeter_honest")
    collapse = reward.score(True, 1, 120, True, b_max, progress)  # `<budget>1</budget>` and 120 tokens, correct
    assert collapse < best_honest_score(reward, 120, b_max, progress)
    assert collapse < min(honest_scores(reward, b_max, progress))  # below the honest answer of any length
    assert collapse_margin(reward, b_max, progress) > 0  # and so is every budget below half its length
    for (budget, length), value in absurd_scores(reward, b_max, progress).items():
        assert value < best_honest_score(reward, length, b_max, progress), (budget, length)


@pytest.mark.parametrize("name", GAMEABLE_FORMS)
def test_the_kept_forms_still_have_the_exit(name):
    """The paper's and our earlier forms are kept unchanged, exit included: the check above fails on them."""
    reward = budget_form(name)
    assert collapse_margin(reward, 120, 1.0) <= 0  # ties the worst honest answer without a cost, beats it with one
    if reward.budget_cost:
        assert reward.score(True, 1, 120, True, 120, 1.0) > min(honest_scores(reward, 120, 1.0))


@pytest.mark.parametrize("b_max", [120, 200])
def test_padding_an_answer_to_land_on_its_budget_does_not_pay(b_max):
    """Repeating a check until the length meets the budget: on its peak, or stating less than it wrote."""
    reward = budget_form("selfbudgeter_honest")
    short = reward.score(True, 21, 20, True, b_max, 1.0)  # the 20 tokens the problem needs, budget on them
    for padded in (40, 80, 120, 180):
        on_peak = min(range(1, 400), key=lambda budget: abs(reward.best_length(budget, True, 1.0) - padded))
        for budget in (on_peak, padded, padded // 2, 1):
            assert reward.score(True, budget, padded, True, b_max, 1.0) < short, (budget, padded)
    # the paper's form (no cost) pays a padded answer on its peak as much as the short one
    paper = budget_form("selfbudgeter")
    assert paper.score(True, 200, 180, True, None, 1.0) == paper.score(True, 20, 18, True, None, 1.0) == 1.0


def finished_scores(reward: BudgetGuidedReward) -> list[float]:
    return [
        reward.score(True, budget, length, correct, b_max, progress, prefilled)
        for budget in (1, 10, 60, 150, 400) for length in (1, 9, 55, 150, 600)
        for correct in (True, False) for b_max in (None, 50, 120, 200)
        for progress in (0.0, 0.5, 1.0) for prefilled in (False, True)
    ]  # fmt: skip


def test_stopping_before_the_answer_scores_below_every_finished_answer():
    reward = budget_form("selfbudgeter_honest")
    stopped = FORMAT.render(30, " 1+1=2 2+2=4 ").replace("</solution>", "")  # budget stated, no answer, unclosed
    no_answer = FORMAT.render(30, " 1+1=2 2+2=4 ")  # closed, but nothing boxed
    parsed = [FORMAT.parse(text) for text in (stopped, no_answer)]
    values = reward(completions=[stopped, no_answer], parsed=parsed, correct=[False, False], solution_lengths=[12, 12],
                    b_max=[120, 120], progress=1.0)  # fmt: skip
    assert values == [reward.format_penalty] * 2
    assert reward.format_penalty < min(finished_scores(reward))
    # the forecast form scores a finished wrong answer over its cap (-1 - 0.5) below stopping (-1)
    forecast = budget_form("selfbudgeter_forecast")
    assert forecast.format_penalty > min(finished_scores(forecast))


@pytest.mark.parametrize("name", BUDGET_FORMS)
def test_a_wrong_answer_on_its_budget_never_beats_a_correct_one_that_misses(name):
    reward = budget_form(name)
    grid = dict(budgets=(1, 5, 20, 60, 119, 120, 121, 300), b_max=(None, 10, 120, 200), progress=(0.0, 0.3, 0.7, 1.0))
    best_wrong, worst_correct = -math.inf, math.inf
    for budget in grid["budgets"]:
        for b_max in grid["b_max"]:
            for progress in grid["progress"]:
                for prefilled in (False, True):
                    landing = (budget, round(reward.best_length(budget, False, progress)))
                    for length in landing:
                        best_wrong = max(best_wrong, reward.score(True, budget, length, False, b_max, progress, prefilled))
                    for length in (0, 1, budget // 3, budget * 3, 5 * budget + 7, 5000):
                        worst_correct = min(worst_correct, reward.score(True, budget, length, True, b_max, progress, prefilled))
    assert worst_correct >= best_wrong, (worst_correct, best_wrong)
    assert {"selfbudgeter", "selfbudgeter_fixed", "selfbudgeter_forecast", "selfbudgeter_honest"} <= set(BUDGET_FORMS)


def test_the_floor_continues_the_linear_fall_and_charges_what_was_spent():
    reward = BudgetGuidedReward(peak="fixed", delta=0.0, shape="linear", alpha_start=0.5, alpha_schedule="constant",
                                budget_penalty=-0.3, budget_cost=0.3, correct_floor=0.1, cost_on="spent",
                                format_penalty=-1.5)  # fmt: skip
    assert reward.score(True, 100, 150, True) == pytest.approx(0.5)  # the width: correct_min
    assert reward.score(True, 100, 160, True) == pytest.approx(0.4)  # on at the same slope (0.5 per 50 tokens)
    assert reward.score(True, 100, 190, True) == reward.score(True, 100, 900, True) == pytest.approx(0.1)  # the floor
    assert reward.score(True, 100, 900, False) == pytest.approx(-1.0)  # wrong answers keep their range
    # the cost on max(b, l): an answer longer than it said pays for what it wrote (r_b: on the stated budget)
    assert reward.score(True, 20, 60, True, b_max=120) == pytest.approx(0.1 - 0.3 * 60 / 120)
    assert reward.score(True, 20, 150, True, b_max=120) == pytest.approx(0.1 - 0.3)
    assert reward.score(True, 130, 10, True, b_max=120) == pytest.approx(0.1 - 0.3 - 0.3)
    assert reward.score(True, 100, 90, True, b_max=120) == pytest.approx(0.9 - 0.3 * 100 / 120)  # b > l: on b
    assert reward.score(True, 20, 150, True, b_max=120, prefilled=True) == pytest.approx(0.1)  # the user's budget


@pytest.mark.parametrize("overrides, message", [
    ({"correct_floor": 0.25}, r"`correct_floor` must be < min\(`correct_min`, `correct_max` \+ `budget_penalty`\) - "
                              r"`budget_cost`, so that a correct answer with an absurd budget scores below every "
                              r"honest one within the tolerance; got correct_floor=0.25 >= 0.2"),
    ({"correct_max": 0.7, "correct_min": 0.6, "correct_floor": 0.2}, r"got correct_floor=0.2 >= 0.1"),  # 0.7 - 0.3 - 0.3
    ({"budget_cost": 0.45, "correct_floor": 0.0}, r"`correct_floor` \+ `budget_penalty` - `budget_cost` must be >= `wrong_max`"),
    ({"format_penalty": -1.0}, r"`format_penalty` must be < `wrong_min` \+ `budget_penalty`, so that stopping before "
                               r"the answer scores below every finished answer; got format_penalty=-1.0 >= -1.3"),
    ({"correct_max": 0.5}, r"`correct_floor` needs `correct_max` > `correct_min`"),
    ({"correct_floor": 0.6}, r"correct_floor=0.6: must be <= correct_min=0.5"),
    ({"cost_on": "length"}, r"cost_on='length': must be one of 'budget', 'spent'"),
])  # fmt: skip
def test_constants_that_leave_an_exit_are_refused(overrides, message):
    honest = {key: value for key, value in vars(budget_form("selfbudgeter_honest")).items()
              if key not in ("output_format", "grader", "__name__")}
    with pytest.raises(ValueError, match=message):
        BudgetGuidedReward(**{**honest, **overrides})
    # without a floor the same constants describe a gameable form, which stays loadable
    if "correct_floor" in overrides or "format_penalty" in overrides:
        BudgetGuidedReward(**{**honest, **overrides, "correct_floor": None})


def test_plateau_scores_every_length_in_its_band_the_same_and_falls_from_its_edges():
    """Within the band the group's ranking comes from the cost alone; beyond it the fall keeps its slope."""
    flat = BudgetGuidedReward(peak="fixed", delta=0.05, shape="linear", alpha_start=0.2, alpha_schedule="constant",
                              band=0.04, budget_cost=0.3, correct_floor=0.1, cost_on="spent", budget_penalty=-0.3,
                              format_penalty=-1.5)  # fmt: skip
    sharp = BudgetGuidedReward(**{**{k: v for k, v in vars(flat).items() if k not in ("output_format", "grader", "__name__")},
                                  "band": 0.0})  # fmt: skip
    band = [flat.score(True, 100, length, True) for length in (91, 93, 95, 97, 99)]
    assert band == [1.0] * 5 and sharp.score(True, 100, 91, True) < 1.0
    # outside the band: the sharp form's fall, shifted out by the band's half-width
    for offset in (1, 5, 12, 20, 40):
        assert flat.score(True, 100, 99 + offset, True) == pytest.approx(sharp.score(True, 100, 95 + offset, True))
        assert flat.score(True, 100, 91 - offset, True) == pytest.approx(sharp.score(True, 100, 95 - offset, True))
    # two budgets whose answers both land in their bands: only the cost tells them apart
    assert flat.score(True, 60, 59, True, b_max=120) - flat.score(True, 66, 63, True, b_max=120) == pytest.approx(0.3 * 6 / 120)
    assert sharp.score(True, 60, 59, True, b_max=120) < sharp.score(True, 66, 63, True, b_max=120)  # landing 2 tokens off wins
    with pytest.raises(ValueError, match="band=-0.1: must be a finite number >= 0"):
        BudgetGuidedReward(band=-0.1)
