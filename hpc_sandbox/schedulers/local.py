"""The embedded default scheduler: node servers as local processes, no cluster needed.

"Submitting" starts one `hpc-sandbox serve` process per node, detached from the
terminal, logging into the job folder; their pids are the job's scheduler ids.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..jobspec import serve_argv
from ..rendezvous import JobInfo, job_dir
from ..spec import SandboxSpec
from .base import JobState, JobStatus, Scheduler

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 10.0


def _alive(pid: int, job_id: str) -> bool:
    """Is `pid` still this job's node server (and not a recycled pid)?

    Each server was started as a session leader; right after the fork (before its
    exec) its command line is still the submitting CLI's, so either name counts.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False  # a zombie has exited; its parent has not reaped it yet
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
        if os.getsid(pid) != pid:
            return False
    except (OSError, IndexError):
        return False
    return job_id.encode() in cmdline or b"hpc_sandbox" in cmdline or b"hpc-sandbox" in cmdline


def server_log(state_dir: Path, job_id: str, index: int) -> Path:
    return job_dir(state_dir, job_id) / "logs" / f"server-{index}.log"


class LocalScheduler(Scheduler):
    name = "local"

    def submit(self, spec: SandboxSpec, job_id: str) -> JobInfo:
        logs = job_dir(self.state_dir, job_id) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pids = []
        for index in range(spec.servers):
            with open(server_log(self.state_dir, job_id, index), "ab") as out:
                proc = subprocess.Popen(
                    serve_argv(spec, job_id, port_index=index, state_dir=self.state_dir, host="127.0.0.1"),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the submitting CLI, like a batch job
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            pids.append(str(proc.pid))
            log.info("started node server %d of job %s as pid %d", index, job_id, proc.pid)
        return JobInfo(job_id=job_id, scheduler=self.name, submitted_at=time.time(), servers=spec.servers,
                       slots_per_server=spec.slots, runtime=spec.runtime, scheduler_ids=tuple(pids),
                       image=spec.image)

    def status(self, jobs: Sequence[JobInfo]) -> dict[str, JobStatus]:
        statuses = {}
        for job in jobs:
            alive = sum(_alive(int(pid), job.job_id) for pid in job.scheduler_ids)
            if alive == len(job.scheduler_ids):
                statuses[job.job_id] = JobStatus(job.job_id, JobState.RUNNING)
            elif alive:
                statuses[job.job_id] = JobStatus(job.job_id, JobState.RUNNING,
                                                 f"{len(job.scheduler_ids) - alive} of {len(job.scheduler_ids)} node servers exited")
            else:
                statuses[job.job_id] = JobStatus(job.job_id, JobState.DONE, "all node server processes have exited")
        return statuses

    def cancel(self, job: JobInfo) -> None:
        pids = [int(pid) for pid in job.scheduler_ids if _alive(int(pid), job.job_id)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while time.monotonic() < deadline and any(_alive(pid, job.job_id) for pid in pids):
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid, job.job_id):
                log.warning("node server pid %d ignored SIGTERM for %.0fs; killing it", pid, STOP_WAIT_SECONDS)
                os.killpg(pid, signal.SIGKILL)
