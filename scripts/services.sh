#!/usr/bin/env bash
# Bring up, stop or report the local services the integration tests need, without systemd:
#
#   scripts/services.sh [up|down|status]      (default: up)
#
#   rabbitmq  RabbitMQ broker, /etc/rabbitmq/rabbitmq.conf with consumer_timeout = 60000 (so tests
#             can see the broker take back an unacked delivery within ~2 min). guest/guest works
#             from 127.0.0.1 (amqp://guest:guest@127.0.0.1:5672/%2f). Logs: /var/log/rabbitmq/.
#   rabbitmq-chaos  a second RabbitMQ node just for the tests that stop and restart a broker
#             (chaos@localhost, amqp://guest:guest@127.0.0.1:5673/%2f, same consumer_timeout, its
#             own config /etc/rabbitmq/chaos.conf, data /var/lib/rabbitmq/chaos, logs
#             /var/log/rabbitmq/chaos/, Erlang distribution port 25673), so those tests can run
#             while the rest of the suite uses the main broker. `rabbitmqctl -n chaos@localhost`.
#   munge     munged with /etc/munge/munge.key (created if missing). Logs: /var/log/munge/.
#   slurm     single-node Slurm (slurmctld + slurmd on this host, node from `slurmd -C`),
#             select/cons_tres + CR_Core so several 1-cpu array tasks run at once, no accounting.
#             Logs: /var/log/slurm/. The Debian slurm-wlm-torque wrappers give qsub/qstat/qdel;
#             qsub accepts both `-J 1-3` and `-t 1-3` for arrays on the command line, and sbatch
#             itself reads `#PBS -J`/`#PBS -t` lines. `qsub -v X=1` means `--export=none,X=1`
#             (login environment + X, not the submitter's PATH), no PBS_* variables are set, and
#             with the array only in `#PBS -J` all tasks share one output file. Details and what
#             was verified (walltime TIMEOUT, MPI inside jobs): scripts/NOTES-slurm.md.
#   openpbs   OpenPBS 23.06.06 (server, sched, comm, mom on this host; built by install.sh into
#             /opt/pbs). Its host name `pbshost` resolves (/etc/hosts) to a non-loopback IPv4 address
#             of THIS machine (PBS ignores 127.0.0.0/8): the dummy interface pbs0 (10.251.0.1) where
#             the kernel allows one, else this machine's own first global address. job_history_enable,
#             `$usecp *:/ /`, the node's ncpus raised to PBS_NCPUS (default 8) so short test arrays
#             run side by side, and an ordinary user `pbsuser` (root may not submit). Slurm's qsub
#             wrappers stay in /usr/bin: PBS's tools are /opt/pbs/bin/... Logs: /var/spool/pbs/*_logs.
#
# Idempotent: config files are rewritten only when their content differs. Slurm daemons are
# restarted only when slurm.conf changed; the broker only when its running consumer_timeout is
# not 60000; a broker node whose rabbit app was stopped gets `start_app`; a down/drained node
# is resumed.
# Each service must come up within $SERVICE_TIMEOUT seconds (default 60) or the script exits 1.
# Quiet on success apart from one summary line per service.
set -euo pipefail

ACTION="${1:-up}"
TIMEOUT="${SERVICE_TIMEOUT:-60}"
# A broker that was killed (not stopped) recovers its durable queues and rebuilds its message
# store index before the rabbit application runs: allow that longer than a plain start.
BOOT_TIMEOUT="${RABBITMQ_BOOT_TIMEOUT:-600}"

RMQ_CONF=/etc/rabbitmq/rabbitmq.conf
RMQ_CONSUMER_TIMEOUT=60000
AMQP_PORT=5672

CHAOS_NODE=chaos@localhost
CHAOS_PORT=5673
CHAOS_DIST_PORT=25673
CHAOS_CONF=/etc/rabbitmq/chaos.conf
CHAOS_BASE=/var/lib/rabbitmq/chaos
CHAOS_LOGDIR=/var/log/rabbitmq/chaos

MUNGE_KEY=/etc/munge/munge.key
MUNGE_PIDFILE=/run/munge/munged.pid

SLURM_CONF=/etc/slurm/slurm.conf
SLURMCTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid
SLURM_LOGDIR=/var/log/slurm

die() { echo "services.sh: error: $*" >&2; exit 1; }
warn() { echo "services.sh: $*" >&2; }

# wait_for SECONDS CMD... : poll CMD once a second until it succeeds; fail after SECONDS.
wait_for() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

# write_if_changed FILE MODE: stdin becomes FILE unless identical; returns 0 if FILE changed.
write_if_changed() {
    local file=$1 mode=$2 tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    if [[ -f "$file" ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mkdir -p "$(dirname "$file")"
    install -m "$mode" "$tmp" "$file"
    rm -f "$tmp"
    return 0
}

pid_alive() { # pid_alive PIDFILE NAME
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(ps -o comm= -p "$pid" 2>/dev/null || true)" == "$2" ]]
}

stop_pidfile() { # stop_pidfile PIDFILE NAME: TERM, wait, then KILL
    local pid
    pid_alive "$1" "$2" || return 0
    pid="$(cat "$1")"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for "$TIMEOUT" bash -c "! ps -p $pid >/dev/null"; then
        warn "$2 (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$1"
}

need() { command -v "$1" >/dev/null || die "$1 not found: run scripts/install.sh first"; }

# ======================================================================== RabbitMQ (both nodes)
# rmq_server_detached [ENV=VALUE...]: start a broker node in the background as user rabbitmq.
# Recovery opens a file per durable queue; with fewer handles than queues RabbitMQ 3.x stalls in
# its boot ("Recovering N queues, available file handles: M") and never runs. Debian's
# /usr/sbin/rabbitmq-server goes through `su`, whose PAM session resets the soft open-files limit
# to 1024, so start the server script ourselves with the soft limit raised to the hard one.
rmq_server_detached() {
    local server=/usr/lib/rabbitmq/bin/rabbitmq-server
    if [[ "$(id -u)" == 0 && -x "$server" ]] && id rabbitmq >/dev/null 2>&1; then
        (cd /var/lib/rabbitmq && env "$@" su rabbitmq -s /bin/sh -c \
            "ulimit -n \$(ulimit -Hn) 2>/dev/null || true; exec $server -detached" 2>&1 9>&-)
    else
        (cd /var/lib/rabbitmq && env "$@" rabbitmq-server -detached 2>&1 9>&-)
    fi
}

# rmq_booted LABEL STATE_CMD RUNNING_CMD: wait for a started node's rabbit application. A node
# still in its boot (recovering queues, or too busy to answer) gets $BOOT_TIMEOUT seconds, with a
# line every minute; a node whose application stays stopped fails after $TIMEOUT.
rmq_booted() {
    local label=$1 state_cmd=$2 running_cmd=$3 start=$SECONDS next=$((SECONDS + 60))
    while ((SECONDS - start < BOOT_TIMEOUT)); do
        "$running_cmd" && return 0
        [[ "$("$state_cmd")" == stopped ]] && ((SECONDS - start >= TIMEOUT)) && return 1
        if ((SECONDS >= next)); then
            warn "$label: still booting after $((SECONDS - start))s (recovering queues; see its log)"
            next=$((SECONDS + 60))
        fi
        sleep 1
    done
    return 1
}

# Queues the test suite and the benchmarks name (tests/ and benchmarks/ delete them when done)
# expire after an hour unused, so a run killed half-way cannot pile up queues that every later
# broker start must recover. A policy touches no other queue.
LEFTOVER_POLICY=clowder-hpc-agent-test-leftovers
LEFTOVER_PATTERN='^(clowder-hpc-agent[.]reports[.]|error[.]|reply[.]|retry[.])?(test|chaos|bench|perf|prof|scale-val|mp)-'
rmq_leftover_policy() {  # rmq_leftover_policy [-n NODE]
    timeout 30 rabbitmqctl "$@" -q set_policy --apply-to queues "$LEFTOVER_POLICY" "$LEFTOVER_PATTERN" \
        '{"expires": 3600000}' >/dev/null 2>&1 || warn "rabbitmq: could not set policy $LEFTOVER_POLICY $*"
}

# ======================================================================== RabbitMQ
# The main node's beam: any rabbitmq beam.smp but the chaos node's (its pid file is known).
rmq_beam_pids() {
    local chaos_pid
    chaos_pid="$(cat "$CHAOS_BASE/$CHAOS_NODE.pid" 2>/dev/null || true)"
    pgrep -u rabbitmq -x beam.smp 2>/dev/null | grep -vx "${chaos_pid:-none}" || true
}
rmq_beam_running() { [[ -n "$(rmq_beam_pids)" ]]; }
rmq_beam_stopped() { ! rmq_beam_running; }
# `rabbitmqctl status` fails while the rabbit application is stopped; `eval` works on any live node.
rmq_node_answers() { [[ "$(timeout 30 rabbitmqctl -q eval 'ok.' 2>/dev/null)" == ok ]]; }
rmq_app_running() { [[ "$(timeout 30 rabbitmqctl -q eval 'rabbit:is_running().' 2>/dev/null)" == true ]]; }
rmq_boot_state() { timeout 30 rabbitmqctl -q eval 'rabbit_boot_state:get().' 2>/dev/null || true; }
amqp_port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$AMQP_PORT" 2>/dev/null; }

rmq_consumer_timeout() {
    # prints e.g. 60000, "undefined" or nothing if the node does not answer
    local out
    out="$(timeout 30 rabbitmqctl -q eval 'application:get_env(rabbit, consumer_timeout).' 2>/dev/null || true)"
    case "$out" in
        "{ok,"*) out="${out#\{ok,}"; echo "${out%\}}" ;;
        *) echo "${out:-unknown}" ;;
    esac
}

rmq_write_conf() {
    write_if_changed "$RMQ_CONF" 0644 <<EOF
# Written by clowder-hpc-agent scripts/services.sh; edits are overwritten.
# Unacked deliveries older than this are taken back by the broker (checked about once a minute).
consumer_timeout = $RMQ_CONSUMER_TIMEOUT
# guest/guest is accepted from loopback only (RabbitMQ's default, stated here for clarity).
loopback_users.guest = true
listeners.tcp.default = $AMQP_PORT
log.file.level = info
EOF
}

rmq_stop() {
    rmq_beam_running || return 0
    local pidfile
    pidfile="$(ls /var/lib/rabbitmq/mnesia/rabbit@*.pid 2>/dev/null | head -n 1 || true)"
    timeout $((TIMEOUT + 10)) rabbitmqctl -q stop >/dev/null 2>&1 || true
    if ! wait_for "$TIMEOUT" rmq_beam_stopped; then
        if [[ -n "$pidfile" ]] && pid_alive "$pidfile" beam.smp; then
            warn "rabbitmq did not stop within ${TIMEOUT}s; killing pid $(cat "$pidfile")"
            kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
            sleep 1
        fi
        rmq_beam_running && die "rabbitmq: broker still running ${TIMEOUT}s after 'rabbitmqctl stop'"
    fi
    return 0
}

rmq_up() {
    need rabbitmq-server
    rmq_write_conf || true
    mkdir -p /var/log/rabbitmq /var/lib/rabbitmq
    chown rabbitmq:rabbitmq /var/log/rabbitmq /var/lib/rabbitmq

    if rmq_beam_running; then
        # Already running (or starting): wait until it answers, then check its settings.
        wait_for "$TIMEOUT" rmq_node_answers \
            || die "rabbitmq: a broker process exists but does not answer 'rabbitmqctl eval' after ${TIMEOUT}s (see /var/log/rabbitmq/)"
        # The node may be up with the rabbit application stopped (`rabbitmqctl stop_app`, as
        # broker-restart tests do): start it. A booting node is left to finish.
        if [[ "$(rmq_boot_state)" == stopped ]]; then
            timeout 60 rabbitmqctl -q start_app >/dev/null 2>&1 \
                || die "rabbitmq: the node runs but 'rabbitmqctl start_app' failed (see /var/log/rabbitmq/)"
        fi
        rmq_booted rabbitmq rmq_boot_state rmq_app_running \
            || die "rabbitmq: node answers but the rabbit application is not running (see /var/log/rabbitmq/)"
        local ct
        ct="$(rmq_consumer_timeout)"
        if [[ "$ct" != "$RMQ_CONSUMER_TIMEOUT" ]]; then
            rmq_stop   # running with another consumer_timeout: restart with our config
        fi
    fi

    if ! rmq_beam_running; then
        local out
        # Not `rabbitmqctl await_startup` straight away: it fails at once until the node has
        # registered with epmd. Poll the node instead (see shared/FACTS.md).
        out="$(rmq_server_detached)" \
            || die "rabbitmq: 'rabbitmq-server -detached' failed: $out"
        wait_for "$TIMEOUT" rmq_node_answers \
            || die "rabbitmq: node did not answer 'rabbitmqctl eval' within ${TIMEOUT}s (see /var/log/rabbitmq/)"
    fi
    rmq_booted rabbitmq rmq_boot_state rmq_app_running \
        || die "rabbitmq: node answers but the rabbit application is not running (see /var/log/rabbitmq/)"
    wait_for "$TIMEOUT" amqp_port_open \
        || die "rabbitmq: AMQP port $AMQP_PORT on 127.0.0.1 not open after ${TIMEOUT}s"
    local ct
    ct="$(rmq_consumer_timeout)"
    [[ "$ct" == "$RMQ_CONSUMER_TIMEOUT" ]] \
        || die "rabbitmq: consumer_timeout is '$ct', expected $RMQ_CONSUMER_TIMEOUT (check $RMQ_CONF)"
    rmq_leftover_policy
}

rmq_status() {
    if rmq_beam_running && rmq_node_answers && rmq_app_running && amqp_port_open; then
        echo "rabbitmq: up (consumer_timeout=$(rmq_consumer_timeout), amqp://127.0.0.1:$AMQP_PORT)"
    else
        echo "rabbitmq: down"
        return 1
    fi
}

# ======================================================================== RabbitMQ chaos node
# A second node on this host for tests that stop/start a broker (tests/chaos/test_chaos.py and the
# durability restart test): restarting it cannot disturb the tests that use the main node.
CHAOS_ENV=(RABBITMQ_NODENAME="$CHAOS_NODE" RABBITMQ_NODE_PORT="$CHAOS_PORT" RABBITMQ_DIST_PORT="$CHAOS_DIST_PORT"
           RABBITMQ_MNESIA_BASE="$CHAOS_BASE" RABBITMQ_LOG_BASE="$CHAOS_LOGDIR" RABBITMQ_CONFIG_FILE="$CHAOS_CONF")
chaos_ctl() { timeout 30 rabbitmqctl -n "$CHAOS_NODE" -q "$@" 2>/dev/null; }
chaos_answers() { [[ "$(chaos_ctl eval 'ok.')" == ok ]]; }
chaos_app_running() { [[ "$(chaos_ctl eval 'rabbit:is_running().')" == true ]]; }
chaos_port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$CHAOS_PORT" 2>/dev/null; }
chaos_consumer_timeout() {
    local out
    out="$(chaos_ctl eval 'application:get_env(rabbit, consumer_timeout).' || true)"
    out="${out#\{ok,}"; echo "${out%\}}"
}
chaos_boot_state() { chaos_ctl eval 'rabbit_boot_state:get().' || true; }
chaos_stopped() { ! pid_alive "$CHAOS_BASE/$CHAOS_NODE.pid" beam.smp; }

chaos_write_conf() {
    write_if_changed "$CHAOS_CONF" 0644 <<EOF
# Written by clowder-hpc-agent scripts/services.sh; edits are overwritten.
# The chaos tests' own broker node ($CHAOS_NODE); same consumer_timeout as the main node.
consumer_timeout = $RMQ_CONSUMER_TIMEOUT
loopback_users.guest = true
listeners.tcp.default = 127.0.0.1:$CHAOS_PORT
log.file.level = info
EOF
}

chaos_stop() {
    chaos_stopped && return 0
    timeout $((TIMEOUT + 10)) rabbitmqctl -n "$CHAOS_NODE" -q stop >/dev/null 2>&1 || true
    if ! wait_for "$TIMEOUT" chaos_stopped; then
        warn "rabbitmq-chaos did not stop within ${TIMEOUT}s; killing pid $(cat "$CHAOS_BASE/$CHAOS_NODE.pid")"
        kill -KILL "$(cat "$CHAOS_BASE/$CHAOS_NODE.pid")" 2>/dev/null || true
        sleep 1
    fi
    rm -f "$CHAOS_BASE/$CHAOS_NODE.pid"
}

chaos_up() {
    local changed=0 out
    if chaos_write_conf; then changed=1; fi
    mkdir -p "$CHAOS_BASE" "$CHAOS_LOGDIR"
    chown rabbitmq:rabbitmq "$CHAOS_BASE" "$CHAOS_LOGDIR"
    if ! chaos_stopped; then
        wait_for "$TIMEOUT" chaos_answers \
            || die "rabbitmq-chaos: the node's process runs but does not answer after ${TIMEOUT}s (see $CHAOS_LOGDIR/)"
        # A test may have left its application stopped: start it (a booting node is left to finish).
        if [[ "$(chaos_boot_state)" == stopped ]]; then
            timeout 60 rabbitmqctl -n "$CHAOS_NODE" -q start_app >/dev/null 2>&1 \
                || die "rabbitmq-chaos: 'rabbitmqctl -n $CHAOS_NODE start_app' failed (see $CHAOS_LOGDIR/)"
        fi
        rmq_booted rabbitmq-chaos chaos_boot_state chaos_app_running \
            || die "rabbitmq-chaos: the rabbit application is not running (see $CHAOS_LOGDIR/)"
        if ((changed)) || [[ "$(chaos_consumer_timeout)" != "$RMQ_CONSUMER_TIMEOUT" ]]; then
            chaos_stop   # new config or another consumer_timeout: restart with ours
        fi
    fi
    if chaos_stopped; then
        out="$(rmq_server_detached "${CHAOS_ENV[@]}")" \
            || die "rabbitmq-chaos: 'rabbitmq-server -detached' failed: $out"
        wait_for "$TIMEOUT" chaos_answers \
            || die "rabbitmq-chaos: node $CHAOS_NODE did not answer within ${TIMEOUT}s (see $CHAOS_LOGDIR/)"
    fi
    rmq_booted rabbitmq-chaos chaos_boot_state chaos_app_running \
        || die "rabbitmq-chaos: the rabbit application is not running (see $CHAOS_LOGDIR/)"
    wait_for "$TIMEOUT" chaos_port_open \
        || die "rabbitmq-chaos: AMQP port $CHAOS_PORT on 127.0.0.1 not open after ${TIMEOUT}s"
    [[ "$(chaos_consumer_timeout)" == "$RMQ_CONSUMER_TIMEOUT" ]] \
        || die "rabbitmq-chaos: consumer_timeout is '$(chaos_consumer_timeout)', expected $RMQ_CONSUMER_TIMEOUT"
    rmq_leftover_policy -n "$CHAOS_NODE"
}

chaos_status() {
    if chaos_app_running && chaos_port_open; then
        echo "rabbitmq-chaos: up ($CHAOS_NODE, consumer_timeout=$(chaos_consumer_timeout), amqp://127.0.0.1:$CHAOS_PORT)"
    else
        echo "rabbitmq-chaos: down"
        return 1
    fi
}

# ======================================================================== munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

munge_up() {
    need munged
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s "$MUNGE_KEY" ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" >/dev/null 2>&1 \
                || die "munge: mungekey --create failed"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 "$MUNGE_KEY"
    chmod 0755 /run/munge

    munge_ok && return 0
    stop_pidfile "$MUNGE_PIDFILE" munged   # a stuck or half-dead munged
    local out
    out="$(runuser -u munge -- /usr/sbin/munged 2>&1 9>&-)" \
        || die "munge: munged failed to start: $out (see /var/log/munge/munged.log)"
    wait_for "$TIMEOUT" munge_ok \
        || die "munge: 'munge -n | unmunge' still fails after ${TIMEOUT}s (see /var/log/munge/munged.log)"
}

munge_down() {
    stop_pidfile "$MUNGE_PIDFILE" munged
    if pgrep -x munged >/dev/null; then
        die "munge: a munged without pid file $MUNGE_PIDFILE is running; stop it by hand"
    fi
}

munge_status() {
    if munge_ok; then echo "munge: up"; else echo "munge: down"; return 1; fi
}

# ======================================================================== Slurm
node_name() { slurmd -C | sed -n 's/^NodeName=\([^ ]*\).*/\1/p'; }

slurm_write_conf() {
    local nodeline host name cpus mem
    nodeline="$(slurmd -C | head -n 1)"
    [[ "$nodeline" == NodeName=* ]] || die "slurm: unexpected 'slurmd -C' output: $nodeline"
    host="$(hostname -s)"
    # The node offers at least SLURM_TEST_CPUS (default 4) CPUs even on a 2-core machine, so that
    # three agent array tasks (or an MPI job with more ranks than cores) run at once as they would
    # on a real compute node; config_overrides stops slurmd from draining the node for it.
    name="$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$nodeline")"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$nodeline")"
    mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$nodeline")"
    (( cpus < ${SLURM_TEST_CPUS:-4} )) && cpus="${SLURM_TEST_CPUS:-4}"
    nodeline="NodeName=$name CPUs=$cpus RealMemory=$mem"
    write_if_changed "$SLURM_CONF" 0644 <<EOF
# Written by clowder-hpc-agent scripts/services.sh; edits are overwritten.
# Single-node Slurm for tests: controller and compute node are this host.
ClusterName=clowder-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=$SLURMCTLD_PIDFILE
SlurmdPidFile=$SLURMD_PIDFILE
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$SLURM_LOGDIR/slurmctld.log
SlurmdLogFile=$SLURM_LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# SIGTERM at the time limit, SIGKILL KillWait seconds later.
KillWait=10
InactiveLimit=0
Waittime=0
# Finished jobs stay visible in squeue/scontrol for 5 minutes.
MinJobAge=300
MaxArraySize=10001
MaxJobCount=20000
SlurmdParameters=config_overrides
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { timeout 10 sinfo -h -n "$1" -o %T 2>/dev/null | head -n 1; }

node_usable() {
    local state
    state="$(node_state "$1")"
    case "$state" in
        idle|mixed|allocated|completing) return 0 ;;
        down|drained|draining|drain|fail|failing)
            # slurmd answers but the node is marked down/drained: resume it.
            timeout 10 scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;   # unknown*, down*, idle* ...: slurmd not (yet) registered
    esac
}

slurm_stop_daemons() {
    stop_pidfile "$SLURMD_PIDFILE" slurmd
    stop_pidfile "$SLURMCTLD_PIDFILE" slurmctld
    # Daemons started without our pid files (by hand, another config) are not ours to kill.
    if pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; then
        die "slurm: slurmd/slurmctld running without pid files $SLURMD_PIDFILE/$SLURMCTLD_PIDFILE; stop them by hand"
    fi
}

slurm_up() {
    need slurmctld
    need slurmd
    local changed=0 node out
    if slurm_write_conf; then changed=1; fi
    mkdir -p /var/spool/slurmd /var/spool/slurmctld "$SLURM_LOGDIR"
    node="$(node_name)"
    [[ -n "$node" ]] || die "slurm: could not read the node name from 'slurmd -C'"

    if ((changed)); then
        slurm_stop_daemons
    fi
    if ! pid_alive "$SLURMCTLD_PIDFILE" slurmctld; then
        out="$(slurmctld 2>&1 9>&-)" || die "slurm: slurmctld failed to start: $out (see $SLURM_LOGDIR/slurmctld.log)"
    fi
    wait_for "$TIMEOUT" slurmctld_ok \
        || die "slurm: slurmctld not answering 'scontrol ping' after ${TIMEOUT}s (see $SLURM_LOGDIR/slurmctld.log)"
    if ! pid_alive "$SLURMD_PIDFILE" slurmd; then
        out="$(slurmd 2>&1 9>&-)" || die "slurm: slurmd failed to start: $out (see $SLURM_LOGDIR/slurmd.log)"
    fi
    wait_for "$TIMEOUT" node_usable "$node" \
        || die "slurm: node $node is '$(node_state "$node")' after ${TIMEOUT}s, not idle (see $SLURM_LOGDIR/)"
}

slurm_down() {
    slurm_stop_daemons
}

slurm_status() {
    local node state cpus
    node="$(node_name 2>/dev/null || true)"
    if slurmctld_ok && pid_alive "$SLURMD_PIDFILE" slurmd; then
        state="$(node_state "$node")"
        cpus="$(timeout 10 sinfo -h -n "$node" -o %c 2>/dev/null | head -n 1)"
        echo "slurm: up (node $node $state, ${cpus:-?} cpus)"
        case "$state" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
    else
        echo "slurm: down"
        return 1
    fi
}

# ======================================================================== openpbs
PBS_EXEC=/opt/pbs
PBS_HOST=pbshost
PBS_DUMMY_IF=pbs0
PBS_DUMMY_IP=10.251.0.1
PBS_USER=pbsuser
PBS_NCPUS="${PBS_NCPUS:-8}"

# The address pbshost must resolve to: a dummy interface's where possible, else our own first
# global IPv4 address (never another host's, never loopback).
pbs_address() {
    if ip -4 -o addr show dev "$PBS_DUMMY_IF" 2>/dev/null | grep -q "inet $PBS_DUMMY_IP/"; then
        echo "$PBS_DUMMY_IP"; return 0
    fi
    if ip link add "$PBS_DUMMY_IF" type dummy 2>/dev/null; then
        ip addr add "$PBS_DUMMY_IP/32" dev "$PBS_DUMMY_IF" && ip link set "$PBS_DUMMY_IF" up \
            && { echo "$PBS_DUMMY_IP"; return 0; }
    fi
    ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}

pbs_hosts_entry() {
    local ip; ip="$(pbs_address)"
    [[ -n "$ip" && "$ip" != 127.* ]] || die "openpbs: this machine has no non-loopback IPv4 address"
    if ! grep -qE "^$ip[[:space:]]+$PBS_HOST\$" /etc/hosts; then
        # Rewrite in place (/etc/hosts may be a bind mount that cannot be replaced).
        local rest; rest="$(grep -vE "[[:space:]]$PBS_HOST\$" /etc/hosts || true)"
        printf '%s\n%s %s\n' "$rest" "$ip" "$PBS_HOST" >/etc/hosts
    fi
}

pbs_node_state() { timeout 10 "$PBS_EXEC/bin/pbsnodes" "$PBS_HOST" 2>/dev/null | sed -n 's/^ *state = //p'; }
pbs_server_ok() { timeout 10 "$PBS_EXEC/bin/qstat" -B >/dev/null 2>&1; }
pbs_node_ok() { case "$(pbs_node_state)" in free|job-busy|job-exclusive) return 0 ;; *) return 1 ;; esac; }
pbs_ok() { pbs_server_ok && pbs_node_ok; }

pbs_up() {
    [[ -x $PBS_EXEC/sbin/pbs_server && -f /etc/pbs.conf ]] \
        || die "OpenPBS is not installed in $PBS_EXEC: run scripts/install.sh first"
    pbs_hosts_entry
    grep -qF '$usecp' /var/spool/pbs/mom_priv/config \
        || echo '$usecp *:/ /' >>/var/spool/pbs/mom_priv/config
    id "$PBS_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$PBS_USER"
    if ! pbs_ok; then
        # The first start runs pbs_habitat (initdb of PBS's own PostgreSQL, queue workq, the node).
        "$PBS_EXEC/libexec/pbs_init.d" start >/var/log/pbs-start.log 2>&1 9>&- \
            || { tail -n 20 /var/log/pbs-start.log >&2; die "openpbs did not start"; }
        wait_for "$TIMEOUT" pbs_server_ok || die "openpbs: server not answering after ${TIMEOUT}s"
    fi
    local q="$PBS_EXEC/bin/qmgr"
    "$q" -c "set server job_history_enable = True" >/dev/null
    "$q" -c "set server scheduler_iteration = 10" >/dev/null
    "$q" -c "set node $PBS_HOST resources_available.ncpus = $PBS_NCPUS" >/dev/null 2>&1 || true
    wait_for "$TIMEOUT" pbs_node_ok || die "openpbs: node $PBS_HOST not free after ${TIMEOUT}s ($(pbs_node_state))"
}

pbs_down() {
    [[ -x $PBS_EXEC/libexec/pbs_init.d ]] || return 0
    "$PBS_EXEC/libexec/pbs_init.d" stop >/dev/null 2>&1 9>&- || true
}

pbs_status() {
    if [[ -x $PBS_EXEC/bin/qstat ]] && pbs_server_ok; then
        local state cpus
        state="$(pbs_node_state)"
        cpus="$(timeout 10 "$PBS_EXEC/bin/pbsnodes" "$PBS_HOST" 2>/dev/null \
                | sed -n 's/^ *resources_available.ncpus = //p')"
        echo "openpbs: up (server $PBS_HOST $(getent ahostsv4 "$PBS_HOST" | awk '{print $1; exit}'), node ${state:-?}, ${cpus:-?} cpus)"
        pbs_node_ok
    else
        echo "openpbs: down"
        return 1
    fi
}

# ======================================================================== main
[[ "$(id -u)" == 0 ]] || die "must run as root (starts system daemons)"

# One bring-up at a time: several test runs may call this concurrently. Daemons are started with
# fd 9 closed (`9>&-`) so they do not inherit, and hold, this lock.
mkdir -p /run/lock
exec 9>/run/lock/clowder-hpc-agent-services.flock
flock -w $((TIMEOUT * 5)) 9 || die "another services.sh has held the lock for $((TIMEOUT * 5))s"

status_all() {
    local rc=0
    rmq_status || rc=1
    chaos_status || rc=1
    munge_status || rc=1
    slurm_status || rc=1
    pbs_status || rc=1
    return $rc
}

case "$ACTION" in
    up)
        rmq_up
        chaos_up
        munge_up
        slurm_up
        pbs_up
        status_all || die "a service is not up after bring-up"
        ;;
    down)
        pbs_down
        slurm_down
        munge_down
        chaos_stop
        rmq_stop
        echo "rabbitmq: down"; echo "rabbitmq-chaos: down"; echo "munge: down"; echo "slurm: down"; echo "openpbs: down"
        ;;
    status)
        status_all
        ;;
    *)
        echo "usage: $0 [up|down|status]" >&2
        exit 2
        ;;
esac
