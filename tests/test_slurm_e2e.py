"""hpc-sandbox on the real single-node Slurm cluster: submit, discover, use, survive cancellation."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from hpc_sandbox import connect

from helpers import SHIMS, pids_matching, wait_until
from slurm_fixtures import cancel_while_a_command_runs

RUNTIME = "bwrap" if shutil.which("bwrap") else "none"


# Every test here needs the cluster (it skips, or fails under HPC_SANDBOX_REQUIRE_SLURM=1,
# without one); `cli` (conftest.py) cancels the jobs a failed test leaves behind.
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def submit(cli, *args: str) -> dict:
    result = cli("submit", "--scheduler", "slurm", "--partition", "debug", "--walltime", "00:10:00",
                 "--wait", "--wait-timeout", "90", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_array_job_serves_four_isolated_slots_until_cancelled(cli, state_dir):
    job = submit(cli, "--array", "2", "--slots", "2", "--runtime", RUNTIME, "--port-range", "22200-22263")
    job_id = job["job_id"]
    assert len(job["scheduler_ids"]) == 1 and job["servers"] == 2
    assert (state_dir / "jobs" / job_id / "submit" / f"{job_id}.sbatch").is_file()

    status = json.loads(cli("status", job_id, "--json").stdout)[0]
    assert status["state"] == "running" and status["free"] == 4

    async def scenario():
        async with connect.from_state_dir(state_dir, [job_id], acquire_timeout=10) as pool:
            slots = [await pool.acquire(trajectory_id=f"t{i}") for i in range(4)]
            assert len({(s.endpoint.url, s.index) for s in slots}) == 4
            assert len({s.endpoint.url for s in slots}) == 2  # both array tasks serve
            assert {s.location for s in slots} == {"cluster"}
            writes = await pool.execute_batch(
                [(s, "bash", {"command": f"echo {i} > mine; sleep 0.5; cat mine; env | grep -c SLURM_ || true"})
                 for i, s in enumerate(slots)])
            # Each wrote and read back its own file; the job's environment does not leak into slots.
            assert [w.stdout.split() for w in writes] == [[str(i), "0"] for i in range(4)]
            seen = await asyncio.gather(*(pool.execute(s, "bash", {"command": "ls"}) for s in slots))
            assert [r.stdout for r in seen] == ["mine\n"] * 4  # each slot sees its own file only

            await cancel_while_a_command_runs(pool, slots, lambda: cli("cancel", job_id), settle=1)

    asyncio.run(scenario())
    assert not (state_dir / "jobs" / job_id).exists()
    assert wait_until(lambda: not pids_matching(job_id), 20), "node servers outlived scancel"


def test_a_job_that_fails_at_start_reports_the_servers_own_error(cli, state_dir):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        result = cli("submit", "--scheduler", "slurm", "--partition", "debug", "--walltime", "00:05:00",
                     "--slots", "1", "--port-range", f"{port}-{port}", "--wait", "--wait-timeout", "60")
    finally:
        blocker.close()
    assert result.returncode != 0
    assert f"no free port in {port}-{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "logs" in result.stderr


def test_a_missing_image_is_reported_with_the_servers_own_error(cli, state_dir):
    # The job inherits this PATH (sbatch exports the environment), so the node server
    # finds the named Apptainer test double (tests/shims/apptainer) on the compute node.
    result = cli("submit", "--scheduler", "slurm", "--partition", "debug", "--walltime", "00:05:00",
                 "--slots", "1", "--runtime", "apptainer", "--image", "/nonexistent/agent.sif",
                 "--port-range", "22400-22463", "--wait", "--wait-timeout", "60",
                 extra_env={"PATH": f"{SHIMS}:{os.environ['PATH']}"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert "image not found: /nonexistent/agent.sif" in line and "slurm-" in line and "logs" in line


def test_scheduler_errors_quote_the_scheduler(cli):
    result = cli("submit", "--scheduler", "slurm", "--partition", "no-such-partition", "--slots", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "sbatch" in result.stderr and "invalid partition" in result.stderr.lower(), result.stderr


def _job_state(scheduler_id: str) -> set[str]:
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, timeout=30).stdout
    return {j["job_state"] for j in json.loads(out)["jobs"]
            if str(j.get("array_job_id") or j["job_id"]) == scheduler_id}


def test_walltime_warning_signal_lets_node_servers_leave_cleanly(cli, state_dir):
    """The real thing: a 3-minute walltime, Slurm's --signal=B:TERM@90 before the kill.

    Slurm may send the signal up to 60 s earlier than asked (its own documentation), so
    it lands 30-90 s after the start: well after the node server is up (a 1-minute
    walltime with @30 could be signalled during start-up). The node server must then
    exit 0 and take its record with it.
    """
    job = submit(cli, "--array", "1", "--slots", "1", "--walltime", "00:03:00", "--port-range", "22400-22463")
    records = state_dir / "jobs" / job["job_id"] / "servers"
    assert len(list(records.iterdir())) == 1
    assert wait_until(lambda: not list(records.iterdir()), timeout=130, interval=0.5), \
        "the node server did not leave before the walltime kill"
    assert wait_until(lambda: _job_state(job["scheduler_ids"][0]) == {"COMPLETED"}, timeout=30, interval=0.5), \
        _job_state(job["scheduler_ids"][0])  # exit 0 after SIGTERM: COMPLETED, not TIMEOUT
    log = next((state_dir / "jobs" / job["job_id"] / "logs").glob("slurm-*.out")).read_text()
    assert "stopped" in log
    cli("cancel", job["job_id"])


def test_ctrl_c_while_waiting_leaves_the_job_queued_and_says_how_to_cancel(cli, state_dir, tmp_path):
    # A job held back by --begin stays pending: `submit --wait` is still waiting when interrupted.
    config = tmp_path / "held.yaml"
    config.write_text("profiles:\n  held:\n    extra_directives:\n      - --begin=now+3600\n")
    env = {**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "hpc_sandbox", "submit", "--scheduler", "slurm",
                             "--partition", "debug", "--slots", "1", "--profile", "held", "--config", str(config),
                             "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    jobs = state_dir / "jobs"
    assert wait_until(lambda: any((j / "job.json").exists() for j in jobs.glob("*")), 30), "no job was submitted"
    time.sleep(1)  # inside the wait loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    [job_id] = [j.name for j in jobs.iterdir()]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"job {job_id} keeps running" in err and f"hpc-sandbox cancel {job_id}" in err
    status = json.loads(cli("status", job_id, "--json").stdout)[0]
    assert status["state"] == "pending", status  # still queued: nothing was cancelled
    assert cli("cancel", job_id).returncode == 0
