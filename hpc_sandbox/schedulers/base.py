"""The one small interface every scheduler module implements.

A scheduler submits a SandboxSpec as a job, reports the state of jobs (all of them
in one call: a shared controller must not be asked once per job), and cancels.
Node servers are discovered through the rendezvous folder, the same way for all.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar
from pathlib import Path

from ..jobfolder import JobFolder, JobInfo, ServerRecord
from ..jobstate import JobStatus
from ..spec import SandboxSpec


class Scheduler(ABC):
    name: str = "base"
    # Whether cancel(job, purge=True) does more than a cancel: removing the job from the
    # scheduler's own records at once (Nomad keeps a stopped job until its garbage
    # collection). Asked by `jobs.cancel`, so that no caller names a scheduler.
    purges: ClassVar[bool] = False

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
    def cancel(self, job: JobInfo, purge: bool = False) -> None:
        """Stop the job's node servers (they remove their own records on SIGTERM).
        `purge`: also remove the job from the scheduler's records at once, where it keeps
        them (`purges`); every scheduler accepts it, the others ignore it."""
