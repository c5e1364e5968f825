"""Two-process CPU runs (DDP over gloo) of SFT and GRPO agree across ranks; the FSDP configuration wraps
the model's decoder layers; a sharded model's gathered weights export like the unsharded ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from selfbudget_pl.strategies import make_strategy

from .conftest import REPO_ROOT
from .test_train import compose_small


def run_ddp(experiment: str, output_dir: Path, tiny_cache: Path, *overrides: str) -> list[dict]:
    """Run tests/distributed_run.py on two CPU processes; return each rank's report."""
    # Built here, once: two ranks building the same tiny model at once would race on the cache.
    instantiate(compose_small(experiment, output_dir, *overrides).model).path
    env = {**os.environ, "SELFBUDGET_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "tests.distributed_run", experiment, str(output_dir), *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_ranks_agree(reports: list[dict], steps: int, synced: list[str]) -> None:
    rank0, rank1 = reports
    assert [r["rank"] for r in reports] == [0, 1] and rank0["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == steps
    # Each rank trained on its own share of the data ...
    assert rank0["examples"] and not set(rank0["examples"]) & set(rank1["examples"])
    # ... yet gradients were averaged, so every rank holds the same weights, and rank 0 exported them.
    assert rank0["weights_sha256"] == rank1["weights_sha256"] == rank0["export_sha256"]
    for key in synced:
        assert rank0["metrics"][key] == pytest.approx(rank1["metrics"][key], abs=1e-6), key


def test_ddp_sft_ranks_agree(tmp_path, tiny_cache):
    reports = run_ddp("sft_toy", tmp_path, tiny_cache, "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "trainer.limit_val_batches=1")
    assert_ranks_agree(reports, steps=3, synced=["val/loss"])


def test_ddp_grpo_ranks_agree_with_accumulated_micro_batches(tmp_path, tiny_cache):
    # Four micro-batches per optimizer step: the first three skip the all-reduce (no_sync) and the
    # last one averages the accumulated sum; a missed sync would leave the ranks' weights different.
    reports = run_ddp("grpo_toy", tmp_path, tiny_cache, "model.name_or_path=null", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "module.micro_batch_size=2")
    assert_ranks_agree(reports, steps=2, synced=["reward", "reward_std", "loss", "entropy",
                                                 "completions/mean_length", "rewards/even_tokens/mean"])
    initial = reports[0]["initial_sha256"]
    assert reports[0]["weights_sha256"] != initial, "GRPO took no step: the test reward gave no advantage"


def test_fsdp_strategy_wraps_the_models_decoder_layers(model_loader):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    strategy = make_strategy(
        "fsdp", model=model_loader, activation_checkpointing=True, sharding_strategy="SHARD_GRAD_OP",
        mixed_precision={"param_dtype": "bfloat16", "reduce_dtype": "float32", "buffer_dtype": None},
    )  # fmt: skip
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert strategy.mixed_precision == MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert strategy._state_dict_type == "sharded" and not strategy.cpu_offload.offload_params


def test_fsdp_yaml_builds_the_strategy_and_lightning_refuses_it_on_cpu(tmp_path, model_loader):
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_small("grpo_toy", tmp_path, "strategy=fsdp")
    strategy = instantiate(cfg.strategy, model=model_loader)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded"
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    # Lightning's FSDP is GPU-only: the CPU tests cover sharding with torch's fully_shard below.
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy)


def test_unknown_wrap_layer_is_named(model_loader):
    with pytest.raises(ValueError, match="NoSuchLayer"):
        make_strategy("fsdp", model=model_loader, wrap_layers=["NoSuchLayer"])


def test_sharded_weights_gather_and_export_like_unsharded(tmp_path, tiny_cache, model_loader):
    model_loader.path  # build the tiny model before two processes read it
    env = {**os.environ, "SELFBUDGET_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "-m", "tests.fsdp_export_run", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sharded_parameters"] > 0, "fully_shard left every parameter whole"
    assert report["gathered_equals_unsharded"] and report["export_equals_unsharded"]


def test_vllm_weight_sync_gives_every_rank_the_full_weights_under_fsdp(tmp_path, tiny_cache, model_loader):
    # FSDP2 fully_shard and the FSDP1 wrapper (Lightning's), each plain and with LoRA: every rank's
    # stand-in engine receives the unsharded (LoRA-merged) weights under the checkpoint's names.
    model_loader.path  # build the tiny model before two processes read it
    env = {**os.environ, "SELFBUDGET_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "-m", "tests.fsdp_weight_sync_run", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(reports[0]) == sorted(reports[1]) == ["fsdp1", "fsdp1_lora", "fsdp2", "fsdp2_lora"]
    for case in reports[0]:
        rank0, rank1 = reports[0][case], reports[1][case]
        assert rank0["digest"] == rank1["digest"], f"{case}: the ranks' engines hold different weights"
        for report in (rank0, rank1):
            checks = {key: value for key, value in report.items() if key not in ("digest", "chunks")}
            assert all(checks.values()), f"{case}: {checks}"
            assert report["chunks"] > 1, f"{case}: the weights went to the engine in one piece"


def test_hf_rollouts_from_a_sharded_policy_match_the_unsharded_model(tmp_path, tiny_cache):
    # FSDP1 (fp32 and bfloat16 mixed precision) and FSDP2: greedy completions on each rank, through the
    # HF backend, equal the unsharded model's; the inner model's generate alone (the old call) fails.
    from selfbudget_pl.models import ModelLoader

    # Built here, where the runner's ModelLoader() looks ($SELFBUDGET_CACHE/tiny_models, not model_loader's
    # directory): two ranks building it at once race, and rank 1's save_pretrained writes no weights.
    ModelLoader().path
    env = {**os.environ, "SELFBUDGET_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "-m", "tests.fsdp_rollout_run", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert sorted(report) == ["fsdp1", "fsdp1_bf16", "fsdp2"]
        for case, checks in report.items():
            checks = {key: value for key, value in checks.items() if key != "inner_generate_error"}
            assert all(checks.values()), f"{case}: {checks}"
            assert checks["inner_generate_fails"], f"{case}: the unfixed call worked, so the test shows nothing"
            if case != "fsdp1_bf16":
                assert checks["after_step"] and checks["weights_moved"], case
