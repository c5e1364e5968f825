"""The process-group variables vLLM's external launcher reads come from the Trainer's own ranks, however the
process was launched (here: SLURM's srun environment, read by Lightning's SLURMEnvironment, which sets no
RANK or LOCAL_RANK); a launch that lacks a variable, or started a different number of processes than
trainer.devices x trainer.num_nodes, is refused in one sentence."""

from __future__ import annotations

import os

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from selfbudget_pl.schema import ConfigError
from selfbudget_pl.launcher_env import check_process_count, export_process_group_env, process_group_env

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def srun_task(monkeypatch, procid: int, ntasks: int, **extra: str) -> None:
    """The environment srun gives task ``procid`` of a one-node job (and nothing torchrun would set)."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = {"SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
           "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "grpo",
           "SLURM_NODELIST": "node7", "SLURM_STEP_NODELIST": "node7", **extra}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def cpu_trainer(devices: int = 2) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp", logger=False, enable_checkpointing=False)


def test_a_srun_task_gets_the_ranks_vllm_reads(monkeypatch):
    srun_task(monkeypatch, procid=1, ntasks=2, SLURM_NTASKS_PER_NODE="2")
    trainer = cpu_trainer()
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    env = export_process_group_env(trainer)
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node7", "MASTER_PORT": str(15000 + 4321)}
    assert {name: os.environ[name] for name in env} == env
    check_process_count(2, 1)  # two tasks for trainer.devices=2: nothing to say


def test_a_task_count_other_than_devices_times_nodes_is_named(monkeypatch):
    # Lightning would raise from inside the Trainer on every rank: here it is one sentence before it.
    srun_task(monkeypatch, procid=0, ntasks=3, SLURM_NTASKS_PER_NODE="3")
    with pytest.raises(ConfigError, match=r"started 3 processes \(SLURMEnvironment\), but trainer.devices=2 x "
                                          r"trainer.num_nodes=1 is 2: make the SLURM job's --ntasks-per-node"):
        check_process_count(2, 1)
    check_process_count([0, 1, 2], 1)


def test_a_launcher_environment_that_lacks_a_variable_is_named(monkeypatch):
    srun_task(monkeypatch, procid=0, ntasks=2, SLURM_NTASKS_PER_NODE="2")
    trainer = cpu_trainer()
    monkeypatch.delenv("SLURM_LOCALID")
    with pytest.raises(ConfigError, match="the launcher's environment lacks SLURM_LOCALID, which Lightning's "
                                          "SLURMEnvironment reads"):
        process_group_env(trainer)


def test_several_srun_tasks_of_a_single_device_run_are_refused(monkeypatch):
    # trainer.devices=1 builds no process group, yet srun started two copies: each would train alone.
    srun_task(monkeypatch, procid=0, ntasks=2, SLURM_NTASKS_PER_NODE="2")
    with pytest.raises(ConfigError, match=r"started 2 processes \(SLURMEnvironment\), but trainer.devices=1"):
        check_process_count(1, 1)
    # --ntasks alone, which Lightning's SLURMEnvironment refuses with a traceback on every rank.
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(ConfigError, match=r"SLURM started 2 tasks from --ntasks alone.*--ntasks-per-node=2"):
        check_process_count(2, 1)


def test_torchrun_with_more_processes_than_devices_is_refused(monkeypatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "GROUP_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"started 4 processes \(TorchElasticEnvironment\).*torchrun's"):
        check_process_count(2, 1)
