"""Jobs on the local Slurm for tests: what squeue shows, waiting, and cleaning up a launcher's jobs."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import time


def cleanup(state_dir):
    """scancel every job this launcher state knows, and any job named after its intents."""
    db = state_dir / "ledger.sqlite"
    if not db.exists():
        return
    con = sqlite3.connect(str(db))
    try:
        rows = con.execute("SELECT job_id, job_name FROM submissions").fetchall()
    except sqlite3.OperationalError:  # the launcher died before it made its tables: no jobs
        rows = []
    finally:
        con.close()
    ids = [r[0] for r in rows if r[0]]
    names = {r[1] for r in rows}
    for rec in squeue():
        if rec.get("name") in names:
            ids.append(str(rec["array_job_id"] or rec["job_id"]))
    if ids:
        subprocess.run(["scancel", *sorted(set(ids))], capture_output=True, timeout=30)


def squeue():
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)["jobs"]


def tasks_of(job_id):
    """{task index: state} for one array job, as squeue shows it now."""
    out = {}
    for rec in squeue():
        if str(rec.get("array_job_id")) != str(job_id):
            continue
        if rec.get("array_task_id") is not None:
            out[rec["array_task_id"]] = rec["job_state"]
        elif rec.get("array_task_string"):
            from launcher.schedulers.base import parse_ranges
            for i in parse_ranges(rec["array_task_string"]):
                out[i] = rec["job_state"]
    return out


def wait_for(predicate, timeout=30.0, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()
