"""The one small interface every scheduler module implements.

A scheduler submits a SandboxSpec as a job, reports the state of jobs (all of them
in one call: a shared controller must not be asked once per job), and cancels.
Node servers are discovered through the rendezvous folder, the same way for all.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from ..jobfolder import JobFolder, JobInfo, ServerRecord
from ..jobstate import JobStatus
from ..spec import SandboxSpec


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
