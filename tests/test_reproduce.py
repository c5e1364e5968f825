"""The CPU reproduction pipeline is wired end to end (a few steps per stage; the figures belong in its report)."""

from __future__ import annotations

import json

import pytest

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from selfbudget_pl.reproduce import reproduce

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
        cfg.control = ["experiment=grpo_toy", "reward=correctness", *grpo]
    return cfg


def test_pipeline_writes_report_with_every_stage(tmp_path, tiny_cache):
    figures = reproduce(_config(tmp_path, grpo_seeds="[0,1]"))

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
    again = reproduce(_config(tmp_path / "again", sft_model=tmp_path / "sft" / "export", control="null"))
    assert "sft" not in again["timings_s"] and not (tmp_path / "again" / "sft").exists()
    assert again["results"]["sft"]["mean_tokens"] == figures["results"]["sft"]["mean_tokens"]
    assert again["results"]["grpo"]["0"] == figures["results"]["grpo"]["0"]


def test_missing_sft_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sft_model=.*nowhere"):
        reproduce(_config(tmp_path, sft_model=tmp_path / "nowhere"))
