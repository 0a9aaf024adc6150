"""The CLI end to end on the local scheduler, as a user types it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import SHIMS, pids_matching, wait_until


# `cli` (conftest.py) runs `python -m hpc_sandbox` against this test's state dir.


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str, code: int | None = None) -> None:
    assert result.returncode != 0 if code is None else result.returncode == code, result
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.parametrize("command", ["submit", "status", "exec", "cp", "cancel", "check", "serve"])
def test_every_command_explains_itself(cli, command):
    result = cli(command, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout and "--" in result.stdout


def test_submit_status_exec_cancel_round_trip(cli, state_dir):
    submitted = cli("submit", "--nodes", "2", "--slots", "2", "--wait", "--json", "--port-range", "21000-21063")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    job_id = job["job_id"]
    assert (job["servers"], job["slots_per_server"], job["ready"]) == (2, 2, True)

    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status[0]["state"] == "running" and status[0]["free"] == 4
    assert all(s["reachable"] for s in status[0]["servers"])
    assert "2/2 ready" in cli("status").stdout

    hello = cli("exec", "--job", job_id, "--", "echo", "hello world")
    assert (hello.returncode, hello.stdout) == (0, "hello world\n")
    shell = cli("exec", "--env", "WHO=you", "--", "echo $WHO >&2; exit 7")
    assert (shell.returncode, shell.stderr) == (7, "you\n")
    slow = cli("exec", "--timeout", "0.5", "--", "sleep 30")
    assert slow.returncode == 124 and "timed out" in slow.stderr

    pids = [int(p) for p in job["scheduler_ids"]]
    cancelled = cli("cancel", job_id)
    assert cancelled.returncode == 0
    assert not (state_dir / "jobs" / job_id).exists()
    assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() and pids_matching(job_id) for p in pids), 10)
    assert "No jobs" in cli("status").stdout


def test_errors_are_one_line_without_traceback(cli):
    assert_one_line_error(cli("status", "no-such-job"), "no job 'no-such-job'")
    assert_one_line_error(cli("cancel", "no-such-job"), "no job 'no-such-job'")
    assert_one_line_error(cli("exec", "--acquire-timeout", "0.2", "--", "true"), "hpc-sandbox submit", code=125)
    assert_one_line_error(cli("submit", "--runtime", "apptainer"), "image")
    assert_one_line_error(cli("submit", "--port-range", "10-5"), "port")
    usage = cli("exec", "--env", "NOEQUALS", "--", "true")  # usage errors: click's usage hint, then the error
    assert usage.returncode == 2 and usage.stderr.strip().splitlines()[-1].endswith("'NOEQUALS' is not KEY=VALUE")


def test_unexpected_failures_are_still_one_line(cli, state_dir, tmp_path):
    from hpc_sandbox.jobfolder import JobFolder

    JobFolder(state_dir, "byhand").create_credentials()  # a folder without job.json: a submit in progress, or `serve` by hand
    listing = cli("status")
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    # An agent that cannot start (here: an interpreter that exits at once) stops the server with an
    # error line after its log lines (a node server logs what it does; that log is the job's).
    served = cli("serve", "--job-id", "byhand", "--host", "127.0.0.1", "--port-range", "21100-21101",
                 "--slots", "1", "--python", "/bin/false")
    assert served.returncode != 0 and "Traceback" not in served.stderr
    assert served.stderr.strip().splitlines()[-1] == "Error: slot 0: agent exited (code 1)"
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    assert_one_line_error(cli("submit", "--state-dir", str(blocked / "state")), "Not a directory")


def test_a_job_that_fails_at_start_reports_the_servers_own_error(cli, state_dir, tmp_path):
    result = cli("submit", "--runtime", "apptainer", "--image", str(tmp_path / "missing.sif"), "--wait",
                 "--wait-timeout", "60", extra_env={"PATH": f"{SHIMS}:{os.environ['PATH']}"})
    assert_one_line_error(result, "image not found")
    assert "logs" in result.stderr


def test_check_reports_what_this_machine_has(cli):
    findings = {f["what"]: f for f in json.loads(cli("check", "--json").stdout)}
    assert {"runtime bwrap", "runtime apptainer", "sbatch", "qsub", "state dir", "modal credentials"} <= set(findings)
    assert findings["state dir"]["ok"] is True
    with_shim = cli("check", extra_env={"PATH": f"{SHIMS}:{os.environ['PATH']}"})
    assert "apptainer version 1.3.4-shim" in with_shim.stdout
