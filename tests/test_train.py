"""Every experiment composes and runs a batch on CPU; overrides behave as users expect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from selfbudget_pl.config.overrides import open_trainer_overrides
from selfbudget_pl.data.budget_labels import label_records, write_jsonl
from selfbudget_pl.data.synthetic import SyntheticSource
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.train import train

from .conftest import REPO_ROOT, SHARED_DATA

CONFIG_DIR = str(REPO_ROOT / "configs")
EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml"))


def compose_small(experiment: str, output_dir: Path, *overrides: str, model: str = "tiny"):
    """Compose an experiment on the tiny model (or ``model``), shrunk to seconds of CPU work."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        # CPU stand-ins for the GPU parts: the tiny model, the CPU trainer, HF rollouts instead of vLLM.
        base = [f"experiment={experiment}", f"model={model}", "trainer=cpu", "rollout=hf"]
        cfg = compose("train", overrides=open_trainer_overrides([*base, *overrides]), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.enable_progress_bar = False
        cfg.num_threads = 1
        cfg.data.num_workers = 0
        cfg.data.batch_size = 4
        cfg.data.val_batch_size = 4
        if "data_root" in cfg.data:
            cfg.data.data_root = str(SHARED_DATA)
        # The tiny model has 1024 positions: the real models' limits would not fit it.
        if cfg.data.get("max_length"):
            cfg.data.max_length = min(cfg.data.max_length, 1024)
        if cfg.data.get("max_prompt_length"):
            cfg.data.max_prompt_length = min(cfg.data.max_prompt_length, 1000)
        for split in ("train", "val", "test"):
            for source in cfg.data.get(split) or []:
                key = "size" if "size" in source else "limit"
                source[key] = 24
        cfg.module.export_dir = str(output_dir / "export")  # never the shared logs/<experiment>/export
        cfg.module.val_sampling.max_new_tokens = 12
        if "sampling" in cfg.module:
            cfg.module.sampling.max_new_tokens = 12
            cfg.module.num_generations = 2
        if cfg.model.name_or_path and not Path(str(cfg.model.name_or_path)).exists():
            cfg.model.name_or_path = None  # an experiment that starts from an earlier run's export
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_batch(experiment, tmp_path, tiny_cache):
    cfg = compose_small(experiment, tmp_path)
    if "data_root" in cfg.data and not SHARED_DATA.is_dir():
        pytest.skip(f"{experiment} reads ../shared/data, absent at {SHARED_DATA}")
    with open_dict(cfg):
        cfg.trainer.fast_dev_run = True
        if cfg.data.get("b_max_labels"):
            cfg.data.b_max_labels = str(reference_labels(cfg.data, tmp_path))
        for source in cfg.data.train:  # a label run's output the experiment trains on (a preset's label stage)
            if source.get("schema") == "labelled" and not Path(source.path).exists():
                source.path = str(synthetic_labels(tmp_path))
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert any(key.startswith("train/") for key in metrics), metrics


def reference_labels(data, output_dir: Path) -> Path:
    """A label file for ``data``'s train sources as `scripts/label_budgets.py` writes it from reference solutions
    (the tiny model's tokenizer): the stand-in, needing no model, for the paper's sampled labels."""
    records = [record for source in data.train for record in instantiate(source).load(root=data.data_root)]
    path = output_dir / "b_max_labels.jsonl"
    write_jsonl(label_records(records, ModelLoader().load_tokenizer()), path)
    return path


def synthetic_labels(output_dir: Path) -> Path:
    """Labelled synthetic sums (the references as the base model's answers, the tiny model's tokenizer): the
    stand-in for the label stage's file."""
    path = output_dir / "labels.jsonl"
    records = SyntheticSource(split="train", size=24, k_max=3, checks_max=0).load()
    write_jsonl(label_records(records, ModelLoader().load_tokenizer()), path)
    return path


def test_sft_run_writes_events_checkpoint_and_export(tmp_path, tiny_cache):
    cfg = compose_small("sft_toy", tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4",
                        "trainer.log_every_n_steps=1")
    metrics, _ = train(cfg)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "export" / "config.json").exists()
    for key in ("val/loss", "val/budget/accuracy", "val/budget/format_error_rate"):
        assert key in metrics, sorted(metrics)


def run_train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cfg_job_prints_the_composed_config():
    result = run_train_cli("--cfg", "job", "experiment=sft_toy", "trainer.max_steps=3", "model.lora.enabled=true")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.name == "sft_toy" and cfg.trainer.max_steps == 3 and cfg.model.lora.enabled is True


@pytest.mark.parametrize(
    "override, message",
    [("trainer.max_stepz=3", "max_stepz"), ("experiment=no_such_thing", "no_such_thing"), ("model=gpt9", "gpt9")],
)
def test_bad_override_gives_a_readable_error(override, message):
    result = run_train_cli(override, "--cfg", "job")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_fast_runs_one_batch(tmp_path, tiny_cache):
    cfg = compose_small("sft_toy", tmp_path, "debug=fast")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert not list(tmp_path.rglob("*.ckpt"))  # no checkpoint
