"""GRPO with a vLLM engine on every rank, launched the ways users launch it: Lightning's own launcher
(``python train.py ... trainer.devices=2``, DDP and FSDP2) and ``torchrun --nproc-per-node 2 train.py ...``,
on two CPU processes (gloo), the tiny model and vLLM's CPU build with a small KV cache. No launcher sets
anything for the test: train.py and Lightning do what they do for users.

``sbatch --wait scripts/slurm_grpo.sbatch`` (the file users submit, its GPU request and variables
overridden for CPUs) on a real one-node SLURM started by the test (:mod:`tests.slurm_cluster`).

Each run: both ranks end on the same weights, rewards and losses are finite, each rank's own engine sampled
for its own share of the prompts (the ranks' problems are disjoint), and a checkpoint saved under the launcher
resumes under it. The vLLM suite runs these (`pytest -m vllm`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from .conftest import REPO_ROOT
from .slurm_cluster import missing_daemons, slurm_cluster
from .test_distributed import free_port
from .test_vllm_engine import require_vllm

pytestmark = pytest.mark.vllm

STEPS = 2
BATCH = 2  # prompts per rank per step
GENERATIONS = 2


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    require_vllm()


# What the sbatch script sets from its variables and the allocation; the other launchers take them as overrides.
LAUNCH = ["experiment=grpo_toy", "trainer=cpu", "trainer.devices=2"]


def grpo_overrides(out: Path, *extra: str) -> list[str]:
    """grpo_toy's settings on two CPU ranks with the colocated vLLM engine, shrunk to seconds per step."""
    return [
        "rollout=vllm", "model.name_or_path=null",
        "rollout.dtype=float32", "+rollout.enforce_eager=true", "rollout.max_model_len=512",
        "rollout.cpu_kv_cache_gb=0.125", f"data.batch_size={BATCH}", f"module.num_generations={GENERATIONS}",
        "module.micro_batch_size=4", "module.sampling.max_new_tokens=16", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.every_n_train_steps=1", "module.prefill_fraction=0.0",
        # The untrained model's answers all get the format penalty: a reward they differ on moves the weights.
        "~reward.functions.budget_guided", "~reward.weights",
        "+reward.functions.even_tokens._target_=tests.distributed_run.EvenTokenReward",
        f"paths.log_dir={out}", f"hydra.run.dir={out / 'run'}", f"module.export_dir={out / 'export'}",
        "+callbacks.launch_report._target_=tests.launch_report.LaunchReport",
        f"+callbacks.launch_report.out_dir={out / 'reports'}", *extra,
    ]  # fmt: skip


def launch_env(tiny_cache: Path, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment a user's shell would have: nothing a launcher sets is set by hand."""
    env = {**(base or os.environ), "OMP_NUM_THREADS": "1", "SELFBUDGET_CACHE": str(tiny_cache)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def launch(command: list[str], env: dict[str, str], out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a launcher command from the repository root as a user would; fail with its output's end (and the
    SLURM job's output file, where there is one)."""
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    job_output = "".join(path.read_text()[-6000:] for path in out.glob("slurm-*.out"))
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-6000:], job_output)
    return result


def reports_of(out: Path) -> list[dict]:
    return [json.loads((out / "reports" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def assert_ranks_trained_apart_and_agree(reports: list[dict], steps: int, global_step: int) -> None:
    rank0, rank1 = reports
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert rank0["global_step"] == rank1["global_step"] == global_step
    # vLLM's external launcher read the ranks the Trainer runs on, whatever launched the process.
    for rank, report in enumerate(reports):
        assert report["env"]["RANK"] == report["env"]["LOCAL_RANK"] == str(rank), report["env"]
        assert report["env"]["WORLD_SIZE"] == "2", report["env"]
    assert rank0["weights_sha256"] == rank1["weights_sha256"], "the ranks' weights differ after the step"
    for report in reports:
        assert report["backend"] == "VLLMRolloutBackend" and report["num_syncs"] == steps
        assert report["completions"] == steps * BATCH * GENERATIONS
        # This rank's engine answered exactly this rank's prompts.
        assert sorted(report["rollout_problems"]) == sorted(report["batch_problems"])
        # Rewards and losses are finite (budget metrics are NaN while no completion states a budget).
        trained = {key: value for key, value in report["finite"].items() if key.startswith(("rewards/", "train/"))}
        assert {"train/loss", "rewards/mean"} <= set(trained) and all(trained.values()), report["metrics"]
    assert not set(rank0["batch_problems"]) & set(rank1["batch_problems"]), "both ranks sampled the same prompts"


def train_then_resume(command: Callable[[Path], list[str]], out: Path, env: dict[str, str], *extra: str) -> None:
    """``STEPS`` steps, then one more resumed from the launcher's last checkpoint; ``command(run_dir)`` is the
    launcher's command line up to the Hydra overrides."""
    first, resumed = out / "first", out / "resumed"
    launch([*command(first), *grpo_overrides(first, f"trainer.max_steps={STEPS}", *extra)], env, first)
    assert_ranks_trained_apart_and_agree(reports_of(first), steps=STEPS, global_step=STEPS)
    (checkpoint,) = (first / "run" / "checkpoints").glob("last*.ckpt")
    launch([*command(resumed), *grpo_overrides(resumed, f"trainer.max_steps={STEPS + 1}", f"ckpt_path={checkpoint}",
                                               *extra)], env, resumed)  # fmt: skip
    assert_ranks_trained_apart_and_agree(reports_of(resumed), steps=1, global_step=STEPS + 1)


def test_lightning_launcher_ddp(tmp_path, tiny_cache, model_loader):
    model_loader.path  # built once here: two ranks building it at once would race
    train_then_resume(lambda run: [sys.executable, "train.py", *LAUNCH], tmp_path, launch_env(tiny_cache),
                      "strategy=ddp")


def test_lightning_launcher_fsdp2(tmp_path, tiny_cache, model_loader):
    model_loader.path
    train_then_resume(lambda run: [sys.executable, "train.py", *LAUNCH], tmp_path, launch_env(tiny_cache),
                      "strategy=fsdp2", "strategy.mixed_precision=null")


def test_torchrun(tmp_path, tiny_cache, model_loader):
    model_loader.path
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               "train.py", *LAUNCH]  # fmt: skip
    train_then_resume(lambda run: command, tmp_path, launch_env(tiny_cache), "strategy=ddp")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A one-node, two-CPU SLURM cluster (munged, slurmctld, slurmd) for this module's tests."""
    missing = missing_daemons()
    if missing:
        message = f"SLURM is not installed here (no {', '.join(missing)}): `apt-get install -y slurm-wlm munge`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the SLURM launcher tests: {message}", pytrace=False)
        pytest.skip(message)
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=2) as env:
        yield env


def test_sbatch_the_script_users_submit(tmp_path, tiny_cache, model_loader, slurm):
    model_loader.path

    def sbatch(run: Path) -> list[str]:
        # scripts/slurm_grpo.sbatch as users submit it, its GPU allocation and variables overridden for CPUs.
        return ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                "--time=30", f"--output={run}/slurm-%j.out", f"--export=ALL,VENV={sys.prefix},EXPERIMENT=grpo_toy,"
                "TRAINER=cpu,STRATEGY=ddp", "scripts/slurm_grpo.sbatch"]  # fmt: skip

    for run in ("first", "resumed"):
        (tmp_path / run).mkdir()
    train_then_resume(sbatch, tmp_path, launch_env(tiny_cache, slurm))


def test_srun_tasks_other_than_devices_stop_every_rank_with_one_sentence(tmp_path, tiny_cache, model_loader, slurm):
    model_loader.path
    command = ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", sys.executable, "train.py", "experiment=grpo_toy",
               "trainer=cpu", "trainer.devices=1", "model.name_or_path=null", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=launch_env(tiny_cache, slurm), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    sentence = ("error: the launcher started 2 processes (SLURMEnvironment), but trainer.devices=1 x "
                "trainer.num_nodes=1 is 1")
    assert result.stderr.count(sentence) == 1, result.stderr[-3000:]  # rank 0 says it; both ranks stopped


def test_sft_validation_samples_from_the_weights_it_validates(tmp_path, tiny_cache):
    result = subprocess.run([sys.executable, "-m", "tests.sft_vllm_validation_run", str(tmp_path)], cwd=REPO_ROOT,
                            env=launch_env(tiny_cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # SFT never marks the engine stale itself: validation did, once, and sampled from the trained weights.
    assert report == {"backend": "VLLMRolloutBackend", "num_syncs": 1, "engine_equals_trained": True}
