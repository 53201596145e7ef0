#!/usr/bin/env bash
# Install what the project needs on a Debian (bookworm) machine, idempotently.
#
#   scripts/install.sh
#
# 1. Debian packages: RabbitMQ, Slurm (+ the Torque/PBS qsub wrappers), munge, ssh, iproute2,
#    procps. apt is skipped entirely when every package is already installed.
# 2. OpenPBS in /opt/pbs, built from ../shared/vendor/openpbs once (scripts/install_openpbs.sh).
# 3. .venv in the repo root with `pip install -e '.[mpi,test]'`. Skipped when the venv imports the
#    project and setup.py has not changed since the last install (stamp file inside .venv).
# 3. The Charliecloud test image (scripts/build_test_image.sh): Debian bookworm from mmdebstrap with
#    pyclowder from PyPI, at /var/cache/clowder-hpc-agent/images/pyclowder-bookworm. Built once per
#    machine (~1-2 min); its stamp files make later runs a no-op.
#
# Quiet on success; prints what failed otherwise. Needs root for apt (CI runs as root).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"  # die, quiet

APT_PACKAGES=(rabbitmq-server slurm-wlm slurm-wlm-torque munge openssh-server openssh-client openssl
              iproute2 procps chromium imagemagick charliecloud-runtime mmdebstrap)

# ---------------------------------------------------------------- Debian packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
    [[ "$(id -u)" == 0 ]] || die "need root to apt-get install: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Daemons are started by scripts/services.sh, not by package scripts (there is no systemd
    # here, and CI machines may lack an init system): forbid invoke-rc.d starts during install.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    trap 'if [[ $created_policy == 1 ]]; then rm -f "$policy"; fi' EXIT
    quiet apt-get update -q || die "apt-get update failed"
    quiet apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    for pkg in "${missing[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        [[ "$status" == "install ok installed" ]] || die "package $pkg still not installed"
    done
fi

# ---------------------------------------------------------------- OpenPBS (built once per machine)
# The `pbs` tests need a real OpenPBS beside Slurm: source and recipe in ../shared/vendor/openpbs.
bash "$REPO/scripts/install_openpbs.sh" || die "OpenPBS install failed"

# ---------------------------------------------------------------- Python venv
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "$PY not found"

if [[ ! -x .venv/bin/python ]]; then
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        # Debian's own python3 needs python3-venv (pyenv/python.org builds do not).
        rm -rf .venv
        if [[ "$(command -v "$PY")" == /usr/bin/* ]] && [[ "$(id -u)" == 0 ]]; then
            quiet apt-get update -q || die "apt-get update failed"
            DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -q --no-install-recommends \
                python3-venv || die "apt-get install python3-venv failed"
        fi
        quiet "$PY" -m venv .venv || die "could not create .venv with $PY (python3-venv missing?)"
    fi
fi

stamp=.venv/.clowder-hpc-agent-setup.sha256
want="$(sha256sum setup.py | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"

if [[ "$want" != "$have" ]] \
   || ! .venv/bin/python -c 'import agent, launcher, hpc_common, mpi4py, pika, pyclowder, pytest, xdist, hypothesis, importlinter' \
        >/dev/null 2>&1 \
   || [[ ! -x .venv/bin/mpiexec ]]; then
    rm -f "$stamp"
    quiet .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[mpi,test]' \
        || die "pip install -e '.[mpi,test]' failed"
    .venv/bin/python -c 'import agent, launcher, mpi4py, pika, pyclowder, pytest, xdist' \
        || die "venv installed but the project does not import"
    echo "$want" >"$stamp"
fi

# ---------------------------------------------------------------- Charliecloud test image
bash "$REPO/scripts/build_test_image.sh" || die "building the Charliecloud test image failed"
