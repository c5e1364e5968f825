"""The process-group variables a colocated vLLM engine reads, written from the Trainer's own ranks.

vLLM's ``external_launcher`` executor (one engine per training rank) reads ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` and joins the process group at ``MASTER_ADDR``/``MASTER_PORT``, as torchrun sets them.
Lightning's other launchers do not: its subprocess launcher (``python train.py trainer.devices=N``) sets
no ``RANK``, and under SLURM the ranks are ``SLURM_PROCID``/``SLURM_LOCALID``. The Trainer's cluster
environment knows them whichever launcher started the process, so :func:`export_process_group_env`
writes them out before the engine is built. :func:`check_process_count` checks, before the Trainer is
built, that an external launcher started as many processes as the Trainer expects.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from selfbudget_pl.schema import ConfigError

# Job names with which Lightning leaves SLURM alone and starts the processes itself (SLURMEnvironment.detect).
SLURM_INTERACTIVE_JOBS = ("bash", "interactive")


def process_group_env(trainer: Any) -> dict[str, str]:
    """The variables vLLM's external launcher reads, from ``trainer``'s ranks and cluster environment.

    Raises :class:`ConfigError` in one sentence when the launcher's environment lacks a variable the
    cluster environment reads.
    """
    cluster = trainer.strategy.cluster_environment
    try:
        env = {
            "RANK": trainer.global_rank,
            "LOCAL_RANK": trainer.local_rank,
            "WORLD_SIZE": trainer.world_size,
            "LOCAL_WORLD_SIZE": trainer.num_devices,
            "MASTER_ADDR": cluster.main_address,
            "MASTER_PORT": cluster.main_port,
        }
    except KeyError as error:
        raise missing_variable(error, cluster) from error
    return {name: str(value) for name, value in env.items()}


def check_process_count(devices: Any, num_nodes: Any) -> None:
    """Before the Trainer is built: a launcher that starts the processes itself (torchrun, SLURM's srun)
    started ``trainer.devices`` x ``trainer.num_nodes`` of them, or :class:`ConfigError` says what to change.
    (Lightning's own SLURM checks raise from inside the Trainer on every rank, as tracebacks; a single-device
    Trainer would not check at all, and each srun task would train alone.)"""
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1 or not isinstance(num_nodes, int):
        return  # "auto" / -1: Lightning counts the devices itself
    if TorchElasticEnvironment.detect():
        cluster = "TorchElasticEnvironment"
        fix = "torchrun's --nproc-per-node x --nnodes"
        started = TorchElasticEnvironment().world_size()
    elif "SLURM_NTASKS" in os.environ and SLURMEnvironment.job_name() not in SLURM_INTERACTIVE_JOBS:
        # Read as SLURMEnvironment.world_size() reads it: its constructor raises (a traceback per rank)
        # on the very mismatches this names.
        cluster = "SLURMEnvironment"
        fix = "the SLURM job's --ntasks-per-node x --nodes"
        started = int(os.environ["SLURM_NTASKS"])
        if started > 1 and "SLURM_NTASKS_PER_NODE" not in os.environ:
            raise ConfigError(
                f"SLURM started {started} tasks from --ntasks alone, which Lightning refuses: request them with "
                f"--ntasks-per-node={devices} (and --nodes={num_nodes}), as scripts/slurm_grpo.sbatch does"
            )
    else:
        return  # Lightning starts trainer.devices processes itself
    if started != devices * num_nodes:
        raise ConfigError(
            f"the launcher started {started} processes ({cluster}), but trainer.devices={devices} x "
            f"trainer.num_nodes={num_nodes} is {devices * num_nodes}: make {fix} equal trainer.devices x "
            "trainer.num_nodes"
        )


def export_process_group_env(trainer: Any) -> dict[str, str]:
    """Write :func:`process_group_env` into ``os.environ`` (overwriting: the process group the Trainer built is
    the one the engine must join) and return it."""
    env = process_group_env(trainer)
    os.environ.update(env)
    return env


def missing_variable(error: KeyError, cluster: Any) -> ConfigError:
    """The one sentence for a launcher environment that lacks a variable Lightning's cluster environment reads."""
    return ConfigError(
        f"the launcher's environment lacks {error.args[0]}, which Lightning's {type(cluster).__name__} reads to "
        "place this process: launch with `python train.py ...` (Lightning starts the processes), `torchrun`, or "
        "`srun` inside an sbatch allocation, which set it"
    )
