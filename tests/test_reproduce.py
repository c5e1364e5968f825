"""The CPU reproduction pipeline is wired end to end (a few steps per stage; the figures belong in its report)."""

from __future__ import annotations

import json

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from selfbudget_pl.reproduce import reproduce

from .test_train import CONFIG_DIR

SHRINK = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "data.train.0.size=64", "data.val.0.size=8", "data.test.0.size=400",
    "module.val_sampling.max_new_tokens=8", "num_threads=1",
]  # fmt: skip


def test_pipeline_writes_report_with_every_stage(tmp_path, tiny_cache, capsys):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("reproduce", overrides=[
            "evaluation.size=6", "evaluation.batch_size=6", "evaluation.max_new_tokens=8",
            "sweep.size=3", "sweep.budgets=[30,50]",
        ])  # fmt: skip
    grpo = ["module.num_generations=2", "module.sampling.max_new_tokens=8", *SHRINK]
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.sft = ["experiment=sft_toy", *SHRINK]
        cfg.grpo = ["experiment=grpo_toy", *grpo]
        cfg.control = ["experiment=grpo_toy", "reward=correctness", *grpo]
    figures = reproduce(cfg)
    banners = [line for line in capsys.readouterr().out.splitlines() if line.startswith("==== [stage")]
    assert [line.split("]")[0] for line in banners] == [f"==== [stage {i}/7" for i in range(1, 8)]
    assert banners[0].endswith("| elapsed 0:00 | ETA 9:18")  # the reference stage times, unscaled
    assert all("| ETA " in line and "?" not in line for line in banners)

    for stage in ("sft", "grpo", "control"):
        assert (tmp_path / stage / "export" / "config.json").exists(), stage
        assert (tmp_path / f"eval_{stage}" / "completions.jsonl").exists(), stage
    # GRPO started from the SFT export, not from a fresh tiny model.
    grpo_config = json.loads((tmp_path / "grpo" / "export" / "config.json").read_text())
    assert grpo_config["model_type"] == "qwen2"
    report = (tmp_path / "report.md").read_text()
    assert [c["target"] for c in figures["checks"]][0] == "SFT accuracy"
    assert len(figures["checks"]) == 5 and "| SFT accuracy |" in report
    assert "Pre-filled budgets" in report and "requested N" in report
    assert {row["budget"] for row in figures["results"]["sweep"]} == {30, 50}
    assert json.loads((tmp_path / "figures.json").read_text())["timings_s"].keys() >= {"sft", "grpo", "sweep"}
