"""The one-screen status a sysadmin reads at a glance (and the same data as JSON)."""
from __future__ import annotations

import json
import time
from typing import Optional

from launcher import backlog as backlogs
from launcher.broker import BrokerError, QueueStats
from launcher.caps import period_start
from launcher.operations import Launcher
from hpc_common.walltime import format_walltime

THROUGHPUT_WINDOW_S = 900.0
MAX_FAILED_SHOWN = 10  # failed tasks of this budget period listed with why they failed


def drain_rate(launcher: Launcher, now: float) -> Optional[float]:
    """Files per minute, a lower bound from the falls in queue depth between recent observations.

    Used when the management API gives no ack rate. Inflow hides work, so this never overstates.
    """
    prev = None
    drained = 0.0
    first = last = None
    for obs in launcher.ledger.observations(now - THROUGHPUT_WINDOW_S):
        if obs.get("ready") is None:
            continue
        depth = obs["ready"] + (obs.get("unacked") or 0) + (obs.get("held") or 0) + (obs.get("held_in_flight") or 0)
        if prev is not None and depth < prev:
            drained += prev - depth
        prev = depth
        first = obs["at"] if first is None else first
        last = obs["at"]
    if first is None or last is None or last - first < 1:
        return None
    return drained / ((last - first) / 60.0)


def collect(launcher: Launcher, queue: Optional[str], broker_label: str,
            refreshed: bool) -> dict:
    """Everything the status screen shows, as plain data."""
    now = launcher.clock()
    caps = launcher.caps
    broker: dict = {"queue": queue, "uri": broker_label}
    stats: Optional[QueueStats] = None
    if launcher.broker is not None:
        try:
            stats = launcher.queue_stats()
            broker.update(ready=stats.ready, unacked=stats.unacked, consumers=stats.consumers)
        except BrokerError as exc:
            broker["error"] = str(exc)
    else:
        broker["error"] = "no broker configured (RABBITMQ_URI, RABBITMQ_QUEUE)"
    held = launcher.held_backlog()
    whole = backlogs.total(stats.ready if stats is not None else None, held,
                           stats.retrying if stats is not None else 0)
    start = period_start(now, caps.budget_period)
    used, committed = launcher.ledger.node_hours(start, now)
    activity = stats.activity if stats is not None else None
    if activity is not None:
        rate, rate_source = activity.files_per_minute, f"reported by {activity.agents} agent(s)"
        if activity.per_file_seconds is not None:
            broker["per_file_seconds"] = round(activity.per_file_seconds, 3)
    else:
        rate = stats.ack_rate * 60 if stats is not None and stats.ack_rate is not None else None
        rate_source = "broker ack rate" if rate is not None else "lower bound from queue-depth falls"
    if rate is None:
        rate = drain_rate(launcher, now)
    decisions = [
        {"at": r["at"], "case": r["case_name"], "submit": r["submit"],
         "cancel_queued": r["cancel_queued"], "cancel_running": r["cancel_running"],
         "job_id": r["job_id"], "reasons": json.loads(r["reasons"])}
        for r in launcher.ledger.last_decisions(5)
    ]
    jobs = []
    for sub in launcher.ledger.submissions():
        if sub["status"] not in ("submitted", "intent"):
            continue
        tasks = launcher.ledger.tasks(sub["job_id"]) if sub["job_id"] else []
        by_state: dict = {}
        for t in tasks:
            by_state[t["state"]] = by_state.get(t["state"], 0) + 1
        failed = [{"index": t["idx"], "exit_status": t["exit_status"],
                   "why": t["why"] or _exit_meaning(t["exit_status"])}
                  for t in tasks if t["state"] == "failed"]
        jobs.append({"job_id": sub["job_id"], "job_name": sub["job_name"],
                     "status": sub["status"], "tasks": sub["tasks"], "states": by_state,
                     "walltime": format_walltime(sub["walltime_s"]), "failed": failed})
    recent_failures = [
        {"job_id": t["job_id"], "index": t["idx"], "exit_status": t["exit_status"],
         "why": t["why"] or _exit_meaning(t["exit_status"])}
        for t in launcher.ledger.tasks()
        if t["state"] == "failed" and (t["ended_at"] or t["updated_at"]) >= start
    ][-MAX_FAILED_SHOWN:]
    return {
        "at": now,
        "scheduler": launcher.scheduler.name,
        "where": launcher.runner.description,
        "scheduler_refreshed": refreshed,
        "broker": broker,
        "backlog": whole.as_json(),
        "queues": _per_queue(queue, stats, held),
        "tasks": launcher.ledger.counts(),
        "tasks_this_period": launcher.ledger.all_counts(start),
        "files_per_minute": None if rate is None else round(rate, 2),
        "files_per_minute_source": rate_source if rate is not None else None,
        "node_hours": {"used": round(used, 3), "committed": round(committed, 3),
                       "budget": caps.node_hours_budget, "period": caps.budget_period,
                       "period_start": start},
        "caps": {"file": caps.source, "max_array_size": caps.max_array_size,
                 "max_running": caps.max_running, "max_queued": caps.max_queued,
                 "max_walltime": format_walltime(caps.max_walltime_s),
                 "allowed_queues": list(caps.allowed_queues),
                 "allowed_accounts": list(caps.allowed_accounts),
                 "cores_per_task": caps.cores_per_task},
        "jobs": jobs,
        "failed_tasks": recent_failures,
        "last_decisions": decisions,
    }


def _exit_meaning(exit_status: Optional[int]) -> str:
    """What a failed task's exit status says when its output said nothing."""
    if exit_status is None:
        return "failed (no exit status)"
    if exit_status < 0:
        return f"the scheduler could not run it (exit {exit_status})"
    if exit_status > 256:
        return f"killed by signal {exit_status - 256}"
    return f"exit {exit_status}"


def _per_queue(queue: Optional[str], stats: Optional[QueueStats], held: backlogs.Backlog) -> dict:
    """`"queues"` of `status --json`: {name: {ready, unacked, consumers, backlog}} for each queue served
    (one entry when there is one queue; the totals stay in "broker" and "backlog")."""
    if stats is None:
        return {}
    each = stats.per_queue or ({queue: stats} if queue else {})
    out = {}
    for name, one in each.items():
        part = backlogs.total(one.ready, held.by_queue.get(name, held) if stats.per_queue else held, one.retrying)
        out[name] = {"ready": one.ready, "unacked": one.unacked, "consumers": one.consumers,
                     "backlog": part.as_json()}
    return out


def _n(value) -> str:
    return "?" if value is None else str(value)


def render_backlog(backlog: dict) -> str:
    """One line: the total and its non-zero parts (what waits where)."""
    parts = [f"{k.replace('_', ' ')} {backlog[k]}" for k in backlogs.WAITING_PARTS if backlog.get(k)]
    flight = [f"{k.replace('_', ' ')} {v}" for k, v in (backlog.get("in_flight") or {}).items() if v]
    text = f"backlog    {backlog.get('total', 0)} waiting" + (f" ({', '.join(parts)})" if parts else "")
    if flight:
        text += f"; in flight: {', '.join(flight)}"
    if backlog.get("retry_after") is not None:
        text += f"; next held message leasable in {backlog['retry_after']:g} s"
    for error in backlog.get("errors") or []:
        text += f"\n           not counted: {error}"
    return text


def render_registration(reg: dict, now: float) -> str:
    """One line: when the scale loop last registered the extractors on Clowder's `extractors` exchange."""
    if not reg:
        return "registered never (no scale loop has registered the extractors)"
    names = ", ".join(f"{q['extractor']} on {name}" for name, q in (reg.get("queues") or {}).items()) or "none"
    when = reg.get("last_at")
    text = "registered " + ("never" if when is None else f"{max(0.0, now - when):.0f} s ago") + \
        f" ({names}; every {reg.get('interval_s', 0):g} s)"
    if reg.get("last_error"):
        text += f"\n           last attempt failed: {reg['last_error']}"
    for problem in reg.get("problems") or []:
        text += f"\n           {problem}"
    return text


def render(data: dict) -> str:
    """The status screen as text (about 15 lines)."""
    b = data["broker"]
    t = data["tasks"]
    p = data["tasks_this_period"]
    nh = data["node_hours"]
    c = data["caps"]
    lines = [f"clowder launcher  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(data['at']))}"
             f"  scheduler {data['scheduler']} ({data['where']})"
             + ("" if data["scheduler_refreshed"] else "  [scheduler not queried: ledger view]")]
    if "error" in b:
        lines.append(f"queue      {b.get('queue') or '?'}: UNAVAILABLE: {b['error']}")
    else:
        lines.append(f"queue      {b['queue']}  ready {_n(b.get('ready'))}  unacked"
                     f" {_n(b.get('unacked'))}  consumers {_n(b.get('consumers'))}  ({b['uri']})")
    queues = data.get("queues") or {}
    if len(queues) > 1:
        for name, q in queues.items():
            lines.append(f"  {name}  ready {_n(q.get('ready'))}  unacked {_n(q.get('unacked'))}  consumers"
                         f" {_n(q.get('consumers'))}  backlog {q['backlog'].get('total', 0)}")
    lines.append(render_backlog(data.get("backlog") or {}))
    lines.append(render_registration(data.get("registration") or {}, data["at"]))
    lines.append(f"tasks now  queued {t['queued']}  running {t['running']}  missing {t['missing']}")
    lines.append(f"period     completed {p['completed']}  timeout {p['timeout']}  failed"
                 f" {p['failed']}  cancelled {p['cancelled']}  (since the {nh['period']} began)")
    fpm = data["files_per_minute"]
    per_file = data["broker"].get("per_file_seconds")
    lines.append("throughput " + ("unknown" if fpm is None else
                                  f"{fpm:g} files/min ({data['files_per_minute_source']})")
                 + ("" if per_file is None else f", {per_file:g} s per file"))
    budget = "no budget" if nh["budget"] is None else f"{nh['budget']:g} per {nh['period']}"
    lines.append(f"node-hours {nh['used']:.2f} used, {nh['committed']:.2f} committed / {budget}")
    lines.append(f"caps       array {c['max_array_size']}  running {c['max_running']}  queued"
                 f" {c['max_queued']}  walltime {c['max_walltime']}  ({c['file']})")
    for job in data["jobs"][-5:]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(job["states"].items())) or job["status"]
        lines.append(f"job        {job['job_id'] or '(interrupted)'} {job['job_name']}:"
                     f" {job['tasks']} task(s), {states}")
    for f in data.get("failed_tasks") or []:
        lines.append(f"failed     {f['job_id']} task {f['index']}: {f['why']}")
    lines.append("last decisions:" if data["last_decisions"] else "last decisions: none yet")
    for d in data["last_decisions"]:
        when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
        act = []
        if d["submit"]:
            act.append(f"+{d['submit']}" + (f" ({d['job_id']})" if d["job_id"] else ""))
        if d["cancel_queued"] or d["cancel_running"]:
            act.append(f"-{d['cancel_queued'] + d['cancel_running']}")
        reason = d["reasons"][0] if d["reasons"] else ""
        lines.append(f"  {when} {d['case']:<21} {' '.join(act) or '.':<12} {reason}")
    return "\n".join(lines)
