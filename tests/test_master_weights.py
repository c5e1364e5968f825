"""fp32 master weights: a GRPO step at the paper's learning rate moves the weights it trains.

The model is the tiny one loaded through the real model's config (configs/model/r1_distill_qwen_1.5b.yaml,
only ``name_or_path`` changed) with the GPU trainer's precision (bf16 compute), so what is checked is
what a real run gets; the bf16-weights run beside it shows the check can fail.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers import AutoModelForCausalLM

from selfbudget_pl.models import ModelLoader
from selfbudget_pl.train import train

from .conftest import REPO_ROOT
from .distributed_run import use_even_token_reward
from .test_train import compose_small

CONFIGS = REPO_ROOT / "configs"


def one_grpo_step(tmp_path, tiny_model_dir, **model_overrides) -> tuple[float, float, set[torch.dtype]]:
    """Share of trained tensors and of trained elements that changed after one optimizer step."""
    cfg = compose_small("grpo_toy", tmp_path, "trainer.max_steps=1", "trainer.val_check_interval=null",
                        "trainer.limit_val_batches=0")  # fmt: skip
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(
            OmegaConf.load(CONFIGS / "model" / "r1_distill_qwen_1.5b.yaml"),
            {"name_or_path": str(tiny_model_dir), **model_overrides},
        )
        cfg.trainer.precision = OmegaConf.load(CONFIGS / "trainer" / "gpu.yaml").precision  # bf16-mixed
        cfg.module.optimizer.lr = OmegaConf.load(CONFIGS / "module" / "grpo.yaml").optimizer.lr  # 1e-6
        cfg.module.warmup_steps = 0
        cfg.module.prefill_fraction = 0.0
        cfg.module.export_dir = None
        use_even_token_reward(cfg)
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    trained = [(name, p) for name, p in objects["module"].model.named_parameters() if p.requires_grad]
    changed = [(p.detach().float() != before[name].to(p.dtype).float()) for name, p in trained]
    tensors = sum(bool(flags.any()) for flags in changed) / len(changed)
    elements = sum(int(flags.sum()) for flags in changed) / sum(flags.numel() for flags in changed)
    return tensors, elements, {p.dtype for _, p in trained}


def test_one_step_at_lr_1e6_moves_every_fp32_master_weight(tmp_path, tiny_model_dir):
    tensors, elements, dtypes = one_grpo_step(tmp_path, tiny_model_dir)
    assert dtypes == {torch.float32}
    assert tensors >= 0.99 and elements >= 0.99, (tensors, elements)


def test_bf16_weights_lose_the_same_step(tmp_path, tiny_model_dir):
    # The opt-in bf16 weights: the same step rounds most updates away (what fp32 masters fix).
    tensors, elements, dtypes = one_grpo_step(
        tmp_path, tiny_model_dir, dtype="bfloat16", allow_low_precision_training=True
    )
    assert dtypes == {torch.bfloat16}
    assert elements < 0.5, elements


def test_lora_keeps_a_bf16_frozen_base_and_fp32_adapters(tiny_model_dir):
    config = OmegaConf.load(CONFIGS / "model" / "qwen2.5_math_7b_instruct.yaml")
    settings = OmegaConf.to_container(config, resolve=True)
    settings.pop("_target_")
    settings.update(name_or_path=str(tiny_model_dir), gradient_checkpointing=False)
    settings["lora"].update(target_modules=["q_proj", "v_proj"])
    loader = ModelLoader(**settings)
    model = loader.load_model()
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    reference = loader.load_model(frozen=True)
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("name", ["tiny", "r1_distill_qwen_1.5b", "qwen2.5_math_7b_instruct"])
def test_shipped_model_configs_train_fp32_weights(name):
    config = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    assert config.dtype == "float32" and not config.allow_low_precision_training
