"""Grading worker processes: math-verify runs there, one item at a time per worker, each under its own
deadline.

Workers are plain subprocesses (``python -c`` importing :mod:`~selfbudget_pl.rewards.verify_worker`),
not ``multiprocessing`` children: those re-import the caller's ``__main__`` (which fails for a script
read from standard input, and costs a torch import for ``train.py``). Each item gets its own time limit
inside the worker (an interval timer) and a hard deadline here; a worker past its hard deadline
(wedged in C code the timer cannot interrupt) is killed and replaced, and only its own item is lost.
So one hostile item costs one worker at most its deadline, never the batch's other items.

A pool that cannot start (workers exiting or silent before they are ready, ``max_failed_starts``
times in a row) raises :class:`GraderUnavailableError` naming the cause: a verdict that could not be
computed is never reported as a wrong answer.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Optional

from selfbudget_pl.rewards.verify_worker import VerifySettings

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding selfbudget_pl


class GraderUnavailableError(RuntimeError):
    """The grading workers could not be started, so answers cannot be graded."""


@dataclass
class _Worker:
    process: subprocess.Popen
    connection: Connection
    stderr: IO[bytes]
    started_at: float
    ready: bool = False
    job: Optional[int] = None  # index of the item in flight
    deadline: float = field(default=float("inf"))

    def stderr_tail(self, limit: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", errors="replace")[-limit:].strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.connection.close()
        self.stderr.close()


class GradingPool:
    """``workers`` grading processes.

    Args:
        workers: processes (>= 1).
        memory_limit_mb: address-space limit per worker (a memory bomb fails as MemoryError); 0 = none.
        warm_up: workers grade a few relations, sets and functions before they report ready.
        startup_timeout_s: how long a worker may take to import math-verify and warm up.
        kill_grace_s: beyond an item's own time limit, how long before its worker is killed.
        max_failed_starts: workers that die or stay silent before they are ready, in a row, before
            :class:`GraderUnavailableError`.
    """

    # The worker's program; a class attribute so tests can substitute a misbehaving worker.
    worker_code = "from selfbudget_pl.rewards.verify_worker import main; main()"

    def __init__(
        self,
        workers: int,
        memory_limit_mb: Optional[int] = 4096,
        warm_up: bool = True,
        startup_timeout_s: float = 60.0,
        kill_grace_s: float = 1.0,
        max_failed_starts: int = 3,
    ) -> None:
        if workers < 1:
            raise ValueError(f"GradingPool: `workers` must be >= 1, got {workers}.")
        self.size = workers
        self.memory_limit_mb = int(memory_limit_mb or 0)
        self.warm_up = warm_up
        self.startup_timeout_s = startup_timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_failed_starts = max_failed_starts
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self.restarts = 0  # workers replaced after missing an item's hard deadline or dying on it
        self.torch_in_workers = False  # whether any worker found torch imported (it should not)

    # -- lifecycle ------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_end, child_end = socket.socketpair()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, environment.get("PYTHONPATH")]))
        stderr = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", self.worker_code, str(child_end.fileno()), str(self.memory_limit_mb),
                 "1" if self.warm_up else "0"],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, env=environment, close_fds=True,
            )
        except OSError as error:
            parent_end.close()
            stderr.close()
            raise GraderUnavailableError(f"GradingPool: cannot start a grading worker ({sys.executable}): {error}") from error
        finally:
            child_end.close()
        return _Worker(process, Connection(parent_end.detach()), stderr, time.monotonic())

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        fresh = self._spawn()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _failed_start(self, worker: _Worker, why: str) -> None:
        self._failed_starts += 1
        if self._failed_starts >= self.max_failed_starts:
            tail = worker.stderr_tail()
            self.close()
            raise GraderUnavailableError(
                f"GradingPool: {self._failed_starts} grading workers in a row failed to start ({why}); "
                f"answers cannot be graded. Worker command: {sys.executable} -c {self.worker_code!r}. "
                f"Last worker's stderr:\n{tail or '(empty)'}"
            )
        self._replace(worker)

    def start(self) -> None:
        """Start the workers and wait until each is ready (raises :class:`GraderUnavailableError`)."""
        self.run([], VerifySettings(), wait_until_ready=True)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    @property
    def started(self) -> bool:
        return bool(self._workers)

    # -- grading --------------------------------------------------------------------------------

    def run(
        self, jobs: list[tuple[str, str, float]], settings: VerifySettings, wait_until_ready: bool = False
    ) -> list[Optional[bool]]:
        """Verdicts of ``(prediction, gold, timeout_s)`` jobs, in order; None where a job ran out of time
        (its worker's timer fired, or the worker was killed at the hard deadline or died on it).
        Returns as soon as every job has its verdict: a replacement worker still starting finishes in the
        background (unless ``wait_until_ready``)."""
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        results: list[Optional[bool]] = [None] * len(jobs)
        queue = collections.deque(range(len(jobs)))
        while (
            queue
            or any(worker.job is not None for worker in self._workers)
            or (wait_until_ready and not all(worker.ready for worker in self._workers))
        ):
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.job is None and queue:
                    index = queue.popleft()
                    prediction, gold, timeout_s = jobs[index]
                    try:
                        worker.connection.send((prediction, gold, timeout_s, settings))
                    except OSError:  # died between items: replace it and requeue the job
                        queue.appendleft(index)
                        self._replace(worker)
                        continue
                    worker.job, worker.deadline = index, now + timeout_s + self.kill_grace_s
            deadlines = [w.deadline if w.ready else w.started_at + self.startup_timeout_s for w in self._workers]
            readable = wait([w.connection for w in self._workers], timeout=max(0.0, min(deadlines) - now))
            for worker in list(self._workers):
                if worker.connection in readable:
                    self._receive(worker, results)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.job is not None and now > worker.deadline:
                    worker.job = None  # its item stays None: out of time
                    self.restarts += 1
                    self._replace(worker)
                elif not worker.ready and now > worker.started_at + self.startup_timeout_s:
                    self._failed_start(worker, f"not ready within {self.startup_timeout_s:.0f} s")
        return results

    def _receive(self, worker: _Worker, results: list[Optional[bool]]) -> None:
        try:
            message = worker.connection.recv()
        except (EOFError, OSError):
            if not worker.ready:
                self._failed_start(worker, f"exited with code {worker.process.wait()} before it was ready")
            else:  # died (on its item: a crash in C code): that item is out of time, the worker replaced
                worker.job = None
                self.restarts += 1
                self._replace(worker)
            return
        if not worker.ready:
            worker.ready, self._failed_starts = True, 0
            self.torch_in_workers |= bool(message[1])
            return
        if worker.job is not None:
            results[worker.job] = message
            worker.job, worker.deadline = None, float("inf")
