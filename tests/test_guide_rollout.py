"""The user guide's SWE-style rollout runs as it stands (issue 19): its code block is
taken from docs/user-guide.md and run, as a reader would, against a local job."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO, start_server

GUIDE = REPO / "docs" / "user-guide.md"


def rollout_block() -> str:
    text = GUIDE.read_text()
    section = text[text.index("### A SWE-style rollout, end to end"):]
    match = re.search(r"```python\n(.+?)\n```", section, re.S)
    assert match, "the guide's rollout section has no python block"
    return match.group(1)


def test_the_guides_rollout_runs_as_written(state_dir, tmp_path):
    server = start_server(state_dir, job_id="guide-rollout", slots=2, runtime="none")
    try:
        script = tmp_path / "rollout.py"
        script.write_text(rollout_block())
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir)})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "test_add (test_calc.T" in done.stdout and "FAILED" in done.stdout, done.stdout
        assert done.stdout.strip().endswith("tests before the edit: exit 0; after: exit 1"), done.stdout[-500:]
        log = tmp_path / "out" / "traj-1" / "tests.log"
        assert "FAILED (failures=1)" in log.read_text()
    finally:
        server.stop()
