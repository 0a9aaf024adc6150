#!/usr/bin/env bash
# The whole test suite, on a fresh machine: install what it needs, start the
# single-node Slurm cluster (as root), run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ "$(id -u)" = 0 ]; then
    bash slurm/start.sh            # installs slurm/munge/torque wrappers/bubblewrap when missing
else
    echo "tests/run.sh: not root, so the local Slurm cluster is not started; Slurm tests skip unless one runs" >&2
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec "$PYTHON" -m pytest "$@"
