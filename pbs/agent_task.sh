#!/usr/bin/env bash
# One array task of Clowder HPC agents. Run by agent_array.pbs and agent_array.slurm; not
# submitted directly. Everything the agent needs comes from the environment (qsub -v / sbatch
# --export, or AGENT_CONFIG naming a YAML file) and, for secrets, from a private env file.
set -euo pipefail

fail() { echo "agent_task: $*" >&2; exit 2; }

cd "$AGENT_HOME" 2>/dev/null || fail "cannot enter AGENT_HOME=$AGENT_HOME"
[ -f agent/__init__.py ] || fail "$AGENT_HOME is not the clowder-hpc-agent folder; submit from its root or set AGENT_HOME"

# The Python to use: never the submitter's PATH, which qsub -v drops on some systems.
PY="${AGENT_PYTHON:-$AGENT_HOME/.venv/bin/python}"
[ -x "$PY" ] || fail "no Python at $PY; run 'bash scripts/install.sh' in $AGENT_HOME or set AGENT_PYTHON"

# Secrets (RABBITMQ_URI with its password, EXTRACTOR_KEY) live in a file only its owner can read,
# so they never appear on a qsub command line or in the scheduler's job record.
ENV_FILE="${AGENT_ENV_FILE:-$HOME/.clowder-hpc-agent/env}"
if [ -f "$ENV_FILE" ]; then
    mode=$(stat -c %a "$ENV_FILE")
    case "$mode" in
        ?00) ;;
        *) fail "$ENV_FILE is readable by others (mode $mode); run: chmod 600 $ENV_FILE" ;;
    esac
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
fi

# A job of `python -m launcher dispatch` processes the one message it was given.
if [ -n "${CLOWDER_MESSAGE_FILE:-}" ] && [ -z "${AGENT_SOURCE:-}" ]; then
    export AGENT_SOURCE=file
fi

# A batch task leaves as soon as the queue is dry, so an idle allocation is given back.
export AGENT_IDLE_EXIT="${AGENT_IDLE_EXIT:-60}"

# One log file per task, named by array (or job) id and index.
job="${SLURM_ARRAY_JOB_ID:-${PBS_ARRAY_ID:-${SLURM_JOB_ID:-${PBS_JOBID:-$$}}}}"
job="${job%%[.[]*}"
index="${SLURM_ARRAY_TASK_ID:-${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-0}}}"
log_dir="${AGENT_LOG_DIR:-$AGENT_HOME/logs}"
mkdir -p "$log_dir"
export AGENT_LOG_FILE="${AGENT_LOG_FILE:-$log_dir/agent-${job}_${index}.log}"
echo "agent_task: task ${job}_${index} on $(hostname), logging to $AGENT_LOG_FILE"

# MPI ranks in this task: AGENT_MPI_RANKS, else what the scheduler allocated for them.
ranks="${AGENT_MPI_RANKS:-${SLURM_NTASKS:-1}}"
if [ -z "${AGENT_MPI_RANKS:-}" ] && [ -n "${PBS_NODEFILE:-}" ] && [ -f "$PBS_NODEFILE" ]; then
    ranks=$(wc -l < "$PBS_NODEFILE")
fi
export PATH="$(dirname "$PY"):$PATH"   # the venv's mpiexec before any system one

# AGENT_PLUGIN may name several plugins ("a b"): one agent (per MPI group) serves them all.
# exec: the scheduler's SIGTERM (walltime, qdel) must reach the agent itself.
# Several ranks need mpi4py (the `mpi` extra); a single-rank task runs without it.
if [ "$ranks" -gt 1 ]; then
    "$PY" -c 'import mpi4py' 2>/dev/null \
        || fail "this task has $ranks MPI ranks but $PY cannot import mpi4py: pip install 'clowder-hpc-agent[mpi]' (or set AGENT_MPI_RANKS=1)"
    exec mpiexec -n "$ranks" "$PY" -m agent run
fi
exec "$PY" -m agent run
