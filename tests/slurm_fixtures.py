"""Pytest helpers for tests that use the project's real single-node Slurm cluster.

The cluster is started outside pytest (``bash slurm/start.sh``; ``.ci/run`` does it
before the suite). These helpers only check that it answers and wait on jobs; they
never start or stop daemons.

Use in a test module::

    from slurm_fixtures import slurm_cluster, sbatch, wait_for_job_state  # noqa: F401

    def test_something(slurm_cluster):
        job = sbatch(["--wrap", "true"])
        wait_for_job_state(job, {"COMPLETED"}, timeout=15)

Importing ``slurm_cluster`` into a module registers the fixture for that module. A
conftest that wants it everywhere can do the same import (or
``pytest_plugins = ["slurm_fixtures"]`` in the rootdir conftest). The cluster check is
cached per process, so importing the fixture into many modules costs one ``sinfo``.

Without a usable cluster the fixture skips with the precise reason, except when
``HPC_SANDBOX_REQUIRE_SLURM=1`` (set by CI), where it fails with that reason instead.
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Sequence

import pytest

from hpc_sandbox.errors import NoCapacity

# Where slurm/start.sh keeps its logs; named in failure messages so a skipped or failed
# run points at the file that explains it.
SLURM_DIR = os.environ.get("HPC_SANDBOX_SLURM_DIR", "/var/lib/hpc-sandbox-slurm")
START_HINT = "start it with `bash slurm/start.sh` (as root)"

# States after which a job never runs again (squeue's long names).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
# sinfo node states in which the node accepts jobs ("mixed"/"allocated" = busy but up).
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    node: str
    cpus: int
    # How many jobs may share one CPU (OverSubscribe=FORCE:N in slurm.conf.in).
    jobs_per_cpu: int

    @property
    def max_running_jobs(self) -> int:
        """How many one-CPU jobs can run at once."""
        return self.cpus * self.jobs_per_cpu


class SlurmError(RuntimeError):
    """A Slurm command failed or a job did not reach the expected state."""


def run(cmd: list[str], timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Slurm CLI command, capturing text output; raise SlurmError on failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(cmd)} did not answer within {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise SlurmError(
            f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


@functools.lru_cache(maxsize=1)
def _probe() -> SlurmCluster | str:
    """The cluster, or a one-line reason it cannot be used."""
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"Slurm client `{tool}` is not on PATH; {START_HINT}"
    try:
        proc = run(["sinfo", "-h", "-N", "-o", "%P|%N|%T|%c|%h"], timeout=10, check=False)
    except SlurmError as exc:
        return f"{exc} (slurmctld hung? log: {SLURM_DIR}/log/slurmctld.log)"
    if proc.returncode != 0:
        return (f"sinfo exited {proc.returncode}: {proc.stderr.strip()} "
                f"(slurmctld not running? {START_HINT}; log: {SLURM_DIR}/log/slurmctld.log)")
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    if not rows:
        return "sinfo lists no nodes: slurm.conf has no node/partition"
    # The default partition is marked with '*'; prefer it.
    rows.sort(key=lambda r: not r[0].endswith("*"))
    partition, node, state, cpus, oversubscribe = rows[0]
    if state not in USABLE_NODE_STATES:
        return (f"node {node} is '{state}', not idle/mixed/allocated "
                f"(slurmd down? {START_HINT}; log: {SLURM_DIR}/log/slurmd.log)")
    # %h prints e.g. "FORCE:8", "YES:4", "NO" or "EXCLUSIVE".
    _, _, share = oversubscribe.partition(":")
    jobs_per_cpu = int(share) if share.isdigit() and oversubscribe.startswith(("FORCE", "YES")) else 1
    return SlurmCluster(partition=partition.rstrip("*"), node=node, cpus=int(cpus),
                        jobs_per_cpu=jobs_per_cpu)


def require_slurm() -> SlurmCluster:
    """Return the cluster; skip the test (fail under HPC_SANDBOX_REQUIRE_SLURM=1) if unusable."""
    result = _probe()
    if isinstance(result, SlurmCluster):
        return result
    reason = f"no usable Slurm cluster: {result}"
    if os.environ.get("HPC_SANDBOX_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (HPC_SANDBOX_REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running single-node cluster (partition, node, cpus), or skip/fail with why not."""
    return require_slurm()


# --------------------------------------------------------------------------- jobs

def sbatch(args: Iterable[str], script: str | None = None, timeout: float = 15) -> str:
    """Submit with ``sbatch --parsable`` and return the job id (the array's base id for arrays).

    ``script`` is passed on stdin (sbatch reads the script from stdin when no file is given).
    """
    cmd = ["sbatch", "--parsable", *args]
    try:
        # Without a script, stdin must not be pytest's: sbatch would wait to read a script.
        stdin = {"input": script} if script is not None else {"stdin": subprocess.DEVNULL}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **stdin)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"sbatch did not answer within {timeout:g} s") from exc
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    return proc.stdout.strip().split(";")[0]


def job_states(job_id: str) -> dict[str, str]:
    """Map each record of a job to its state, e.g. {"12": "RUNNING"} or, for an array,
    {"12_0": "COMPLETED", "12_[2-3]": "PENDING", ...}. Finished jobs stay listed for
    MinJobAge (300 s) after they end; an unknown or purged id gives {}.
    """
    proc = run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%i %T"], check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}
        raise SlurmError(f"squeue -j {job_id} exited {proc.returncode}: {proc.stderr.strip()}")
    states = {}
    for line in proc.stdout.splitlines():
        if line.strip():
            rec, state = line.split()
            states[rec] = state
    return states


def wait_for_job_state(job_id: str, states: Collection[str] | str, timeout: float = 30,
                       poll: float = 0.1) -> str:
    """Wait until the job (every task, for an array) is in one of ``states``; return it.

    Raises SlurmError on timeout, or at once when the job ends in a terminal state that
    is not wanted (waiting for RUNNING on a job that FAILED cannot succeed), so a test
    fails with the state that explains it instead of a bare timeout.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while True:
        last = job_states(job_id)
        if last:
            current = set(last.values())
            if current <= wanted:
                return next(iter(current)) if len(current) == 1 else ",".join(sorted(current))
            dead = (current & TERMINAL_STATES) - wanted
            if dead:
                raise SlurmError(f"job {job_id} ended {sorted(dead)} while waiting for "
                                 f"{sorted(wanted)}: {last}")
        if time.monotonic() >= deadline:
            raise SlurmError(f"job {job_id} not in {sorted(wanted)} after {timeout:g} s: "
                             f"{last or 'unknown to squeue'}")
        time.sleep(poll)


def wait_for_path(path: "os.PathLike[str] | str", timeout: float = 30, poll: float = 0.05,
                  job_id: str | None = None) -> None:
    """Wait until ``path`` exists (and is non-empty); name the job's state on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.path.getsize(path) > 0:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            state = f"; job {job_id}: {job_states(job_id) or 'unknown'}" if job_id else ""
            raise SlurmError(f"{path} did not appear within {timeout:g} s{state}")
        time.sleep(poll)


def cancel(job_id: str) -> None:
    """scancel, ignoring jobs that are already gone (for test cleanup)."""
    run(["scancel", str(job_id)], check=False)


# --------------------------------------------------------------------------- scenarios


async def cancel_while_a_command_runs(pool, slots: Sequence, cancel: Callable[[], subprocess.CompletedProcess],
                                      settle: float) -> None:
    """The cancel scenario both live schedulers play (Slurm, and PBS on its wrappers):
    `slots[0]` runs a long command when ``cancel()`` (the CLI's `cancel`, run
    ``settle`` seconds after the command starts) ends the job. The command must end
    with `job_ended` within 15 s, a command on `slots[1]` too, and the pool must have
    no slot to give."""
    long = asyncio.ensure_future(pool.execute(slots[0], "bash", {"command": "sleep 120"}, timeout=300))
    await asyncio.sleep(settle)
    cancelled = await asyncio.to_thread(cancel)
    assert cancelled.returncode == 0, cancelled.stderr
    ended_at = time.monotonic()
    result = await asyncio.wait_for(long, 30)
    assert result.success is False and result.error_kind == "job_ended", result
    assert time.monotonic() - ended_at < 15
    after = await pool.execute(slots[1], "bash", {"command": "true"})
    assert after.error_kind == "job_ended"
    with pytest.raises(NoCapacity):
        await pool.acquire(timeout=1)
