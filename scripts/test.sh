#!/usr/bin/env bash
# The project's test command (README; CI runs it through .ci/run):
#
#   scripts/test.sh [pytest args...]      e.g. scripts/test.sh tests/unit, scripts/test.sh -m "not slow"
#
# Installs what is missing (scripts/install.sh), brings up RabbitMQ (and its second node for
# the broker-restart tests), munge and Slurm
# (scripts/services.sh up), then runs pytest from the repo's .venv. The venv's bin comes first
# on PATH so its MPICH mpiexec wins over Debian's /usr/bin/mpiexec (mpiexec.slurm).
# pytest's exit 5 (no tests collected) is turned into a failure.
#
# Tests run in parallel with pytest-xdist: TEST_WORKERS processes (default 8; most tests wait on
# the broker, Slurm or timeouts rather than use a CPU). `--dist loadgroup` keeps each
# xdist_group on one worker, one test at a time (tests/conftest.py lists the groups). Later
# arguments win, so `scripts/test.sh -n 0 -k name` runs serially.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/install.sh
bash scripts/services.sh up

export PATH="$REPO/.venv/bin:$PATH"
rc=0
.venv/bin/python -m pytest -ra -n "${TEST_WORKERS:-8}" --dist loadgroup "$@" || rc=$?   # no path: pytest.ini testpaths
if ((rc == 5)); then
    echo "test.sh: error: pytest collected no tests (exit 5); treating that as a failure" >&2
    exit 1
fi
exit "$rc"
