"""The agent harness under MPI: `mpiexec -n N python -m agent run` on a fresh queue (tests/mpi and others)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

from devtools.clowder_standin import ClowderStandin
from helpers.agent_harness import REPO, AgentHarness


class MpiHarness(AgentHarness):
    """AgentHarness plus `mpiexec -n N python -m agent run`."""

    mpiexec = "mpiexec"

    def start_mpi(self, ranks: int, *args: str, launcher_args: tuple = (), **env):
        log_path = str(self.tmp / f"agent-{len(self.procs)}.log")
        self.logs.append(log_path)
        full_env = self.env(**env)
        full_env["PATH"] = os.path.dirname(self.mpiexec) + os.pathsep + full_env.get("PATH", "")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([self.mpiexec, *launcher_args, "-n", str(ranks), sys.executable, "-m", "agent",
                                     "run", *args], env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_exit(self, proc, timeout: float = 60) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mpiexec did not exit within {timeout}s; log:\n{self.log_text()}")

    def rank_pids(self) -> dict[int, int]:
        """World rank -> pid of its agent process, from the ranks' start-up lines."""
        found = re.findall(r"rank (\d+) of \d+ \(pid (\d+)\)", self.log_text())
        return {int(r): int(p) for r, p in found}

    def consumers(self) -> int:
        return self.ch.queue_declare(self.queue, durable=True, passive=True).method.consumer_count

    def unprocessed(self, ids):
        return [f for f in ids if not self.standin.metadata_for(f)]


@contextlib.contextmanager
def mpi_harness(rabbitmq, mpi, amqp_queue, tmp_path):
    """An MpiHarness on a fresh queue with its own Clowder stand-in (also for other test modules)."""
    with ClowderStandin() as standin:
        h = MpiHarness(rabbitmq, amqp_queue, standin, tmp_path)
        h.mpiexec = str(mpi)
        try:
            yield h
        finally:
            h.close()
