"""Scheduler modules: one per scheduler, all with the same small interface (base.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import JobState, JobStatus, Scheduler
from .local import LocalScheduler
from .pbs import PbsScheduler
from .slurm import SlurmScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {"local": LocalScheduler, "pbs": PbsScheduler, "slurm": SlurmScheduler}


def get_scheduler(name: str, state_dir: Path) -> Scheduler:
    try:
        return SCHEDULERS[name](state_dir)
    except KeyError:
        raise ConfigError(f"unknown scheduler {name!r}; valid: {', '.join(sorted(SCHEDULERS))}") from None


__all__ = ["JobState", "JobStatus", "Scheduler", "SCHEDULERS", "get_scheduler"]
