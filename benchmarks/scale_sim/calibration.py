"""Every constant the scale model uses, in one place, each with where its number came from.

Costs are per file unless named otherwise. "Measured here" means on this project's 2-core
machine; `python benchmarks/scale_model.py calibrate` re-measures the broker, the Clowder stand-in
and the local Slurm's start latency and prints the values to put here. CPU costs are idle-machine
costs: a probe run while others loaded the machine is scaled by our share of the cores then,
cores / (cores + other load), the same correction the validation applies the other way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Costs:
    """Calibrated costs; replace() a field to ask "what if" (the CLI's --set NAME=VALUE)."""

    # -- agent, per file ------------------------------------------------------------------------
    agent_cpu_s: float = 0.36e-3
    child_cpu_s: float = 0.96e-3
    clowder_requests_per_file: int = 3
    # -- MPI leader (one per node): broker I/O, acks, status relay, hand-out to ranks -----------
    leader_cpu_s: float = 0.57e-3
    leader_handout_s: float = 0.028
    # -- broker ---------------------------------------------------------------------------------
    broker_ops_per_file: int = 11
    broker_ops_per_s: float = 40236.0
    # -- Clowder --------------------------------------------------------------------------------
    clowder_workers: int = 1
    clowder_service_s: float = 0.689e-3
    clowder_rtt_s: float = 0.0
    # -- relay ----------------------------------------------------------------------------------
    relay_files_per_s: float = 1030.0
    # -- start-up and scheduler -----------------------------------------------------------------
    agent_start_s: float = 0.31
    rank_start_cpu_s: float = 0.63
    task_start_s: float = 0.01
    dispatch_job_s: float = 4.7
    walltime_margin_s: float = 20.0

    def with_overrides(self, pairs: dict[str, float]) -> "Costs":
        """A copy with some fields replaced (names checked; ints stay ints)."""
        known = {f.name: f.type for f in fields(self)}
        changes = {}
        for name, value in pairs.items():
            if name not in known:
                raise KeyError(name)
            changes[name] = int(value) if known[name] in ("int", int) else float(value)
        return replace(self, **changes)


# Where each number came from (printed under every result table, so results carry their inputs).
SOURCES: dict[str, str] = {
    "agent_cpu_s": "benchmarks/results/agent_throughput.md (2026-12-02 01:07 run; reruns at 01:35 and 02:03 gave "
                   "0.39 and 0.53 ms): agent process CPU per file, one slot, wordcount extractor, lean stand-in",
    "child_cpu_s": "benchmarks/results/agent_throughput.md: the extractor process's CPU per file in the same run",
    "clowder_requests_per_file": "pyclowder _process_message: file-info GET, blob GET, then the extractor's "
                                 "metadata POST (FACTS.md); counted on the stand-in by `validate`",
    "leader_cpu_s": "benchmarks/results/agent_throughput.md: the MPI leader's (rank 0's) CPU per file, 2 ranks, its own "
                    "extractor lane included (caps one leader near 1,750 files/s)",
    "leader_handout_s": "benchmarks/results/mpi_scaling.md (2026-12-02 01:18, 24 files per rank of 0.5 s): 4 ranks "
                        "+29 ms and 8 ranks +27 ms per file over 1 rank: a rank's result to its next file "
                        "(the ranks' and the leader's poll back-off), a wait, not CPU",
    "broker_ops_per_file": "job publish + delivery + ack, 4 status publishes + their 4 deliveries to Clowder "
                           "(README: four status messages per file)",
    "broker_ops_per_s": "`scale_model.py calibrate` 2026-12-02 01:22: persistent publish + delivery + ack on one "
                        "queue of the shared RabbitMQ 3.10.8, operations/s, idle-corrected (other load ~0.03 cores)",
    "clowder_workers": "the Clowder stand-in is one Python process (GIL): one request at a time",
    "clowder_service_s": "`scale_model.py calibrate` 2026-12-02 01:22: 1 / the stand-in's requests/s under 4 "
                         "concurrent clients (file-info GET), idle-corrected; a real Clowder: measure yours and "
                         "--set clowder_service_s=",
    "clowder_rtt_s": "`scale_model.py calibrate`: one client's median request time (idle-corrected) minus the "
                     "service time; 0 here: one client is faster than the 4-client rate (GIL contention)",
    "relay_files_per_s": "benchmarks/results/relay_throughput.md (2026-12-02 16:16, login-node layout: the relay alone on "
                         "a core, as on a cluster; agents staging ahead, small files inline with their lease): the relay's "
                         "CPU per file with real agents, median of the three cases 0.97 ms = 1,030 files/s per relay core "
                         "(co-located with the agents it spends 0.97-1.33 ms; under 2,000 virtual agents, which fetch "
                         "every file through the relay, 1.32 ms = 755 files/s per core the same session: relay_load.md)",
    "agent_start_s": "benchmarks/results/agent_throughput.md (2026-12-02 01:07): first result 0.30-0.31 s after the agent starts",
    "rank_start_cpu_s": "benchmarks/results/mpi_scaling.md (2026-12-02 01:18): 64 ranks ready after 20.3 s on 2 cores "
                        "(20.3 x 2 / 64 core-seconds per rank)",
    "task_start_s": "`scale_model.py calibrate`: local Slurm, a one-task array over one 0 s file: its job "
                    "script's first line to the first result, minus agent_start_s (the queue wait before that "
                    "line is the run's input)",
    "dispatch_job_s": "benchmarks/launcher_dispatch_vs_array.results.md: ~4.7 s of wall time per job per CPU "
                      "(scheduling, start, Python start-up, the launcher's polling)",
    "walltime_margin_s": "README: AGENT_WALLTIME_MARGIN default, 5% of walltime, at least 20 s",
}

DEFAULT = Costs()
