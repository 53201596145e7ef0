"""Checks that the local services integration tests need really answer.

scripts/services.sh brings them up (scripts/test.sh and .ci/run call it). Each `require_*` returns
quietly when its service works; otherwise it fails the test when CI=true (CI must never silently
skip an integration test) and skips it elsewhere, with the reason either way.

Results are cached per process: a service checked once is not re-probed for every test.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from hpc_common.redact import redact_uri

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
# The second broker node of scripts/services.sh, only for tests that stop and start a broker.
DEFAULT_CHAOS_URL = "amqp://guest:guest@127.0.0.1:5673/%2f"
DEFAULT_CHAOS_NODE = "chaos@localhost"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(reason: str) -> None:
    """Fail (CI=true) or skip (elsewhere) the current test because a service is missing."""
    hint = " (run scripts/services.sh up, or scripts/test.sh which does it)"
    if in_ci():
        pytest.fail(f"{reason}{hint}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(f"{reason}{hint}")


def rabbitmq_url() -> str:
    """AMQP URL of the test broker: $RABBITMQ_TEST_URI or guest on 127.0.0.1:5672."""
    return os.environ.get("RABBITMQ_TEST_URI") or DEFAULT_RABBITMQ_URL


def _run(argv: list, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _rabbitmq_problem(url: str) -> Optional[str]:
    try:
        import pika
    except ImportError as exc:
        return f"pika is not importable: {exc}"
    params = pika.URLParameters(url)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 5
    params.connection_attempts = 1
    params.stack_timeout = 10
    try:
        conn = pika.BlockingConnection(params)
    except Exception as exc:  # pika raises many types; any of them means "not usable"
        return f"RabbitMQ at {redact_uri(url)} does not accept an AMQP connection: {exc!r}"
    try:
        conn.channel().close()
    finally:
        conn.close()
    return None


def require_rabbitmq() -> str:
    """Open and close an AMQP connection; returns the URL."""
    url = rabbitmq_url()
    problem = _rabbitmq_problem(url)
    if problem:
        unavailable(problem)
    return url


def chaos_rabbitmq() -> tuple[str, str]:
    """(AMQP URL, node name) of the restartable broker: $RABBITMQ_CHAOS_URI / $RABBITMQ_CHAOS_NODE."""
    return (os.environ.get("RABBITMQ_CHAOS_URI") or DEFAULT_CHAOS_URL,
            os.environ.get("RABBITMQ_CHAOS_NODE") or DEFAULT_CHAOS_NODE)


@functools.lru_cache(maxsize=None)
def _chaos_problem(url: str, node: str) -> Optional[str]:
    problem = _rabbitmqctl_problem(node)
    return problem or _rabbitmq_problem(url)


def _rabbitmqctl_problem(node: str) -> Optional[str]:
    if not shutil.which("rabbitmqctl"):
        return "rabbitmqctl is not on PATH"
    try:
        out = _run(["rabbitmqctl", "-n", node, "-q", "eval", "rabbit:is_running()."], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'rabbitmqctl -n {node}' did not answer: {exc}"
    if out.stdout.strip() != "true":
        return f"broker node {node} is not running (rabbitmqctl: {(out.stderr or out.stdout).strip()[-300:]})"
    return None


def require_chaos_rabbitmq() -> tuple[str, str]:
    """The restartable broker node answers rabbitmqctl and AMQP; returns (URL, node name)."""
    url, node = chaos_rabbitmq()
    problem = _chaos_problem(url, node)
    if problem:
        unavailable(problem)
    return url, node


@functools.lru_cache(maxsize=None)
def _slurm_problem() -> Optional[str]:
    missing = [tool for tool in ("sinfo", "sbatch", "squeue", "scontrol", "qsub") if not shutil.which(tool)]
    if missing:
        return f"Slurm commands not on PATH: {', '.join(missing)}"
    try:
        out = _run(["sinfo", "-h", "-o", "%T"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'sinfo -h -o %T' did not answer: {exc}"
    if out.returncode != 0:
        return f"'sinfo' failed (exit {out.returncode}): {out.stderr.strip()}"
    states = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    if not states & USABLE_NODE_STATES:
        return f"no usable Slurm node (sinfo node states: {sorted(states) or 'none'})"
    return None


def require_slurm() -> None:
    """sinfo shows an idle/mixed/allocated node and sbatch, qsub are on PATH."""
    problem = _slurm_problem()
    if problem:
        unavailable(problem)


PBS_BIN = Path("/opt/pbs/bin")
PBS_USER = "pbsuser"
PBS_HOST = "pbshost"


@functools.lru_cache(maxsize=None)
def _pbs_problem() -> Optional[str]:
    qstat = PBS_BIN / "qstat"
    if not os.access(qstat, os.X_OK):
        return f"OpenPBS is not installed ({qstat} missing: scripts/install.sh builds it)"
    try:
        out = _run([str(qstat), "-B"])
        nodes = _run([str(PBS_BIN / "pbsnodes"), PBS_HOST])
        user = _run(["id", "-u", PBS_USER])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"OpenPBS did not answer: {exc}"
    if out.returncode != 0:
        return f"the OpenPBS server does not answer 'qstat -B' (exit {out.returncode}): {out.stderr.strip()}"
    state = next((line.split("=", 1)[1].strip() for line in nodes.stdout.splitlines()
                  if line.strip().startswith("state =")), "?")
    if state not in ("free", "job-busy", "job-exclusive"):
        return f"OpenPBS node {PBS_HOST} is not usable (state {state})"
    if user.returncode != 0:
        return f"no ordinary user {PBS_USER} to submit as (root may not submit to PBS)"
    return None


def require_pbs() -> None:
    """The OpenPBS server answers, its node is usable and the user jobs are submitted as exists."""
    problem = _pbs_problem()
    if problem:
        unavailable(problem)


def mpiexec_path() -> Path:
    """The mpiexec to use in tests: the venv's (MPICH wheel), never Debian's mpiexec.slurm."""
    return VENV_BIN / "mpiexec"


@functools.lru_cache(maxsize=None)
def _mpi_problem() -> Optional[str]:
    mpiexec = mpiexec_path()
    if not os.access(mpiexec, os.X_OK):
        return f"{mpiexec} is missing (pip install -e '.[mpi]')"
    try:
        out = _run([sys.executable, "-c", "import mpi4py.MPI"], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"importing mpi4py.MPI did not finish: {exc}"
    if out.returncode != 0:
        return f"mpi4py does not import: {out.stderr.strip()[-500:]}"
    return None


def require_mpi() -> Path:
    """The venv's mpiexec exists and mpi4py imports; returns mpiexec's path."""
    problem = _mpi_problem()
    if problem:
        unavailable(problem)
    return mpiexec_path()


#: the directory image scripts/install.sh builds (scripts/build_test_image.sh)
CHARLIECLOUD_IMAGE = os.environ.get("CHARLIECLOUD_TEST_IMAGE") or "/var/cache/clowder-hpc-agent/images/pyclowder-bookworm"


@functools.lru_cache(maxsize=None)
def _charliecloud_problem(image: str) -> Optional[str]:
    if not shutil.which("ch-run"):
        return "ch-run is not on PATH (apt-get install charliecloud-runtime)"
    for part in ("ch/base.stamp", "ch/layer.stamp", "extractor/probe.py"):
        if not os.path.exists(os.path.join(image, part)):
            return f"the test image {image} is missing or unfinished (no {part}): run scripts/build_test_image.sh"
    env = dict(os.environ, USER=os.environ.get("USER") or "root")
    try:
        out = subprocess.run(["ch-run", image, "--", "python3", "-c", "import pyclowder"], capture_output=True,
                             text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ch-run did not start the test image: {exc}"
    if out.returncode != 0:
        return f"ch-run {image} -- python3 -c 'import pyclowder' failed: {out.stderr.strip()[-500:]}"
    return None


def require_charliecloud() -> str:
    """ch-run works and the test image (python3 + pyclowder + /extractor) starts; returns the image's path."""
    problem = _charliecloud_problem(CHARLIECLOUD_IMAGE)
    if problem:
        unavailable(problem)
    return CHARLIECLOUD_IMAGE


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> bool:
    """Whether something accepts TCP connections on host:port within timeout seconds."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


IMAGEMAGICK_CONVERT = "/usr/bin/convert"  # Debian's imagemagick (scripts/install.sh), not another on PATH


@functools.lru_cache(maxsize=None)
def _imagemagick_problem() -> Optional[str]:
    try:
        out = _run([IMAGEMAGICK_CONVERT, "-version"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{IMAGEMAGICK_CONVERT} does not run ({exc}): apt-get install imagemagick"
    if "ImageMagick" not in out.stdout:
        return f"{IMAGEMAGICK_CONVERT} is not ImageMagick's convert: apt-get install imagemagick"
    return None


def require_imagemagick() -> str:
    """ImageMagick's convert runs; returns its path."""
    problem = _imagemagick_problem()
    if problem:
        unavailable(problem)
    return IMAGEMAGICK_CONVERT
