"""A one-node SLURM cluster on this machine for the launcher tests: munged, slurmctld and slurmd started from
a temporary directory (their own sockets, ports, state and logs; no cgroups: process tracking by
``/proc``, no task plugin), stopped again by their pids. Debian's ``slurm-wlm`` and ``munge`` packages
provide the daemons (``.ci/run`` installs them).

    with slurm_cluster(tmp_path, cpus=2) as env:   # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", "--wait", ...], env=env)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def missing_daemons() -> list[str]:
    """The SLURM and munge programs this machine lacks (empty: a cluster can start)."""
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def write_config(root: Path, cpus: int) -> Path:
    """slurm.conf for one node (this host) with ``cpus`` CPUs, everything under ``root``."""
    host = socket.gethostname()
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=selfbudget-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@contextmanager
def slurm_cluster(root: Path, cpus: int = 2, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yield the environment that reaches them."""
    root.mkdir(parents=True, exist_ok=True)
    conf = write_config(root, cpus)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[subprocess.Popen] = []
    try:
        munge = [_program("munged"), "--foreground", "--force", f"--socket={root / 'munge.socket'}",
                 f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                 f"--seed-file={root / 'munged.seed'}"]  # fmt: skip
        started.append(subprocess.Popen(munge, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: (root / "munge.socket").exists(), timeout, "munged did not create its socket", root)
        for daemon in ("slurmctld", "slurmd"):
            log = (root / "log" / f"{daemon}.out").open("w")
            started.append(subprocess.Popen([_program(daemon), "-D", "-f", str(conf)], env=env, stdout=log,
                                            stderr=subprocess.STDOUT))
        _wait(lambda: _node_idle(env), timeout, "the node did not become idle", root)
        yield env
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _node_idle(env: dict[str, str]) -> bool:
    result = subprocess.run([_program("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip() == "idle"


def _wait(ready, timeout: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {path.name}\n{path.read_text()[-1500:]}"
                             for path in sorted((root / "log").glob("*")))
            raise RuntimeError(f"{what} within {timeout:.0f} s; logs:\n{logs}")
        time.sleep(0.5)
