"""Opt-in: the Nomad flow against a real agent (never in CI: no Nomad agent installs here).

Run on a workstation with Nomad (raw_exec enabled; `nomad agent -dev` has it):

    nomad agent -dev &
    HPC_SANDBOX_NOMAD_ADDR=http://127.0.0.1:4646 python -m pytest tests/test_nomad_live.py -v

NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_CACERT are used as set. The job's node server runs
`python -m hpc_sandbox` on the Nomad client, so this package must be importable there
(a dev agent on this machine runs it from the same Python).
"""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

ADDRESS = os.environ.get("HPC_SANDBOX_NOMAD_ADDR")
pytestmark = [
    pytest.mark.skipif(not (ADDRESS and shutil.which("nomad")),
                       reason="opt-in: set HPC_SANDBOX_NOMAD_ADDR to a Nomad agent (and have `nomad` on PATH)"),
    pytest.mark.timeout(300),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def test_submit_status_exec_check_cancel_on_a_real_agent(cli):
    port = free_port()
    env = {"NOMAD_ADDR": ADDRESS or "", "HPC_SANDBOX_SCHEDULER": "nomad", "HPC_SANDBOX_PORT_RANGE": f"{port}-{port}"}
    submitted = cli("submit", "--slots", "2", "--wait", "--wait-timeout", "180", extra_env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        status = json.loads(cli("status", job_id, "--json", extra_env=env).stdout)[0]
        assert (status["scheduler"], status["state"], status["free"]) == ("nomad", "running", 2), status
        ran = cli("exec", "--job", job_id, "--", "echo from a real nomad", extra_env=env)
        assert (ran.returncode, ran.stdout) == (0, "from a real nomad\n"), ran.stderr
    finally:
        cancelled = cli("cancel", "--purge", job_id, extra_env=env)
        assert cancelled.returncode == 0, cancelled.stderr
    other = free_port()
    checked = cli("check", "--scheduler", "nomad", "--timeout", "180",
                  extra_env={**env, "HPC_SANDBOX_PORT_RANGE": f"{other}-{other}"})
    assert checked.returncode == 0, checked.stdout + checked.stderr
