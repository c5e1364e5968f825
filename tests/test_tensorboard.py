"""TensorBoard as a user opens it: read the event files of a short GRPO run and check every group."""

from __future__ import annotations

import yaml
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from selfbudget_pl.modules.validation_metrics import ValidationRecord
from selfbudget_pl.train import train

from .test_train import compose_small

# Where each scalar comes from: the first part of its name (TensorBoard's group).
GROUPS = {"train", "val", "rollout", "rewards", "grader", "completions", "clip_ratio"}


def _read(log_dir):
    runs = EventMultiplexer(size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    runs.AddRunsFromDirectory(str(log_dir))
    runs.Reload()
    (run,) = runs.Runs()
    return runs, run


def test_short_grpo_run_fills_every_tensorboard_group(tmp_path, tiny_cache):
    cfg = compose_small("grpo_toy", tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2",
                        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=2")  # fmt: skip
    _, objects = train(cfg)
    log_dir = tmp_path / "tensorboard"
    # One event file: per-file readers (tests/test_resume.py) find every scalar in it.
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    runs, run = _read(log_dir)
    tags = runs.Runs()[run]

    scalars = set(tags["scalars"])
    assert {tag.split("/")[0] for tag in scalars} == GROUPS, sorted(scalars)
    expected = {
        "train/loss", "train/entropy", "train/lr", "train/epoch", "train/tokens_per_s",
        "rewards/mean", "rewards/std", "rewards/frac_zero_std", "rewards/budget_guided/mean",
        "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
        "rollout/tokens_per_s", "rollout/prefilled_fraction", "rollout/budget/budget_rel_error",
        "rollout/budget/difficulty_3/accuracy", "val/accuracy", "val/budget/within_10",
        "rollout/budget/understated_rate", "rollout/budget/difficulty_3/understated_rate",  # the collapse detector
    }  # fmt: skip
    assert expected <= scalars, sorted(expected - scalars)
    assert [event.step for event in runs.Scalars(run, "rewards/mean")] == [1, 3]  # every 2nd step

    # Images at every validation (steps 2 and 4); histograms of the training rollouts and of validation.
    assert [event.step for event in runs.Images(run, "val/by_difficulty")] == [2, 4]
    assert {"rollout/completion_length", "rollout/budget_error", "val/completion_length"} <= set(tags["histograms"])
    assert [event.step for event in runs.Histograms(run, "rollout/completion_length")] == [1, 3]  # as the scalars

    # The resolved config: hparams.yaml and the HParams tab, with the final metrics as its columns.
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["module"]["num_generations"] == 2 and hparams["paths"]["output_dir"] == str(tmp_path)
    content = runs.PluginRunToTagToContent("hparams")[run]
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["module/num_generations"].number_value == 2
    assert session.session_start_info.hparams["reward/functions/budget_guided/delta"].number_value == 0.05
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"val/accuracy", "rewards/mean", "train/loss", "completions/mean_length"} <= metric_tags
    assert metric_tags <= scalars  # every column reads a logged scalar

    # The budget scatter is drawn whenever a validation saw stated budgets (the random model states none).
    module = objects["module"]
    record = ValidationRecord()
    record.points = [(40.0, 38.0, True), (60.0, 70.0, False)]
    record.budget_errors = [-0.05, 1 / 6]
    record.log_figures(module.logger.experiment, module.global_step)
    module.logger.experiment.flush()
    runs, run = _read(log_dir)
    assert [event.step for event in runs.Images(run, "val/budget_vs_length")] == [4]
    assert "val/budget_error" in runs.Runs()[run]["histograms"]
