"""Scheduler modules: one per scheduler, all with the same small interface (base.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, SchedulerError
from ..spec import SCHEDULERS
from .base import JobState, JobStatus, Scheduler
from .local import LocalScheduler
from .pbs import PbsScheduler
from .slurm import SlurmScheduler

# The schedulers that can submit today, by their name in spec.SCHEDULERS.
BACKENDS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (LocalScheduler, SlurmScheduler, PbsScheduler)}
assert set(BACKENDS) <= set(SCHEDULERS), "a backend whose name a profile cannot give"
SUBMIT_SCHEDULERS = tuple(name for name in SCHEDULERS if name in BACKENDS)


def get_scheduler(name: str, state_dir: Path) -> Scheduler:
    backend = BACKENDS.get(name)
    if backend is not None:
        return backend(state_dir)
    if name in SCHEDULERS:
        raise SchedulerError(f"scheduler {name!r} cannot submit yet (`hpc-sandbox render --scheduler {name}` "
                             f"prints its jobspec); submit with one of {', '.join(SUBMIT_SCHEDULERS)}")
    raise ConfigError(f"unknown scheduler {name!r}; valid: {', '.join(SUBMIT_SCHEDULERS)}")


__all__ = ["JobState", "JobStatus", "Scheduler", "BACKENDS", "SUBMIT_SCHEDULERS", "get_scheduler"]
