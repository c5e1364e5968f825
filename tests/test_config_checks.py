"""Config checks: every bad value is an error naming its full key, the value and what is allowed, before
any model or data is loaded; surprising values are a warning, once; schemas match the constructors."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from selfbudget_pl import cli
from selfbudget_pl.config.checks import (
    ConfigError,
    check_eval_config,
    check_eval_prompts,
    check_generation,
    check_train_config,
)
from selfbudget_pl.config.groups import ALL_SCHEMAS
from selfbudget_pl.config.overrides import open_trainer_overrides, trainer_arguments
from selfbudget_pl.schema import Findings, HYDRA_KEYS

from .conftest import REPO_ROOT

CONFIG_DIR = str(REPO_ROOT / "configs")


def compose_cfg(*overrides: str, config: str = "train"):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    return cfg


def error_of(cfg) -> str:
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    return str(error.value)


@pytest.fixture(autouse=True)
def _never_load_a_model(monkeypatch):
    """The checks run before any model is loaded: loading one here is a failure."""
    from selfbudget_pl.models import ModelLoader

    def refuse(self):
        raise AssertionError("a model was loaded during the start-up checks")

    monkeypatch.setattr(ModelLoader, "load_model", refuse)


# -- the cases and more: (overrides, the key the message must name, what it must say) ------------

BAD_VALUES = [
    ("experiment=grpo_toy", "module.micro_batch_size=-3", "module.micro_batch_size=-3: must be an integer >= 1, or null"),
    ("experiment=grpo_toy", "module.micro_batch_size=0", "module.micro_batch_size=0: must be an integer >= 1"),
    ("experiment=grpo_toy", "module.mini_batch_size=0", "module.mini_batch_size=0: must be an integer >= 1"),
    ("experiment=grpo_toy", "module.micro_batch_size=four", "module.micro_batch_size='four': is a string"),
    ("experiment=grpo_toy", "module.sampling.temperature=-1", "module.sampling.temperature=-1: must be a finite number >= 0"),
    ("experiment=grpo_toy", "module.sampling.max_new_tokens=0", "module.sampling.max_new_tokens=0: must be an integer >= 1"),
    ("experiment=grpo_toy", "module.sampling.top_p=0", "module.sampling.top_p=0: must be a finite number > 0 and <= 1"),
    ("experiment=grpo_toy", "module.sampling.top_p=1.5", "module.sampling.top_p=1.5: must be a finite number > 0"),
    ("experiment=grpo_toy", "module.sampling.top_k=-1", "module.sampling.top_k=-1: must be an integer >= 0"),
    ("experiment=grpo_toy", "module.epsilon_low=-0.1", "module.epsilon_low=-0.1: must be a finite number >= 0 and < 1"),
    ("experiment=grpo_toy", "module.epsilon_high=-0.2", "module.epsilon_high=-0.2: must be a finite number >= 0"),
    ("experiment=grpo_toy", "module.beta=-0.5", "module.beta=-0.5: must be a finite number >= 0"),
    ("experiment=grpo_toy", "module.beta=nan", "module.beta=nan: is not a finite number"),
    ("experiment=grpo_toy", "module.num_generations=1", "module.num_generations=1: must be an integer >= 2"),
    ("experiment=grpo_toy", "module.loss_aggregation=mean", "module.loss_aggregation='mean': must be one of 'token'"),
    ("experiment=grpo_toy", "module.prefill_budget_range=[1.0,0.5]", "module.prefill_budget_range=[1.0, 0.5]: must satisfy 0 < low <= high"),
    ("experiment=grpo_toy", "module.prefill_draw=group", "module.prefill_draw='group': must be one of 'prompt', 'completion'"),
    ("experiment=grpo_toy", "module.optimizer.lr=0", "module.optimizer.lr=0: must be a finite number > 0"),
    ("experiment=sft_toy", "module.optimizer.lr=-1e-5", "module.optimizer.lr=-1e-05: must be a finite number > 0"),
    ("experiment=sft_toy", "module.optimizer.betas=[0.9,1.5]", "module.optimizer.betas[1]=1.5: must be a finite number >= 0 and < 1"),
    ("experiment=sft_toy", "module.min_lr_ratio=2", "module.min_lr_ratio=2: must be a finite number >= 0 and <= 1"),
    ("experiment=sft_toy", "module.val_sampling.max_new_tokens=0", "module.val_sampling.max_new_tokens=0: must be an integer >= 1"),
    ("experiment=grpo_toy", "reward.weights.budget_guided=nan", "reward.weights.budget_guided=nan: is not a finite number"),
    ("experiment=grpo_toy", "+reward.weights.typo=1", "reward.weights.typo=1: names no reward function"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.correct_max=inf", "reward.functions.budget_guided.correct_max=inf: is not a finite number"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.budget_penalty=-2", "reward.functions.budget_guided.budget_penalty=-2: `correct_floor` + `budget_penalty` - `budget_cost` must be >= `wrong_max`, so that a correct answer far from and over its budget cap still beats every wrong answer; got correct_floor=0.1 + budget_penalty=-2 - budget_cost=0.3 < wrong_max=-0.5"),
    ("experiment=grpo_toy", "reward=selfbudgeter_forecast", "reward.functions.budget_guided.budget_penalty=-2", "reward.functions.budget_guided.budget_penalty=-2: `correct_min` + `budget_penalty` - `budget_cost` must be >= `wrong_max`"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.correct_floor=0.25", "reward.functions.budget_guided.correct_floor=0.25: `correct_floor` must be < min(`correct_min`, `correct_max` + `budget_penalty`) - `budget_cost`, so that a correct answer with an absurd budget scores below every honest one within the tolerance; got correct_floor=0.25 >= 0.2"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.format_penalty=-1", "reward.functions.budget_guided.format_penalty=-1: `format_penalty` must be < `wrong_min` + `budget_penalty`, so that stopping before the answer scores below every finished answer; got format_penalty=-1 >= -1.3"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.correct_floor=0.6", "reward.functions.budget_guided.correct_floor=0.6: must be <= reward.functions.budget_guided.correct_min=0.5"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.cost_on=length", "reward.functions.budget_guided.cost_on='length': must be one of 'budget', 'spent'"),
    ("experiment=grpo_toy", "trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4: GRPO optimizes manually"),
    ("experiment=grpo_toy", "+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0: GRPO optimizes manually: clip with module.max_grad_norm"),
    ("experiment=grpo_toy", "reward.functions.budget_guided.delta=1", "reward.functions.budget_guided.delta=1: must be a finite number >= 0 and < 1"),
    ("experiment=sft_toy", "output_format.max_budget=0", "output_format.max_budget=0: must be an integer >= 1"),
    ("experiment=sft_toy", "output_format.budget_close='<solution>'", "output_format=['<budget>', '<solution>', '<solution>', '</solution>']: the four tags must all differ"),
    ("experiment=sft_toy", "trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1, or -1"),
    ("experiment=sft_toy", "trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1, or -1 or null"),
    ("experiment=sft_toy", "trainer.max_steps=-1", "trainer.max_epochs=-1", "trainer.max_epochs=-1: with trainer.max_steps=-1 training never ends"),
    ("experiment=sft_toy", "data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("experiment=sft_toy", "data.on_bad_row=skip", "data.on_bad_row='skip': must be one of 'drop', 'error'"),
    ("experiment=sft_toy", "data.prompt_template=hello", "data.prompt_template='hello': has no {problem} field"),
    ("experiment=sft_toy", "data.train.0.k_min=9", "data.train[0].k_min=9: must be <= data.train[0].k_max=6"),
    ("experiment=sft_toy", "data.train.0.size=0", "data.train[0].size=0: must be an integer >= 1"),
    ("experiment=sft_toy", "model.dtype=float64", "model.dtype='float64': must be one of 'float32', 'bfloat16', 'float16', 'auto'"),
    ("experiment=sft_toy", "model.lora.r=0", "model.lora.r=0: must be an integer >= 1"),
    ("experiment=sft_toy", "model.lora.dropout=1", "model.lora.dropout=1: must be a finite number >= 0 and < 1"),
    ("experiment=sft_toy", "model.tiny.hidden_size=65", "model.tiny.hidden_size=65: must be a multiple of model.tiny.num_attention_heads=4"),
    ("experiment=sft_toy", "grader.timeout_s=0", "grader.timeout_s=0: must be a finite number > 0"),
    ("experiment=sft_toy", "grader.workers=-1", "grader.workers=-1: must be an integer >= 0, or null"),
    ("experiment=sft_toy", "rollout.batch_size=0", "rollout.batch_size=0: must be an integer >= 1"),
    ("experiment=sft_toy", "rollout.decoder=turbo", "rollout.decoder='turbo': must be one of 'auto', 'fused', 'generate'"),
    ("experiment=sft_toy", "strategy=ddp", "strategy.static_graph=maybe", "strategy.static_graph='maybe': is a string; must be true or false"),
    ("experiment=sft_toy", "strategy.name=deepspeed", "strategy.name='deepspeed': must be one of 'auto', 'ddp', 'fsdp', 'fsdp2'"),
    ("experiment=sft_toy", "+strategy.find_unused_parameters=true", "strategy.find_unused_parameters=true: strategy 'auto' takes no options"),
    ("experiment=sft_toy", "num_threads=0", "num_threads=0: must be an integer >= 1, or null"),
    ("experiment=sft_toy", "ckpt_path=/no/such/last.ckpt", "ckpt_path='/no/such/last.ckpt': no such file or directory"),
    ("experiment=sft_toy", "+trainer.fast_dev_rn=true", "trainer.fast_dev_rn=true: is not an argument of lightning.pytorch.Trainer; did you mean trainer.fast_dev_run?"),
]


@pytest.mark.parametrize("case", BAD_VALUES, ids=[case[-2] for case in BAD_VALUES])
def test_bad_value_is_an_error_naming_the_full_key(case):
    *overrides, expected = case
    message = error_of(compose_cfg(*overrides))
    assert expected in message, message


def test_every_bad_value_is_reported_at_once():
    overrides = ["module.micro_batch_size=-3", "module.mini_batch_size=0", "module.sampling.temperature=-1",
                 "module.sampling.max_new_tokens=0", "module.sampling.top_p=0", "module.epsilon_low=-0.1",
                 "module.beta=-1", "reward.weights.budget_guided=nan", "output_format.max_budget=0",
                 "trainer.max_steps=0", "module.optimizer.lr=0"]
    message = error_of(compose_cfg("experiment=grpo_toy", *overrides))
    assert message.startswith(f"{len(overrides)} bad config values:"), message
    for override in overrides:
        assert override.split("=")[0] + "=" in message


def test_unknown_key_in_a_config_file_is_named_with_the_closest_argument():
    cfg = compose_cfg("experiment=grpo_toy")
    with open_dict(cfg):
        cfg.module.micro_batch = 4
        cfg.data.train[0].opernd_max = 5
    message = error_of(cfg)
    assert "module.micro_batch=4: is not an argument of selfbudget_pl.modules.grpo.GRPOModule; did you mean 'micro_batch_size'?" in message
    assert "data.train[0].opernd_max=5: is not an argument of selfbudget_pl.data.synthetic.SyntheticSource; did you mean 'operand_max'?" in message


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml")))
def test_shipped_experiments_pass_on_their_cpu_stand_ins(experiment):
    overrides = [f"experiment={experiment}", "model=tiny", "trainer=cpu", "rollout=hf"]
    if experiment.endswith("_math"):  # the real models' lengths do not fit the tiny model's 1024 positions
        overrides += ["data.max_length=1024", "data.max_prompt_length=512", "module.val_sampling.max_new_tokens=512"]
        if experiment.startswith("grpo"):
            overrides.append("module.sampling.max_new_tokens=512")
    check_train_config(compose_cfg(*overrides))


def test_surprising_values_are_a_warning_logged_once(caplog):
    cfg = compose_cfg("experiment=grpo_toy", "module.sampling.temperature=0")
    with caplog.at_level(logging.WARNING):
        check_train_config(cfg)
        check_train_config(cfg)
    warnings = [r.getMessage() for r in caplog.records if "module.sampling.temperature=0" in r.getMessage()]
    assert len(warnings) == 1 and "every advantage is 0" in warnings[0]
    with caplog.at_level(logging.WARNING):
        check_train_config(compose_cfg("experiment=sft_math", "model=tiny", "trainer=cpu", "data.val_size=10",
                                       "data.max_length=1024", "data.max_prompt_length=512",
                                       "module.val_sampling.max_new_tokens=500"))
    assert "data.val_size=10: is ignored: data.val has sources" in caplog.text
    with caplog.at_level(logging.WARNING):
        check_train_config(compose_cfg("experiment=sft_toy", "trainer.max_steps=40"))
    assert "module.warmup_steps=50: is not below trainer.max_steps=40" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # greedy validation is the normal case: no warning
        check_train_config(compose_cfg("experiment=grpo_toy", "module.val_sampling.temperature=0"))
    assert "temperature" not in caplog.text


# -- positions ---------------------------------------------------------------------------------------


def test_max_new_tokens_past_the_tiny_models_positions_names_both_keys():
    message = error_of(compose_cfg("experiment=grpo_toy", "model.name_or_path=null", "data.max_prompt_length=null",
                                   "module.sampling.max_new_tokens=100000"))
    assert "module.sampling.max_new_tokens=100000: leaves no room for the prompt within the model's " \
           "max_position_embeddings=1024 (model.tiny.max_position_embeddings)" in message
    message = error_of(compose_cfg("experiment=grpo_toy", "model.name_or_path=null", "data.max_prompt_length=1000",
                                   "module.sampling.max_new_tokens=100"))
    assert "module.sampling.max_new_tokens=100: with data.max_prompt_length=1000 that is 1100 tokens, more than " \
           "the model's max_position_embeddings=1024" in message
    message = error_of(compose_cfg("experiment=sft_toy", "model.tiny.max_position_embeddings=256",
                                   "data.max_prompt_length=null", "module.val_sampling.max_new_tokens=300"))
    assert "module.val_sampling.max_new_tokens=300: leaves no room for the prompt within the model's max_position_embeddings=256" in message


def test_training_prompts_are_checked_after_tokenising_before_the_weights_load(tmp_path, tiny_cache):
    """data.max_prompt_length=null: the longest prompt is known only once the data is tokenised."""
    from selfbudget_pl.train import train

    cfg = compose_cfg("experiment=grpo_toy", "model.name_or_path=null", "data.max_prompt_length=null",
                      "module.sampling.max_new_tokens=1020",
                      "module.val_sampling.max_new_tokens=20", "+trainer.fast_dev_run=true", "num_threads=1",
                      "data.train.0.size=64", "data.train.0.k_min=6", "data.train.0.operand_max=99")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.module.export_dir = str(tmp_path / "export")
    with pytest.raises(ConfigError, match=r"module.sampling.max_new_tokens=1020: with the longest train prompt "
                                          r"\(synthetic/train/\d+\)=(\d+) that is \d+ tokens, more than the model's "
                                          r"max_position_embeddings=1024"):
        train(cfg)


def test_positions_are_read_from_a_checkpoint_config_without_its_weights(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    message = error_of(compose_cfg("experiment=sft_toy", f"model.name_or_path={checkpoint}",
                                   "data.max_length=600", "module.val_sampling.max_new_tokens=100"))
    assert f"data.max_length=600: is more than the model's max_position_embeddings=512 ({checkpoint} config.json)" in message
    assert "val_sampling" not in message


# -- devices and accelerators -----------------------------------------------------------------------


def test_more_devices_than_exist_is_an_error():
    count = os.cpu_count()
    message = error_of(compose_cfg("experiment=sft_toy", f"trainer.devices={count + 1}"))
    assert f"trainer.devices={count + 1}: asks for more devices than this machine has ({count} CPU core(s))" in message


def test_more_gpus_than_exist_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = error_of(compose_cfg("experiment=sft_toy", "trainer=gpu", "trainer.devices=8"))
    assert "trainer.devices=8: asks for more devices than this machine has (2 CUDA GPU(s))" in message
    message = error_of(compose_cfg("experiment=sft_toy", "trainer=gpu", "trainer.devices=[0,3]"))
    assert "trainer.devices=[0, 3]: names device(s) [3] that do not exist" in message


@pytest.mark.parametrize(
    "experiment, fix",
    [("grpo_math", "add `trainer=cpu` and `rollout=hf` (vLLM needs CUDA)"), ("sft_math", "add `trainer=cpu`")],
)
def test_gpu_experiment_without_a_gpu_says_what_to_add(monkeypatch, experiment, fix):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of(compose_cfg(f"experiment={experiment}", "model=tiny"))
    assert message.startswith("bad config value: trainer.accelerator='gpu': this machine has no CUDA GPU")
    assert message.endswith(f"to run on CPU {fix}")


def test_fsdp1_without_a_gpu_names_the_strategies_that_run_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of(compose_cfg("experiment=sft_math", "model=tiny", "trainer=fsdp", "strategy=fsdp"))
    assert "`trainer=cpu` and `strategy=fsdp2` or `strategy=ddp` (Lightning's FSDP1 strategy is GPU-only)" in message


# -- Lightning's Trainer flags, as typed -----------------------------------------------------------


def test_trainer_flags_as_typed_become_additions_and_typos_are_named():
    typed = ["experiment=sft_toy", "trainer.fast_dev_run=true", "trainer.limit_train_batches=2",
             "trainer.overfit_batches=1", "trainer.detect_anomaly=true", "model.lora.enabled=true"]
    opened = open_trainer_overrides(typed)
    assert opened == ["experiment=sft_toy", "++trainer.fast_dev_run=true", "++trainer.limit_train_batches=2",
                      "++trainer.overfit_batches=1", "++trainer.detect_anomaly=true", "model.lora.enabled=true"]
    cfg = compose_cfg(*opened)
    assert (cfg.trainer.fast_dev_run, cfg.trainer.limit_train_batches, cfg.trainer.detect_anomaly) == (True, 2, True)
    check_train_config(cfg)
    with pytest.raises(ConfigError, match=r"trainer.limit_train_batchs=2: 'limit_train_batchs' is not an argument "
                                          r"of lightning.pytorch.Trainer; did you mean trainer.limit_train_batches\?"):
        open_trainer_overrides(["trainer.limit_train_batchs=2"])
    assert {"fast_dev_run", "overfit_batches", "detect_anomaly", "max_steps"} <= trainer_arguments()


def test_reproduce_stages_take_lightning_flags_as_typed(tmp_path):
    from selfbudget_pl.reproduce import compose_stage

    cfg = compose_stage(["experiment=sft_toy", "trainer.overfit_batches=1", "trainer.detect_anomaly=true"], tmp_path)
    assert (cfg.trainer.overfit_batches, cfg.trainer.detect_anomaly) == (1, True)


def test_train_cli_runs_with_lightning_flags_as_typed(tmp_path, tiny_cache):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "SELFBUDGET_CACHE": str(tiny_cache)}
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=sft_toy", "trainer.fast_dev_run=true", "trainer.detect_anomaly=true",
         "trainer.limit_train_batches=2", "num_threads=1", "data.train.0.size=64", f"paths.output_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Running in `fast_dev_run` mode" in result.stderr + result.stdout


def test_train_cli_bad_value_is_one_sentence_not_a_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run([sys.executable, "train.py", "experiment=grpo_toy", "module.micro_batch_size=-3"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "error: bad config value: module.micro_batch_size=-3: must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


# -- bf16/fp16 weights stepped by a plain optimizer -----------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_trainable_weights_with_adamw_are_refused(dtype):
    message = error_of(compose_cfg("experiment=sft_toy", f"model.dtype={dtype}"))
    assert f"model.dtype='{dtype}': loads the trainable weights in {dtype}, and module.optimizer (torch.optim.AdamW)" in message
    assert "model.dtype=float32" in message and f"model.frozen_dtype={dtype}" in message
    assert "model.allow_low_precision_training=true" in message


def test_lora_adapters_in_low_precision_are_refused_too():
    # model.dtype is the trained weights' dtype: under LoRA, the adapters'.
    message = error_of(compose_cfg("experiment=sft_toy", "model.lora.enabled=true", "model.dtype=bfloat16"))
    assert "model.dtype='bfloat16': loads the trainable weights in bfloat16" in message


@pytest.mark.parametrize(
    "overrides",
    [["model.lora.enabled=true", "model.dtype=float32", "model.frozen_dtype=bfloat16"],
     ["model.dtype=bfloat16", "model.allow_low_precision_training=true"]],
    ids=["lora_bf16_base", "opt_in"],
)
def test_low_precision_is_fine_for_frozen_weights_or_with_an_explicit_opt_in(overrides):
    check_train_config(compose_cfg("experiment=sft_toy", *overrides))


def test_dtype_auto_reads_the_checkpoints_dtype(tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "bf16"
    checkpoint.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    (checkpoint / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    message = error_of(compose_cfg("experiment=sft_toy", f"model.name_or_path={checkpoint}", "model.dtype=auto"))
    assert "model.dtype='auto': loads the trainable weights in bfloat16 (the checkpoint's dtype)" in message


def test_every_model_config_has_the_opt_in_key_off():
    for path in sorted((REPO_ROOT / "configs" / "model").glob("*.yaml")):
        assert OmegaConf.load(path).allow_low_precision_training is False, path


# -- evaluation and generation --------------------------------------------------------------------


def test_eval_config_bad_values_and_positions(monkeypatch):
    with pytest.raises(ConfigError, match=r"sampling.temperature=-1: must be a finite number >= 0"):
        check_eval_config(compose_cfg("sampling.temperature=-1", config="eval"))
    with pytest.raises(ConfigError, match=r"batch_size=0: must be an integer >= 1"):
        check_eval_config(compose_cfg("batch_size=0", config="eval"))
    with pytest.raises(ConfigError, match=r"datasets.gsm8k.schema='csv': must be one of"):
        check_eval_config(compose_cfg("datasets.gsm8k.schema=csv", config="eval"))
    with pytest.raises(ConfigError, match=r"sampling.max_new_tokens=4096: leaves no room for the prompt within "
                                          r"the model's max_position_embeddings=1024"):
        check_eval_config(compose_cfg("sampling.max_new_tokens=4096", config="eval"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='gpu': this machine has no CUDA GPU .* add `device=cpu` and `rollout=hf`"):
        check_eval_config(compose_cfg("device=cuda", "rollout=vllm", config="eval"))


def test_eval_prompts_with_max_new_tokens_must_fit(tokenizer):
    cfg = compose_cfg("sampling.max_new_tokens=900", "budget=[100000]", config="eval")
    datasets = {"mine": [{"id": "short", "problem": "1+1"}, {"id": "long", "problem": "1+2+3+4+5+6 " * 20}]}
    with pytest.raises(ConfigError, match=r"sampling.max_new_tokens=900: with the longest prompt with its pre-filled "
                                          r"budget \(mine long\)=\d+ that is \d+ tokens, more than the model's "
                                          r"max_position_embeddings=1024"):
        check_eval_prompts(cfg, None, datasets, tokenizer)
    check_eval_prompts(compose_cfg("sampling.max_new_tokens=100", config="eval"), None, datasets, tokenizer)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-tokens", "5000"], "--max-tokens=5000: leaves no room for the prompt within the model's max_position_embeddings=1024"),
        (["--max-tokens", "1000"], "--max-tokens=1000: with the prompt="),
        (["--temperature", "-1"], "--temperature=-1.0: must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature=nan: is not a finite number"),
        (["--dtype", "float8"], "--dtype='float8': must be one of"),
    ],
)
def test_generate_checks_its_options_before_loading_the_model(capsys, tiny_cache, args, expected):
    code = cli.main(["generate", "1+2+3+4+5+6 " * 10, *args])
    assert code == 2
    assert expected in capsys.readouterr().err


def test_check_generation_accepts_good_options():
    check_generation(None, 200, 0.7, "cpu", "float32", prompt_tokens=30)


# -- schemas stay in step with the constructors ---------------------------------------------------------


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _arguments(target) -> set[str]:
    """Named arguments of a constructor or function, following ``*args/**kwargs`` up the class hierarchy."""
    names: set[str] = set()
    owners = target.__mro__ if inspect.isclass(target) else (target,)
    for owner in owners:
        init = owner.__init__ if inspect.isclass(owner) else owner
        if inspect.isclass(owner) and "__init__" not in vars(owner) and not dataclasses.is_dataclass(owner):
            continue
        parameters = inspect.signature(init).parameters
        names |= {n for n, p in parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        forwards = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if not forwards or not inspect.isclass(owner):
            break
    return names


@pytest.mark.parametrize("schema", ALL_SCHEMAS, ids=lambda schema: schema.__name__)
def test_schema_fields_are_the_constructor_arguments(schema):
    fields = {field.name for field in dataclasses.fields(schema)}
    assert schema.TARGETS, f"{schema.__name__} describes no target"
    for dotted in schema.TARGETS:
        arguments = _arguments(_resolve(dotted))
        expected = arguments - set(schema.INJECTED)
        if dotted == "selfbudget_pl.strategies.make_strategy":
            expected = {"name"}  # the options of each strategy are DDPSchema, FSDPSchema, FSDP2Schema
        assert fields == expected, (
            f"{dotted}: arguments without a schema field: {sorted(expected - fields)}; "
            f"schema fields that are no argument: {sorted(fields - expected)}"
        )
        assert set(schema.INJECTED) <= arguments, f"{dotted} has no argument {set(schema.INJECTED) - arguments}"


def test_every_target_in_the_shipped_configs_has_a_schema_or_is_lightnings():
    from selfbudget_pl.schema import REGISTRY

    targets = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                targets.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (REPO_ROOT / "configs").rglob("*.yaml"):
        walk(OmegaConf.to_container(OmegaConf.load(path)))
    from selfbudget_pl.config.groups import LIGHTNING_SUBCLASSES

    lightnings = ("lightning.", "torch.optim.", *LIGHTNING_SUBCLASSES)
    unchecked = sorted(t for t in targets if t not in REGISTRY and not t.startswith(lightnings))
    assert unchecked == [], unchecked
    assert not HYDRA_KEYS & {field.name for schema in ALL_SCHEMAS for field in dataclasses.fields(schema)}


def test_findings_name_nan_and_infinity_as_not_finite():
    from selfbudget_pl.schema import check_value

    findings = Findings()
    for value in (math.nan, math.inf, -math.inf):
        check_value(value, float, {}, "x", findings)
    assert [f.message for f in findings.errors] == ["is not a finite number; must be a finite number"] * 3


def test_activation_checkpointing_in_both_the_model_and_the_strategy_is_refused_naming_both():
    message = error_of(compose_cfg("experiment=grpo_toy", "strategy=fsdp2", "model.gradient_checkpointing=true",
                                   "strategy.activation_checkpointing=true"))
    assert message == (
        "bad config value: strategy.activation_checkpointing=true: with model.gradient_checkpointing=true recomputes "
        "each decoder layer twice in backward: keep one, model.gradient_checkpointing=false or "
        "strategy.activation_checkpointing=false"
    )
    for one in ("model.gradient_checkpointing=true", "strategy.activation_checkpointing=true"):
        check_train_config(compose_cfg("experiment=grpo_toy", "strategy=fsdp2", one))


# -- each rule stated once: a class built in Python refuses what its config would ------------------------


def _constructor_cases():
    from selfbudget_pl.callbacks.progress import ProgressLines
    from selfbudget_pl.data.datamodule import BudgetMathDataModule
    from selfbudget_pl.data.sources import HFSource, JsonlSource
    from selfbudget_pl.data.synthetic import SyntheticSource
    from selfbudget_pl.modules.grpo import GRPOModule
    from selfbudget_pl.modules.sft import SFTModule
    from selfbudget_pl.rewards.budget import BudgetGuidedReward
    from selfbudget_pl.rewards.grader import MathGrader
    from selfbudget_pl.rollout.hf import HFRolloutBackend
    from selfbudget_pl.strategies import make_strategy

    return [
        (lambda: MathGrader(timeout_s=2.0, retry_timeout_s=1.0), "MathGrader: timeout_s=2.0: must be <= retry_timeout_s=1.0"),
        (lambda: MathGrader(workers=-1, max_chars=0), "MathGrader: max_chars=0: must be an integer >= 1; workers=-1: must be an integer >= 0, or null"),
        (lambda: BudgetGuidedReward(delta=1.0), "BudgetGuidedReward: delta=1.0: must be a finite number >= 0 and < 1"),
        (lambda: SyntheticSource(k_min=1), "SyntheticSource: k_min=1: must be an integer >= 2 (a sum has at least two operands)"),
        (lambda: SyntheticSource(operand_min=5, operand_max=3), "SyntheticSource: operand_min=5: must be <= operand_max=3"),
        (lambda: JsonlSource("rows.jsonl", schema="gsm9k"), "JsonlSource: schema='gsm9k': must be one of 'gsm8k'"),
        (lambda: HFSource(" "), "HFSource: name_or_path=' ': is empty"),
        (lambda: BudgetMathDataModule(mode="rl"), "BudgetMathDataModule: mode='rl': must be one of 'sft', 'grpo'"),
        (lambda: ProgressLines(every_n_steps=0), "ProgressLines: every_n_steps=0: must be an integer >= 1"),
        (lambda: HFRolloutBackend(None, None, decoder="fast"), "HFRolloutBackend: decoder='fast': must be one of 'auto', 'fused', 'generate'"),
        (lambda: GRPOModule(model_loader=None, num_generations=1), "GRPOModule: num_generations=1: must be an integer >= 2"),
        (lambda: SFTModule(model_loader=None, optimizer=functools.partial(torch.optim.AdamW), head_chunk_tokens=0), "SFTModule: head_chunk_tokens=0: must be an integer >= 1"),
        (lambda: make_strategy("auto", find_unused_parameters=True), "make_strategy: find_unused_parameters=true: strategy 'auto' takes no options"),
        (lambda: make_strategy("dpp"), "make_strategy: name='dpp': must be one of 'auto', 'ddp', 'fsdp', 'fsdp2'"),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(14))
def test_a_class_built_in_python_refuses_what_its_config_would(index):
    build, message = _constructor_cases()[index]
    with pytest.raises(ValueError) as caught:
        build()
    assert message in str(caught.value)


@pytest.mark.parametrize("override, message", [
    ("data.train.0.k_min=1", "data.train[0].k_min=1: must be an integer >= 2 (a sum has at least two operands)"),
    ("data.train.0.heldout_fraction=0.7", "data.train[0].heldout_fraction=0.7: must be a finite number > 0 and < 0.5"),
    ("grader.retry_timeout_s=0.5", "grader.timeout_s=1.0: must be <= grader.retry_timeout_s=0.5"),
])  # fmt: skip
def test_the_config_layer_checks_what_the_constructor_requires(override, message):
    """Rules the two copies had drifted apart on: the config layer now refuses them before anything loads."""
    with pytest.raises(ConfigError) as caught:
        check_train_config(compose_cfg("experiment=grpo_toy", override))
    assert message in str(caught.value)


def test_arguments_built_in_code_are_left_to_their_own_constructors(tmp_path):
    from selfbudget_pl.data.datamodule import BudgetMathDataModule
    from selfbudget_pl.data.sources import JsonlSource
    from selfbudget_pl.data.synthetic import SyntheticSource
    from selfbudget_pl.modules.losses import SamplerCorrection
    from selfbudget_pl.rollout.base import SamplingSettings

    (tmp_path / "rows.jsonl").write_text("")
    source = JsonlSource(tmp_path / "rows.jsonl", schema="question_answer")  # a path object; a schema the rows module reads
    assert source.path == str(tmp_path / "rows.jsonl")
    data = BudgetMathDataModule(train=[source, SyntheticSource(size=4)], data_root=tmp_path)  # built sources, a Path root
    assert len(data.sources["train"]) == 2
    from selfbudget_pl.config.groups import GRPOModuleSchema
    from selfbudget_pl.schema import check_arguments

    check_arguments(GRPOModuleSchema, {"sampling": SamplingSettings(), "sampler_correction": SamplerCorrection(),
                                       "num_generations": 4}, "GRPOModule")  # built objects: not re-checked
    with pytest.raises(ValueError, match=r"GRPOModule: sampling.temperature=-1: must be a finite number >= 0"):
        check_arguments(GRPOModuleSchema, {"sampling": {"temperature": -1}}, "GRPOModule")  # a config node: checked
