#!/usr/bin/env bash
# Start (or confirm) hpc-sandbox's single-node Slurm cluster: munged, slurmctld, slurmd
# on this machine, plus the Torque-style qsub/qstat/qdel wrappers. Idempotent: when
# everything already runs with the current config it only checks and returns.
#
# Environment:
#   HPC_SANDBOX_SLURM_DIR      state/spool/pid/log folder (default /var/lib/hpc-sandbox-slurm)
#   HPC_SANDBOX_SLURM_TIMEOUT  seconds to wait for the node to become usable (default 60)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${HPC_SANDBOX_SLURM_DIR:-/var/lib/hpc-sandbox-slurm}
TIMEOUT=${HPC_SANDBOX_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_STDERR=$BASE/log/munged.stderr

log() { echo "slurm/start.sh: $*"; }
die() { echo "slurm/start.sh: FAILED: $*" >&2; exit 1; }

# A daemon counts as running if its process is alive (a zombie is not), has the
# daemon's name, and is either the pid in its pid file or, failing that, found by
# pgrep (a daemon started by other means, e.g. a systemd unit on a CI machine).
is_daemon() {
    local pid=$1 name=$2 comm state
    read -r _ comm state _ <"/proc/$pid/stat" 2>/dev/null || return 1
    [[ $comm == "($name)" && $state != [ZX] ]]
}

daemon_pid() {
    local name=$1 pidfile=$BASE/run/$1.pid pid
    for pid in $(cat "$pidfile" 2>/dev/null; pgrep -x "$name"); do
        if is_daemon "$pid" "$name"; then echo "$pid"; return 0; fi
    done
}

stop_daemon() {
    local name=$1 pid
    pid=$(daemon_pid "$name")
    [[ -n $pid ]] || return 0
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "$name did not exit within 10 s of SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

start_daemon() {
    local name=$1; shift
    local out=$BASE/log/$name.stderr
    [[ -z $(daemon_pid "$name") ]] || return 0
    log "starting $name"
    # Both daemons fork into the background once their config is valid; a bad config
    # makes them exit non-zero here, with the reason on stderr or in their log.
    # fd 9 (the start lock) is closed so the daemon does not hold the lock forever.
    if ! "$name" "$@" 9>&- >>"$out" 2>&1; then
        die "$name exited at start (log: $BASE/log/$name.log, stderr: $out)"
    fi
    for _ in $(seq 50); do [[ -z $(daemon_pid "$name") ]] || return 0; sleep 0.1; done
    die "$name is not running after start (log: $BASE/log/$name.log, stderr: $out)"
}

# -i: ignore unreadable state files (a controller killed mid-save leaves a truncated
# one, and slurmctld would otherwise refuse to start); this is a throwaway test cluster.
start_slurmctld() { start_daemon slurmctld -i; }
start_slurmd() { start_daemon slurmd; }

# Cancel every job slurmctld still lists (all of them are leftovers, see above) and
# wait until they are gone, so the node's CPUs are free for the jobs that follow.
cancel_leftover_jobs() {
    local ids
    ids=$(timeout 10 squeue -h -o '%F' 2>/dev/null | sort -u | tr '\n' ' ') || ids=""
    [[ -n ${ids// } ]] || return 0
    log "cancelling jobs left over from before the daemons last stopped: $ids"
    timeout 30 scancel $ids 2>/dev/null || true
    for _ in $(seq 120); do
        [[ -z $(timeout 10 squeue -h -o '%i' 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    log "warning: leftover jobs still listed after 60 s: $(timeout 10 squeue -h -o '%i:%T' | head -5 | tr '\n' ' ')"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

(( EUID == 0 )) || die "must run as root (it installs packages and runs the Slurm daemons as root)"

# Two test runs may call this at once; without the lock both could run apt-get or
# start a second copy of a daemon.
mkdir -p "$BASE/run"
exec 9>"$BASE/run/start.lock"
flock -w 300 9 || die "another slurm/start.sh held $BASE/run/start.lock for 300 s"

bash "$HERE/install.sh" || die "installing packages failed (see the messages above)"
install -d -m 0755 "$BASE" "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log" /etc/slurm

# ---------------------------------------------------------------------------- munge
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating a random munge key at $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 /etc/munge
    (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY.tmp")
    chown munge:munge "$MUNGE_KEY.tmp"
    chmod 0400 "$MUNGE_KEY.tmp"
    mv -f "$MUNGE_KEY.tmp" "$MUNGE_KEY"
fi

if ! munge_works; then
    # No systemd here: /run/munge would normally come from tmpfiles.d.
    install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
    # A live, answering munged was caught by munge_works above, so one still present
    # is wedged. One killed hard leaves its pid file and socket behind; munged copes.
    if pids=$(pgrep -x munged); then
        log "munged (pid $(echo $pids)) does not answer; restarting it"
        kill $pids 2>/dev/null || true
        sleep 1
    fi
    log "starting munged"
    # munged writes $MUNGE_LOG itself and refuses a log file it does not own, so the
    # shell must not open that file; its early errors go to a file of ours instead.
    runuser -u munge -- /usr/sbin/munged 9>&- >>"$MUNGE_STDERR" 2>&1 \
        || die "munged did not start (log: $MUNGE_LOG, stderr: $MUNGE_STDERR)"
    for _ in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || die "munged runs but 'munge -n | unmunge' fails (log: $MUNGE_LOG, stderr: $MUNGE_STDERR)"
fi

# --------------------------------------------------------------------- slurm.conf
node=$(hostname -s)
cpus=$(nproc)
mem_total=$(free -m | awk '/^Mem:/ {print $2}')
# Leave the OS and the test processes headroom: 10% of memory, at least 512 MiB.
headroom=$(( mem_total / 10 > 512 ? mem_total / 10 : 512 ))
real_memory=$(( mem_total - headroom > 256 ? mem_total - headroom : 256 ))

rendered=$(mktemp "$BASE/slurm.conf.XXXXXX")
trap 'rm -f "$rendered"' EXIT
sed -e "s|@NODE@|$node|g" -e "s|@CPUS@|$cpus|g" -e "s|@REAL_MEMORY@|$real_memory|g" \
    -e "s|@BASE@|$BASE|g" "$HERE/slurm.conf.in" >"$rendered"
if grep -q '@[A-Z_]*@' "$rendered"; then
    die "unreplaced placeholder in $HERE/slurm.conf.in: $(grep -o '@[A-Z_]*@' "$rendered" | head -1)"
fi

conf_changed=0
if ! cmp -s "$rendered" "$CONF"; then
    conf_changed=1
    chmod 0644 "$rendered"
    mv -f "$rendered" "$CONF"
    log "wrote $CONF (node $node, $cpus CPUs, RealMemory=$real_memory MiB)"
fi

# ------------------------------------------------------------------------ daemons
if (( conf_changed )) && [[ -n "$(daemon_pid slurmctld)$(daemon_pid slurmd)" ]]; then
    # Several settings (MaxJobCount, SelectType, the node line) only take effect on a
    # restart, so a changed config always restarts rather than `scontrol reconfigure`.
    log "config changed while the daemons run: restarting them"
    stop_daemon slurmd
    stop_daemon slurmctld
fi
# Jobs that slurmctld recovers from its state file were running or queued before the
# daemons last stopped (a reboot, a killed test run). When no slurmctld ran and no
# slurmstepd is alive, none of them can really be running, yet slurmctld counts them
# as holding the node's CPUs until it gives up on them (several minutes): every test
# job would wait behind them. They are cancelled once the node is up (see below).
leftovers_possible=0
if [[ -z $(daemon_pid slurmctld) ]] && ! pgrep -x slurmstepd >/dev/null; then
    leftovers_possible=1
fi
start_slurmctld
start_slurmd

# ------------------------------------------------------------ wait for the node
deadline=$(( SECONDS + TIMEOUT ))
last_state="" last_resume=-100 restarted=""
while :; do
    state=$(timeout 10 sinfo -h -N -n "$node" -o '%T' 2>/dev/null | head -1) || state=""
    case $state in
        idle|mixed|allocated|completing)
            (( leftovers_possible )) && cancel_leftover_jobs
            log "ready: node $node is $state (partition debug, $cpus CPUs) after ${SECONDS}s"
            exit 0 ;;
        down*|drain*|fail*)
            # Left DOWN/DRAINED by an earlier run; the node is ours alone, so whatever
            # the reason, put it back in service (at most every 5 s while we wait).
            if (( SECONDS - last_resume >= 5 )); then
                reason=$(timeout 10 sinfo -h -N -n "$node" -o '%E' 2>/dev/null | head -1) || true
                log "node $node is $state (reason: ${reason:-none}); resuming it"
                timeout 10 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                last_resume=$SECONDS
            fi ;;
    esac
    if [[ $state != "$last_state" ]]; then
        log "waiting for node $node: state '${state:-no answer from slurmctld}'"
        last_state=$state
    fi
    # A daemon can vanish after we saw it (one killed just before this script ran still
    # shows in /proc for a moment): start it once more; a second death is a real failure.
    for d in slurmctld slurmd; do
        if [[ -z $(daemon_pid "$d") ]]; then
            [[ " $restarted " != *" $d "* ]] || die "$d died (log: $BASE/log/$d.log)"
            log "$d is not running; starting it again"
            restarted+=" $d"
            "start_$d"
        fi
    done
    if (( SECONDS >= deadline )); then
        die "node $node not usable after ${TIMEOUT}s (state '${state:-no answer}'; logs: $BASE/log/slurmctld.log, $BASE/log/slurmd.log)"
    fi
    sleep 0.5
done
