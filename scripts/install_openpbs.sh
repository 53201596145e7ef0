#!/usr/bin/env bash
# Build and install OpenPBS 23.06.06 into /opt/pbs, once per machine (called by install.sh).
#
#   scripts/install_openpbs.sh
#
# The source, the one patch it needs on Python 3.11 and the recipe it follows live in
# $OPENPBS_VENDOR (default: ../shared/vendor/openpbs beside the repository; read-only: the build
# happens in a scratch folder). Skipped when /opt/pbs already answers `qstat --version` with this
# version and PBS_HOME exists. The servers are started by scripts/services.sh, not here.
#
# Slurm's slurm-wlm-torque also installs /usr/bin/qsub, qstat, qdel: PBS's own tools are always
# called as /opt/pbs/bin/... (nothing is linked into /usr/bin). Quiet on success; needs root.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR="${OPENPBS_VENDOR:-$REPO/../shared/vendor/openpbs}"
VERSION=23.06.06
PBS_EXEC=/opt/pbs
PBS_HOME=/var/spool/pbs

source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"  # die, quiet

installed() {
    [[ -x $PBS_EXEC/sbin/pbs_server && -d $PBS_HOME/mom_priv && -f /etc/pbs.conf ]] || return 1
    local version
    version="$("$PBS_EXEC/bin/qstat" --version 2>/dev/null || true)"
    [[ "$version" == *"pbs_version = $VERSION"* ]]
}

# Build dependencies and the PostgreSQL binaries PBS's datastore runs on. --no-upgrade: never
# upgrade packages (postgresql among them) under services that are already running.
DEPS=(gcc g++ make libtool autoconf automake libhwloc-dev libx11-dev libxt-dev libedit-dev
      libical-dev libncurses-dev python3-dev tcl-dev tk-dev swig libexpat1-dev libssl-dev
      libxext-dev libxft-dev libpq-dev postgresql postgresql-contrib sudo patch)

install_deps() {
    local missing=() pkg status
    for pkg in "${DEPS[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    export DEBIAN_FRONTEND=noninteractive
    # PostgreSQL's package would start a cluster of its own: PBS runs its own instance instead.
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created=1
    fi
    if ! quiet apt-get install -y -q --no-upgrade --no-install-recommends "${missing[@]}"; then
        quiet apt-get update -q || die "apt-get update failed"
        quiet apt-get install -y -q --no-upgrade --no-install-recommends "${missing[@]}" \
            || { [[ $created == 1 ]] && rm -f "$policy"; die "apt-get install failed: ${missing[*]}"; }
    fi
    [[ $created == 1 ]] && rm -f "$policy"
    return 0
}

build_and_install() {
    local tarball="$VENDOR/openpbs-$VERSION.tar.gz" work
    [[ -f $tarball ]] || die "no OpenPBS source at $tarball (set OPENPBS_VENDOR)"
    work="$(mktemp -d /tmp/openpbs-build.XXXXXX)"
    tar -xzf "$tarball" -C "$work"
    # (set -e does not apply inside a subshell that is tested with ||: chain the steps with &&)
    (
        cd "$work" &&
        # Python 3.11 has no <eval.h> (vendor/openpbs/patch-python311-evalh.diff; fixed upstream later).
        patch -s -p1 <"$VENDOR/patch-python311-evalh.diff" &&
        # Keep other Pythons (pyenv, a venv) out of configure: PBS embeds the system python3.
        export PATH=/usr/sbin:/usr/bin:/sbin:/bin &&
        quiet ./autogen.sh &&
        quiet ./configure --prefix="$PBS_EXEC" --with-python=/usr &&
        quiet make -j"$(nproc)" &&
        quiet make install
    ) || { rm -rf "$work"; die "OpenPBS build failed"; }
    rm -rf "$work"
    chmod 4755 "$PBS_EXEC/sbin/pbs_iff" "$PBS_EXEC/sbin/pbs_rcp"
}

# /etc/pbs.conf names the host "pbshost"; services.sh maps that name to an address of this machine.
configure() {
    cat >/etc/pbs.conf <<EOF
PBS_SERVER=pbshost
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=1
PBS_EXEC=$PBS_EXEC
PBS_HOME=$PBS_HOME
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
PBS_LEAF_NAME=pbshost
PBS_MOM_NODE_NAME=pbshost
PBS_SERVER_HOST_NAME=pbshost
EOF
    # Its systemd/update-rc.d complaints are harmless here: services.sh starts PBS itself.
    "$PBS_EXEC/libexec/pbs_postinstall" >/dev/null 2>&1 || true
    [[ -d $PBS_HOME/mom_priv ]] || die "pbs_postinstall did not create $PBS_HOME"
    # Output copy-back: a local copy, not scp to ourselves (else jobs stick in E).
    grep -qF '$usecp' "$PBS_HOME/mom_priv/config" \
        || echo '$usecp *:/ /' >>"$PBS_HOME/mom_priv/config"
}

[[ "$(id -u)" == 0 ]] || { installed && exit 0; die "need root to build and install OpenPBS"; }
installed && exit 0
install_deps
[[ -x $PBS_EXEC/sbin/pbs_server ]] || build_and_install
configure
installed || die "OpenPBS installed but $PBS_EXEC/bin/qstat --version does not say $VERSION"
