"""Logs outlive their job (issue 19, item 8): cancel moves a job's node server logs to
STATE_DIR/logs/JOB/ (the last KEPT_JOB_LOGS jobs' are kept), and `hpc-sandbox logs JOB`
prints them, from the job folder while it exists, from there after."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from hpc_sandbox.jobfolder import KEPT_JOB_LOGS, JobFolder, job_logs, logs_root

from helpers import free_port_range
from test_cli import assert_one_line_error


def _job_with_logs(state_dir: Path, job_id: str, text: str = "line\n") -> JobFolder:
    folder = JobFolder(state_dir, job_id)
    folder.create_credentials(tls=False)
    folder.logs.mkdir()
    folder.server_log(0).write_text(text)
    return folder


def test_removing_a_job_folder_keeps_its_logs_for_the_last_jobs_only(state_dir):
    first = _job_with_logs(state_dir, "job-0", "first words\n")
    assert job_logs(state_dir, "job-0") == [first.server_log(0)]
    first.remove()
    assert not first.exists()
    [kept] = job_logs(state_dir, "job-0")
    assert kept.read_text() == "first words\n" and kept.parent == logs_root(state_dir) / "job-0"
    assert stat.S_IMODE(logs_root(state_dir).stat().st_mode) == 0o700
    for n in range(1, KEPT_JOB_LOGS + 1):
        folder = _job_with_logs(state_dir, f"job-{n}")
        past = time.time() - 100 + n  # kept in the order the jobs went
        os.utime(folder.logs, (past, past))
        folder.remove()
    assert job_logs(state_dir, "job-0") == []  # the oldest went when one more came
    assert sorted(p.name for p in logs_root(state_dir).iterdir()) == sorted(
        f"job-{n}" for n in range(1, KEPT_JOB_LOGS + 1))


def test_a_job_without_logs_leaves_nothing_behind(state_dir):
    folder = JobFolder(state_dir, "quiet")
    folder.create_credentials(tls=False)
    folder.remove()
    assert not logs_root(state_dir).exists() or not any(logs_root(state_dir).iterdir())


def test_logs_command_prints_a_cancelled_jobs_logs(cli, state_dir):
    assert "Usage:" in cli("logs", "--help").stdout
    submitted = cli("submit", "--nodes", "2", "--slots", "1", "--wait", "--json", "--port-range", free_port_range())
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    assert cli("exec", "--job", job_id, "--", "true").returncode == 0
    running = cli("logs", job_id)
    assert running.returncode == 0 and running.stdout.count("==> ") == 2, running
    assert cli("cancel", job_id).returncode == 0
    printed = cli("logs", job_id)
    assert printed.returncode == 0, printed.stderr
    headers = [line for line in printed.stdout.splitlines() if line.startswith("==> ")]
    assert len(headers) == 2 and all("server-" in h for h in headers), printed.stdout
    assert "leased" in printed.stdout  # the node servers' own lines, kept past the cancel
    tail = cli("logs", job_id, "--tail", "1")
    assert tail.returncode == 0 and len([ln for ln in tail.stdout.splitlines() if ln]) == 2 * 2, tail.stdout
    assert_one_line_error(cli("logs", "no-such-job"), "no logs of job 'no-such-job'")


def test_logs_of_a_job_that_wrote_none_says_so(cli, state_dir):
    JobFolder(state_dir, "silent").create_credentials(tls=False)  # a Nomad job's folder has no logs/
    assert_one_line_error(cli("logs", "silent"), "job 'silent' has no logs in its folder yet")
