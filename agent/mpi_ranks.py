"""MPI file-per-rank parallelism: one extractor process per rank, one broker connection per leader.

`mpiexec -n N python -m agent run ...` starts N agents. They split into groups (AGENT_MPI_LEADER:
`node`, the default, is one group per node; `allocation` is one group for the whole job; a number
k makes groups of k consecutive ranks, for trying several groups on one machine). In each group:

- the leader (group rank 0) runs the ordinary Runner with the ordinary AMQP source: the group's
  only broker connection. Its slots are lanes (LaneSlot), each one job at a time as the Runner
  expects; a lane's job goes to the least-loaded live rank of the group, the leader included,
  so the Runner's acking, retry, journal and stop decisions are made once for the whole group;
- every other rank runs a RankWorker (its extractor process or processes) and a small loop that
  takes jobs from the leader over MPI and sends the extractor's frames back.

The `slots` setting means extractor processes *per rank* here (default 1: one file at a time per
rank); the leader's Runner gets ranks x slots lanes (x2 with stage-ahead, AGENT_STAGE_AHEAD=1,
where each extractor holds its next file while it works on the current one).

Only the leader's comm thread and the other ranks' main threads call MPI, with non-blocking
sends and probes between short sleeps: a blocking MPI receive spins a core, and 64 spinning
ranks on two cores would starve the extractors. Every wake-up of a thread costs CPU, so a file
costs one MPI message each way: a rank sends a file's statuses with its outcome (holding them at
most STATUS_HOLD), and the leader hands the Runner each message as one call.

Failures. Ranks send heartbeats; a rank silent for AGENT_MPI_RANK_TIMEOUT seconds (or failing
a send) is lost: its files are reported "died" to the Runner (retried like any crash) and the
other ranks take the next files. With MPICH's hydra a killed rank takes the whole job down
instead; nothing is lost either way, since the leader's deliveries are unacknowledged (the
broker requeues them) or journaled (the next agent recovers them). A group that lost a rank, or
a leader that fails outside the Runner, ends the job with MPI_Abort rather than hang in
MPI_Finalize. A rank that loses its leader aborts too.

SIGTERM/SIGINT received by any rank are relayed to the leader, whose Runner drains all lanes at
once: one allocation (group), one decision. Idle exit, message budget and walltime are the
leader's Runner's decisions too.

Several plugins (`--plugin a,b`, agent.runner_group): every rank runs a RankWorker per plugin; a
lane's number says whose (plugin p's lanes are p * LANE_STRIDE + i), and the leader runs one Runner
per plugin, each with its own lanes, over the group's one connection.

Nothing here imports mpi4py unless an MPI launcher started the agent (launched_by_mpi): importing
it initializes MPI, which a plain single-process agent must not do.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from operator import itemgetter
from typing import Any, Callable, NamedTuple, Optional

from hpc_common.redact import Redactor

from . import early_signals, exitcodes, frames
from .config import AgentConfig, setting_from_env
from .errors import ConfigError
from .event_loop import EventLoop
from .frames import Kind
from .rank_worker import RankWorker

log = logging.getLogger("agent.mpi")
TAG = 7177
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_CHILD_DROP_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL", "MV2_", "I_MPI_")
# Poll intervals (s): back off from MIN_POLL after activity. A rank with a free lane may get a
# job any moment; a rank whose lanes are all busy only expects kill/close, and 64 ranks polling
# fast on two cores would take the CPU their extractors need.
MIN_POLL, MAX_POLL_LEADER, MAX_POLL_RANK, MAX_POLL_RANK_FULL = 0.001, 0.005, 0.05, 0.25
# A leader with no job out on another rank expects no frames, only heartbeats, signals and
# (at the start) readiness: it polls at this pace, jobs to send still wake it at once.
MAX_POLL_LEADER_QUIET = 0.05
# A rank that just reported a job's end expects its next job within a few ms (the leader's turn):
# it polls at most this often for JOB_EXPECTED seconds, then backs off as usual.
POLL_JOB_EXPECTED, JOB_EXPECTED = 0.002, 0.03
# A rank holds its extractors' status frames until the job's end (one MPI message per file)
# or STATUS_HOLD seconds, so a long job's statuses still reach Clowder while it runs.
STATUS_HOLD = 0.2
SCAN_EVERY = 0.25   # leader: heartbeat and timeout checks
_STATUS = Kind.STATUS.value  # read once: an enum member's .value is a lookup each time
CLOSE_WAIT = 30.0


def launched_by_mpi(environ: Optional[dict[str, str]] = None, forced: Optional[bool] = None) -> bool:
    """True when an MPI launcher started this process; the `mpi` setting (AGENT_MPI) overrides.

    `forced` is the resolved setting (agent run passes cfg.mpi); without it AGENT_MPI is read from
    `environ` with the settings table's own parser.
    """
    env = os.environ if environ is None else environ
    if forced is None:
        forced = setting_from_env("mpi", env)
    if forced is not None:
        return forced
    return any(env.get(name) for name in LAUNCHER_VARS)


@dataclass(frozen=True)
class MpiSettings:
    """The MPI path's settings (AGENT_MPI_LEADER, AGENT_MPI_RANK_TIMEOUT, AGENT_STAGE_AHEAD in agent.config)."""

    leader: str = "node"          # node | allocation | <ranks per group>
    rank_timeout: float = 60.0    # seconds of silence after which a rank (or the leader) is lost
    stage_ahead: bool = False

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> "MpiSettings":
        """The MPI settings of a resolved (already checked) agent config."""
        return cls(leader=cfg.mpi_leader, rank_timeout=cfg.mpi_rank_timeout, stage_ahead=cfg.stages_ahead())

    @property
    def heartbeat(self) -> float:
        return min(5.0, self.rank_timeout / 4)


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The extractor's environment without the launcher's wiring (PMI_FD belongs to the rank)."""
    return {k: v for k, v in env.items() if not k.startswith(_CHILD_DROP_PREFIXES)}


def _wait_for_everyone(comm: Any) -> None:
    """A barrier that sleeps: ranks still starting get the CPU instead of spinning ranks."""
    req = comm.Ibarrier()
    delay = MIN_POLL
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, MAX_POLL_RANK)


def load_mpi() -> Any:
    """mpi4py's MPI module (importing it initializes MPI); ConfigError naming the extra if missing."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"started by an MPI launcher but mpi4py cannot be imported ({exc}): "
                          "pip install 'clowder-hpc-agent[mpi]' (or set AGENT_MPI=0)") from None
    return MPI


def _group(world: Any, mode: str) -> Any:
    from mpi4py import MPI

    if mode == "allocation":
        return world.Dup()
    if mode == "node":
        return world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    return world.Split(color=world.Get_rank() // int(mode), key=world.Get_rank())


class _RankTag(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_rank_tagged", False):
            record.name = f"rank{self.rank}.{record.name}"
            record._rank_tagged = True  # type: ignore[attr-defined]
        return True


@dataclass(frozen=True)
class RankPlugin:
    """One plugin every rank of the group runs: its extractor's init frame, environment and slots per rank."""

    init: dict[str, Any]
    env: dict[str, str]
    slots: int


#: lanes of plugin p are p * LANE_STRIDE + i on every rank, so a job's lane says whose extractor runs it
LANE_STRIDE = 1 << 20


def join_allocation(cfg: AgentConfig, plugins: list[RankPlugin], redactor: Redactor,
                    make_loop: Optional[Callable[[], EventLoop]] = None) -> "Leader | Follower":
    """Initialize MPI, find this rank's group and role, start every plugin's extractor(s) on this rank.

    make_loop: the agent's event loop, made only on a leader: its own extractors' pipes are read there.
    """
    settings = MpiSettings.from_config(cfg)
    MPI = load_mpi()
    world = MPI.COMM_WORLD
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankTag(world.Get_rank()))
    _wait_for_everyone(world)
    comm = _group(world, settings.leader)
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    log.info("rank %d of %d (pid %d): %s of a group of %d", world.Get_rank(), world.Get_size(), os.getpid(),
             "leader" if comm.Get_rank() == 0 else f"member {comm.Get_rank()}", comm.Get_size())
    member: Leader | Follower
    if comm.Get_rank() == 0:
        if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
            log.error("this MPI library gives no thread support (MPI_THREAD_SERIALIZED needed by the leader)")
            world.Abort(exitcodes.CONFIG_ERROR)
        member = Leader(world, comm, plugins, redactor, settings, make_loop() if make_loop else None)
    else:
        member = Follower(world, comm, plugins, redactor, settings)
    member.start()
    return member


# ---------------------------------------------------------------------------------------------
# The leader: the Runner's slots are lanes; jobs go to ranks.
# ---------------------------------------------------------------------------------------------
class LaneSlot:
    """One Runner slot (an agent.slots.ExtractorSlot): one job at a time, run by whichever rank the leader picks."""

    def __init__(self, index: int, leader: "Leader", plugin: int = 0) -> None:
        self.index = index  # the lane: plugin * LANE_STRIDE + the Runner's slot number
        self.plugin = plugin
        self.busy_with: Any = None
        self.started_at = 0.0
        self.info: Optional[dict[str, Any]] = None
        self._leader = leader

    def start(self) -> None:
        """Nothing to start: the ranks' extractors started when the allocation was joined."""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self.info = self._leader.wait_ready(timeout, self.plugin)
        return self.info

    def assign(self, delivery: Any, body: dict[str, Any], job_number: int) -> None:
        self.busy_with = delivery
        self.started_at = time.monotonic()
        self._leader.assign(self.index, body, job_number)

    def kill(self, reason: Optional[str] = None) -> None:
        """Kill the job on its rank; the rank's "died" frame follows (the reason is the rank's)."""
        self._leader.kill(self.index)

    def close(self) -> None:
        self._leader.close_lane(self.index)


class _LaneCalls(NamedTuple):
    """How a lane's frames reach its Runner: the slot, post (wakes the main thread), quiet (does not)."""

    slot: LaneSlot
    post: Callable[[Callable[[], None]], None]
    quiet: Callable[[Callable[[], None]], None]
    on_frame: Callable[[Any, dict[str, Any]], None]


def _deliver(taken: list[tuple[_LaneCalls, dict[str, Any]]]) -> None:
    """Main thread: hand a batch of frames to their lanes' Runners, in the order they came."""
    for calls, frame in taken:
        calls.on_frame(calls.slot, frame)


@dataclass
class RankRecord:
    """What the leader knows of one rank of its group (rank 0 is the leader itself).

    One record per rank, so a rank's state is read and changed in one place; the leader's lock
    guards load, ready, failed and lost (the main thread and the comm thread both change them).
    """

    load: list[int]                 # per plugin: jobs out on this rank
    last_seen: float                # when it last sent anything (comm thread)
    last_sent: float                # when we last sent it anything (comm thread)
    ready: set[int] = field(default_factory=set)         # plugins whose extractor is ready there
    failed: dict[int, str] = field(default_factory=dict)  # plugins it could not start, with the reason
    lost: Optional[str] = None      # why it was given up on (silent, send or receive failed)
    closed: bool = False            # it acknowledged the close
    jobs_sent: int = 0

    @classmethod
    def new(cls, plugins: int, now: float) -> "RankRecord":
        return cls(load=[0] * plugins, last_seen=now, last_sent=now)

    def usable(self, plugin: int) -> bool:
        """Its extractor for plugin is ready and it has not been lost."""
        return plugin in self.ready and plugin not in self.failed and self.lost is None

    def answered(self, plugin: int) -> bool:
        """It said whether it can run plugin's extractor (or can no longer say anything)."""
        return plugin in self.ready or plugin in self.failed or self.lost is not None


class Leader:
    """Group rank 0: the Runner's lanes, its own extractor(s), and the comm thread for the others."""

    leader = True

    def __init__(self, world: Any, comm: Any, plugins: list[RankPlugin], redactor: Redactor,
                 settings: MpiSettings, loop: Optional[EventLoop] = None) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self._loop = loop
        self.world, self.comm, self.settings = world, comm, settings
        self.size = comm.Get_size()
        self.workers = [RankWorker(p.init, child_env(p.env), redactor, self._local_frame, extractors=p.slots,
                                   stage_ahead=settings.stage_ahead, loop=loop) for p in plugins]
        self.worker = self.workers[0]
        self.lanes_total = self.worker.capacity * self.size
        self._lock = threading.Lock()
        self._lanes: dict[int, LaneSlot] = {}
        self._calls: dict[int, _LaneCalls] = {}
        self._where: dict[int, int] = {}          # lane -> rank running its job
        self._remote_out = 0                      # jobs out on other ranks (comm thread: poll faster)
        n = len(plugins)
        now = time.monotonic()
        self.ranks = [RankRecord.new(n, now) for _ in range(self.size)]
        self._closed_lanes: set[int] = set()
        self._closing = False
        self._answered = [threading.Event() for _ in range(n)]
        self._out: "queue.SimpleQueue[tuple[int, tuple]]" = queue.SimpleQueue()
        self._relay: Optional[int] = None
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._comm_main, name="mpi-comm", daemon=True)
        self.infos: list[Optional[dict[str, Any]]] = [None] * n

    def _others(self) -> list[tuple[int, RankRecord]]:
        """The group's other ranks with their records."""
        return list(enumerate(self.ranks))[1:]

    def _lost_ranks(self) -> list[int]:
        return [rank for rank, rec in self._others() if rec.lost is not None]

    def _still_open(self) -> list[int]:
        """Ranks neither lost nor closed: those the leader still waits for at the end."""
        return [rank for rank, rec in self._others() if rec.lost is None and not rec.closed]

    # -- set-up -----------------------------------------------------------------------------------
    def start(self) -> None:
        atexit.register(self._abort_if_unfinished)
        for worker in self.workers:
            worker.start()
        self._thread.start()
        if self.size == 1:
            for answered in self._answered:
                answered.set()
        log.info("MPI group of %d rank(s) (AGENT_MPI_LEADER=%s): this rank holds the group's broker connection",
                 self.size, self.settings.leader)

    def leader_config(self, cfg: AgentConfig, plugin: int = 0) -> AgentConfig:
        """The plugin's Runner's settings: one slot per lane of the whole group."""
        return dataclasses.replace(cfg, slots=self.workers[plugin].capacity * self.size)

    def make_slot(self, index: int, post: Callable[[Callable[[], None]], None],
                  on_frame: Callable[[Any, dict[str, Any]], None], plugin: int = 0) -> LaneSlot:
        lane = plugin * LANE_STRIDE + index
        slot = LaneSlot(lane, self, plugin)
        self._calls[lane] = _LaneCalls(slot, post, getattr(post, "quiet", post), on_frame)
        self._lanes[lane] = slot
        return slot

    def wait_ready(self, timeout: float, plugin: int = 0) -> dict[str, Any]:
        """This rank's extractor ready, then every other rank ready or failed (up to timeout)."""
        info = self.infos[plugin]
        if info is not None:
            return info
        worker = self.workers[plugin]
        deadline = time.monotonic() + timeout
        if not worker.ready.wait(timeout):
            raise RuntimeError(f"extractor process did not start within {timeout:.0f}s")
        if worker.fatal:
            raise RuntimeError(worker.fatal)
        with self._lock:
            self.ranks[0].ready.add(plugin)
        self._check_answered()
        self._answered[plugin].wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            ready = [rank for rank, rec in enumerate(self.ranks) if plugin in rec.ready]
            failed = {rank: rec.failed[plugin] for rank, rec in enumerate(self.ranks) if plugin in rec.failed}
        for rank, reason in sorted(failed.items()):
            log.error("rank %d cannot run the extractor: %s; the other ranks carry on", rank, reason)
        silent = self.size - len(ready) - len(failed)
        if silent:
            log.warning("%d rank(s) not ready after %.0fs; they get files once they are", silent, timeout)
        log.info("%d of %d rank(s) ready: %d extractor process(es) per rank, %d lane(s)%s", len(ready),
                 self.size, worker.extractors, worker.capacity * self.size,
                 ", stage-ahead on" if worker.stage_ahead else "")
        self.infos[plugin] = worker.info
        return worker.info  # type: ignore[return-value]

    # -- lanes (main thread) --------------------------------------------------------------------
    def _pick(self, plugin: int) -> int:
        """The least-loaded usable rank (the lowest on ties), 0 when none is (lock held)."""
        best, best_load = 0, -1
        for rank, rec in enumerate(self.ranks):
            if rec.usable(plugin) and (best_load < 0 or rec.load[plugin] < best_load):
                best, best_load = rank, rec.load[plugin]
        return best

    def assign(self, lane: int, body: dict[str, Any], number: int) -> None:
        plugin = lane // LANE_STRIDE
        with self._lock:
            rank = self._pick(plugin)
            self._where[lane] = rank
            rec = self.ranks[rank]
            rec.load[plugin] += 1
            rec.jobs_sent += 1
            if rank:
                self._remote_out += 1
        if rank == 0:
            self.workers[plugin].submit(lane, number, body)
        else:
            self._out.put((rank, ("job", lane, number, body)))

    def kill(self, lane: int) -> None:
        with self._lock:
            rank = self._where.get(lane)
        if rank == 0:
            self.workers[lane // LANE_STRIDE].kill(lane)
        elif rank is not None:
            self._out.put((rank, ("kill", lane)))

    def close_lane(self, lane: int) -> None:
        self._closed_lanes.add(lane)
        if self._closing or len(self._closed_lanes) < len(self._lanes):
            return
        self._closing = True
        for worker in self.workers:
            worker.close()
        for rank in range(1, self.size):
            self._out.put((rank, ("close",)))

    # -- frames (worker and comm threads) -----------------------------------------------------------
    def _local_frame(self, lane: int, frame: dict[str, Any]) -> None:
        # With the agent's loop, this rank's extractors are read on its thread, inside its run of
        # posted calls: the frame's call runs in the same run, without a wake-up.
        self._frame(0, lane, frame, on_loop=self._loop is not None)

    def _frame(self, rank: int, lane: int, frame: dict[str, Any], on_loop: bool = False) -> None:
        """One frame of the lane's job, run on rank (rank 0: this rank's own extractors' loop).

        on_loop: the caller is the agent's loop thread, so no frame needs a wake-up.
        """
        with self._lock:
            if not self._owns(rank, lane, frame):
                return
        calls = self._calls[lane]
        # statuses leave with the next outcome: no wake-up each
        post = calls.quiet if on_loop or frame.get(frames.KIND) == _STATUS else calls.post
        post(partial(calls.on_frame, calls.slot, frame))

    def _frames(self, rank: int, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """The frames of one MPI message from rank, in order: one call for the main thread, one wake-up."""
        with self._lock:
            taken = [(lane // LANE_STRIDE, self._calls[lane], frame) for lane, frame in batch
                     if self._owns(rank, lane, frame)]
        for _, group in groupby(taken, itemgetter(0)):  # each plugin's frames go to its own Runner
            run = [(calls, frame) for _, calls, frame in group]
            calls = run[0][0]
            wake = any(frame.get(frames.KIND) != _STATUS for _, frame in run)
            (calls.post if wake else calls.quiet)(partial(_deliver, run))

    def _owns(self, rank: int, lane: int, frame: dict[str, Any]) -> bool:
        """Whether rank still runs lane's job (else the frame is late: the rank was given up on);
        a frame that ends the job frees the lane (lock held)."""
        if self._where.get(lane) != rank:
            return False
        if frames.ends_job(frame):
            del self._where[lane]
            self.ranks[rank].load[lane // LANE_STRIDE] -= 1
            if rank:
                self._remote_out -= 1
        return True

    def _lose(self, rank: int, reason: str) -> None:
        with self._lock:
            rec = self.ranks[rank]
            if rec.lost is not None:
                return
            rec.lost = reason
            lanes = [lane for lane, r in self._where.items() if r == rank]
            for lane in lanes:
                del self._where[lane]
            self._remote_out -= len(lanes)
            rec.load = [0] * len(rec.load)
        log.error("MPI rank %d lost (%s): %d file(s) it held go back for another attempt; the other ranks "
                  "carry on", rank, reason, len(lanes))
        self._check_answered()
        for lane in lanes:
            calls = self._calls[lane]
            calls.post(partial(calls.on_frame, calls.slot, frames.died(f"MPI rank {rank} was lost: {reason}")))

    # -- the comm thread ------------------------------------------------------------------------------
    def _comm_main(self) -> None:
        try:
            self._comm_loop()
        except BaseException:  # noqa: BLE001 - without this thread the group cannot work
            log.exception("MPI communication failed; aborting the MPI job")
            logging.shutdown()
            self.world.Abort(exitcodes.INTERNAL_ERROR)

    def _comm_loop(self) -> None:
        MPI = self._MPI
        status = MPI.Status()
        sends: list[tuple[int, Any]] = []
        carried: Optional[tuple[int, tuple]] = None
        interval = MIN_POLL
        hb = self.settings.heartbeat
        next_scan = 0.0
        while not (self._stop.is_set() and not sends):
            busy = carried is not None
            while True:
                if carried is None:
                    try:
                        carried = self._out.get_nowait()
                    except queue.Empty:
                        break
                dest, msg = carried
                carried = None
                busy = True
                self._send(dest, msg, sends)
            sends = self._completed(sends)
            while True:
                try:
                    message = self.comm.improbe(MPI.ANY_SOURCE, TAG, status)
                except MPI.Exception as exc:
                    log.warning("MPI probe failed: %s", exc)
                    break
                if message is None:
                    break
                src = status.Get_source()
                try:
                    msg = message.recv()
                except MPI.Exception as exc:
                    self._lose(src, f"receive failed: {exc}")
                    continue
                busy = True
                self.ranks[src].last_seen = time.monotonic()
                self._handle(src, msg)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + SCAN_EVERY
                for rank, rec in self._others():
                    if rec.lost is not None or rec.closed:
                        continue
                    if now - rec.last_seen > self.settings.rank_timeout:
                        self._lose(rank, f"no word from it for {self.settings.rank_timeout:g}s")
                    elif now - rec.last_sent >= hb:
                        self._send(rank, ("hb",), sends)
                self._relay_signal()
            cap = MAX_POLL_LEADER if self._remote_out or sends else MAX_POLL_LEADER_QUIET
            interval = MIN_POLL if busy else min(interval * 2, cap)
            try:
                carried = self._out.get(timeout=interval)
            except queue.Empty:
                pass

    def _send(self, dest: int, msg: tuple, sends: list[tuple[int, Any]]) -> None:
        if self.ranks[dest].lost is not None:
            return  # its jobs were already reported died by _lose
        try:
            sends.append((dest, self.comm.isend(msg, dest=dest, tag=TAG)))
            self.ranks[dest].last_sent = time.monotonic()
        except self._MPI.Exception as exc:
            self._lose(dest, f"send failed: {exc}")

    def _completed(self, sends: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        left = []
        for dest, req in sends:
            if self.ranks[dest].lost is not None:
                continue  # abandoned; the job ends with MPI_Abort
            try:
                if not req.Test():
                    left.append((dest, req))
            except self._MPI.Exception as exc:
                self._lose(dest, f"send failed: {exc}")
        return left

    def _handle(self, src: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "frames":
            self._frames(src, msg[1])
        elif kind == "frame":
            self._frame(src, msg[1], msg[2])
        elif kind in ("ready", "fatal"):
            plugin = msg[2] if len(msg) > 2 else 0
            with self._lock:
                if kind == "ready":
                    self.ranks[src].ready.add(plugin)
                else:
                    self.ranks[src].failed[plugin] = msg[1]
            self._check_answered()
        elif kind == "signal":
            log.info("rank %d received %s: stopping the group", src, signal.Signals(msg[1]).name)
            self._relay = msg[1]
        elif kind == "closed":
            self.ranks[src].closed = True

    def _check_answered(self) -> None:
        with self._lock:
            for plugin, answered in enumerate(self._answered):
                if all(rec.answered(plugin) for _, rec in self._others()):
                    answered.set()

    def _relay_signal(self) -> None:
        """A rank's SIGTERM/SIGINT becomes the leader's: the Runner's handler drains every lane."""
        signum = self._relay
        if signum is None or not callable(signal.getsignal(signum)):
            return  # no handler yet (still starting): keep it until the Runner installed one
        self._relay = None
        os.kill(os.getpid(), signum)

    # -- the end ----------------------------------------------------------------------------------------
    def finish(self, code: int) -> int:
        """After the Runner: wait for the ranks to close; abort the job if some cannot."""
        self._finished = True
        if not self._closing:  # the Runner never closed its lanes (it was not built, or failed)
            self._closing = True
            for worker in self.workers:
                worker.close()
            for rank in range(1, self.size):
                self._out.put((rank, ("close",)))
        deadline = time.monotonic() + CLOSE_WAIT
        while time.monotonic() < deadline and self._still_open():
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(10)
        for worker in self.workers:
            worker.join(10)
        missing, lost = self._still_open(), self._lost_ranks()
        if self.size > 1:
            shares = [rec.jobs_sent for rec in self.ranks]
            log.info("files handed out: %d to this rank, %d to %d other rank(s) (%d to %d each)", shares[0],
                     sum(shares[1:]), self.size - 1, min(shares[1:]), max(shares[1:]))
        if lost or missing:
            log.error("ending the MPI job with MPI_Abort (lost rank(s): %s; not closing: %s); every file was "
                      "settled or handed back first", lost or "none", missing or "none")
            logging.shutdown()
            self.world.Abort(code)
        return code

    def _abort_if_unfinished(self) -> None:
        if not self._finished:
            log.error("the leader is exiting without closing its ranks; aborting the MPI job")
            logging.shutdown()
            self.world.Abort(exitcodes.INTERNAL_ERROR)


# ---------------------------------------------------------------------------------------------
# Every other rank: run the jobs the leader sends.
# ---------------------------------------------------------------------------------------------
class Follower:
    """A rank that gets its files over MPI from its group's leader."""

    leader = False

    def __init__(self, world: Any, comm: Any, plugins: list[RankPlugin], redactor: Redactor,
                 settings: MpiSettings) -> None:
        self.world, self.comm, self.settings = world, comm, settings
        self._up: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self.workers = [RankWorker(p.init, child_env(p.env), redactor, self._emit, extractors=p.slots,
                                   stage_ahead=settings.stage_ahead,
                                   on_ready=lambda info, reason, i=i: self._ready(info, reason, i))
                        for i, p in enumerate(plugins)]
        self._signals: list[int] = []

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def leader_config(self, cfg: AgentConfig) -> AgentConfig:  # pragma: no cover - leader only
        return cfg

    def _emit(self, lane: int, frame: dict[str, Any]) -> None:
        self._up.put(("frame", lane, frame))

    def _ready(self, info: Optional[dict[str, Any]], reason: str, plugin: int = 0) -> None:
        self._up.put(("ready", info, plugin) if info is not None else ("fatal", reason, plugin))

    def serve(self) -> int:
        """Run jobs from the leader until it says close; returns this rank's exit code."""
        def on_signal(signum: int, _frame: Any) -> None:
            self._signals.append(signum)
            self._up.put(("wake",))

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for signum in early_signals.take():  # came while this rank was starting
            if signum != signal.SIGUSR1:
                on_signal(signum, None)
        try:
            return self._loop()
        except BaseException:  # noqa: BLE001 - never hang the job in MPI_Finalize
            log.exception("rank failed; aborting the MPI job")
            logging.shutdown()
            self.world.Abort(exitcodes.INTERNAL_ERROR)
            raise

    def _loop(self) -> int:
        from mpi4py import MPI

        status = MPI.Status()
        sends: list[Any] = []
        last_heard = last_sent = time.monotonic()
        interval = MIN_POLL
        hb = self.settings.heartbeat
        carried: Optional[tuple] = None
        # Frames wait here until one ends a job (or STATUS_HOLD passed, or something else leaves):
        # a file's statuses and outcome then make one MPI message, in order with everything else.
        held: list[tuple[int, dict[str, Any]]] = []
        held_since = expect_until = 0.0
        while True:
            busy = carried is not None
            outgoing: list[tuple] = []
            ended = False
            while True:
                if carried is None:
                    try:
                        carried = self._up.get_nowait()
                    except queue.Empty:
                        break
                msg, carried = carried, None
                busy = True
                if msg[0] == "frame":
                    if not held:
                        held_since = time.monotonic()
                    held.append((msg[1], msg[2]))
                    ended = ended or frames.ends_job(msg[2])
                elif msg[0] != "wake":
                    if held:
                        outgoing.append(("frames", held))
                        held = []
                    outgoing.append(msg)
            now = time.monotonic()
            if held and (ended or now - held_since >= STATUS_HOLD):
                outgoing.append(("frames", held))
                held = []
            if ended:
                expect_until = now + JOB_EXPECTED  # the leader hands this lane its next job at once
            for msg in outgoing:
                sends.append(self.comm.isend(msg, dest=0, tag=TAG))
                last_sent = time.monotonic()
            while self._signals:
                sends.append(self.comm.isend(("signal", self._signals.pop(0)), dest=0, tag=TAG))
            sends = [r for r in sends if not r.Test()]
            closing = False
            while True:
                message = self.comm.improbe(0, TAG, status)
                if message is None:
                    break
                msg = message.recv()
                busy = True
                last_heard = time.monotonic()
                if msg[0] == "job":
                    self.workers[msg[1] // LANE_STRIDE].submit(msg[1], msg[2], msg[3])
                elif msg[0] == "kill":
                    self.workers[msg[1] // LANE_STRIDE].kill(msg[1])
                elif msg[0] == "close":
                    closing = True
            if closing:
                if held:
                    sends.append(self.comm.isend(("frames", held), dest=0, tag=TAG))
                return self._close(sends)
            now = time.monotonic()
            if now - last_heard > self.settings.rank_timeout:
                log.error("no word from the leader for %gs: aborting the MPI job (its deliveries go back to "
                          "the queue with its connection)", self.settings.rank_timeout)
                logging.shutdown()
                self.world.Abort(exitcodes.INTERNAL_ERROR)
            if now - last_sent >= hb:
                sends.append(self.comm.isend(("hb",), dest=0, tag=TAG))
                last_sent = now
            full = all(w.load() >= w.capacity for w in self.workers)
            cap = MAX_POLL_RANK_FULL if full else MAX_POLL_RANK
            if now < expect_until:
                cap = POLL_JOB_EXPECTED
            interval = MIN_POLL if busy else min(interval * 2, cap)
            wait = min(interval, max(0.0, held_since + STATUS_HOLD - now)) if held else interval
            try:
                carried = self._up.get(timeout=wait)
            except queue.Empty:
                pass

    def _close(self, sends: list[Any]) -> int:
        for worker in self.workers:
            worker.close()
        for worker in self.workers:
            worker.join(10)
        while True:  # frames still queued (none expected: the leader closes when all lanes are idle)
            try:
                msg = self._up.get_nowait()
            except queue.Empty:
                break
            if msg[0] in ("frame", "ready", "fatal"):
                sends.append(self.comm.isend(msg, dest=0, tag=TAG))
        sends.append(self.comm.isend(("closed",), dest=0, tag=TAG))
        deadline = time.monotonic() + 10
        while sends and time.monotonic() < deadline:
            sends = [r for r in sends if not r.Test()]
            time.sleep(0.005)
        return exitcodes.PLUGIN_ERROR if any(w.fatal for w in self.workers) else exitcodes.OK
