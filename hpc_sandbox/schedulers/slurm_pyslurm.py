"""The optional pyslurm path for reading job states: one RPC to slurmctld instead of
an `squeue` process per poll.

Used only where pyslurm is installed *and* was built for this cluster's Slurm release
(pyslurm's major.minor follows Slurm's: pyslurm 23.2.x is for Slurm 23.02), and only
pyslurm's current API (`pyslurm.Jobs.load()`, pyslurm 23.02 and later). Anywhere else,
and whenever pyslurm fails, the `squeue` CLI path in slurm.py answers; it is complete
on its own. No pyslurm release matches the Slurm 22.05 of the test cluster, so the tests
reach this module through a named pyslurm double only.
"""
from __future__ import annotations

import functools
import logging
import re
from types import ModuleType

from ..errors import SchedulerError
from ..jobstate import JobState
from .batch import run_command

log = logging.getLogger(__name__)

def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of "22.05.8", "slurm 22.05.8" or "22.5.1"."""
    match = re.search(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


@functools.cache  # once per process: the answer does not change under it
def matching_pyslurm() -> ModuleType | None:
    """pyslurm, if it is importable, new enough and built for this cluster's Slurm."""
    try:
        import pyslurm  # type: ignore[import-not-found]
    except ImportError:
        return None
    if not hasattr(pyslurm, "Jobs"):
        log.info("pyslurm %s predates pyslurm.Jobs; using squeue", getattr(pyslurm, "__version__", "?"))
        return None
    try:
        cluster = release(run_command(["sinfo", "--version"], what="sinfo --version"))
    except SchedulerError as exc:
        log.info("cannot tell this cluster's Slurm release (%s); using squeue", exc)
        return None
    mine = release(getattr(pyslurm, "__version__", ""))
    if cluster is None or mine != cluster:
        log.info("pyslurm %s is not built for this cluster's Slurm %s; using squeue",
                 getattr(pyslurm, "__version__", "?"), cluster)
        return None
    log.info("reading job states through pyslurm %s", pyslurm.__version__)
    return pyslurm


def job_states(pyslurm: ModuleType) -> list[tuple[str, str, str]]:
    """(key, Slurm state, reason) of every job slurmctld knows; the key is the id sbatch
    printed (the array's id for array tasks). Raises SchedulerError when the RPC fails."""
    try:
        jobs = pyslurm.Jobs.load()
    except Exception as exc:  # pyslurm.RPCError and whatever a mismatched build raises
        raise SchedulerError(f"pyslurm could not load jobs: {exc}") from None
    return [(str(job.array_id or job.id), str(job.state), str(job.state_reason or "")) for job in jobs.values()]
