"""The CPU reproduction pipeline is wired end to end (a few steps per stage; the figures belong in its report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from selfbudget_pl.reproduce import check_targets, combine_figures, over_seeds, reproduce

from .test_train import CONFIG_DIR

SHRINK = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "data.train.0.size=64", "data.val.0.size=8", "data.test.0.size=400",
    "module.val_sampling.max_new_tokens=8", "num_threads=1",
]  # fmt: skip


def _config(tmp_path, **overrides):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("reproduce", overrides=[
            "evaluation.size=6", "evaluation.batch_size=6", "evaluation.max_new_tokens=8",
            "sweep.size=3", "sweep.budgets=[30,50]", *[f"{key}={value}" for key, value in overrides.items()],
        ])  # fmt: skip
    grpo = ["module.num_generations=2", "module.sampling.max_new_tokens=8", *SHRINK]
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.sft = ["experiment=sft_toy", *SHRINK]
        cfg.grpo = ["experiment=grpo_toy", *grpo]
        cfg.comparisons = {"control": ["experiment=grpo_toy", "reward=correctness", *grpo]}
    return cfg


def test_pipeline_writes_report_with_every_stage(tmp_path, tiny_cache, capsys):
    figures = reproduce(_config(tmp_path, grpo_seeds="[0,1]"))
    banners = [line for line in capsys.readouterr().out.splitlines() if line.startswith("==== [stage")]
    # sft, its eval, (GRPO, eval, sweep) per seed, the control and its eval
    assert [line.split("]")[0] for line in banners] == [f"==== [stage {i}/10" for i in range(1, 11)]
    # The reference stage times, unscaled: 325 + 2 + 2 x (339 + 1 + 1) + 544 + 3 s; each seed takes the GRPO run's.
    assert banners[0].endswith("| elapsed 0:00 | ETA 25:56")
    assert all("| ETA " in line and "?" not in line for line in banners)

    for stage in ("sft", "grpo_seed0", "grpo_seed1", "control"):
        assert (tmp_path / stage / "export" / "config.json").exists(), stage
        assert (tmp_path / f"eval_{stage}" / "completions.jsonl").exists(), stage
    # GRPO started from the SFT export, not from a fresh tiny model.
    grpo_config = json.loads((tmp_path / "grpo_seed0" / "export" / "config.json").read_text())
    assert grpo_config["model_type"] == "qwen2"
    report = (tmp_path / "report.md").read_text()
    assert set(figures["checks"]) == {"0", "1"}
    targets = [c["target"] for c in figures["checks"]["0"]]
    assert targets[0] == "SFT accuracy" and len(targets) == 7
    assert "GRPO own budget within ±10% of length" in targets and "GRPO Spearman(budget, difficulty)" in targets
    assert "| SFT accuracy |" in report and "mean ± sd" in report
    summary = figures["over_seeds"][2]  # the length ratio: lower is better, so the worst seed is the longest
    values = {seed: figures["checks"][seed][2]["measured"] for seed in ("0", "1")}
    assert summary["worst"] == max(values.values()) and values[summary["worst_seed"]] == summary["worst"]
    assert summary["met_on_every_seed"] == all(figures["checks"][seed][2]["met"] for seed in ("0", "1"))
    assert "Pre-filled budgets" in report and "requested N" in report
    assert {row["budget"] for row in figures["results"]["sweep"]["1"]} == {30, 50}
    assert json.loads((tmp_path / "figures.json").read_text())["timings_s"].keys() >= {"sft", "grpo_seed0", "sweep_grpo_seed1"}

    # Stage 2 again from that SFT export: stage 1 is skipped, the SFT figures are the same.
    again = reproduce(_config(tmp_path / "again", sft_model=tmp_path / "sft" / "export", comparisons="{}"))
    assert "sft" not in again["timings_s"] and not (tmp_path / "again" / "sft").exists()
    assert again["results"]["sft"]["mean_tokens"] == figures["results"]["sft"]["mean_tokens"]
    assert again["results"]["grpo"]["0"] == figures["results"]["grpo"]["0"]


def test_missing_sft_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sft_model=.*nowhere"):
        reproduce(_config(tmp_path, sft_model=tmp_path / "nowhere"))


def _figures(seed: str, length: float, within: float) -> dict:
    results = {
        "sft": {"accuracy": 1.0, "spearman_budget_difficulty": 0.97, "mean_tokens": 80.0},
        "grpo": {seed: {"accuracy": 1.0, "mean_tokens": length, "within_10": within, "spearman_budget_difficulty": 0.9}},
        "sweep": {seed: [{"within_10": 0.9}, {"within_10": 0.85}]},
    }
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        targets = compose("reproduce").targets
    checks = {seed: check_targets(results, seed, targets)}
    return {"checks": checks, "over_seeds": over_seeds(checks)}


def test_separate_runs_combine_into_one_table_over_seeds(tmp_path, capsys):
    import runpy

    for seed, length, within in (("0", 36.0, 0.9), ("1", 44.0, 0.7)):
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "figures.json").write_text(json.dumps(_figures(seed, length, within)))
    script = runpy.run_path(str(Path(CONFIG_DIR).parent / "scripts" / "combine_reproductions.py"), run_name="combine")
    assert script["main"]([str(tmp_path / "0"), str(tmp_path / "1"), "--markdown", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| seed 0 | seed 1 |" in table
    # length ratio 0.45 and 0.55: mean 0.5, the worst is seed 1's, missed there
    assert "| GRPO mean length / SFT mean length | <= 0.5 | 0.450 | 0.550 **✗** | 0.500 ± 0.071 | 0.550 (1) | **no** |" in table
    assert "| GRPO own budget within ±10% of length | >= 0.8 | 0.900 | 0.700 **✗** |" in table
    assert "| pre-filled budgets: worst fraction within ±10% | >= 0.8 | 0.850 | 0.850 | 0.850 ± 0.000 | 0.850 (0) | yes |" in table
    assert table in capsys.readouterr().out
    with pytest.raises(ValueError, match="seed 0 appears in two runs"):
        combine_figures([_figures("0", 36.0, 0.9)] * 2, ["a", "b"])


def test_runs_of_different_sft_models_combine_under_their_labels(tmp_path, capsys):
    import runpy

    for run, length in (("a", 36.0), ("b", 44.0)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "figures.json").write_text(json.dumps(_figures("0", length, 0.9)))
    script = runpy.run_path(str(Path(CONFIG_DIR).parent / "scripts" / "combine_reproductions.py"), run_name="combine")
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert script["main"]([*runs, "--labels", "sft0", "sft1"]) == 0
    table = capsys.readouterr().out
    assert "| seed sft0/0 | seed sft1/0 |" in table
    assert "| GRPO mean length / SFT mean length | <= 0.5 | 0.450 | 0.550 **✗** | 0.500 ± 0.071 | 0.550 (sft1/0) | **no** |" in table
    with pytest.raises(SystemExit, match="1 labels for 2 runs"):
        script["main"]([*runs, "--labels", "sft0"])


def test_a_label_run_that_solves_nothing_stops_before_stage_one(tmp_path, tiny_cache):
    cfg = _config(tmp_path)
    with open_dict(cfg):
        # The untrained tiny model (sft_toy's starting point) solves none of these.
        cfg.label = {"source": {"_target_": "selfbudget_pl.data.synthetic.SyntheticSource", "split": "train", "size": 4},
                     "samples": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8, "batch_size": 4, "seed": 0}  # fmt: skip
    with pytest.raises(ValueError, match=r"no problem of 4 in .*labels.jsonl was solved \(problems 4, solved 0, .*samples correct 0 of 8"):
        reproduce(cfg)
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 4  # written, and resumable
    assert not (tmp_path / "sft").exists()


def test_targets_against_the_base_model_need_its_evaluation(tmp_path):
    with pytest.raises(ValueError, match="targets.reference=base .* set `base`"):
        reproduce(_config(tmp_path, **{"targets.reference": "base"}))


def test_targets_against_the_base_model_at_twenty_percent():
    results = {
        "base": {"accuracy": 0.50, "mean_tokens": 100.0},
        "sft": {"accuracy": 0.46, "format_error_rate": 0.02, "mean_tokens": 70.0},
        "grpo": {"0": {"accuracy": 0.49, "mean_tokens": 45.0, "within_10": 0.1, "within_20": 0.75,
                       "spearman_budget_difficulty": 0.6}},
        "sweep": {"0": [{"within_10": 0.9, "within_20": 0.7}, {"within_10": 0.9, "within_20": 0.55}]},
    }  # fmt: skip
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        targets = compose("reproduce", overrides=["preset=smollm2_sums"]).targets
    checks = {row["target"]: (row["measured"], row["met"]) for row in check_targets(results, "0", targets)}
    assert checks == {
        "SFT accuracy change vs base (points)": (-4.0, False),
        "SFT well-formed answers": (0.98, True),
        "GRPO mean length / base mean length": (0.45, True),  # against the base model, not SFT's 70
        "GRPO accuracy change vs base (points)": (-1.0, True),
        "GRPO own budget within ±20% of length": (0.75, True),
        "GRPO Spearman(budget, difficulty)": (0.6, True),
        "pre-filled budgets: worst fraction within ±20%": (0.55, False),
    }
    with open_dict(targets):
        targets.tolerance = 0.15
    with pytest.raises(ValueError, match="targets.tolerance=0.15"):
        check_targets(results, "0", targets)


def test_a_comparison_named_like_a_stage_is_refused(tmp_path):
    cfg = _config(tmp_path)
    with open_dict(cfg):
        cfg.comparisons = {"grpo_seed0": ["experiment=grpo_toy"]}
    with pytest.raises(ValueError, match=r"comparisons: \['grpo_seed0'\] name a stage"):
        reproduce(cfg)


def test_side_by_side_shows_distinct_problems_both_right_first(tmp_path):
    from selfbudget_pl.reproduce import side_by_side

    answers = {"a": ("1+1", True, True), "b": ("1+1", True, True), "c": ("2+2", False, True), "d": ("3+3", True, True)}
    for model, index in (("base", 1), ("grpo", 2)):
        (tmp_path / model).mkdir()
        rows = [{"id": key, "answer": "x", "correct": answer[index], "text": f"{model} {answer[0]}", "response_tokens": 9}
                for key, answer in answers.items()]  # fmt: skip
        (tmp_path / model / "completions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = side_by_side(tmp_path / "base", tmp_path / "grpo", {k: v[0] for k, v in answers.items()}, 3)
    shown = [line for line in lines if line.startswith("**")]
    assert shown == ["**1+1** (gold x)", "**3+3** (gold x)", "**2+2** (gold x)"]
    assert "| 9 tokens, right: base 1+1 | 9 tokens, right: grpo 1+1 |" in lines
