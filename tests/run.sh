#!/usr/bin/env bash
# The whole test suite, on a fresh machine: install what it needs, start the
# single-node Slurm cluster (as root), run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" = 0 ]; then
    bash slurm/start.sh            # installs slurm/munge/torque wrappers/bubblewrap when missing
    # tests/test_as_user.py makes an unprivileged user's venvs with Debian's python3 (a
    # pyenv under /root is not readable by other users), so that one needs python3-venv.
    # The Atropos-style backend runs its tmux tool in real tmux where a slot has it.
    if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || ! command -v tmux >/dev/null; then
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
            python3 python3-venv tmux >/dev/null
    fi
else
    echo "tests/run.sh: not root, so the local Slurm cluster is not started; Slurm tests skip unless one runs" >&2
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec "$PYTHON" -m pytest "$@"
