"""The memory plan: its arithmetic on known sizes, the paper's 7B setting against 8 x 80 GB (fits under
FSDP2, not under DDP), the error naming the biggest term and its keys, vLLM's share, ``selfbudget-plan``
and the check at launch that stops a run before anything loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from selfbudget_pl.schema import ConfigError
from selfbudget_pl.memory.fit import check_plan, format_plan, misfits, plan_from_config
from selfbudget_pl.config.checks import plain
from selfbudget_pl.memory.architecture import model_architecture
from selfbudget_pl.memory.plan import GIB, RunShape, sampling_engine_limits
from selfbudget_pl.plan import main as plan_main
from selfbudget_pl.train import CONFIG_DIR, train

from .conftest import REPO_ROOT
from .test_train import compose_small

SEVEN_B = REPO_ROOT / "benchmarks" / "model_configs" / "r1_distill_qwen_7b.json"
PAPER_7B = ["experiment=grpo_math", "model=r1_distill_qwen_7b", "trainer.devices=8",
            f"memory_plan.model_config={SEVEN_B}", "memory_plan.device_memory_gib=80"]


def plan_for(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    settings = instantiate(cfg.memory_plan)
    plan, device_memory = plan_from_config(cfg, settings, probe=False)
    return plan, device_memory, settings


def term(plan, name: str) -> float:
    return next(t.bytes for t in plan.device if t.name == name)


def test_seven_b_full_training_fits_8x80_under_fsdp2_and_not_under_ddp():
    plan, memory, settings = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2", "rollout.max_model_len=9216")
    assert misfits(plan, memory, settings) == [], format_plan(plan, memory, settings)
    parameters = 7_615_616_512  # DeepSeek-R1-Distill-Qwen-7B, untied head
    assert term(plan, "trained weights") == parameters * 4 / 8
    assert term(plan, "optimizer state") == 2 * parameters * 4 / 8
    assert term(plan, "vLLM weights") == parameters * 2  # the checkpoint's bfloat16
    # 28 layers x 4 KV heads x 128 x 2 (k, v) x 2 bytes = 56 KiB a token
    assert "56 KiB" in next(t.detail for t in plan.device if t.name == "vLLM KV cache")

    plan, memory, settings = plan_for(*PAPER_7B, "trainer=ddp", "strategy=ddp")
    with pytest.raises(ConfigError, match=r"biggest term is (gradients|optimizer state) .*strategy=fsdp2"):
        check_plan(plan, memory, settings)


def test_vllm_default_length_preempts_and_a_small_share_cannot_start():
    plan, memory, settings = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2")
    assert any("will preempt" in note for note in plan.notes)  # 9,216 positions x 40 sequences in 7.8 GiB
    plan, memory, settings = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2",
                                      "rollout.gpu_memory_utilization=0.2")
    problems = misfits(plan, memory, settings)
    assert any("will not start" in p and "rollout.max_model_len" in p for p in problems), problems


def test_vllm_is_planned_at_the_runs_limits_and_an_explicit_value_wins():
    # grpo_math: 1,024-token prompts + 8,192 new tokens; 8 prompts x G = 5 per rank beside a validation batch of 16.
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2")
    kv = next(t for t in plan.device if t.name == "vLLM KV cache")
    assert "9216 (data.max_prompt_length + max_new_tokens) x 40 (the rank's most completions per call)" in kv.detail
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2", "data.val_batch_size=64",
                          "rollout.max_model_len=4096")
    kv = next(t for t in plan.device if t.name == "vLLM KV cache")
    assert "4096 (rollout.max_model_len) x 64 (the rank's most completions per call)" in kv.detail
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2", "+rollout.max_num_seqs=8")
    assert "x 8 (rollout.max_num_seqs)" in next(t.detail for t in plan.device if t.name == "vLLM KV cache")


def test_the_plan_and_the_module_take_the_engine_limits_from_the_same_rule(tmp_path):
    cfg = compose_small("grpo_toy", tmp_path, "model.name_or_path=null", "module.prefill_fraction=0.0")
    with open_dict(cfg):
        cfg.data.max_prompt_length, cfg.data.val_batch_size = 64, 48
        cfg.module.sampling.max_new_tokens, cfg.module.val_sampling.max_new_tokens = 200, 12
    output_format = instantiate(cfg.output_format)
    module = instantiate(cfg.module, model_loader=instantiate(cfg.model, _convert_="object"),
                         output_format=output_format, rollout=None, _convert_="object")
    datamodule = instantiate(cfg.data, output_format=output_format, _convert_="object")
    datamodule.connect(module.tokenizer)
    datamodule.setup("fit")
    module._trainer = SimpleNamespace(datamodule=datamodule)  # what engine_limits reads of a Trainer
    shape = RunShape(**{key: plain(cfg.get(key)) or {}
                        for key in ("trainer", "strategy", "model", "module", "data", "rollout")})
    arch = model_architecture(shape.model, None)
    planned = sampling_engine_limits(shape, arch)
    assert module.engine_limits() == planned
    # The longer of the two completions; the validation batch of 48 is more than a step's 4 prompts x G.
    assert (planned.max_model_len, planned.max_num_seqs) == (64 + 200, 48)
    assert cfg.data.batch_size * cfg.module.num_generations < 48
    # Without a prompt limit the module measures the data's longest prompt (the plan cannot: no data).
    datamodule.max_prompt_length = None
    longest = max(len(example["prompt_ids"]) for split in datamodule.datasets.values() for example in split)
    assert module.engine_limits().max_prompt_tokens == longest < 64
    # Pre-filled budgets lengthen prompts: by the longest one, the top of the range for the largest train cap.
    module.prefill_fraction = 0.5
    cap = max(example["b_max"] or 0 for example in datamodule.datasets["train"])
    budget = round(cap * module.prefill_budget_range[1])
    prefix = module.tokenizer.encode(module.output_format.budget_prefix(budget), add_special_tokens=False)
    assert cap > 0 and module.engine_limits().max_prompt_tokens == longest + len(prefix)


def test_sharding_divides_what_fsdp2_shards_and_the_reference_counts_when_beta_is_positive():
    alone, _, _ = plan_for("experiment=grpo_toy", "model.name_or_path=null")
    sharded, _, _ = plan_for("experiment=grpo_toy", "model.name_or_path=null", "strategy=fsdp2", "trainer.devices=4",
                             "module.beta=0.04")
    for name in ("trained weights", "gradients", "optimizer state"):
        assert term(sharded, name) == pytest.approx(term(alone, name) / 4)
    assert term(sharded, "reference model") == pytest.approx(term(alone, "trained weights") / 4)
    assert "reference model" not in [t.name for t in alone.device]


SHAPE_SFT = ["experiment=sft_toy", "model=qwen2.5_0.5b_shape", "model.name_or_path=null", "model.tiny.hidden_size=896",
             "model.tiny.intermediate_size=4864", "trainer=cpu", "trainer.precision=bf16-mixed"]


def test_a_checkpoint_is_planned_on_the_rank_that_serializes_it():
    plan, _, _ = plan_for(*SHAPE_SFT)
    weights = term(plan, "trained weights")
    # On CPU the file's bytes (weights and both AdamW moments) are held beside the resident state.
    assert term(plan, "checkpoint (one file)") == pytest.approx(3 * weights)
    assert plan.device_peak >= plan.phase_bytes(plan.device, "resident") + 3 * weights
    assert [t.phase for t in plan.host if t.name == "checkpoint (one file)"] == ["checkpoint"]
    plan, _, _ = plan_for(*SHAPE_SFT, "+callbacks.model_checkpoint.save_weights_only=true")
    assert term(plan, "checkpoint (one file)") == pytest.approx(weights)
    plan, _, _ = plan_for(*SHAPE_SFT, "callbacks.model_checkpoint=null")
    assert not [t for t in plan.device + plan.host if t.phase == "checkpoint"]
    # On a GPU the file is built in host memory; sharded checkpoints hold one tensor per rank there.
    plan, _, _ = plan_for(*PAPER_7B, "trainer=ddp", "strategy=ddp")
    assert not [t for t in plan.device if t.phase == "checkpoint"]
    host = next(t for t in plan.host if t.phase == "checkpoint")
    assert host.bytes == pytest.approx(3 * 7_615_616_512 * 4)
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2")
    host = next(t for t in plan.host if t.phase == "checkpoint")
    assert host.name == "checkpoint (sharded)" and host.bytes == pytest.approx(152_064 * 3_584 * 4)  # 8 x 1/8 head
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2", "strategy.save_distributed_checkpoint=false")
    assert next(t for t in plan.host if t.phase == "checkpoint").bytes == pytest.approx(2 * 3 * 7_615_616_512 * 4)


def test_adams_update_holds_sqrt_v_per_tensor_on_cpu_and_for_every_parameter_with_foreach():
    plan, _, _ = plan_for(*SHAPE_SFT)
    assert term(plan, "optimizer update") == pytest.approx(2 * 151_936 * 896 * 4)  # the tied embedding, twice
    plan, _, _ = plan_for(*SHAPE_SFT, "+module.optimizer.fused=true")
    assert "optimizer update" not in [t.name for t in plan.device]
    plan, _, _ = plan_for(*PAPER_7B, "trainer=fsdp2", "strategy=fsdp2")
    assert term(plan, "optimizer update") == pytest.approx(term(plan, "trained weights"))  # foreach: every shard
    plan, _, _ = plan_for(*SHAPE_SFT, "model.lora.enabled=true")
    assert term(plan, "optimizer update") <= 2 * term(plan, "trained weights")  # the adapters bound it


def test_sft_samples_only_in_validation_with_its_own_length():
    plan, _, _ = plan_for(*SHAPE_SFT, "data.max_prompt_length=64", "module.val_sampling.max_new_tokens=32")
    assert "x 96 tokens" in next(t.detail for t in plan.device if t.name == "sampler KV cache")
    # It samples inside the precision plugin's autocast: the cast weights are there as in a step.
    assert term(plan, "autocast weight copies (sampling)") == term(plan, "autocast weight copies")
    plan, _, _ = plan_for(*SHAPE_SFT, "trainer.limit_val_batches=0")
    assert not [t for t in plan.device if t.phase == "rollout"]


def test_planning_command_prints_the_table_and_exits_naming_the_keys(capsys):
    with pytest.raises(SystemExit) as stopped:
        plan_main(["--devices-memory", "80", *PAPER_7B[:-1], "trainer=ddp", "strategy=ddp"])
    printed = capsys.readouterr().out
    assert "per device" in printed and "optimizer state" in printed and "per host" in printed
    assert "strategy=fsdp2" in str(stopped.value)


def test_launch_stops_before_loading_when_the_plan_cannot_fit(tmp_path):
    cfg = compose_small("sft_toy", tmp_path)
    with open_dict(cfg):
        cfg.memory_plan.device_memory_gib = 0.001
    with pytest.raises(ConfigError, match=r"memory plan: .* the biggest term is .*shrink it with"):
        train(cfg)
    assert not any(Path(tmp_path).rglob("*.ckpt"))


@pytest.mark.slow
def test_tiny_training_run_stays_within_the_plan_plus_the_process_overhead():
    """A fresh process trains the tiny model for two steps: its peak resident growth is the plan's device
    peak plus at most the fixed overhead of libraries loading during the run (benchmarks/RESULTS.md)."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_memory_plan.py"), "--case", "tiny_sft"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.5 * row["planned_mib"] <= row["measured_mib"] <= row["planned_mib"] + 150, row
