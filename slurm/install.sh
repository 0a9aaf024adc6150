#!/usr/bin/env bash
# Install what the single-node test cluster needs, from Debian's own packages.
# Idempotent: on a machine that already has everything it touches nothing (no
# `apt-get update`, which is slow and needs the network).
set -euo pipefail

# slurm-wlm pulls in slurmctld, slurmd and the client commands; slurm-wlm-torque
# adds Torque-compatible qsub/qstat/qdel; procps gives pgrep/free, which minimal
# images (CI containers) may lack and start.sh relies on.
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge slurm-wlm-torque bubblewrap procps)

die() { echo "slurm/install.sh: ERROR: $*" >&2; exit 1; }

if (( EUID != 0 )); then
    die "must run as root (it installs Debian packages and runs the Slurm daemons as root)"
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this setup needs a Debian/Ubuntu machine"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this setup needs a Debian/Ubuntu machine"

missing=()
for pkg in "${PACKAGES[@]}"; do
    # A removed-but-not-purged package is listed with status "deinstall ... config-files";
    # only "install ok installed" means the binaries are really there.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

echo "slurm/install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/hpc-sandbox-slurm-install.XXXXXX.log)
# Package maintainer scripts try to start services through systemd/invoke-rc.d;
# where there is no init (containers) they fail noisily but harmlessly, so the
# output goes to a log that is only shown when apt itself fails.
if ! apt-get update >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get update failed (full log: $log)"
fi
if ! apt-get install -y --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "apt-get install ${missing[*]} failed (full log: $log)"
fi

for bin in slurmctld slurmd munged sbatch squeue sinfo scontrol scancel qsub qstat qdel bwrap pgrep free; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin is still missing after installing ${missing[*]} (log: $log)"
done
echo "slurm/install.sh: installed (log: $log)"
