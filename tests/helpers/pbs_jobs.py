"""Jobs on the local OpenPBS for tests, submitted as the ordinary user (PBS refuses root).

The tests run as root; everything a job touches must be reachable by that user: the checkout and
its venv (their parent folders get the search bit only, nothing is made readable that was not),
a per-test work folder the user owns, and the user's private ~/.clowder-hpc-agent/env (mode 600)
holding the broker URI, as pbs/agent_array.pbs's header tells users to do.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from helpers.services import PBS_BIN, PBS_USER, REPO, unavailable
from helpers.slurm_jobs import wait_for

WORK_BASE = Path("/tmp/clowder-pbs-tests")
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"  # util-linux; /usr/sbin may be off PATH


def user() -> pwd.struct_passwd:
    return pwd.getpwnam(PBS_USER)


def _searchable(path: Path) -> None:
    """Give every folder above ``path`` the search bit for others (never read or write)."""
    for folder in [*reversed(path.parents)]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def make_reachable() -> None:
    """Let the user run this checkout's venv Python (its interpreter may live under /root)."""
    python = Path(sys.executable)
    for path in (REPO / "pbs", python, python.resolve(), Path(sys.base_prefix) / "lib"):
        _searchable(path)
    probe = subprocess.run([RUNUSER, "-u", PBS_USER, "--", str(REPO / ".venv" / "bin" / "python"),
                            "-c", "import agent, launcher"], cwd="/", capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        unavailable(f"{PBS_USER} cannot run {REPO}/.venv/bin/python: {probe.stderr.strip()[-300:]}")


def work_dir(label: str) -> Path:
    """A fresh folder owned by the user (tmp_path is root's, mode 700)."""
    WORK_BASE.mkdir(mode=0o755, exist_ok=True)
    WORK_BASE.chmod(0o755)
    path = WORK_BASE / f"{label}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    u = user()
    os.chown(path, u.pw_uid, u.pw_gid)
    return path


def write_secrets(rabbitmq_url: str) -> Path:
    """~user/.clowder-hpc-agent/env (mode 600, the user's): the broker URI with its password."""
    u = user()
    folder = Path(u.pw_dir) / ".clowder-hpc-agent"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chown(folder, u.pw_uid, u.pw_gid)
    path = folder / "env"
    text = f"RABBITMQ_URI={rabbitmq_url}\n"
    if path.exists() and path.read_text() == text:
        return path
    tmp = folder / f".env.{uuid.uuid4().hex[:6]}"  # tests in parallel write the same text: atomically
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.chown(tmp, u.pw_uid, u.pw_gid)
    tmp.replace(path)
    return path


def user_env(**extra: str) -> Dict[str, str]:
    """A login-like environment of the user: PBS's tools after /usr/bin (Slurm's wrappers first), as
    on this machine's default PATH, so only full paths or pbs.conf find PBS's qsub."""
    u = user()
    env = {"HOME": u.pw_dir, "USER": PBS_USER, "LOGNAME": PBS_USER, "SHELL": "/bin/bash",
           "LANG": "C.UTF-8", "PATH": f"/usr/local/bin:/usr/bin:/bin:{PBS_BIN}"}
    env.update(extra)
    return env


def run_as_user(argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run argv as the user (runuser, no shell) with exactly ``env``."""
    proc = subprocess.run([RUNUSER, "-u", PBS_USER, "--", *argv], cwd=str(cwd), env=dict(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{list(argv)} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def popen_as_user(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Start argv as the user in its own session (so a test can kill it and its children)."""
    return subprocess.Popen([RUNUSER, "-u", PBS_USER, "--", *argv], cwd=str(cwd), env=dict(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def qstat(job_id: str) -> Dict[str, dict]:
    """{id: attributes} of a job and its subjobs, finished ones included (qstat -x -t -f -F json)."""
    out = subprocess.run([str(PBS_BIN / "qstat"), "-x", "-t", "-f", "-F", "json", job_id],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {}
    return json.loads(out.stdout, strict=False).get("Jobs", {})


def parent(job_id: str) -> dict:
    return qstat(job_id).get(job_id, {})


def subjobs(job_id: str) -> Dict[int, dict]:
    """{index: attributes} of an array's subjobs."""
    return {int(v["array_index"]): v for k, v in qstat(job_id).items() if k != job_id and "array_index" in v}




def wait_finished(job_id: str, timeout: float) -> dict:
    """The job's attributes once it is F (finished); AssertionError (after qdel) otherwise."""
    if wait_for(lambda: parent(job_id).get("job_state") == "F", timeout):
        return parent(job_id)
    qdel(job_id)
    raise AssertionError(f"PBS job {job_id} not finished within {timeout}s: {parent(job_id)}")


def qdel(*job_ids: str) -> None:
    """Delete jobs (as root: PBS managers may); errors for finished ones are expected."""
    if job_ids:
        subprocess.run([str(PBS_BIN / "qdel"), "-x", *job_ids], capture_output=True, timeout=30)


def names_to_ids(names: Sequence[str]) -> list:
    """Ids of the jobs with these names (qselect -x), whoever submitted them."""
    ids = []
    for name in names:
        out = subprocess.run([str(PBS_BIN / "qselect"), "-x", "-N", name], capture_output=True,
                             text=True, timeout=30)
        ids += out.stdout.split()
    return ids


def cleanup(folder: Path, job_ids: Sequence[str] = (), names: Sequence[str] = ()) -> None:
    """qdel what a test left, then remove its work folder."""
    qdel(*job_ids, *names_to_ids(names))
    shutil.rmtree(folder, ignore_errors=True)


def read_output(folder: Path, pattern: str = "*.o*") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob(pattern)))


def ledger_names(state_dir: Path) -> list:
    """Job names of every submission a launcher state directory recorded."""
    import sqlite3

    db = state_dir / "ledger.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(str(db))
    try:
        return [r[0] for r in con.execute("SELECT job_name FROM submissions")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def pbs_file_tag(job_id: Optional[str]) -> str:
    """``"12[].pbshost"`` -> ``"12"``: how agent_task.sh names its log files."""
    return (job_id or "").split("[", 1)[0].split(".", 1)[0]
