"""What every CLI-driven batch scheduler (Slurm, PBS) shares: render, keep the
submitted script on disk, submit with a timeout, cancel; and the aggregation of
per-task states into one job state.

A scheduler module overrides only what differs: its commands, how a job id is read
from the submit command's output, and how one status call is parsed.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from ..errors import SchedulerError
from ..jobspec import RenderedJobspec, render
from ..jobfolder import JobFolder, JobInfo
from ..spec import SandboxSpec
from ..jobstate import JobState, JobStatus
from .base import Scheduler

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0  # a hung controller must not hang hpc-sandbox
# Which state wins when tasks of one job disagree: any live task keeps the job alive.
_LIVE_ORDER = (JobState.RUNNING, JobState.COMPLETING, JobState.PENDING)
_END_ORDER = (JobState.FAILED, JobState.TIMEOUT, JobState.PREEMPTED, JobState.CANCELLED, JobState.DONE)


class Task(NamedTuple):
    """One task (array task, split array part, node) as a scheduler listed it."""
    state: JobState
    reason: str
    # The scheduler's estimate of when this task starts (Unix seconds), set only while it
    # is pending and only where the scheduler gives one (see JobStatus.expected_start).
    expected_start: float | None = None


def run_command(argv: Sequence[str], timeout: float | None = None, what: str | None = None,
                env: Mapping[str, str] | None = None) -> str:
    """Run a scheduler command; its failure becomes one line quoting the scheduler.

    `env` adds to (does not replace) this process's environment: a scheduler command
    still needs the user's PATH, config paths and credentials."""
    label = what or argv[0]
    timeout = COMMAND_TIMEOUT if timeout is None else timeout
    log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]} is not on PATH (is this a login node of the cluster?)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{label} did not answer within {timeout:.0f}s (is the controller down or overloaded?)",
                             timed_out=True) from None
    if proc.returncode != 0:
        said = " ".join(line.strip() for line in proc.stderr.strip().splitlines()[-2:]) or proc.stdout.strip()[-200:]
        raise SchedulerError(f"{label} failed (exit {proc.returncode}): {said or 'no message'}",
                             returncode=proc.returncode, said=said)
    return proc.stdout


def combine(job_id: str, states: Iterable[tuple[JobState, str] | Task], expected_tasks: int) -> JobStatus:
    """One job state from its tasks' states (array tasks, split array parts, nodes).

    The expected start is the earliest among the pending tasks that carry one: the
    moment the job's next capacity is expected, whether the job as a whole is pending or
    already partly running.
    """
    seen = [Task(*task) for task in states]  # plain (state, reason) pairs are tasks without an estimate
    if not seen:
        return JobStatus(job_id, JobState.UNKNOWN, "not known to the scheduler")
    expected = min((t.expected_start for t in seen if t.state is JobState.PENDING and t.expected_start is not None),
                   default=None)
    for state in _LIVE_ORDER:
        matching = [t.reason for t in seen if t.state is state]
        if matching:
            detail = f"{len(matching)} of {expected_tasks} tasks {state.value}"
            reasons = sorted({r for r in matching if r and r != "None"})
            return JobStatus(job_id, state, detail + (f" ({', '.join(reasons)})" if reasons else ""), expected)
    for state in _END_ORDER:
        matching = [t.reason for t in seen if t.state is state]
        if matching:
            reasons = sorted({r for r in matching if r and r != "None"})
            return JobStatus(job_id, state, ", ".join(reasons))
    return JobStatus(job_id, JobState.UNKNOWN, ", ".join(sorted({t.reason for t in seen if t.reason})))


class BatchScheduler(Scheduler):
    submit_command: tuple[str, ...] = ()
    cancel_command: tuple[str, ...] = ()

    def submit(self, spec: SandboxSpec, folder: JobFolder) -> JobInfo:
        # The scheduler writes job output there and does not create missing folders.
        folder.logs.mkdir(parents=True, exist_ok=True)
        folder.submit_dir.mkdir(exist_ok=True)
        spec = self.with_cluster_limits(spec.replace(scheduler=self.name))
        ids: list[str] = []
        for part in render(spec, self.name, job_key=folder.job_id):
            script = folder.submit_dir / part.name
            script.write_text(part.text, encoding="utf-8")
            try:
                out = run_command(self.submit_argv(folder, script, part),
                                  what=f"{self.submit_command[0]} {script.name}")
            except SchedulerError:
                if ids:  # a split array half submitted is worse than none
                    self._cancel_ids(ids)
                raise
            scheduler_id = self.parse_job_id(out)
            ids.append(scheduler_id)
            log.info("submitted %s as %s job %s", script, self.name, scheduler_id)
        folder.write_scheduler_ids(ids)
        return JobInfo(job_id=folder.job_id, scheduler=self.name, submitted_at=time.time(), servers=spec.servers,
                       slots_per_server=spec.slots, runtime=spec.runtime, scheduler_ids=tuple(ids),
                       image=spec.image)

    def with_cluster_limits(self, spec: SandboxSpec) -> SandboxSpec:
        """The spec with limits read from the live cluster where the profile sets none
        (`render` never asks, so that it prints the same text anywhere)."""
        return spec

    def submit_argv(self, folder: JobFolder, script: Path, part: RenderedJobspec) -> list[str]:
        return [*self.submit_command, str(script)]

    def parse_job_id(self, stdout: str) -> str:
        return stdout.strip()

    def cancel(self, job: JobInfo, purge: bool = False) -> None:
        self._cancel_ids(list(job.scheduler_ids))

    def _cancel_ids(self, ids: list[str]) -> None:
        if ids:
            run_command([*self.cancel_command, *ids])

    def status(self, jobs: Sequence[JobInfo]) -> dict[str, JobStatus]:
        if not jobs:
            return {}
        tasks = self.query(jobs)  # ONE call to the scheduler for all of them
        result = {}
        for job in jobs:
            states = [task for scheduler_id in job.scheduler_ids for task in tasks.get(scheduler_id, [])]
            result[job.job_id] = combine(job.job_id, states, job.servers)
        return result

    def query(self, jobs: Sequence[JobInfo]) -> dict[str, list[Task]]:
        """Task states of the given jobs, keyed by the id the submit command printed."""
        raise NotImplementedError
