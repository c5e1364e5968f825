"""selfbudget-lightning: LightningCLI over the same modules and DataModule, its configs generated from Hydra."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selfbudget_pl.lightning_cli import EXPERIMENTS, cli, compose_experiment, config_text, lightning_config

from .conftest import REPO_ROOT


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_lightning_configs_match_the_hydra_configs(name):
    committed = REPO_ROOT / "configs" / "lightning" / f"{name}.yaml"
    assert committed.read_text() == config_text(name), (
        f"{committed} drifted from `train.py experiment={name}`: run `python -m selfbudget_pl.lightning_cli export-configs`"
    )


def test_generated_config_follows_a_hydra_change():
    cfg = compose_experiment("grpo_toy", ["module.num_generations=6", "reward=correctness", "trainer.max_steps=7"])
    config = lightning_config(cfg, "out")
    assert config["model"]["init_args"]["num_generations"] == 6
    assert config["trainer"]["max_steps"] == 7
    assert config["trainer"]["callbacks"][0]["class_path"] == "selfbudget_pl.callbacks.reward.RewardCallback"
    assert set(config["trainer"]["callbacks"][0]["init_args"]["functions"]) == {"accuracy", "format"}
    with pytest.raises(ValueError, match="--trainer.strategy"):
        lightning_config(compose_experiment("grpo_toy", ["strategy=ddp"]), "out")


def _small_config(name: str, out: Path, *overrides: str) -> Path:
    """The experiment's LightningCLI config as the generator writes it, on a few small batches."""
    small = [
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "data.train.0.size=64", "data.val.0.size=4", "data.batch_size=4", "data.val_batch_size=4",
        "module.val_sampling.max_new_tokens=8", "grader.workers=0", f"module.export_dir={out / 'export'}", *overrides,
    ]  # fmt: skip
    out.mkdir(parents=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(lightning_config(compose_experiment(name, small), str(out))))
    return path


def test_sft_then_grpo_run_through_the_cli(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setattr("sys.argv", ["selfbudget-lightning"])  # the arguments below are the whole command line
    sft = cli(["fit", "--config", str(_small_config("sft_toy", tmp_path / "sft", "model.tiny.hidden_size=32")),
               "--num_threads=1", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert sft.trainer.global_step == 3
    assert type(sft.model).__name__ == "SFTModule" and "train/loss" in sft.trainer.callback_metrics
    export = tmp_path / "sft" / "export"
    assert (export / "config.json").exists()

    grpo_config = _small_config("grpo_toy", tmp_path / "grpo", f"model.name_or_path={export}",
                                "module.sampling.max_new_tokens=8", "trainer.max_steps=2", "trainer.val_check_interval=2")
    # The override syntax of the issue: dotted flags on top of the file.
    grpo = cli(["fit", "--config", str(grpo_config), "--model.num_generations=2", "--trainer.devices=1",
                "--data.batch_size=2", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert type(grpo.model).__name__ == "GRPOModule" and grpo.model.num_generations == 2
    assert grpo.trainer.global_step == 2
    assert grpo.model.model_loader.name_or_path == str(export)  # started from the SFT run's export
    assert (tmp_path / "grpo" / "export" / "config.json").exists()
    assert (tmp_path / "grpo" / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "grpo" / "tensorboard").glob("events.out.tfevents.*"))
    hparams = yaml.safe_load((tmp_path / "grpo" / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["model"]["init_args"]["num_generations"] == 2  # the run's config, overrides included
