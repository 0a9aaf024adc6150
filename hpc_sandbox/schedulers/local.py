"""The embedded default scheduler: node servers as local processes, no cluster needed.

"Submitting" starts one `hpc-sandbox serve` process per node, detached from the
terminal, logging into the job folder; their pids are the job's scheduler ids.

They are children of the submitting process: one that cancels its own job (launch,
the Atropos face) waits for them, or each would stay a zombie until it exits.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from ..jobspec import serve_argv
from ..jobfolder import JobFolder, JobInfo
from ..spec import SandboxSpec
from ..jobstate import JobState, JobStatus
from .base import Scheduler

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 10.0
# A start time computed from btime and clock ticks can be off by seconds after clock
# adjustments; a pid recycled within a minute of the submit is not a real risk.
PID_START_SLACK = 60.0


def _boot_time() -> float:
    with open("/proc/stat", "rb") as handle:
        for line in handle:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _alive(pid: int, job: JobInfo) -> bool:
    """Is `pid` still this job's node server (and not a recycled pid)?

    Each server was started as a session leader, before job.json was written; a pid
    recycled since then belongs to a process that started later. Right after the
    fork (before its exec) its command line is still the submitting CLI's, so
    either name counts.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return False  # a zombie has exited; its parent has not reaped it yet
        started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > job.submitted_at + PID_START_SLACK:
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
        if os.getsid(pid) != pid:
            return False
    except (OSError, IndexError, ValueError):
        return False
    return job.job_id.encode() in cmdline or b"hpc_sandbox" in cmdline or b"hpc-sandbox" in cmdline


# The node servers this process started and has not waited for yet, by pid.
_started: dict[int, subprocess.Popen] = {}


def _forget_exited() -> None:
    """Wait for the node servers this process started that have exited by themselves."""
    for pid, proc in list(_started.items()):
        if proc.poll() is not None:
            _started.pop(pid, None)


def _reap(pids: Sequence[int]) -> None:
    """Wait for those of `pids` this process started (they have been stopped)."""
    for pid in pids:
        proc = _started.pop(pid, None)
        if proc is not None:
            try:
                proc.wait(STOP_WAIT_SECONDS)
            except subprocess.TimeoutExpired:  # a server stuck in the kernel: the next _reap tries again
                _started[pid] = proc


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass  # it exited between the check and the signal: what we wanted


class LocalScheduler(Scheduler):
    name = "local"

    def submit(self, spec: SandboxSpec, folder: JobFolder) -> JobInfo:
        job_id = folder.job_id
        _forget_exited()
        folder.logs.mkdir(parents=True, exist_ok=True)
        pids = []
        for index in range(spec.servers):
            with open(folder.server_log(index), "ab") as out:
                proc = subprocess.Popen(
                    serve_argv(spec, job_id, port_index=index, state_dir=str(folder.state_dir), host="127.0.0.1"),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the submitting CLI, like a batch job
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            _started[proc.pid] = proc
            pids.append(str(proc.pid))
            log.info("started node server %d of job %s as pid %d", index, job_id, proc.pid)
        return JobInfo(job_id=job_id, scheduler=self.name, submitted_at=time.time(), servers=spec.servers,
                       slots_per_server=spec.slots, runtime=spec.runtime, scheduler_ids=tuple(pids),
                       image=spec.image)

    def status(self, jobs: Sequence[JobInfo]) -> dict[str, JobStatus]:
        _forget_exited()
        statuses = {}
        for job in jobs:
            alive = sum(_alive(int(pid), job) for pid in job.scheduler_ids)
            if alive == len(job.scheduler_ids):
                statuses[job.job_id] = JobStatus(job.job_id, JobState.RUNNING)
            elif alive:
                statuses[job.job_id] = JobStatus(job.job_id, JobState.RUNNING,
                                                 f"{len(job.scheduler_ids) - alive} of {len(job.scheduler_ids)} node servers exited")
            else:
                statuses[job.job_id] = JobStatus(job.job_id, JobState.DONE, "all node server processes have exited")
        return statuses

    def cancel(self, job: JobInfo, purge: bool = False) -> None:
        pids = [int(pid) for pid in job.scheduler_ids if _alive(int(pid), job)]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while time.monotonic() < deadline and any(_alive(pid, job) for pid in pids):
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid, job):
                log.warning("node server pid %d ignored SIGTERM for %.0fs; killing it", pid, STOP_WAIT_SECONDS)
                _signal(pid, signal.SIGKILL, group=True)
        _reap([int(pid) for pid in job.scheduler_ids])
