"""The simulation: N array tasks (one node each) x R MPI ranks against one RabbitMQ and one Clowder.

What is modelled, per file, on the rank that runs it (costs from calibration.Costs):

1. broker: the file's broker operations (job publish, delivery, ack, status publishes and their
   deliveries) on ONE broker, a single server (one queue is one Erlang process);
   through a relay (source "relay") the file first passes the relay, a single server too;
2. leader (ranks > 1): the node's MPI leader hands the file out, a single server per node, and
   the hand-out takes `leader_handout_s` of polling latency on top;
3. agent: the agent's and the extractor child's CPU per file, then the file's Clowder requests
   on ONE Clowder (`clowder_workers` servers, each request `clowder_service_s`, plus a round trip);
4. work: the extractor's time, drawn from the stated distribution (a sleep, or CPU when
   `work_cpu`, which then competes for the node's or the shared host's cores).

Tasks wait in the scheduler's queue (a stated distribution), take a scheduler slot, start up,
and each rank then takes files until the backlog is dry for `idle_exit` seconds or the walltime
would be passed (a rank starts a file only if the longest file it has seen plus the margin still
fits; a file that would still overrun is handed back at the limit and run again elsewhere). A task
that ends by walltime while work remains is submitted again (what `launcher scale` does).
`mode="dispatch"` runs one job per file instead (the launcher's `dispatch`), same queue waits.

Every shared component is a first-come-first-served server booked when a file reaches it (exact
for one server; with several, a booking never back-fills an earlier gap). On the shared host of
this machine a booking also takes one of its cores, stretched by the share of the cores other
work leaves us (`cpu_share`, measured during each validation run). Approximations, stated: a file's Clowder
requests hold the server back to back; the broker is one server whatever the number of queues;
all files are waiting at time 0 (a backlog); scheduler throughput (job starts per second) is not
limited, which flatters dispatch.
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import simpy

from .calibration import DEFAULT, Costs
from .workload import Dist, fixed

SATURATED = 0.85  # a shared component busier than this fraction of the makespan is the limit
COMPONENTS = ("leader", "broker", "clowder", "relay")


@dataclass(frozen=True)
class Config:
    """One simulated run. Times in seconds."""

    nodes: int = 1
    ranks: int = 1
    files: int = 100
    work: Dist = fixed(1.0)
    work_cpu: bool = False
    queue_wait: Dist = fixed(0.0)
    task_waits: tuple[float, ...] = ()  # measured first queue wait per array index (validation); else drawn
    walltime: float = 0.0          # per task; 0 = none
    mode: str = "array"            # "array" (resident agents) or "dispatch" (one job per file)
    source: str = "amqp"           # "amqp" (nodes reach the broker) or "relay"
    idle_exit: float = 60.0
    slots: int = 0                 # tasks (array) or jobs (dispatch) running at once; 0 = nodes / nodes*ranks
    host_cores: int = 0            # > 0: broker, Clowder, relay and every node share these cores (this machine)
    cpu_share: float = 1.0         # with host_cores: the share of the cores this run gets (others' load)
    include_startup: bool = True   # False: ranks ready at t=0, timing from the first publish (mpi_scaling)
    seed: int = 1
    costs: Costs = DEFAULT

    def check(self) -> None:
        """Raise ValueError with one readable reason when the configuration makes no sense."""
        if self.nodes < 1 or self.ranks < 1 or self.files < 1:
            raise ValueError("nodes, ranks and files must be >= 1")
        if self.mode not in ("array", "dispatch"):
            raise ValueError(f"mode must be array or dispatch, not {self.mode!r}")
        if self.source not in ("amqp", "relay"):
            raise ValueError(f"source must be amqp or relay, not {self.source!r}")
        if not 0 < self.cpu_share <= 1:
            raise ValueError(f"cpu_share must be in (0, 1], not {self.cpu_share:g}")
        if self.walltime < 0 or self.idle_exit < 0 or self.slots < 0 or self.host_cores < 0:
            raise ValueError("walltime, idle_exit, slots and host_cores must be >= 0")
        if 0 < self.walltime <= self.costs.walltime_margin_s:
            raise ValueError(f"walltime {self.walltime:g} s leaves no time after the "
                             f"{self.costs.walltime_margin_s:g} s margin")


@dataclass
class Result:
    """What one run produced. Rates are averages over the makespan."""

    config: Config
    done: list[int] = field(default_factory=list)       # file ids, in completion order
    handbacks: int = 0
    makespan: float = 0.0
    rank_busy_s: float = 0.0          # rank-seconds of extractor work on files that completed
    allocated_rank_s: float = 0.0     # rank-seconds of allocation (task start to exit)
    tasks_run: int = 0
    peak_connections: int = 0
    busy: dict[str, float] = field(default_factory=dict)  # component -> busy seconds (leader: busiest one)
    done_times: list[float] = field(default_factory=list)
    broker_ops: int = 0
    clowder_requests: int = 0
    relay_files: int = 0

    @property
    def files_per_s(self) -> float:
        return len(self.done) / self.makespan if self.makespan > 0 else 0.0

    @property
    def utilization(self) -> float:
        """Fraction of the allocated rank-time spent in the extractor's work on files that completed."""
        return self.rank_busy_s / self.allocated_rank_s if self.allocated_rank_s > 0 else 0.0

    @property
    def broker_ops_per_s(self) -> float:
        return self.broker_ops / self.makespan if self.makespan > 0 else 0.0

    @property
    def clowder_requests_per_s(self) -> float:
        return self.clowder_requests / self.makespan if self.makespan > 0 else 0.0

    @property
    def relay_load(self) -> float:
        """Files/s through the relay as a fraction of its capacity."""
        if not self.makespan:
            return 0.0
        return self.relay_files / self.makespan / self.config.costs.relay_files_per_s

    @property
    def steady_files_per_s(self) -> float:
        """Files/s between the 10th and the 90th percentile of completions (start-up and tail left out)."""
        times, n = self.done_times, len(self.done_times)
        lo, hi = n // 10, (9 * n) // 10
        if n < 10 or times[hi] <= times[lo]:
            return self.files_per_s
        return (hi - lo) / (times[hi] - times[lo])

    def busy_fraction(self, component: str) -> float:
        """Busy time of a component over the whole makespan (leader: the busiest node's)."""
        return self.busy.get(component, 0.0) / self.makespan if self.makespan > 0 else 0.0

    def load(self, component: str) -> float:
        """Steady files/s x the component's service time per file, over its servers: 1.0 = saturated."""
        cfg, c = self.config, self.config.costs
        running = min(cfg.nodes, cfg.slots or cfg.nodes)
        per_file = {
            "broker": c.broker_ops_per_file / c.broker_ops_per_s,
            "clowder": c.clowder_requests_per_file * c.clowder_service_s / max(1, c.clowder_workers),
            "relay": 1.0 / c.relay_files_per_s if cfg.source == "relay" else 0.0,
            "leader": c.leader_cpu_s / running if cfg.ranks > 1 and cfg.mode == "array" else 0.0,
        }[component]
        return self.steady_files_per_s * per_file

    @property
    def bottleneck(self) -> str:
        """The shared component that limits the run, or "none" when the files' own work does."""
        name = max(COMPONENTS, key=self.load)
        return name if self.load(name) >= SATURATED else "none"


class SimulationStuck(RuntimeError):
    """The configuration can never finish (e.g. every file is longer than the walltime)."""


class _Backlog:
    """The files waiting in the broker (or relay): ids handed out in order, hand-backs go first.

    An idle rank waits for a hand-back; each hand-back wakes one waiting rank (the longest
    waiting), as one redelivery reaches one consumer.
    """

    def __init__(self, env: simpy.Environment, files: int) -> None:
        self.env = env
        self.waiting = deque(range(files))
        self.remaining = files          # not yet completed
        self.idle: deque[list] = deque()  # [event, still waiting] per idle rank

    def take(self) -> Optional[int]:
        return self.waiting.popleft() if self.waiting else None

    def wait(self) -> list:
        """A ticket [event, True]; the rank sets ticket[1] = False when it stops waiting."""
        ticket = [self.env.event(), True]
        self.idle.append(ticket)
        return ticket

    def hand_back(self, file_id: int) -> None:
        self.waiting.appendleft(file_id)
        while self.idle:
            event, alive = self.idle.popleft()
            if alive:
                event.succeed()
                return


class _Server:
    """`k` identical first-come-first-served servers, booked in the order requests arrive."""

    def __init__(self, k: int) -> None:
        self.free = [0.0] * max(1, k)   # a heap of the times each server is next free
        self.busy = 0.0

    def book(self, now: float, seconds: float, host: Optional["_Server"] = None) -> float:
        """Book `seconds` of service from `now` (and a host core alongside); returns the end time."""
        start = max(now, self.free[0])
        if host is not None:
            start = max(start, host.free[0])
            heapq.heapreplace(host.free, start + seconds)
            host.busy += seconds
        heapq.heapreplace(self.free, start + seconds)
        self.busy += seconds
        return start + seconds


class _Sim:
    def __init__(self, cfg: Config) -> None:
        cfg.check()
        self.cfg, self.c = cfg, cfg.costs
        self.env = simpy.Environment()
        self.rng_wait = random.Random(f"{cfg.seed}-wait")
        self.rng_work = random.Random(f"{cfg.seed}-work")
        self.backlog = _Backlog(self.env, cfg.files)
        self.res = Result(cfg)
        self.servers = {"broker": _Server(1), "clowder": _Server(self.c.clowder_workers), "relay": _Server(1)}
        self.host = _Server(cfg.host_cores) if cfg.host_cores else None
        self.slots = simpy.Resource(self.env, cfg.slots or cfg.nodes)
        self.connections = 0
        self.leaders: dict[int, _Server] = {}
        # Durations are drawn per file id, so a handed-back file takes as long the second time.
        self.durations = [cfg.work.sample(self.rng_work) for _ in range(cfg.files)]

    # -- shared components ----------------------------------------------------------------------
    def _use(self, server: Optional[_Server], seconds: float):
        """Wait for and take `seconds` of a server (None: a core of the host, or just the time)."""
        now = self.env.now
        if self.host is not None:
            seconds /= self.cfg.cpu_share  # other work on the shared host stretches every CPU step
        if server is None:
            end = self.host.book(now, seconds) if self.host is not None and seconds > 0 else now + seconds
        else:
            end = server.book(now, seconds, self.host)
        yield self.env.timeout(end - now)

    def _fetch(self, leader: Optional[_Server]):
        """Broker (and relay) work to get one file to a rank, then the leader's hand-out."""
        c = self.c
        if self.cfg.source == "relay":
            self.res.relay_files += 1
            yield from self._use(self.servers["relay"], 1.0 / c.relay_files_per_s)
        self.res.broker_ops += c.broker_ops_per_file
        yield from self._use(self.servers["broker"], c.broker_ops_per_file / c.broker_ops_per_s)
        if leader is not None:
            yield from self._use(leader, c.leader_cpu_s)
            yield self.env.timeout(c.leader_handout_s)

    def _process(self, file_id: int, end: float):
        """Agent CPU, Clowder requests and the extractor's work; False if handed back at `end`."""
        c, env = self.c, self.env
        n = c.clowder_requests_per_file
        self.res.clowder_requests += n
        yield from self._use(self.servers["clowder"], n * c.clowder_service_s)
        work = self.durations[file_id]
        own = c.agent_cpu_s + c.child_cpu_s
        if env.now + own + n * c.clowder_rtt_s + work > end:
            # the walltime hits it: work until the limit, then hand the file back
            yield env.timeout(max(0.0, end - env.now))
            self.backlog.hand_back(file_id)
            self.res.handbacks += 1
            return False
        if self.host is None:  # a cluster node: its own cores, one per rank
            yield env.timeout(own + n * c.clowder_rtt_s + work)
            return True
        yield from self._use(None, own)
        if self.cfg.work_cpu:
            yield from self._use(None, work)
            yield env.timeout(n * c.clowder_rtt_s)
        else:
            yield env.timeout(work + n * c.clowder_rtt_s)
        return True

    def _finish(self, file_id: int) -> None:
        self.res.done.append(file_id)
        self.res.done_times.append(self.env.now)
        self.res.rank_busy_s += self.durations[file_id]
        self.res.makespan = self.env.now
        self.backlog.remaining -= 1

    # -- array mode -----------------------------------------------------------------------------
    def _rank(self, leader: Optional[_Server], end: float):
        """One rank: take files until idle for idle_exit or the walltime; returns True on walltime."""
        env, cfg = self.env, self.cfg
        margin = self.c.walltime_margin_s if cfg.walltime else 0.0
        longest = 0.0
        while True:
            if env.now + longest + margin > end:
                return True
            file_id = self.backlog.take()
            if file_id is None:
                if self.backlog.remaining == 0 and cfg.idle_exit == 0:
                    return False
                ticket = self.backlog.wait()
                idle = env.timeout(cfg.idle_exit)
                yield env.any_of([idle, ticket[0]])
                ticket[1] = False
                if not ticket[0].triggered and not self.backlog.waiting:
                    return False
                continue
            started = env.now
            yield from self._fetch(leader)
            finished = yield from self._process(file_id, end)
            if not finished:
                return True
            self._finish(file_id)
            longest = max(longest, env.now - started)

    def _start_up(self) -> float:
        c, cfg = self.c, self.cfg
        cores = cfg.host_cores * cfg.cpu_share if cfg.host_cores else cfg.ranks
        return c.task_start_s + c.agent_start_s + (c.rank_start_cpu_s * cfg.ranks / cores if cfg.ranks > 1 else 0.0)

    def _task(self, slot: int):
        """One array index: queue wait, slot, start-up, ranks; resubmitted after a walltime end."""
        env, cfg = self.env, self.cfg
        first = True
        while self.backlog.remaining > 0:
            if cfg.include_startup:
                given = first and slot < len(cfg.task_waits)
                yield env.timeout(cfg.task_waits[slot] if given else cfg.queue_wait.sample(self.rng_wait))
                first = False
            with self.slots.request() as req:
                yield req
                began = env.now
                self.res.tasks_run += 1
                if cfg.include_startup:
                    yield env.timeout(self._start_up())
                end = env.now + cfg.walltime if cfg.walltime else math.inf
                self.connections += 1
                self.res.peak_connections = max(self.res.peak_connections, self.connections)
                leader = self.leaders.setdefault(slot, _Server(1)) if cfg.ranks > 1 else None
                done_before = len(self.res.done)
                ranks = [env.process(self._rank(leader, end)) for _ in range(cfg.ranks)]
                outcome = yield env.all_of(ranks)
                self.connections -= 1
                self.res.allocated_rank_s += (env.now - began) * cfg.ranks
                walltime_end = any(outcome.values())
                if walltime_end and len(self.res.done) == done_before:
                    raise SimulationStuck(f"a task of {cfg.walltime:g} s walltime finished no file: "
                                          "files are longer than the walltime allows")
                if not walltime_end:  # idle exit: the backlog was dry
                    return

    # -- dispatch mode --------------------------------------------------------------------------
    def _job_slot(self):
        """One of the launcher's open jobs (--max-jobs): job after job, one file each, same waits."""
        env, c = self.env, self.c
        while True:
            file_id = self.backlog.take()
            if file_id is None:
                return
            yield env.timeout(self.cfg.queue_wait.sample(self.rng_wait))
            began = env.now
            self.res.tasks_run += 1
            yield env.timeout(c.dispatch_job_s)
            yield from self._fetch(None)
            yield from self._process(file_id, math.inf)
            self._finish(file_id)
            self.res.allocated_rank_s += env.now - began

    def run(self) -> Result:
        cfg = self.cfg
        if cfg.mode == "array":
            for slot in range(cfg.nodes):
                self.env.process(self._task(slot))
        else:
            self.res.peak_connections = 1  # the launcher holds the broker connection
            for _ in range(min(cfg.files, cfg.slots or cfg.nodes * cfg.ranks)):
                self.env.process(self._job_slot())
        self.env.run()
        if cfg.source == "relay" and cfg.mode == "array":
            self.res.peak_connections = 1  # only the relay talks to the broker
        self.res.busy = {name: server.busy for name, server in self.servers.items()}
        self.res.busy["leader"] = max((s.busy for s in self.leaders.values()), default=0.0)
        return self.res


def simulate(cfg: Config) -> Result:
    """Run one configuration to the end (every file done) and return what it measured."""
    return _Sim(cfg).run()
