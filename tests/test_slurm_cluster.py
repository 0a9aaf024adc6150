"""The project's single-node Slurm cluster, used the way a user (or a scheduler module)
uses it: sbatch, arrays, squeue --json, scancel, --test-only, the Torque wrappers, bwrap
inside a job, and a port opened by a job reached from outside it.

Needs `bash slurm/start.sh` first; skips otherwise (fails under HPC_SANDBOX_REQUIRE_SLURM=1).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixtures import (  # noqa: F401  (slurm_cluster is a fixture)
    SlurmCluster,
    cancel,
    run,
    sbatch,
    slurm_cluster,
    wait_for_job_state,
    wait_for_path,
)

pytestmark = pytest.mark.timeout(60)

# A job should start within about a second here (the controller schedules batch jobs
# from a 1 s loop); the margin is for a loaded CI machine.
START_TIMEOUT = 20


@pytest.fixture
def submit(slurm_cluster: SlurmCluster, tmp_path: Path):
    """sbatch a script with its output in tmp_path; every job is cancelled at teardown."""
    job_ids: list[str] = []

    def _submit(script: str, *args: str) -> str:
        job_id = sbatch(["--chdir", str(tmp_path), "--output", str(tmp_path / "slurm-%j.out"),
                         *args], script=script)
        job_ids.append(job_id)
        return job_id

    yield _submit
    for job_id in job_ids:
        cancel(job_id)


def _write_atomically(path: str, text: str) -> str:
    """Shell that writes text to path so a poller never reads a half-written file."""
    return f'printf "%s\\n" "{text}" > "{path}.tmp" && mv "{path}.tmp" "{path}"'


def test_sbatch_job_runs_and_writes_a_file(submit, tmp_path: Path, slurm_cluster: SlurmCluster):
    out = tmp_path / "out"
    job = submit("#!/bin/bash\n" + _write_atomically(str(out), "$SLURM_JOB_ID $SLURM_JOB_PARTITION"))
    assert job.isdigit()
    wait_for_path(out, timeout=START_TIMEOUT, job_id=job)
    assert out.read_text().split() == [job, slurm_cluster.partition]
    assert wait_for_job_state(job, "COMPLETED", timeout=15) == "COMPLETED"


def test_array_runs_each_task_with_its_own_index_and_job_id(submit, tmp_path: Path):
    script = "#!/bin/bash\n" + _write_atomically(
        f"{tmp_path}/task_$SLURM_ARRAY_TASK_ID",
        "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID $SLURM_JOB_ID $SLURM_ARRAY_TASK_COUNT")
    job = submit(script, "--array=0-3")
    for i in range(4):
        wait_for_path(tmp_path / f"task_{i}", timeout=START_TIMEOUT, job_id=job)
    rows = [(tmp_path / f"task_{i}").read_text().split() for i in range(4)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert {r[1] for r in rows} == {job}, "every task belongs to the submitted array"
    assert len({r[2] for r in rows}) == 4, f"each task has its own job id: {rows}"
    assert {r[3] for r in rows} == {"4"}
    assert wait_for_job_state(job, "COMPLETED", timeout=15) == "COMPLETED"


def test_squeue_json_shows_pending_and_running_jobs(submit, tmp_path: Path):
    held = submit("#!/bin/bash\nsleep 60\n", "--hold")  # stays PENDING until released
    running = submit("#!/bin/bash\nsleep 60\n")
    wait_for_job_state(running, "RUNNING", timeout=START_TIMEOUT)

    proc = run(["squeue", "--json"])
    data = json.loads(proc.stdout)
    assert data["meta"]["plugin"]["type"].startswith("openapi/")
    by_id = {str(j["job_id"]): j for j in data["jobs"]}
    assert by_id[held]["job_state"] == "PENDING"
    assert by_id[running]["job_state"] == "RUNNING"
    assert by_id[running]["partition"] == by_id[held]["partition"]


def test_scancel_ends_a_running_job_and_kills_its_process(submit, tmp_path: Path):
    pid_file = tmp_path / "pid"
    # exec: the pid recorded is the sleep's own, so we can check it really died.
    job = submit(f"#!/bin/bash\n{_write_atomically(str(pid_file), '$$')}\nexec sleep 300\n")
    wait_for_path(pid_file, timeout=START_TIMEOUT, job_id=job)
    pid = int(pid_file.read_text())
    wait_for_job_state(job, "RUNNING", timeout=10)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"

    run(["scancel", job])
    assert wait_for_job_state(job, "CANCELLED", timeout=15) == "CANCELLED"
    deadline = time.monotonic() + 15  # SIGTERM, then SIGKILL after KillWait=5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"sleep (pid {pid}) survived scancel"


def test_sbatch_test_only_accepts_valid_and_rejects_bad_partition(slurm_cluster: SlurmCluster):
    ok = run(["sbatch", "--test-only", "-p", slurm_cluster.partition, "--wrap", "true"], check=False)
    assert ok.returncode == 0, ok.stderr
    assert "to start at" in ok.stderr  # "sbatch: Job N to start at ... using 1 processors on nodes vm ..."
    bad = run(["sbatch", "--test-only", "-p", "no-such-partition", "--wrap", "true"], check=False)
    assert bad.returncode != 0
    assert "invalid partition" in bad.stderr.lower(), bad.stderr


PBS_SCRIPT = """#!/bin/bash
#PBS -N {name}
#PBS -l nodes=1:ppn=1
#PBS -l walltime=00:05:00
#PBS -j oe
echo "stdout of $SLURM_JOB_ID"
echo "stderr of $SLURM_JOB_ID" >&2
{body}
"""


def _qsub(tmp_path: Path, script: str, *args: str) -> str:
    path = tmp_path / "job.pbs"
    path.write_text(script)
    # The wrapper names output files relative to the current directory.
    proc = subprocess.run(["qsub", *args, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    assert job.isdigit(), f"qsub printed {proc.stdout!r}"
    return job


def test_qsub_runs_a_pbs_script(slurm_cluster: SlurmCluster, tmp_path: Path):
    done = tmp_path / "done"
    job = _qsub(tmp_path, PBS_SCRIPT.format(name="x", body=_write_atomically(str(done), "ok")))
    try:
        wait_for_path(done, timeout=START_TIMEOUT, job_id=job)
        wait_for_job_state(job, "COMPLETED", timeout=15)
        # sbatch itself reads the #PBS lines: -N becomes the job name, walltime the limit.
        name, limit = run(["squeue", "-h", "--states=all", "-j", job, "-o", "%j %l"]).stdout.split()
        assert (name, limit) == ("x", "5:00")
        # Known wrapper behaviour: output files are named after the script file, not -N,
        # and a `#PBS -j oe` line does not join the streams (qsub passes its own -e).
        assert (tmp_path / f"job.pbs.o{job}").read_text() == f"stdout of {job}\n"
        assert (tmp_path / f"job.pbs.e{job}").read_text() == f"stderr of {job}\n"
    finally:
        cancel(job)


def test_qsub_join_flag_on_command_line_joins_output(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = _qsub(tmp_path, PBS_SCRIPT.format(name="x", body=""), "-j", "oe")
    try:
        wait_for_job_state(job, "COMPLETED", timeout=START_TIMEOUT)
        out = tmp_path / f"job.pbs.o{job}"
        wait_for_path(out, timeout=5)
        assert sorted(out.read_text().splitlines()) == [f"stderr of {job}", f"stdout of {job}"]
        assert not (tmp_path / f"job.pbs.e{job}").exists()
    finally:
        cancel(job)


def test_qstat_lists_a_running_job_and_qdel_cancels_it(slurm_cluster: SlurmCluster, tmp_path: Path):
    job = _qsub(tmp_path, PBS_SCRIPT.format(name="sleeper", body="sleep 300"))
    try:
        wait_for_job_state(job, "RUNNING", timeout=START_TIMEOUT)
        listing = run(["qstat"]).stdout
        row = next((line.split() for line in listing.splitlines() if line.split()[:1] == [job]), None)
        assert row is not None, f"job {job} missing from qstat:\n{listing}"
        assert row[1] == "sleeper" and row[4] == "R", row
        full = run(["qstat", "-f", job]).stdout
        assert re.search(r"job_state = R\b", full), full
        assert "Resource_List.walltime = 00:05:00" in full, full

        qdel = subprocess.run(["qdel", job], capture_output=True, text=True, timeout=15)
        assert qdel.returncode == 0, qdel.stderr
        assert wait_for_job_state(job, "CANCELLED", timeout=15) == "CANCELLED"
    finally:
        cancel(job)


def test_job_can_run_bwrap_with_its_own_pid_namespace_and_tmp(submit, tmp_path: Path):
    out = tmp_path / "bwrap"
    host_marker = f"/tmp/hpc-sandbox-bwrap-test-{os.getpid()}-{time.monotonic_ns()}"
    bwrap = "bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --unshare-pid"
    script = f"""#!/bin/bash
{bwrap} true; plain=$?
inner=$({bwrap} sh -c 'echo $$; touch {host_marker} && echo wrote')
{_write_atomically(str(out), "$plain $(echo $inner)")}
"""
    job = submit(script)
    wait_for_path(out, timeout=START_TIMEOUT, job_id=job)
    plain, inner_pid, wrote = out.read_text().split()
    assert plain == "0", "bwrap exited non-zero inside the job"
    # bwrap's own init is pid 1 of the new namespace; the command is its first child.
    assert int(inner_pid) <= 2, f"command saw pid {inner_pid}: no new pid namespace"
    assert wrote == "wrote"
    assert not os.path.exists(host_marker), "a write to /tmp inside bwrap reached the host's /tmp"


SERVER = r"""
import os, socket, sys
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
port_file = sys.argv[1]
with open(port_file + ".tmp", "w") as f:
    f.write(str(sock.getsockname()[1]))
os.replace(port_file + ".tmp", port_file)
while True:
    conn, _ = sock.accept()
    conn.sendall(("hello from job %s\n" % os.environ["SLURM_JOB_ID"]).encode())
    conn.close()
"""


def test_port_opened_inside_a_job_is_reachable_from_outside(submit, tmp_path: Path):
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    port_file = tmp_path / "port"
    job = submit(f"#!/bin/bash\nexec {sys.executable} {server} {port_file}\n")
    wait_for_path(port_file, timeout=START_TIMEOUT, job_id=job)
    port = int(port_file.read_text())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        reply = conn.makefile().readline()
    assert reply == f"hello from job {job}\n"
