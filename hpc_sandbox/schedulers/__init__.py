"""Scheduler modules: one per scheduler, all with the same small interface (base.py).

Each is imported when first asked for, so that importing `schedulers` loads neither
the templates nor the other schedulers. The job states they report are in `jobstate`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError, SchedulerError
from ..spec import SCHEDULERS
from .base import Scheduler

# The schedulers that can submit today, by their name in spec.SCHEDULERS: module, class.
BACKENDS: dict[str, tuple[str, str]] = {
    "local": ("local", "LocalScheduler"),
    "slurm": ("slurm", "SlurmScheduler"),
    "pbs": ("pbs", "PbsScheduler"),
    "nomad": ("nomad", "NomadScheduler"),
}
SUBMIT_SCHEDULERS = tuple(name for name in SCHEDULERS if name in BACKENDS)


def scheduler_class(name: str) -> type[Scheduler]:
    if name in BACKENDS:
        module, cls = BACKENDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    if name in SCHEDULERS:
        raise SchedulerError(f"scheduler {name!r} cannot submit yet (`hpc-sandbox render --scheduler {name}` "
                             f"prints its jobspec); submit with one of {', '.join(SUBMIT_SCHEDULERS)}")
    raise ConfigError(f"unknown scheduler {name!r}; valid: {', '.join(SUBMIT_SCHEDULERS)}")


def get_scheduler(name: str, state_dir: Path) -> Scheduler:
    return scheduler_class(name)(state_dir)


__all__ = ["Scheduler", "BACKENDS", "SUBMIT_SCHEDULERS", "get_scheduler", "scheduler_class"]
