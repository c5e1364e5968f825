"""Evaluation of the tiny model: every completion written, the summary table, plots, budget sweeps, baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.data.sources import SyntheticSource
from selfbudget_pl.evaluate import (
    check_budgets,
    check_samples_per_problem,
    evaluate,
    evaluate_model,
    evaluation_limits,
    load_datasets,
)
from selfbudget_pl.eval_report import summary_markdown
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import SamplingSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAIN_HEADER = (
    "| dataset | budget | n | k | accuracy % | ± s.e. | mean tokens | compression % | Δ accuracy (pts) | budget MAE "
    "| within ±10 % | within ±20 % | ρ(budget, difficulty) | budget < 0.5 × length % |"
)


@pytest.fixture(scope="module")
def model(model_loader):
    return model_loader.load_model()


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=0) as grader:
        yield grader


@pytest.fixture(scope="module")
def records():
    return SyntheticSource(size=6, split="test").load()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hydra_eval_of_20_problems_writes_every_output(tiny_model_dir, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                f"model_path={tiny_model_dir}",
                f"paths.output_dir={tmp_path}",
                "limit=20",
                "batch_size=8",
                "sampling.max_new_tokens=6",
                "grader.workers=0",
                "progress=false",
            ],
        )
    summary = evaluate(cfg)

    completions = _rows(tmp_path / "completions.jsonl")
    expected = instantiate(cfg.datasets.synthetic).load()[:20]
    assert [row["id"] for row in completions] == [record["id"] for record in expected]
    for row in completions:
        assert row["dataset"] == "synthetic" and row["requested_budget"] is None
        assert isinstance(row["correct"], bool) and row["difficulty"] in {2.0, 3.0, 4.0, 5.0, 6.0}
        assert isinstance(row["text"], str) and 0 < row["response_tokens"] <= 6
    (row,) = summary["rows"]
    assert row["n"] == 20 and row["budget"] is None
    assert row["mean_tokens"] == pytest.approx(sum(r["response_tokens"] for r in completions) / 20)
    assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in completions) / 20)
    for key in ("budget_mae", "within_10", "within_20", "spearman_budget_difficulty", "format_error_rate",
                "understated_rate"):
        assert key in row

    markdown = (tmp_path / "summary.md").read_text()
    assert MAIN_HEADER in markdown
    assert "| synthetic | model | 20 |" in markdown
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
    for figure in ("budget_vs_length_synthetic.png", "by_difficulty_synthetic.png"):
        assert (tmp_path / figure).read_bytes().startswith(b"\x89PNG")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_vllm_engine_for_evaluation_is_sized_by_its_prompts_batch_and_samples(tiny_model_dir, tokenizer):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"model_path={tiny_model_dir}", "limit=20", "batch_size=8", "sampling.max_new_tokens=6",
            "samples_per_problem={synthetic: 3}", "budget=[5,3000]"])  # fmt: skip
    datasets = load_datasets(cfg.datasets, list(cfg.eval_datasets), cfg.get("limit"), cfg.get("data_root"))
    sampling = SamplingSettings(max_new_tokens=6)
    limits = evaluation_limits(cfg, datasets, tokenizer, sampling)
    assert (limits.max_new_tokens, limits.max_num_seqs) == (6, 8 * 3)
    prompts = encode_prompts([r["problem"] for r in datasets["synthetic"]], tokenizer, cfg.prompt_template,
                             cfg.get("system_prompt"), cfg.get("chat_template"))
    longest = max(len(ids) for ids in prompts)
    prefix = tokenizer.encode(instantiate(cfg.output_format).budget_prefix(3000), add_special_tokens=False)
    assert limits.max_prompt_tokens == longest + len(prefix)  # the longest budget's prefix counts
    assert limits.prompt_key.startswith("the longest prompt with its pre-filled budget (synthetic ")


def test_prefilled_budgets_appear_verbatim_and_are_reported_per_budget(model, tokenizer, grader, records, tmp_path):
    summary = evaluate_model(
        model, {"sums": records}, tokenizer, out_dir=tmp_path, grader=grader, budgets=[5, 40],
        sampling=SamplingSettings(temperature=0.0, max_new_tokens=8), batch_size=4, progress=False, tensorboard=False,
    )
    completions = _rows(tmp_path / "completions.jsonl")
    assert len(completions) == 2 * len(records)
    for row in completions:
        n = row["requested_budget"]
        assert row["text"].startswith(f"<budget>{n}</budget><solution>")
        assert row["budget"] == n and row["budget_ratio"] == pytest.approx(row["length"] / n)
    rows = {row["budget"]: row for row in summary["rows"]}
    assert sorted(rows) == [5, 40]
    for n, row in rows.items():
        ratios = [c["length"] / n for c in completions if c["requested_budget"] == n]
        assert row["mean_budget_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    # At most 8 new tokens against a budget of 40: nothing can land within ±10 %.
    assert rows[40]["within_10"] == 0.0
    assert "## Pre-filled budgets (controllability)" in summary["markdown"]
    assert "| sums | 40 | 6 |" in summary["markdown"]


def test_baseline_gives_compression_and_accuracy_change(model, tokenizer, grader, records, tmp_path):
    def run(out: Path, max_new_tokens: int, baseline=None) -> dict:
        return evaluate_model(
            model, records, tokenizer, out_dir=out, grader=grader, baseline=baseline, progress=False, tensorboard=False,
            sampling=SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens),
        )

    base = run(tmp_path / "base", 8)
    short = run(tmp_path / "short", 4, baseline=tmp_path / "base")  # a run directory, as on the command line
    (row,) = short["rows"]
    (base_row,) = base["rows"]
    assert row["mean_tokens"] < base_row["mean_tokens"]
    assert row["compression"] == pytest.approx(1 - row["mean_tokens"] / base_row["mean_tokens"])
    assert row["accuracy_change"] == pytest.approx(100 * (row["accuracy"] - base_row["accuracy"]))
    assert "compression" not in base_row


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset\(s\) \['gsm9k'\]; known: \['gsm8k', 'synthetic'\]"):
        load_datasets({"gsm8k": {}, "synthetic": {}}, ["gsm9k"])
    for bad in (0, -3, [100, 0], "100", True):
        with pytest.raises(ValueError, match="budget must be null, a positive int"):
            check_budgets(bad)
    with pytest.raises(ValueError, match="repeats a condition"):
        check_budgets([100, 100])
    assert check_budgets(None) == [None] and check_budgets([None, 200]) == [None, 200]
    with pytest.raises(FileNotFoundError, match="baseline="):
        evaluate_model(object(), [], tokenizer=object(), grader=object(), baseline=tmp_path / "missing")


def test_selfbudget_eval_command_runs_hydra_main(tiny_model_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "selfbudget_pl.cli", "eval", f"model_path={tiny_model_dir}", "limit=3",
            "sampling.max_new_tokens=4", "budget=[7]", "grader.workers=0", "progress=false", "tensorboard=false",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "| synthetic | 7 | 3 |" in result.stdout
    assert len(_rows(tmp_path / "completions.jsonl")) == 3


def _compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_paper_preset_composes_the_papers_protocol():
    cfg = _compose_eval(["eval_preset=paper"])
    assert list(cfg.eval_datasets) == ["gsm8k", "math500", "aime24", "aime25", "amc23"]
    assert cfg.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens) == (0.6, 0.95, 32768)
    assert dict(cfg.samples_per_problem) == {"gsm8k": 1, "math500": 1, "aime24": 16, "aime25": 16, "amc23": 16}
    assert cfg.rollout._target_.endswith("HFRolloutBackend")  # the rollout group still chooses the backend
    vllm = _compose_eval(["eval_preset=paper", "rollout=vllm"])
    assert vllm.rollout._target_.endswith("VLLMRolloutBackend") and vllm.sampling.max_new_tokens == 32768
    greedy = _compose_eval(["eval_preset=paper_greedy"])
    assert greedy.sampling.temperature == 0.0 and greedy.samples_per_problem == 1
    assert list(greedy.eval_datasets) == list(cfg.eval_datasets)


def test_paper_preset_end_to_end_on_the_tiny_model(tiny_model_dir, shared_data, tmp_path):
    """Every dataset of the preset loads and runs (AIME 2025 and AMC's float answers included); the small
    sets get k = 16 samples per problem, avg@k and its standard error; a baseline run adds compression
    and the paper-shaped table."""
    common = [
        "eval_preset=paper", "model=tiny", f"model_path={tiny_model_dir}", f"data_root={shared_data}", "limit=2",
        "sampling.max_new_tokens=6", "grader.workers=0", "progress=false", "tensorboard=false", "batch_size=2",
    ]
    base = evaluate(_compose_eval([*common, f"paths.output_dir={tmp_path / 'base'}", "sampling.max_new_tokens=8"]))
    summary = evaluate(_compose_eval([*common, f"paths.output_dir={tmp_path / 'run'}", f"baseline={tmp_path / 'base'}"]))

    rows = {row["dataset"]: row for row in summary["rows"]}
    assert list(rows) == ["gsm8k", "math500", "aime24", "aime25", "amc23"]
    completions = _rows(tmp_path / "run" / "completions.jsonl")
    answers = {row["answer"] for row in completions if row["dataset"] == "amc23"}
    assert all(not answer.endswith(".0") for answer in answers)  # AMC's 27.0 is read as 27
    for name, row in rows.items():
        k = 16 if name in ("aime24", "aime25", "amc23") else 1
        mine = [c for c in completions if c["dataset"] == name]
        assert (row["n"], row["k"], len(mine)) == (2, k, 2 * k)
        assert sorted({c["sample"] for c in mine}) == list(range(k))
        assert row["accuracy"] == pytest.approx(sum(c["correct"] for c in mine) / len(mine))
        assert 0 < row["mean_tokens"] <= 6
        assert row["compression"] == pytest.approx(1 - row["mean_tokens"] / base["rows"][list(rows).index(name)]["mean_tokens"])
        if k == 1:
            assert row["accuracy_se"] is None
        else:
            runs = [sum(c["correct"] for c in mine if c["sample"] == j) / 2 for j in range(k)]
            mean = sum(runs) / k
            expected = (sum((a - mean) ** 2 for a in runs) / (k - 1) / k) ** 0.5
            assert row["accuracy_se"] == pytest.approx(expected)
    table = summary["markdown"].split("## As the paper prints it")[1]
    assert "| model | gsm8k acc % | gsm8k tokens | gsm8k compr. % | math500 acc % |" in table
    assert "| baseline |" in table and "| this run |" in table
    settings = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]
    assert settings["samples_per_problem"]["aime25"] == 16 and settings["sampling"]["top_p"] == 0.95


def test_samples_per_problem_is_checked():
    sampled, greedy = SamplingSettings(temperature=0.6), SamplingSettings(temperature=0.0)
    assert check_samples_per_problem(4, ["a", "b"], sampled) == {"a": 4, "b": 4}
    assert check_samples_per_problem({"b": 8, "other": 2}, ["a", "b"], sampled) == {"a": 1, "b": 8}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"samples_per_problem\[a\]=.* must be a positive int"):
            check_samples_per_problem(bad, ["a"], sampled)
    with pytest.raises(ValueError, match="greedy decoding"):
        check_samples_per_problem({"a": 16}, ["a"], greedy)


def test_report_prints_the_collapse_detector():
    rows = [
        {"dataset": "synthetic", "budget": None, "n": 500, "k": 1, "accuracy": 0.97, "understated_rate": 0.19},
        {"dataset": "synthetic", "budget": 40, "n": 500, "k": 1, "accuracy": 0.96, "understated_rate": float("nan")},
    ]
    table = summary_markdown(rows).split("## As the paper prints it")[0]
    header, _, own, prefilled = table.strip().splitlines()[2:6]
    assert header.endswith("| budget < 0.5 × length % |")
    assert own.endswith("| 19.0 |")  # own budgets: the share that sits below half the length written
    assert prefilled.endswith("| – |")  # pre-filled budgets are the user's, never counted


def test_the_base_model_is_read_with_the_free_form_output_format(tiny_model_dir, tmp_path):
    from selfbudget_pl.data.answers import FreeFormOutput

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"model_path={tiny_model_dir}", f"paths.output_dir={tmp_path}", "limit=4", "batch_size=4",
            "sampling.max_new_tokens=6", "grader.workers=0", "progress=false", "output_format=free_form",
        ])  # fmt: skip
    assert isinstance(instantiate(cfg.output_format), FreeFormOutput)
    summary = evaluate(cfg)
    # The untrained tiny model writes no budget tag: read free-form, no completion fails on its format.
    rows = _rows(tmp_path / "completions.jsonl")
    assert all(row["budget"] is None and row["format_error"] in ("none", "no_answer") for row in rows)
    assert summary["rows"][0]["n"] == 4
