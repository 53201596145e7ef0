"""The launcher's ledger: SQLite in WAL mode, schema-versioned.

It records submissions (written as an *intent* before qsub/sbatch runs, so a crash between the
two is found again by job name), array tasks and their states, node-hours, and every scaling
decision with its reasons. Terminal task states are final; a task the scheduler stops reporting
is MISSING (still counted as present) until ``missing_grace_s`` has passed, then it is settled.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from launcher.errors import LedgerError
from launcher.schedulers.base import JobStatus
from launcher.states import JobState

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY,
    job_name TEXT NOT NULL UNIQUE,     -- intent token, given to the scheduler as the job name
    job_id TEXT UNIQUE,                -- NULL until the scheduler answered
    scheduler TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'array',
    status TEXT NOT NULL,              -- intent | submitted | failed | done
    tasks INTEGER NOT NULL,
    walltime_s INTEGER NOT NULL,
    queue TEXT,
    account TEXT,
    max_running INTEGER,
    nodes_per_task REAL NOT NULL DEFAULT 1,
    script TEXT,
    created_at REAL NOT NULL,
    submitted_at REAL,
    finished_at REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    raw_state TEXT,
    exit_status INTEGER,
    started_at REAL,
    ended_at REAL,
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL,
    missing_since REAL,
    cancel_requested_at REAL,
    final INTEGER NOT NULL DEFAULT 0,  -- terminal, or MISSING settled after the grace period
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (final);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    case_name TEXT NOT NULL,
    submit INTEGER NOT NULL DEFAULT 0,
    cancel_queued INTEGER NOT NULL DEFAULT 0,
    cancel_running INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    reasons TEXT NOT NULL,             -- JSON list of lines
    observation TEXT NOT NULL,         -- JSON
    idle_since REAL
);
"""


# v2: one batch job per message (``dispatch``).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS dispatch (
    id INTEGER PRIMARY KEY,
    msg_hash TEXT NOT NULL,            -- sha256 of the body: spots a redelivered duplicate
    file_id TEXT,
    body BLOB NOT NULL,
    properties TEXT NOT NULL,          -- JSON: headers, content_type, correlation_id, reply_to
    state TEXT NOT NULL,               -- received | submitted | done | requeued | dead_lettered
    job_name TEXT,
    job_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dispatch_open ON dispatch (state);
CREATE INDEX IF NOT EXISTS dispatch_hash ON dispatch (msg_hash);
"""


# v3: the agents' activity reports the launcher read (they expire from the broker's window queue
# after hpc_common.reports.WINDOW; kept here for metrics totals and the run report's plots).
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS agent_reports (
    agent TEXT NOT NULL,
    at REAL NOT NULL,                  -- the agent's clock when it sent the report
    queue TEXT NOT NULL,
    task TEXT,
    interval_s REAL NOT NULL,
    done INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    busy_seconds REAL NOT NULL,
    slots INTEGER,
    durations TEXT NOT NULL DEFAULT '[]',  -- JSON list of seconds per file
    read_at REAL NOT NULL,
    PRIMARY KEY (agent, at)
);
CREATE INDEX IF NOT EXISTS agent_reports_at ON agent_reports (at);
"""

# v4: why a task failed, in the task's own words (the last line of its output file), for `status`.
_SCHEMA_V4 = """
ALTER TABLE tasks ADD COLUMN why TEXT
"""


class Ledger:
    """One SQLite file. Every public method is one transaction."""

    def __init__(self, path, missing_grace_s: float = 600.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.missing_grace_s = missing_grace_s
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Transaction(self.db)

    def _migrate(self) -> None:
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta "
                            "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise LedgerError(f"ledger {self.path} has schema {version}; this launcher knows"
                                  f" up to {SCHEMA_VERSION}: upgrade the launcher")
            if version < 1:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version < 2:
                for stmt in _SCHEMA_V2.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version < 3:
                for stmt in _SCHEMA_V3.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
            if version < 4:
                self.db.execute(_SCHEMA_V4)
            if version < SCHEMA_VERSION:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))

    # ------------------------------------------------------------------ submissions
    def begin_submission(self, scheduler: str, tasks: int, walltime_s: int,
                         queue: Optional[str], account: Optional[str], max_running: int,
                         nodes_per_task: float, script: str, now: Optional[float] = None,
                         kind: str = "array", prefix: str = "clowder-") -> Tuple[int, str]:
        """Record the intent to submit; returns (submission id, unique job name to submit with)."""
        name = prefix + secrets.token_hex(4)
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO submissions (job_name, scheduler, kind, status, tasks, walltime_s,"
                " queue, account, max_running, nodes_per_task, script, created_at)"
                " VALUES (?, ?, ?, 'intent', ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, scheduler, kind, tasks, walltime_s, queue, account, max_running,
                 nodes_per_task, script, now or time.time()))
        return cur.lastrowid, name

    def record_submitted(self, submission_id: int, job_id: str,
                         now: Optional[float] = None) -> None:
        """The scheduler accepted it: store the job id and one QUEUED row per task."""
        now = now or time.time()
        with self._tx():
            row = self.db.execute("SELECT tasks FROM submissions WHERE id=?",
                                  (submission_id,)).fetchone()
            self.db.execute("UPDATE submissions SET job_id=?, status='submitted', submitted_at=?"
                            " WHERE id=?", (job_id, now, submission_id))
            for idx in range(1, row["tasks"] + 1):
                self.db.execute(
                    "INSERT OR IGNORE INTO tasks (job_id, idx, state, first_seen, updated_at)"
                    " VALUES (?, ?, 'queued', ?, ?)", (job_id, idx, now, now))

    def record_failed(self, submission_id: int, error: str, now: Optional[float] = None) -> None:
        """The submission certainly did not create a job."""
        with self._tx():
            self.db.execute("UPDATE submissions SET status='failed', error=?, finished_at=?"
                            " WHERE id=?", (error[:2000], now or time.time(), submission_id))

    def pending_intents(self) -> List[sqlite3.Row]:
        """Submissions whose outcome is unknown (the launcher died around qsub)."""
        return self.db.execute("SELECT * FROM submissions WHERE status='intent'").fetchall()

    def submissions(self, status: Optional[str] = None) -> List[sqlite3.Row]:
        if status:
            return self.db.execute("SELECT * FROM submissions WHERE status=? ORDER BY id",
                                   (status,)).fetchall()
        return self.db.execute("SELECT * FROM submissions ORDER BY id").fetchall()

    def submission_by_job(self, job_id: str) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM submissions WHERE job_id=?", (job_id,)).fetchone()

    def open_jobs(self) -> List[str]:
        """Job ids that still have tasks not final."""
        rows = self.db.execute("SELECT DISTINCT job_id FROM tasks WHERE final=0 ORDER BY job_id")
        return [r["job_id"] for r in rows]

    # ------------------------------------------------------------------ tasks
    def tasks(self, job_id: Optional[str] = None, open_only: bool = False) -> List[sqlite3.Row]:
        sql = "SELECT * FROM tasks WHERE 1=1"
        args: list = []
        if job_id is not None:
            sql += " AND job_id=?"
            args.append(job_id)
        if open_only:
            sql += " AND final=0"
        return self.db.execute(sql + " ORDER BY job_id, idx", args).fetchall()

    def set_task_why(self, job_id: str, idx: int, why: str) -> None:
        """Keep why a task failed (shown by `status`)."""
        with self._tx():
            self.db.execute("UPDATE tasks SET why=? WHERE job_id=? AND idx=?", (why, job_id, idx))

    def mark_cancel_requested(self, job_id: str, indices: Optional[Sequence[int]] = None,
                              now: Optional[float] = None) -> None:
        """Remember we asked for a cancel: tasks that then vanish were cancelled, not lost."""
        now = now or time.time()
        with self._tx():
            if indices is None:
                self.db.execute("UPDATE tasks SET cancel_requested_at=? WHERE job_id=? AND final=0",
                                (now, job_id))
            else:
                self.db.executemany(
                    "UPDATE tasks SET cancel_requested_at=? WHERE job_id=? AND idx=? AND final=0",
                    [(now, job_id, i) for i in indices])

    def apply_status(self, status: JobStatus, now: Optional[float] = None) -> None:
        """Merge one successful scheduler answer into the ledger (never called on a failed query)."""
        now = now or time.time()
        with self._tx():
            known = {r["idx"]: r for r in self.db.execute(
                "SELECT * FROM tasks WHERE job_id=?", (status.job_id,))}
            for idx, task in status.tasks.items():
                row = known.get(idx)
                if row is None:
                    self.db.execute(
                        "INSERT INTO tasks (job_id, idx, state, first_seen, updated_at)"
                        " VALUES (?, ?, ?, ?, ?)", (status.job_id, idx, task.state.value, now, now))
                    row = {"final": 0, "cancel_requested_at": None, "started_at": None}
                if row["final"]:
                    continue
                state = task.state
                if state == JobState.MISSING and row["cancel_requested_at"]:
                    state = JobState.CANCELLED
                if state == JobState.MISSING:
                    self._set_missing(status.job_id, idx, now)
                    continue
                started = task.start_time or row["started_at"]
                if started is None and state == JobState.RUNNING:
                    started = now
                ended = task.end_time or (now if state.terminal else None)
                self.db.execute(
                    "UPDATE tasks SET state=?, raw_state=?, exit_status=?, started_at=?,"
                    " ended_at=?, updated_at=?, missing_since=NULL, final=? WHERE job_id=? AND idx=?",
                    (state.value, task.raw_state, task.exit_status, started,
                     ended if state.terminal else None, now, int(state.terminal),
                     status.job_id, idx))
            for idx, row in known.items():
                if idx in status.tasks or row["final"]:
                    continue
                if row["cancel_requested_at"]:
                    self.db.execute(
                        "UPDATE tasks SET state='cancelled', ended_at=?, updated_at=?, final=1"
                        " WHERE job_id=? AND idx=?", (now, now, status.job_id, idx))
                else:
                    self._set_missing(status.job_id, idx, now)
            self._finish_submission(status.job_id, now)

    def _set_missing(self, job_id: str, idx: int, now: float) -> None:
        row = self.db.execute("SELECT missing_since FROM tasks WHERE job_id=? AND idx=?",
                              (job_id, idx)).fetchone()
        since = row["missing_since"] if row and row["missing_since"] else now
        settled = now - since >= self.missing_grace_s
        self.db.execute("UPDATE tasks SET state='missing', missing_since=?, updated_at=?, final=?"
                        " WHERE job_id=? AND idx=?", (since, now, int(settled), job_id, idx))

    def _finish_submission(self, job_id: str, now: float) -> None:
        left = self.db.execute("SELECT COUNT(*) FROM tasks WHERE job_id=? AND final=0",
                               (job_id,)).fetchone()[0]
        if left == 0:
            self.db.execute("UPDATE submissions SET status='done', finished_at=? WHERE job_id=?"
                            " AND status='submitted'", (now, job_id))

    def counts(self) -> Dict[str, int]:
        """Open tasks per state (queued, running, missing) plus unresolved intents as missing."""
        out = {s.value: 0 for s in JobState}
        for row in self.db.execute("SELECT state, COUNT(*) AS n FROM tasks WHERE final=0"
                                   " GROUP BY state"):
            out[row["state"]] = row["n"]
        for row in self.pending_intents():
            out[JobState.MISSING.value] += row["tasks"]
        return out

    def all_counts(self, since: float = 0.0) -> Dict[str, int]:
        """Tasks per state, including finished ones first seen after ``since``."""
        out = {s.value: 0 for s in JobState}
        for row in self.db.execute("SELECT state, COUNT(*) AS n FROM tasks WHERE final=0"
                                   " OR first_seen>=? GROUP BY state", (since,)):
            out[row["state"]] = row["n"]
        return out

    def run_slots_claimed(self) -> int:
        """Tasks that may run at once: per open job, min(open tasks, its throttle)."""
        total = 0
        for row in self.db.execute(
                "SELECT s.max_running AS m, COUNT(t.idx) AS n FROM submissions s JOIN tasks t"
                " ON t.job_id=s.job_id WHERE t.final=0 GROUP BY s.id"):
            total += min(row["n"], row["m"] or row["n"])
        # tasks of jobs the launcher did not submit (adopted) count one slot each
        total += self.db.execute(
            "SELECT COUNT(*) FROM tasks t WHERE t.final=0 AND NOT EXISTS"
            " (SELECT 1 FROM submissions s WHERE s.job_id=t.job_id)").fetchone()[0]
        for row in self.pending_intents():
            total += min(row["tasks"], row["max_running"] or row["tasks"])
        return total

    def node_hours(self, period_start: float, now: Optional[float] = None) -> Tuple[float, float]:
        """(used, committed) node-hours in the period that began at ``period_start``.

        Used: elapsed time of tasks that ran in the period. Committed: used plus the full
        remaining walltime of every open task (what they may still consume).
        """
        now = now or time.time()
        used = reserved = 0.0
        for row in self.db.execute(
                "SELECT t.*, COALESCE(s.walltime_s, 0) AS wall, COALESCE(s.nodes_per_task, 1) AS npt"
                " FROM tasks t LEFT JOIN submissions s ON s.job_id=t.job_id"
                " WHERE t.final=0 OR t.ended_at>=? OR t.started_at>=?",
                (period_start, period_start)):
            wall, npt = row["wall"], row["npt"]
            if row["started_at"]:
                start = max(row["started_at"], period_start)
                if row["final"]:
                    end = row["ended_at"] or (row["started_at"] + wall)
                    end = min(end, row["started_at"] + wall) if wall else end
                    used += max(end - start, 0) / 3600.0 * npt
                else:
                    elapsed = max(now - start, 0)
                    used += elapsed / 3600.0 * npt
                    reserved += max(wall - (now - row["started_at"]), 0) / 3600.0 * npt
            elif not row["final"]:
                reserved += wall / 3600.0 * npt
        for row in self.pending_intents():
            reserved += row["tasks"] * row["walltime_s"] / 3600.0 * row["nodes_per_task"]
        return used, used + reserved

    # ------------------------------------------------------------------ dispatch
    def dispatch_receive(self, msg_hash: str, file_id: Optional[str], body: bytes,
                         properties: dict, attempts: int, now: Optional[float] = None) -> int:
        """The launcher now owns this message (committed before the broker delivery is acked)."""
        now = now or time.time()
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO dispatch (msg_hash, file_id, body, properties, state, attempts,"
                " received_at, updated_at) VALUES (?, ?, ?, ?, 'received', ?, ?, ?)",
                (msg_hash, file_id, body, json.dumps(properties), attempts, now, now))
        return cur.lastrowid

    def dispatch_open_by_hash(self, msg_hash: str) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM dispatch WHERE msg_hash=? AND state IN"
                               " ('received', 'submitted')", (msg_hash,)).fetchone()

    def dispatch_rows(self, *states: str) -> List[sqlite3.Row]:
        marks = ",".join("?" * len(states))
        return self.db.execute(f"SELECT * FROM dispatch WHERE state IN ({marks}) ORDER BY id",
                               states).fetchall()

    def dispatch_update(self, row_id: int, now: Optional[float] = None, **fields) -> None:
        allowed = {"state", "job_name", "job_id", "reason", "attempts"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx():
            self.db.execute(f"UPDATE dispatch SET {sets}, updated_at=? WHERE id=?",
                            (*fields.values(), now or time.time(), row_id))

    def dispatch_counts(self) -> Dict[str, int]:
        return {r["state"]: r["n"] for r in self.db.execute(
            "SELECT state, COUNT(*) AS n FROM dispatch GROUP BY state")}

    # ------------------------------------------------------------------ decisions
    def record_decision(self, decision, observation: dict, job_id: Optional[str] = None,
                        now: Optional[float] = None) -> int:
        """Store a scaling decision with its reasons and the observation it was based on."""
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO decisions (at, case_name, submit, cancel_queued, cancel_running,"
                " job_id, reasons, observation, idle_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now or time.time(), decision.case.value, decision.submit,
                 decision.cancel_queued, decision.cancel_running, job_id,
                 json.dumps(list(decision.reasons)), json.dumps(observation, sort_keys=True),
                 decision.idle_since))
        return cur.lastrowid

    def set_decision_job(self, decision_id: int, job_id: str) -> None:
        with self._tx():
            self.db.execute("UPDATE decisions SET job_id=? WHERE id=?", (job_id, decision_id))

    def last_decisions(self, n: int = 5) -> List[sqlite3.Row]:
        return self.db.execute("SELECT * FROM decisions ORDER BY id DESC LIMIT ?",
                               (n,)).fetchall()

    def last_idle_since(self) -> Optional[float]:
        """The idle clock carried by the latest decision."""
        row = self.db.execute("SELECT idle_since FROM decisions ORDER BY id DESC LIMIT 1").fetchone()
        return row["idle_since"] if row else None

    def decision_counts(self) -> Dict[str, int]:
        """Scaling decisions recorded per case (every case_name ever written)."""
        return {r["case_name"]: r["n"] for r in self.db.execute(
            "SELECT case_name, COUNT(*) AS n FROM decisions GROUP BY case_name")}

    # ------------------------------------------------------------------ agent reports
    def record_reports(self, reports: Sequence[dict], now: Optional[float] = None) -> int:
        """Keep the agents' activity reports (hpc_common.reports.report); a report read twice is kept once.

        Malformed reports are skipped. Returns how many were new.
        """
        now = now or time.time()
        rows = []
        for r in reports:
            try:
                durations = [float(d) for d in (r.get("durations") or [])]
                rows.append((str(r["agent"]), float(r["time"]), str(r.get("queue") or ""),
                             r.get("task"), float(r.get("interval") or 0.0), int(r.get("done") or 0),
                             int(r.get("failed") or 0), int(r.get("dead_lettered") or 0),
                             float(r.get("busy_seconds") or 0.0),
                             int(r["slots"]) if r.get("slots") else None, json.dumps(durations), now))
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        if not rows:
            return 0
        with self._tx():
            before = self.db.total_changes
            self.db.executemany(
                "INSERT OR IGNORE INTO agent_reports (agent, at, queue, task, interval_s, done, failed,"
                " dead_lettered, busy_seconds, slots, durations, read_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            return self.db.total_changes - before

    def agent_reports(self, since: float = 0.0, queue: Optional[str] = None) -> List[dict]:
        """Kept reports sent at or after ``since`` (oldest first), durations decoded."""
        sql, args = "SELECT * FROM agent_reports WHERE at>=?", [since]
        if queue is not None:
            sql += " AND queue=?"
            args.append(queue)
        out = []
        for row in self.db.execute(sql + " ORDER BY at", args):
            item = dict(row)
            item["durations"] = json.loads(item["durations"] or "[]")
            out.append(item)
        return out

    def report_totals(self, queue: Optional[str] = None) -> Dict[str, float]:
        """Sums over every kept report: done, failed, dead_lettered, busy_seconds."""
        sql = ("SELECT COALESCE(SUM(done), 0) AS done, COALESCE(SUM(failed), 0) AS failed,"
               " COALESCE(SUM(dead_lettered), 0) AS dead_lettered,"
               " COALESCE(SUM(busy_seconds), 0) AS busy_seconds FROM agent_reports")
        row = self.db.execute(sql + (" WHERE queue=?" if queue is not None else ""),
                              (queue,) if queue is not None else ()).fetchone()
        return dict(row)

    def observations(self, since: float) -> Iterator[dict]:
        for row in self.db.execute("SELECT at, observation FROM decisions WHERE at>=? ORDER BY id",
                                   (since,)):
            obs = json.loads(row["observation"])
            obs["at"] = row["at"]
            yield obs


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (isolation_level=None connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
