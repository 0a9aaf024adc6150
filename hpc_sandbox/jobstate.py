"""The states a job can be in, and a job's status as its scheduler reports it.

Plain types at the bottom of the house: the schedulers make them, `jobs` reports them,
and the pool reads them (a ClusterSource is handed a function that returns them), so
that none of those needs to import another to agree on what a job's state is.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass


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


def jittered(interval: float) -> float:
    """Spread the polls of many clients so they do not ask a controller for job states in step."""
    return interval * random.uniform(0.8, 1.2)


__all__ = ["JobState", "JobStatus", "jittered"]
