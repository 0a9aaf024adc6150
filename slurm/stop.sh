#!/usr/bin/env bash
# Stop hpc-sandbox's single-node Slurm cluster: cancel every job, then stop slurmd,
# slurmctld and munged. Idempotent: stopping a stopped cluster is a no-op.
# State (job ids, finished-job records) stays under $HPC_SANDBOX_SLURM_DIR for the next start.
set -euo pipefail

BASE=${HPC_SANDBOX_SLURM_DIR:-/var/lib/hpc-sandbox-slurm}

log() { echo "slurm/stop.sh: $*"; }
die() { echo "slurm/stop.sh: FAILED: $*" >&2; exit 1; }

(( EUID == 0 )) || die "must run as root (the daemons run as root and munge)"

# Same rule as start.sh: a daemon counts as running if its process is alive (a zombie
# is not), has the daemon's name, and is either the pid in its pid file or, failing
# that, found by pgrep (a daemon started by other means, e.g. a systemd unit).
is_daemon() {
    local pid=$1 name=$2 comm state
    read -r _ comm state _ <"/proc/$pid/stat" 2>/dev/null || return 1
    [[ $comm == "($name)" && $state != [ZX] ]]
}

daemon_pid() {
    local name=$1 pidfile=$2 pid
    for pid in $(cat "$pidfile" 2>/dev/null; pgrep -x "$name"); do
        if is_daemon "$pid" "$name"; then echo "$pid"; return 0; fi
    done
}

stop_daemon() {
    local name=$1 pidfile=$2 pid
    pid=$(daemon_pid "$name" "$pidfile")
    if [[ -z $pid ]]; then
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    # slurmctld saves its state on SIGTERM, which can take a few seconds; only a daemon
    # that ignores SIGTERM for 15 s is killed outright.
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

# Cancel jobs first, while slurmctld and slurmd can still deliver the signals: jobs
# left running would otherwise keep their processes (and ports) after slurmd is gone,
# and would be recovered as running by the next slurmctld.
if [[ -n $(daemon_pid slurmctld "$BASE/run/slurmctld.pid") ]] && command -v squeue >/dev/null; then
    # %F is the array's base job id (the job id for other jobs): one scancel per array.
    jobs=$(timeout 10 squeue -h -o '%F' 2>/dev/null | sort -u || true)
    if [[ -n $jobs ]]; then
        log "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086  # one job id per word
        timeout 20 scancel $jobs 2>/dev/null || true
        # scancel sends SIGTERM and, KillWait (5 s) later, SIGKILL; wait for both.
        for _ in $(seq 150); do
            # squeue lists unfinished jobs only (pending, running, completing, ...).
            left=$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)
            [[ -z $left ]] && break
            sleep 0.1
        done
        [[ -z ${left:-} ]] || log "jobs still not finished after 15 s: $(echo $left)"
    fi
fi

stop_daemon slurmd "$BASE/run/slurmd.pid"
stop_daemon slurmctld "$BASE/run/slurmctld.pid"
stop_daemon munged /run/munge/munged.pid
log "stopped"
