"""Command line: ``python -m launcher {submit,status,scale,metrics,report,dispatch,relay,spool,cancel,reconcile}``.

Settings (launcher.settings): command-line flag > environment variable > settings file > default.
Global options may be given before or after the subcommand. Failures map to exit codes by their
branch of launcher.errors: 1 service (scheduler, command, broker), 2 configuration, 3 refused, 4 locked.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import filelock

from hpc_common.job_env import agent_settings_env
from hpc_common.pbs_conf import pbs_bin_dir
from hpc_common.redact import redact_text, redact_uri
from hpc_common.walltime import walltime_seconds as parse_walltime  # whole seconds, bare number = seconds
from launcher.caps import Request, load_caps
from launcher.errors import BrokerError, ConfigError, LauncherError, LedgerError
from launcher.ledger import Ledger
from launcher.logfmt import OneLineFormatter
from launcher.operations import Launcher, Refused
from launcher.runner import LocalRunner, Runner, SSHRunner, default_control_dir
from launcher.schedulers import detect_scheduler, make_scheduler
from launcher.schedulers.pbs import PBSPro
from launcher.settings import from_args as settings_from_args, queue_names
from launcher.strategy import Policy

EXIT_ERROR, EXIT_CONFIG, EXIT_REFUSED, EXIT_LOCKED = 1, 2, 3, 4
DEFAULT_CAPS = Path("/etc/clowder-hpc-agent/caps.yaml")
REPO_PBS_DIR = Path(__file__).resolve().parent.parent / "pbs"

log = logging.getLogger("launcher")


# ---------------------------------------------------------------------- settings
def _settings(args: argparse.Namespace) -> Any:
    """This command line's LauncherSettings (launcher.settings: flag > environment > file > default)."""
    return settings_from_args(args)


def _state_dir(args) -> Path:
    return Path(_settings(args).state_dir)


def _caps_path(args) -> Path:
    path = _settings(args).caps
    if path:
        return Path(path)
    if DEFAULT_CAPS.exists():
        return DEFAULT_CAPS
    raise ConfigError("no site caps: pass --caps FILE or set LAUNCHER_CAPS"
                      f" (or install {DEFAULT_CAPS})")


def _runner(args) -> Runner:
    s = _settings(args)
    if not s.ssh:
        return LocalRunner()
    return SSHRunner(s.ssh, default_control_dir(), config_file=Path(s.ssh_config) if s.ssh_config else None)


def _scheduler_name(args, runner: Runner) -> str:
    name = _settings(args).scheduler
    if name:
        return name
    found = detect_scheduler(runner)
    if not found:
        raise ConfigError(f"no scheduler found on PATH ({runner.description}): no sbatch, no qstat;"
                          " pass --scheduler pbs|torque|slurm")
    return found


def _script(args, scheduler: str, runner: Runner) -> str:
    script = _settings(args).script
    if script:
        return script
    if isinstance(runner, SSHRunner):
        raise ConfigError("over --ssh, pass --script PATH (the job script's path on the login node)")
    candidates = [REPO_PBS_DIR / "agent_array.slurm"] if scheduler == "slurm" else []
    candidates.append(REPO_PBS_DIR / "agent_array.pbs")
    for path in candidates:
        if path.exists():
            return str(path)
    raise ConfigError(f"no job script: {candidates[0]} does not exist; pass --script PATH")


def _walltime(args) -> Optional[int]:
    """--walltime in seconds (None when absent); a bad one is a ConfigError naming the flag."""
    if not args.walltime:
        return None
    try:
        return parse_walltime(args.walltime)
    except ValueError as exc:
        raise ConfigError(f"walltime from --walltime: {exc}") from None


def _broker(args):
    s = _settings(args)
    uri, queue = s.rabbitmq_uri, s.rabbitmq_queue
    if not uri or not queue:
        return None, queue, redact_uri(uri) if uri else "(RABBITMQ_URI not set)"
    from hpc_common.retry_queues import buckets
    from launcher.broker import queue_stats, queues_stats
    names = queue_names(queue)
    retry_buckets = buckets(s.retry_backoff, s.max_retries)  # where the agents park retries
    if len(names) > 1:  # agents serving several plugins: the backlog is the sum of their queues'
        return (functools.partial(queues_stats, uri, names, s.rabbitmq_management, retry_buckets=retry_buckets),
                queue, redact_uri(uri))
    return (functools.partial(queue_stats, uri, queue, s.rabbitmq_management, retry_buckets=retry_buckets),
            queue, redact_uri(uri))


def _one_queue(args, command: str) -> None:
    """ConfigError when the queue setting names several queues and command serves one."""
    names = queue_names(_settings(args).rabbitmq_queue)
    if len(names) > 1:
        raise ConfigError(f"{command} serves one queue, not {len(names)} ({', '.join(names)}): "
                          "run one per queue")


def build(args, need_script: bool = False) -> Launcher:
    """Assemble a Launcher from flags and environment."""
    caps = load_caps(_caps_path(args))
    runner = _runner(args)
    name = _scheduler_name(args, runner)
    scheduler = make_scheduler(name)
    if isinstance(scheduler, PBSPro) and not isinstance(runner, SSHRunner):
        scheduler.bin_dir = pbs_bin_dir()  # PBS's qsub, not a Slurm wrapper earlier on PATH
    ledger = Ledger(_state_dir(args) / "ledger.sqlite")
    broker, queue, _ = _broker(args)
    names = queue_names(queue)
    # Several queues: the jobs' agents serve several plugins (AGENT_PLUGIN='a b'), each consuming its
    # own queue; RABBITMQ_QUEUE names one queue, so theirs is emptied (Slurm's --export=ALL would pass a,b).
    env = {"RABBITMQ_QUEUE": queue if len(names) == 1 else ""} if names else {}
    script = _script(args, name, runner) if need_script else ""
    if not scheduler.exports_submit_env:
        env = {**_job_settings(script, runner), **env}
    from launcher import backlog

    if len(names) > 1:
        held = functools.partial(backlog.held_queues, backlog.places_per_queue(_settings(args), names))
    else:
        held = functools.partial(backlog.held, backlog.Places.from_settings(_settings(args), queue))
    return Launcher(runner=runner, scheduler=scheduler, ledger=ledger, caps=caps, script=script,
                    job_env=env, broker=broker, held=held)


def _job_settings(script: str, runner: Runner) -> dict:
    """What a PBS/Torque job must be given (it does not inherit this environment): the agent's
    settings from it, secrets excepted, and AGENT_HOME when the job script is this checkout's own."""
    env = agent_settings_env(os.environ)
    if script and not isinstance(runner, SSHRunner) and Path(script).resolve().parent == REPO_PBS_DIR:
        env.setdefault("AGENT_HOME", str(REPO_PBS_DIR.parent))
    return env


def _lock(args) -> filelock.FileLock:
    state = _state_dir(args)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = filelock.FileLock(str(state / "launcher.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise LockedError(f"another launcher is running with state directory {state}"
                          " (its lock is held); refusing to start a second one") from None
    return lock


class LockedError(LauncherError):
    """Another launcher holds the state directory's lock (exit code 4)."""


# ---------------------------------------------------------------------- commands
def cmd_submit(args) -> int:
    launcher = build(args, need_script=True)
    launcher.reconcile()
    walltime = _walltime(args)
    job_id, allowed = launcher.submit(Request(args.tasks, walltime, args.queue, args.account))
    for line in allowed.reasons:
        print(line, file=sys.stderr)
    print(job_id)
    return 0


def cmd_cancel(args) -> int:
    launcher = build(args)
    if launcher.ledger.submission_by_job(args.job_id) is None and not args.force:
        raise ConfigError(f"job {args.job_id} was not submitted by this launcher (state directory"
                          f" {_state_dir(args)}); use --force to cancel it anyway")
    launcher.cancel(args.job_id)
    launcher.refresh()
    print(f"cancelled {args.job_id}")
    return 0


def cmd_reconcile(args) -> int:
    launcher = build(args)
    ok = launcher.reconcile()
    counts = launcher.ledger.counts()
    print(f"reconciled: queued {counts['queued']}, running {counts['running']},"
          f" missing {counts['missing']}" + ("" if ok else " (scheduler query failed)"))
    return 0 if ok else EXIT_ERROR


def status_snapshot(args, refresh: bool = True):
    """(launcher, data) as `status --json` shows it; ``refresh`` queries the scheduler when no
    scale loop holds the lock (the ledger view otherwise)."""
    from launcher.status import collect

    launcher = build(args)
    _, queue, label = _broker(args)
    refreshed = False
    try:
        lock = _lock(args) if refresh else None
    except LockedError:
        lock = None  # a scale loop is running: show its ledger, do not query in parallel
    if lock is not None:
        try:
            refreshed = launcher.reconcile()
        finally:
            lock.release()
    from launcher.registration import read_record

    data = collect(launcher, queue, label, refreshed)
    data["registration"] = read_record(str(_state_dir(args)))  # written by the scale loop
    return launcher, data


def cmd_status(args) -> int:
    from launcher.status import render

    _, data = status_snapshot(args)
    print(json.dumps(data, indent=2, default=str) if args.json else render(data))
    return 0


def _metrics_registry(args, refresh: bool):
    from launcher.metrics import registry_for

    def snapshot():
        launcher, data = status_snapshot(args, refresh=refresh)
        return data, launcher.ledger

    return registry_for(snapshot)


def _start_metrics(args, bind: str, refresh: bool):
    from launcher.metrics import announce, serve

    build(args).ledger.close()  # settings checked once up front: a bad caps file fails here
    server, _thread, port = serve(bind, _metrics_registry(args, refresh))
    announce(bind, port, sys.stderr)
    return server


def cmd_metrics(args) -> int:
    from launcher.metrics import wait

    server = _start_metrics(args, args.bind, refresh=args.refresh)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    wait(stop, server)
    return 0


def cmd_report(args) -> int:
    from launcher.report import write_report

    launcher, data = status_snapshot(args, refresh=not args.no_refresh)
    index = write_report(launcher, data, Path(args.out), since=args.since)
    print(index)
    return 0


def cmd_scale(args) -> int:
    launcher = build(args, need_script=True)
    if launcher.broker is None:
        raise ConfigError("scale needs the broker: set RABBITMQ_URI and RABBITMQ_QUEUE"
                          " (or --rabbitmq-queue)")
    caps = launcher.caps
    walltime = _walltime(args) or caps.default_walltime_s
    policy = Policy(walltime_s=min(walltime, caps.max_walltime_s),
                    files_per_task=args.files_per_task, idle_grace_s=args.idle_grace,
                    queue=args.queue, account=args.account)
    if walltime > caps.max_walltime_s:
        print(f"capped: walltime {args.walltime} requested, max_walltime applies", file=sys.stderr)
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    # scale holds the lock: its metrics show the ledger it keeps fresh (no second scheduler query)
    server = _start_metrics(args, args.metrics_bind, refresh=False) if args.metrics_bind else None
    registrar = None
    try:
        registrar = _registrar(args)  # after the metrics address: that is the first line on stderr
        if registrar is not None and args.once:  # Clowder keeps listing the extractors while no agent runs
            registrar.send()
        elif registrar is not None:
            registrar.start()
        return _scale_loop(args, launcher, policy, stop)
    finally:
        if registrar is not None:
            registrar.stop()
        if server is not None:
            server.shutdown()
            server.server_close()


def _registrar(args):
    """The scale loop's registrations on the `extractors` exchange (None with --heartbeat 0)."""
    from launcher.registration import Registrar, find_registrations

    s = _settings(args)
    if not s.heartbeat:
        return None
    path = [p for p in (s.plugin_path or "").split(":") if p]
    found, problems = find_registrations(queue_names(s.rabbitmq_queue), queue_names(s.plugin), path,
                                         s.extractor_key, s.clowder_email)
    for problem in problems:
        print(f"registration: {problem}", file=sys.stderr)
    return Registrar(s.rabbitmq_uri, found, s.heartbeat, str(_state_dir(args)), problems)


def _scale_loop(args, launcher: Launcher, policy: Policy, stop: threading.Event) -> int:
    while True:
        decision = launcher.scale_once(policy, per_file_s=args.per_file_seconds)
        if args.once or args.verbose:
            act = f"submit {decision.submit}" if decision.submit else (
                f"cancel {decision.cancel_queued + decision.cancel_running}"
                if decision.cancel_queued or decision.cancel_running else "no action")
            print(f"{decision.case.value}: {act}: " + "; ".join(decision.reasons), flush=True)
        if args.once or stop.wait(args.interval):
            return 0


def cmd_dispatch(args) -> int:
    from launcher.broker import QueueClient
    from launcher.dispatch import Dispatcher

    _one_queue(args, "dispatch")
    launcher = build(args, need_script=True)
    if isinstance(launcher.runner, SSHRunner):
        raise ConfigError("dispatch runs on the login node itself for now (message files must be"
                          " readable by the jobs): drop --ssh")
    uri, queue = _settings(args).rabbitmq_uri, _settings(args).rabbitmq_queue
    if not uri or not queue:
        raise ConfigError("dispatch needs RABBITMQ_URI and RABBITMQ_QUEUE (or --rabbitmq-queue)")
    caps = launcher.caps
    walltime = _walltime(args) or caps.default_walltime_s
    dispatcher = Dispatcher(
        launcher=launcher, client=lambda: QueueClient(uri), queue=queue,
        message_dir=_state_dir(args) / "dispatch", walltime_s=min(walltime, caps.max_walltime_s),
        max_jobs=args.max_jobs, max_attempts=args.max_attempts, sched_queue=args.queue,
        account=args.account)
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while True:
        try:
            summary = dispatcher.step()
        except BrokerError as exc:  # broker restarting: the ledger keeps what we own
            if args.once:
                raise
            log.warning("dispatch pass stopped, retrying in %g s: %s", args.interval, exc)
            if stop.wait(args.interval):
                return 0
            continue
        open_rows = len(launcher.ledger.dispatch_rows("received", "submitted"))
        if args.once or args.verbose or any(summary.values()):
            print(" ".join(f"{k} {v}" for k, v in summary.items()) + f" open {open_rows}",
                  flush=True)
        if args.once:
            return 0
        if args.until_empty and open_rows == 0 and not summary["taken"]:
            return 0
        if stop.wait(args.interval):
            return 0


def cmd_relay(args) -> int:
    from launcher.relay.main import main_from_cli

    _one_queue(args, "relay")
    return main_from_cli(args, str(_state_dir(args)), _settings(args))


def cmd_spool(args) -> int:
    from launcher.backlog import record_spool
    from launcher.relay.spool import main_from_cli

    _one_queue(args, "spool")
    settings = _settings(args)
    if settings.rabbitmq_queue and not settings.ssh:
        record_spool(Path(settings.state_dir), settings.rabbitmq_queue, args.dir)  # so status/scale count what it stages
    return main_from_cli(args, settings)


# ---------------------------------------------------------------------- parser
def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = {"default": argparse.SUPPRESS} if suppress else {"default": None}
    g = parser.add_argument_group("settings (flag > environment > settings file > default)")
    g.add_argument("--config", metavar="FILE", help="YAML settings file (env LAUNCHER_CONFIG)", **d)
    g.add_argument("--caps", metavar="FILE", help="site caps YAML (env LAUNCHER_CAPS)", **d)
    g.add_argument("--scheduler", metavar="pbs|torque|slurm",
                   help="env LAUNCHER_SCHEDULER; detected from PATH when absent", **d)
    g.add_argument("--ssh", metavar="HOST",
                   help="run scheduler commands on this login node (env LAUNCHER_SSH)", **d)
    g.add_argument("--ssh-config", metavar="FILE", help="ssh -F file (env LAUNCHER_SSH_CONFIG)",
                   **d)
    g.add_argument("--state-dir", metavar="DIR",
                   help="ledger and lock (env LAUNCHER_STATE_DIR,"
                        " default ~/.local/state/clowder-launcher)", **d)
    g.add_argument("--rabbitmq-queue", metavar="Q", action="append",
                   help="env RABBITMQ_QUEUE; repeat (or a,b) for agents serving several plugins", **d)
    g.add_argument("--rabbitmq-management", metavar="URL",
                   help="management API for unacked counts (env RABBITMQ_MANAGEMENT_URL)", **d)
    g.add_argument("-v", "--verbose", action="store_true",
                   **({"default": argparse.SUPPRESS} if suppress else {"default": False}))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `launcher: error: argument --tasks: invalid int value: 'x'`."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(EXIT_CONFIG, f"launcher: error: {message} (see {self.prog} --help)\n")


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--walltime", metavar="HH:MM:SS")
    p.add_argument("--queue", metavar="Q")
    p.add_argument("--account", metavar="A")
    p.add_argument("--script", metavar="PATH",
                   help="job script (env LAUNCHER_SCRIPT; default pbs/agent_array.slurm|.pbs)")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="python -m launcher",
                                  description="Submit, scale and account for agent job arrays.")
    _common(top, suppress=False)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit the agent array; prints the job id")
    p.add_argument("--tasks", type=int, required=True)
    _job_options(p)
    _common(p, suppress=True)
    p.set_defaults(func=cmd_submit, locked=True)

    p = sub.add_parser("status", help="one screen: queue, tasks, throughput, budget, decisions")
    p.add_argument("--json", action="store_true")
    _common(p, suppress=True)
    p.set_defaults(func=cmd_status, locked=False)

    p = sub.add_parser("scale", help="size the array from the queue (loop, or --once)")
    p.add_argument("--once", action="store_true")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between decisions")
    p.add_argument("--idle-grace", type=float, default=300.0,
                   help="seconds the queue must stay empty before idle tasks are cancelled")
    p.add_argument("--files-per-task", type=int, default=None,
                   help="most files one task is given (default: what fits in its walltime by the"
                        " agents' measured per-file time, 50 while that is unknown)")
    p.add_argument("--per-file-seconds", type=float, default=None)
    p.add_argument("--metrics-bind", metavar="HOST:PORT",
                   help="also serve Prometheus /metrics here while scaling (see `metrics`)")
    p.add_argument("--heartbeat", type=float, default=None, metavar="SECONDS",
                   help="register the extractors on the 'extractors' exchange this often (env HEARTBEAT;"
                        " default 60, inside Clowder v2's 300 s window; 0: never)")
    _job_options(p)
    _common(p, suppress=True)
    p.set_defaults(func=cmd_scale, locked=True)

    p = sub.add_parser("metrics", help="serve Prometheus /metrics (the status data, read at each scrape)")
    p.add_argument("--bind", required=True, metavar="HOST:PORT",
                   help="address to listen on, e.g. 127.0.0.1:9464 (port 0: any free port, printed)")
    p.add_argument("--refresh", action="store_true",
                   help="query the scheduler at each scrape when no scale loop runs"
                        " (default: the ledger view that scale keeps fresh)")
    _common(p, suppress=True)
    p.set_defaults(func=cmd_metrics, locked=False)

    p = sub.add_parser("report", help="write a self-contained HTML run report with plots")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and the PNGs")
    p.add_argument("--since", metavar="WHEN",
                   help="start of the report: ISO time (2026-12-01T10:00), epoch seconds, or an age"
                        " like 90m / 6h / 2d (default: the first thing the ledger recorded)")
    p.add_argument("--no-refresh", action="store_true", help="do not query the scheduler first")
    _common(p, suppress=True)
    p.set_defaults(func=cmd_report, locked=False)

    p = sub.add_parser("dispatch", help="one batch job per message (rare heavy extractors)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument("--until-empty", action="store_true",
                   help="exit when the queue is empty and every dispatched job is settled")
    p.add_argument("--interval", type=float, default=15.0)
    p.add_argument("--max-jobs", type=int, default=10, help="dispatched jobs open at once")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="failed jobs per message before it is dead-lettered")
    _job_options(p)
    _common(p, suppress=True)
    p.set_defaults(func=cmd_dispatch, locked=True)

    p = sub.add_parser("relay", help="lease messages to agents over HTTP and forward their Clowder calls")
    from launcher.relay.main import add_arguments as relay_arguments
    relay_arguments(p)
    _common(p, suppress=True)
    p.set_defaults(func=cmd_relay, locked=False)

    p = sub.add_parser("spool", help="stage messages and files into a spool folder; upload the agents' results")
    from launcher.relay.spool import add_arguments as spool_arguments
    spool_arguments(p)
    _common(p, suppress=True)
    p.set_defaults(func=cmd_spool, locked=False)

    p = sub.add_parser("cancel", help="cancel a job (all its tasks)")
    p.add_argument("job_id")
    p.add_argument("--force", action="store_true", help="also a job this launcher did not submit")
    _common(p, suppress=True)
    p.set_defaults(func=cmd_cancel, locked=True)

    p = sub.add_parser("reconcile", help="resolve interrupted submissions, refresh task states")
    _common(p, suppress=True)
    p.set_defaults(func=cmd_reconcile, locked=True)
    return top


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = ()
        return True


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactFilter())
    handler.setFormatter(OneLineFormatter("launcher"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    lock = None
    try:
        _settings(args)  # every setting checked up front, whatever the command uses
        if args.locked:
            lock = _lock(args)
        return args.func(args)
    except Refused as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except LockedError as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, LedgerError) as exc:  # settings, caps, requests, ledger file
        print(f"launcher: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except LauncherError as exc:  # scheduler, command, broker, remote spool
        print(f"launcher: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if lock is not None:
            lock.release()
        log.removeHandler(handler)
