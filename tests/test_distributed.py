"""Two-process CPU runs (DDP over gloo) of SFT and GRPO agree across ranks; so do runs under
``strategy=fsdp2`` (Lightning's ModelParallelStrategy with ``fully_shard``), which also match DDP and
resume from their distributed checkpoints; the FSDP configuration wraps the model's decoder layers;
GRPO under FSDP1 is refused; a sharded model's gathered weights export like the unsharded ones."""

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
from .distributed_run import shared_overrides
from .test_train import compose_small


def run_ddp(experiment: str, output_dir: Path, tiny_cache: Path, *overrides: str) -> list[dict]:
    """Run tests/distributed_run.py on two CPU processes; return each rank's report."""
    # Built here, once: two ranks building the same tiny model at once would race on the cache.
    instantiate(compose_small(experiment, output_dir, *shared_overrides(overrides)).model).path
    env = {**os.environ, "SELFBUDGET_CACHE": str(tiny_cache), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "tests.distributed_run", experiment, str(output_dir), *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def torchrun(module: str, *args: str) -> None:
    """Run ``python -m tests.<module> *args`` on two torchrun CPU ranks (gloo); fail with its stderr."""
    from selfbudget_pl.models import ModelLoader

    # Built here, once, where the runners' ModelLoader() looks: two ranks building it at once race.
    ModelLoader().path
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
         "-m", f"tests.{module}", *args],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


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


def assert_examples_shuffled_from_data_seed(reports: list[dict], cfg) -> None:
    """Each rank trained on the examples a DistributedSampler seeded with ``data.seed`` gives it, in order."""
    from selfbudget_pl.models import ModelLoader

    datamodule = instantiate(cfg.data, _convert_="object")
    datamodule.connect(ModelLoader().load_tokenizer())
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    assert cfg.data.seed != cfg.seed
    for rank, report in enumerate(reports):
        order = list(torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, seed=cfg.data.seed))
        assert report["examples"] == [dataset[index]["id"] for index in order[: len(report["examples"])]], rank


def test_ddp_sft_ranks_agree(tmp_path, tiny_cache):
    reports = run_ddp("sft_toy", tmp_path, tiny_cache, "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "trainer.limit_val_batches=1")
    assert_ranks_agree(reports, steps=3, synced=["val/loss"])


def test_ddp_grpo_ranks_agree_with_accumulated_micro_batches(tmp_path, tiny_cache):
    # Four micro-batches per optimizer step: the first three skip the all-reduce (no_sync) and the
    # last one averages the accumulated sum; a missed sync would leave the ranks' weights different.
    # Rank 1 samples at most 7 tokens, rank 0 at most 12, so the ranks' length extremes differ whichever
    # decoder draws the samples (the random-weight model seldom stops early).
    # data.seed differs from the global seed: each rank's share must be shuffled from data.seed.
    overrides = ("model.name_or_path=null", "trainer.max_steps=3", "trainer.val_check_interval=3",
                 "trainer.limit_val_batches=1", "module.micro_batch_size=2", "data.seed=5")
    reports = run_ddp("grpo_toy", tmp_path, tiny_cache, *overrides, "rank1:module.sampling.max_new_tokens=7")
    assert_examples_shuffled_from_data_seed(reports, compose_small("grpo_toy", tmp_path, *overrides))
    assert_ranks_agree(reports, steps=3, synced=["rewards/mean", "rewards/std", "train/loss", "train/entropy",
                                                 "completions/mean_length", "rewards/even_tokens/mean"])
    initial = reports[0]["initial_sha256"]
    assert reports[0]["weights_sha256"] != initial, "GRPO took no step: the test reward gave no advantage"
    # Each gradient bucket is all-reduced once per optimizer step, steps after DDP rebuilds its buckets
    # included: neither the earlier micro-batches' backwards (no_sync) nor the DDP forward that wraps
    # training_step (and prepares its reducer for a backward) makes another.
    for report in reports:
        per_step: list[list[int]] = []
        for entry in report["allreduced_buckets"]:
            per_step.append([]) if entry == "step" else per_step[-1].append(entry)
        assert len(per_step) == 3 and all(step and len(set(step)) == len(step) for step in per_step), per_step
    # Length extremes are the extremes over ranks, the mean the mean of the ranks' means (equal counts).
    lengths = [report["completion_lengths"] for report in reports]
    assert max(lengths[1]) <= 7 < max(lengths[0])  # a mean or rank 0's own extreme would differ
    for report in reports:
        metrics = report["metrics"]
        assert metrics["completions/min_length"] == min(min(lengths[0]), min(lengths[1]))
        assert metrics["completions/max_length"] == max(max(lengths[0]), max(lengths[1]))
        expected_mean = sum(sum(part) / len(part) for part in lengths) / 2
        assert metrics["completions/mean_length"] == pytest.approx(expected_mean)


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


def test_fsdp_loads_once_unless_told_not_to(model_loader):
    from selfbudget_pl.strategies import loads_once

    once = make_strategy("fsdp", model=model_loader)
    every = make_strategy("fsdp", model=model_loader, load_from_rank_zero=False)
    assert once.kwargs["sync_module_states"] and callable(once.kwargs["param_init_fn"])
    assert "sync_module_states" not in every.kwargs and "param_init_fn" not in every.kwargs
    assert not loads_once(once)  # one process (no cluster environment yet): no other rank to spare a load


def test_fsdp1_loads_once_on_rank_zero(tmp_path, tiny_cache):
    """strategy=fsdp's default: rank 1 builds the model on the meta device and never reads the checkpoint;
    after wrapping, each rank's weights and buffers are the checkpoint's and lm_head is still embed_tokens."""
    torchrun("fsdp1_load_once_run", str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["loads"] == 1 and not rank0["was_meta"]
    assert rank1["loads"] == 0 and rank1["was_meta"]
    for report in (rank0, rank1):
        assert report["weights_equal_checkpoint"] and report["buffers_equal_checkpoint"], report
        assert report["tied"] and report["tied_in_checkpoint"], report


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


def test_sharded_weights_gather_and_export_like_unsharded(tmp_path, tiny_cache):
    torchrun("fsdp_export_run", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sharded_parameters"] > 0, "fully_shard left every parameter whole"
    assert report["gathered_equals_unsharded"] and report["export_equals_unsharded"]


def test_token_normaliser_counts_every_ranks_tokens_like_one_process(tmp_path, tiny_cache):
    from tests.normaliser_run import LENGTHS, gradients, grpo_module, mini_batch

    torchrun("normaliser_run", str(tmp_path))
    distributed = torch.load(tmp_path / "distributed_grads.pt")
    module = grpo_module()  # one process, no process group: the whole mini-batch at once
    experience = mini_batch(module.model.config.vocab_size)
    expected = gradients(module, experience, module._normaliser(experience))
    assert module._normaliser(experience) == sum(LENGTHS)
    scale = max(float(grad.abs().max()) for grad in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # Each rank dividing by its own tokens (the short completions' rank weighing 4x more per token)
    # is a different step: the comparison above can tell them apart.
    halves = [experience.rows(0, 4), experience.rows(4, 8)]
    per_rank = [gradients(module, half, float(half.completion_mask.sum())) for half in halves]
    wrong = max(float(((a + b) / 2 - expected[name]).abs().max()) for name, a, b in
                ((name, per_rank[0][name], per_rank[1][name]) for name in expected))  # fmt: skip
    assert wrong > 0.05 * scale


def test_vllm_weight_sync_gives_every_rank_the_full_weights_under_fsdp(tmp_path, tiny_cache):
    # FSDP2 fully_shard and the FSDP1 wrapper (Lightning's), each plain and with LoRA: every rank's
    # stand-in engine receives the unsharded (LoRA-merged) weights under the checkpoint's names.
    torchrun("fsdp_weight_sync_run", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(reports[0]) == sorted(reports[1]) == ["fsdp1", "fsdp1_lora", "fsdp2", "fsdp2_lora"]
    for case in reports[0]:
        rank0, rank1 = reports[0][case], reports[1][case]
        assert rank0["digest"] == rank1["digest"], f"{case}: the ranks' engines hold different weights"
        for report in (rank0, rank1):
            checks = {key: value for key, value in report.items() if key != "digest"}
            assert all(checks.values()), f"{case}: {checks}"


def test_hf_rollouts_from_a_sharded_policy_match_the_unsharded_model(tmp_path, tiny_cache):
    # FSDP1 (fp32 and bfloat16 mixed precision) and FSDP2: greedy completions on each rank, through the
    # HF backend, equal the unsharded model's; the inner model's generate alone (the old call) fails.
    torchrun("fsdp_rollout_run", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert sorted(report) == ["fsdp1", "fsdp1_bf16", "fsdp2"]
        assert "clipped_to_max_grad_norm" in report["fsdp1"]
        for case, checks in report.items():
            checks = {key: value for key, value in checks.items() if key != "inner_generate_error"}
            assert all(checks.values()), f"{case}: {checks}"
            assert checks["inner_generate_fails"], f"{case}: the unfixed call worked, so the test shows nothing"
            if case != "fsdp1_bf16":
                assert checks["after_step"] and checks["weights_moved"], case


# -- FSDP2: ModelParallelStrategy + fully_shard (runs on CPU over gloo) ------------------------------------


def run_fsdp2(kind: str, output_dir: Path, *overrides: str) -> dict[str, list[dict]]:
    """Run tests/fsdp2_run.py on two torchrun CPU ranks; return every run's per-rank reports by run name."""
    torchrun("fsdp2_run", kind, str(output_dir), *overrides)
    names = sorted({path.name.split(".rank")[0] for path in output_dir.glob("*.rank0.json")})
    return {name: [json.loads((output_dir / f"{name}.rank{r}.json").read_text()) for r in (0, 1)] for name in names}


def export_difference(left: Path, right: Path) -> float:
    """Largest absolute difference between two exports' weights (they must hold the same tensors)."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(left).state_dict()
    b = AutoModelForCausalLM.from_pretrained(right).state_dict()
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def assert_fsdp2(reports: list[dict]) -> None:
    assert [r["strategy"] for r in reports] == ["FSDP2Strategy"] * 2
    assert all(r["sharded"] for r in reports), "configure_model left the policy unsharded"


def test_fsdp2_sft_ranks_agree_and_match_ddp(tmp_path, tiny_cache):
    # Activation checkpointing on (tests/fsdp2_run.py): sharded, recomputed layers train like DDP's.
    # Validation (no-grad generation through the root) after every step, between the training forwards.
    runs = run_fsdp2("sft", tmp_path, "trainer.max_steps=3", "trainer.val_check_interval=1",
                     "trainer.limit_val_batches=1")
    fsdp2, ddp = runs["sft"], runs["ddp"]
    assert_fsdp2(fsdp2)
    assert_ranks_agree(fsdp2, steps=3, synced=["val/loss", "train/loss"])
    assert fsdp2[0]["weights_sha256"] != fsdp2[0]["initial_sha256"]
    assert [r["examples"] for r in fsdp2] == [r["examples"] for r in ddp]
    # Same data, same steps: the sharded run ends where DDP does (up to float summation order).
    assert export_difference(tmp_path / "sft" / "export", tmp_path / "ddp" / "export") < 1e-6
    checkpoint = tmp_path / "sft" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").exists()  # one shard file per rank

    # bfloat16 mixed precision: after the last validation the root unit still holds its gathered
    # bfloat16 copies; the export must be the float32 parameters, not those.
    bf16 = runs["bf16"]
    assert_fsdp2(bf16)
    assert_ranks_agree(bf16, steps=3, synced=["val/loss", "train/loss"])
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "export", dtype="auto").state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    rounded = [key for key, tensor in exported.items() if torch.equal(tensor, tensor.bfloat16().float())]
    assert not rounded, f"exported bfloat16-rounded weights: {rounded}"


def test_fsdp2_grpo_ranks_agree_match_ddp_and_resume_from_the_sharded_checkpoint(tmp_path, tiny_cache):
    # rollout.decoder=generate: the fused sampler refuses sharded parameters, so DDP would otherwise
    # sample with another loop (other random draws) and the runs could not be compared.
    # beta > 0: a frozen reference model, sharded by the same plan, in the loss and the checkpoint.
    runs = run_fsdp2("grpo", tmp_path, "model.name_or_path=null", "trainer.val_check_interval=2",
                     "trainer.limit_val_batches=1", "module.micro_batch_size=2", "rollout.decoder=generate",
                     "module.beta=0.04")
    full, part, resumed, ddp = runs["full"], runs["part"], runs["resumed"], runs["ddp"]
    for reports in (full, part, resumed):
        assert_fsdp2(reports)
        assert all(r["reference_sharded"] for r in reports)
    # Manual optimization: manual_backward inside training_step, which FSDP1 cannot run.
    assert_ranks_agree(full, steps=2, synced=["rewards/mean", "rewards/std", "train/loss", "train/entropy", "train/kl",
                                              "completions/mean_length", "rewards/even_tokens/mean"])
    assert full[0]["weights_sha256"] != full[0]["initial_sha256"], "GRPO took no step"
    assert [r["examples"] for r in ddp] == [r["examples"] for r in full]
    one_step = export_difference(tmp_path / "full" / "export", tmp_path / "part" / "export")
    assert export_difference(tmp_path / "full" / "export", tmp_path / "ddp" / "export") < 0.01 * one_step

    # Stopped after step 1: each rank wrote its shard; the resumed run starts from those weights and
    # ends bitwise where the uninterrupted run did, having trained on the batches it had not seen.
    checkpoint = tmp_path / "part" / "checkpoints" / "step_step=1.ckpt"
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in checkpoint.iterdir()}
    from torch.distributed.checkpoint import FileSystemReader

    saved = list(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert any("layers.0" in key for key in saved)
    # The reference is not saved: the resumed run rebuilt it from the base checkpoint, and its KL term
    # still gives the uninterrupted run's weights (below).
    assert not [key for key in saved if "ref_model" in key]
    assert part[0]["global_step"] == 1 and resumed[0]["global_step"] == 2
    for rank in (0, 1):
        assert resumed[rank]["initial_sha256"] == part[rank]["weights_sha256"]
        assert resumed[rank]["weights_sha256"] == full[rank]["weights_sha256"]
        assert part[rank]["examples"] + resumed[rank]["examples"] == full[rank]["examples"]
    assert resumed[0]["export_sha256"] == full[0]["export_sha256"]


def test_fsdp2_strategy_settings(model_loader):
    from lightning.pytorch.strategies import ModelParallelStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    strategy = make_strategy(
        "fsdp2", model=model_loader, activation_checkpointing=True, reshard_after_forward=False,
        mixed_precision={"param_dtype": "bfloat16", "reduce_dtype": "float32", "output_dtype": None},
    )  # fmt: skip
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._tensor_parallel_size == 1 and strategy._data_parallel_size == "auto"  # all ranks, at setup
    assert strategy._save_distributed_checkpoint
    plan = strategy.parallelize
    assert plan.layers == (Qwen2DecoderLayer,) and plan.activation_checkpointing and not plan.reshard_after_forward
    assert (plan.param_dtype, plan.reduce_dtype, plan.output_dtype) == (torch.bfloat16, torch.float32, None)
    with pytest.raises(ValueError, match="buffer_dtype"):
        make_strategy("fsdp2", model=model_loader, mixed_precision={"buffer_dtype": "bfloat16"})
    with pytest.raises(NotImplementedError, match="cpu_offload"):
        make_strategy("fsdp2", model=model_loader, cpu_offload=True)


def test_fsdp2_yaml_composes_with_its_trainer(tmp_path, model_loader):
    from hydra import compose, initialize_config_dir

    from selfbudget_pl.strategies import FSDP2Strategy

    cfg = compose_small("grpo_toy", tmp_path, "strategy=fsdp2")
    strategy = instantiate(cfg.strategy, model=model_loader)
    assert isinstance(strategy, FSDP2Strategy) and strategy.parallelize.param_dtype == torch.bfloat16
    with initialize_config_dir(str(REPO_ROOT / "configs"), version_base="1.3"):
        gpu = compose("train", overrides=["experiment=grpo_math", "trainer=fsdp2", "strategy=fsdp2"])
    assert gpu.strategy.name == "fsdp2" and gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "32-true"


def test_grpo_under_fsdp1_is_refused_before_training(tmp_path, tiny_cache):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from selfbudget_pl.strategies import check_strategy_supports
    from selfbudget_pl.train import train

    # Refused by train() before the Trainer exists (Lightning would refuse FSDP on CPU anyway, later).
    with pytest.raises(ValueError, match=r"#19626.*strategy=fsdp2"):
        train(compose_small("grpo_toy", tmp_path, "strategy=fsdp", "strategy.mixed_precision=null"))
    check_strategy_supports(SimpleNamespace(automatic_optimization=True), FSDPStrategy())  # SFT: fine


def test_fsdp_activation_checkpointing_recomputes_sft_layers_without_a_kv_cache(model_loader):
    # Lightning's FSDP1 checkpoint wrappers (strategy=fsdp activation_checkpointing=true) around the decoder
    # layers: SFT's forward, which does not pass use_cache, built a KV cache that the recompute in backward
    # appended to again ("size of tensor a (2L) must match ... (L)"). configure_model turns the cache off.
    from functools import partial
    from types import SimpleNamespace

    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

    from selfbudget_pl.modules.sft import SFTModule

    strategy = make_strategy("fsdp", model=model_loader, activation_checkpointing=True)
    module = SFTModule(model_loader, optimizer=partial(torch.optim.SGD, lr=0.1))
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_model()
    assert module.model.config.use_cache is False
    _setup_activation_checkpointing(module.model, strategy._activation_checkpointing_kwargs)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    module.lm_loss(batch).backward()

    plain = SFTModule(model_loader, optimizer=partial(torch.optim.SGD, lr=0.1))
    plain._trainer = SimpleNamespace(strategy=make_strategy("fsdp", model=model_loader))
    plain.configure_model()
    assert plain.model.config.use_cache is True  # without checkpointing the default stays


def prepare_load_once_checkpoint(output_dir: Path) -> dict:
    """Save tests/fsdp_load_once_run.py's checkpoint in ``output_dir``; return what one process loading it takes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in ("prepare", "single"):
        done = subprocess.run([sys.executable, "-m", "tests.fsdp_load_once_run", str(output_dir), mode],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((output_dir / "single.rank0.json").read_text())


@pytest.mark.slow
def test_fsdp2_loads_once_on_rank_zero_and_exports_streamed(tmp_path):
    """Rank 1 never holds the whole model: its peak while loading and sharding stays well below what one
    process needs to load the model, and the weights it ends with are the checkpoint's."""
    single = prepare_load_once_checkpoint(tmp_path)
    torchrun("fsdp_load_once_run", str(tmp_path), "once")
    rank0, rank1 = (json.loads((tmp_path / f"once.rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank1["was_meta"] and rank0["sharded"] and rank1["sharded"]
    assert rank0["gathered_equals_checkpoint"] and rank0["export_equals_checkpoint"]
    assert rank1["buffers_finite"]
    assert rank1["load_mib"] < 0.6 * single["load_mib"], (rank1, single)  # its shard: half the float32 model
    assert rank0["export_mib"] < 0.5 * single["model_mib"], rank0  # one shard at a time, not two whole copies


@pytest.mark.slow
def test_fsdp1_load_once_keeps_rank_one_below_a_whole_model(tmp_path, monkeypatch):
    """Under FSDP1 too, rank 1 never holds the whole model: FSDP fills one unit at a time from rank 0."""
    single = prepare_load_once_checkpoint(tmp_path)
    # This model's units (~13 MiB) fall under glibc's dynamic mmap threshold (up to 32 MiB), so the buffers
    # each unit frees would stay in the heap and count in the peak; a real model's units are always mmapped.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    torchrun("fsdp1_load_once_run", str(tmp_path), str(tmp_path / "checkpoint"))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank1["loads"] == 0 and rank1["was_meta"]
    for report in (rank0, rank1):
        assert report["weights_equal_checkpoint"] and report["buffers_equal_checkpoint"], report
        assert report["tied"] == report["tied_in_checkpoint"], report
    assert rank1["load_mib"] < 0.6 * single["load_mib"], (rank1, single)  # its shard: half the float32 model
