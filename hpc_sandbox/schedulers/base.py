"""The one small interface every scheduler module implements.

A scheduler submits a SandboxSpec as a job, reports the state of jobs (all of them
in one call: a shared controller must not be asked once per job), and cancels.
Node servers are discovered through the rendezvous folder, the same way for all.
"""
from __future__ import annotations

import enum
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..jobfolder import JobFolder, JobInfo, ServerRecord
from ..spec import SandboxSpec


def jittered(interval: float) -> float:
    """Spread the polls of many clients so they do not hit a controller in step."""
    return interval * random.uniform(0.8, 1.2)


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETING = "completing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    PREEMPTED = "preempted"
    UNKNOWN = "unknown"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.PREEMPTED)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    reason: str = ""  # the scheduler's own words, kept verbatim
    # The scheduler's own estimate of when the job's earliest *pending* task starts, as a
    # Unix timestamp in seconds (Slurm's backfill `start_time`, what `squeue --start`
    # shows; PBS Pro's `estimated.start_time`). Taken only from tasks still waiting in the
    # queue: a job whose tasks all run or have ended has None, and so has a pending job the
    # scheduler has not estimated (yet: Slurm's backfill pass runs every bf_interval; held
    # jobs, Torque). An array with some tasks running and some pending keeps the estimate
    # of its pending rest. It is a forecast, passed on as the scheduler gave it: it moves
    # as other jobs end early or arrive, and it may already lie in the past when the
    # scheduler has not revised it since. Last, with a default, so that every existing
    # JobStatus(...) call stays valid.
    expected_start: float | None = None


class Scheduler(ABC):
    name: str = "base"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).expanduser()

    @abstractmethod
    def submit(self, spec: SandboxSpec, folder: JobFolder) -> JobInfo:
        """Start the job's node servers (or queue it); the job folder and token exist already."""

    @abstractmethod
    def status(self, jobs: Sequence[JobInfo]) -> dict[str, JobStatus]:
        """State of every given job, in one round trip to the scheduler."""

    def servers(self, job: JobInfo) -> list[ServerRecord] | None:
        """The job's node servers, for a scheduler that knows them (Nomad's allocations);
        None: their ready records in the job folder are the truth (a shared filesystem)."""
        return None

    @abstractmethod
    def cancel(self, job: JobInfo) -> None:
        """Stop the job's node servers (they remove their own records on SIGTERM)."""
