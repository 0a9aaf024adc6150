"""Jobs as a user sees them: submit, wait until ready, report, cancel.

Everything about one job stays in its folder under the state dir, where a person
can look: job.json (what was submitted, the scheduler's ids), the token, the ready
records of its node servers, and their logs.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .client import NodeClient, endpoint_of
from .errors import ClientError, ConfigError, ErrorKind, HpcSandboxError, JobNotFound
from .protocol import SlotState
from .jobfolder import Credentials, JobFolder, JobInfo, ServerRecord, jobs_root, list_jobs
from .jobstate import JobState, JobStatus, jittered
from .schedulers import Scheduler, get_scheduler, scheduler_class
from .spec import SandboxSpec

log = logging.getLogger(__name__)


class JobFailed(HpcSandboxError):
    kind = ErrorKind.JOB_FAILED


@dataclass(frozen=True)
class ServerState:
    record: ServerRecord
    reachable: bool
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class JobReport:
    info: JobInfo
    status: JobStatus
    servers: list[ServerState]

    @property
    def free(self) -> int:
        return sum(s.counts.get(SlotState.FREE, 0) for s in self.servers)

    @property
    def leased(self) -> int:
        return sum(s.counts.get(SlotState.LEASED, 0) for s in self.servers)


STATUS_INTERVAL = 2.0  # seconds between scheduler status calls while waiting


def new_job_id(job_name: str) -> str:
    return f"{job_name}-{secrets.token_hex(3)}"


def submit(spec: SandboxSpec, scheduler: str | None = None) -> "Job":
    """Make the job folder and its credentials, then hand the spec to the scheduler
    (the spec's own, unless named here)."""
    state_dir = spec.state_dir.expanduser()
    backend = get_scheduler(scheduler or spec.scheduler, state_dir)
    folder = JobFolder(state_dir, new_job_id(spec.job_name))
    folder.create_credentials(tls=spec.tls)
    try:
        info = backend.submit(spec, folder)
    except BaseException:
        folder.remove()
        raise
    folder.write_info(info)
    return Job(state_dir, info)


@dataclass(frozen=True)
class Job:
    """A submitted job, from Python: what `hpc-sandbox submit/status/cancel` use too.

        job = jobs.submit(load_spec(profile="gpu", overrides={"array": 16}))
        await job.wait_ready(progress=print)
        print(job.id, job.scheduler_ids, (await job.status()).status.state)
        job.cancel()
    """

    state_dir: Path
    info: JobInfo

    @classmethod
    def attach(cls, state_dir: Path, job_id: str) -> "Job":
        """A job submitted earlier (by this process or another), by its id."""
        return cls(Path(state_dir).expanduser(), JobFolder(state_dir, job_id).read_info())

    @property
    def id(self) -> str:
        return self.info.job_id

    @property
    def scheduler_ids(self) -> tuple[str, ...]:
        """The scheduler's own job ids (Slurm/PBS job ids, local pids)."""
        return self.info.scheduler_ids

    @property
    def folder(self) -> JobFolder:
        return JobFolder(self.state_dir, self.id)

    async def wait_ready(self, timeout: float = 600.0, progress: Callable[[int, int, str], None] | None = None,
                         servers: int | None = None) -> list[ServerState]:
        """Wait until `servers` node servers (default: all of them) answer."""
        return await wait_ready(self.state_dir, self.info, timeout, progress, servers)

    async def status(self) -> JobReport:
        [found] = await report(self.state_dir, self.id)
        return found

    def cancel(self, purge: bool = False) -> None:
        """Cancel through the scheduler and remove the job folder; a job already gone is
        fine. `purge`: also remove it from the scheduler's records at once where the
        scheduler keeps them (Nomad); elsewhere it is a plain cancel."""
        try:
            cancel(self.state_dir, self.id, purge=purge and scheduler_class(self.info.scheduler).purges)
        except JobNotFound:
            pass


@functools.lru_cache(maxsize=32)
def _backend(name: str, state_dir: Path) -> Scheduler:
    """One scheduler object per scheduler and state dir: what it learns (a cluster's
    squeue format, Nomad's node addresses) is kept between polls."""
    return get_scheduler(name, state_dir)


def job_states(state_dir: Path, infos: Sequence[JobInfo]) -> dict[str, JobStatus]:
    """The state of every given job: one status call per scheduler, for all its jobs."""
    statuses: dict[str, JobStatus] = {}
    for scheduler in sorted({info.scheduler for info in infos}):
        group = [info for info in infos if info.scheduler == scheduler]
        statuses.update(_backend(scheduler, Path(state_dir)).status(group))
    return statuses


def scheduler_servers(state_dir: Path, info: JobInfo) -> list[ServerRecord] | None:
    """The job's node servers as its scheduler knows them (Nomad), or None when its
    ready records in the job folder are the truth."""
    return _backend(info.scheduler, Path(state_dir)).servers(info)


def server_records(state_dir: Path, job_id: str, info: JobInfo | None = None) -> list[ServerRecord]:
    folder = JobFolder(state_dir, job_id)
    if info is None:
        try:
            info = folder.read_info()
        except JobNotFound:
            info = None  # a node server started by hand: records only
    found = scheduler_servers(state_dir, info) if info is not None else None
    return folder.read_records() if found is None else found


async def _probe(record: ServerRecord, credentials: Credentials, session: aiohttp.ClientSession) -> ServerState:
    if record.process_gone():
        return ServerState(record, False, error=f"stale record: its node server (pid {record.pid} on this host) "
                                                "has exited")
    endpoint = endpoint_of(record, credentials)
    try:
        answer = await NodeClient(endpoint, session=session).slots()
        return ServerState(record, True, answer.counts)
    except ClientError as exc:
        return ServerState(record, False, error=str(exc))


async def probe_servers(state_dir: Path, job_id: str, info: JobInfo | None = None) -> list[ServerState]:
    credentials = JobFolder(state_dir, job_id).credentials()
    records = await asyncio.to_thread(server_records, state_dir, job_id, info)
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(_probe(r, credentials, session) for r in records)))


async def wait_ready(state_dir: Path, info: JobInfo, timeout: float,
                     progress: Callable[[int, int, str], None] | None = None,
                     servers: int | None = None) -> list[ServerState]:
    """Wait until `servers` (default: every) node server of the job answers; fail fast
    if the job ends."""
    backend = get_scheduler(info.scheduler, state_dir)
    wanted = min(servers or info.servers, info.servers)
    deadline = time.monotonic() + timeout
    next_status = 0.0
    status = JobStatus(info.job_id, JobState.UNKNOWN)
    while True:
        # Ready records are files (cheap to look at often); the scheduler is a shared
        # controller, asked every few seconds at most.
        if time.monotonic() >= next_status:
            status = backend.status([info])[info.job_id]
            next_status = time.monotonic() + jittered(STATUS_INTERVAL)
        found = await probe_servers(state_dir, info.job_id, info)
        ready = sum(s.reachable for s in found)
        if progress:
            progress(ready, info.servers, status.state.value)
        if ready >= wanted:
            return found
        if status.state.ended or (info.scheduler == "local" and status.reason):
            folder = JobFolder(state_dir, info.job_id)
            said = folder.log_tail() or status.reason  # Nomad keeps logs on its nodes: its own reason then
            raise JobFailed(f"job {info.job_id} {status.state.value} before its node servers were ready"
                            f"{': ' + said if said else ''} (logs: {folder.logs})")
        if time.monotonic() > deadline:
            raise JobFailed(f"job {info.job_id}: {ready} of {info.servers} node servers ready after {timeout:.0f}s "
                            f"(scheduler says {status.state.value}{': ' + status.reason if status.reason else ''}); "
                            f"it keeps running: `hpc-sandbox status {info.job_id}`")
        await asyncio.sleep(0.2)


def job_ids(state_dir: Path, job: str | None) -> list[str]:
    if job is None:
        return list_jobs(state_dir)
    if not JobFolder(state_dir, job).exists():
        raise JobNotFound(f"no job {job!r} in {jobs_root(state_dir)} (see `hpc-sandbox status`)")
    return [job]


async def report(state_dir: Path, job: str | None = None) -> list[JobReport]:
    infos = []
    for job_id in job_ids(state_dir, job):
        try:
            infos.append(JobFolder(state_dir, job_id).read_info())
        except JobNotFound:
            # A folder without job.json is a submit in progress (its token comes first)
            # or a node server started by hand: nothing to report on, unless asked by name.
            if job is not None:
                raise
            log.debug("skipping %s: no job.json", job_id)
    statuses = job_states(state_dir, infos)
    reports = []
    for info in infos:
        servers = await probe_servers(state_dir, info.job_id, info)
        reports.append(JobReport(info, statuses.get(info.job_id, JobStatus(info.job_id, JobState.UNKNOWN)), servers))
    return reports


def cancel(state_dir: Path, job: str, purge: bool = False) -> JobInfo:
    """Cancel through the scheduler, then remove the job folder (records, token; its logs
    are kept, see jobfolder.KEPT_JOB_LOGS).
    `purge` (the CLI's --purge) also removes the job from the scheduler's records at once:
    an error for a scheduler that keeps none (Scheduler.purges)."""
    folder = JobFolder(state_dir, job)
    info = folder.read_info()
    backend = get_scheduler(info.scheduler, state_dir)
    if purge and not backend.purges:
        raise ConfigError(f"--purge is for Nomad jobs; {job} is a {info.scheduler} job")
    backend.cancel(info, purge=purge)
    folder.remove()
    return info
