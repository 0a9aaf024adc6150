"""Wiring: a SlotPool over the jobs of a state dir, from a profile, or over a job it submits.

    pool = connect.from_state_dir()                       # every live job in ~/.hpc-sandbox
    pool = connect.from_config(profile="gpu", overflow="modal")
    async with connect.launch(profile="gpu", array=16) as pool:   # submits, cancels on exit
        ...

The pool knows only its sources (`SlotPool(sources, overflow=...)`). This module sits
above the pool, jobs, burst and config and puts them together: it binds a
ClusterSource to the schedulers (through `jobs`), reads profiles (`config`), submits
and cancels jobs, and chooses the cloud source. The CLI and compat call it; nothing
below it wires itself up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jobs as job_api
from .errors import ConfigError
from .pool import ClusterSource, CloudSource, SlotPool
from .spec import SandboxSpec

log = logging.getLogger(__name__)

# The cloud sources a pool can overflow to, by the name `--overflow` and `overflow=` take.
OVERFLOW_PROVIDERS = ("modal",)


def cloud_source(provider: str, state_dir: Path, profile: str | None = None, config_file: Path | None = None,
                 cloud_profile: str | None = None, settings: Mapping[str, Any] | None = None) -> CloudSource:
    """The cloud source for `provider`, from the cloud profile named (or the one the
    cluster profile names), with `settings` overriding its keys."""
    if provider not in OVERFLOW_PROVIDERS:
        raise ConfigError(f"unknown overflow {provider!r}; valid: {', '.join(OVERFLOW_PROVIDERS)}")
    # Loaded only when a cloud is asked for: a pool over a cluster alone never pays for them.
    from .burst.modal import ModalSource
    from .config import load_cloud_profile

    cloud = load_cloud_profile(cloud_profile, cluster_profile=profile, config_file=config_file, overrides=settings)
    return ModalSource(cloud, state_dir=state_dir)


def cluster_source(state_dir: Path | None = None, job_ids: Sequence[str] | None = None) -> ClusterSource:
    """The node servers of the jobs of a state dir (all of them, or those named), with
    their jobs watched through their schedulers."""
    state = Path(state_dir).expanduser() if state_dir is not None else None
    source = ClusterSource(state, job_ids, job_states=lambda infos: job_api.job_states(source.state_dir, infos),
                           locate=lambda info: job_api.scheduler_servers(source.state_dir, info))
    return source


def from_state_dir(state_dir: Path | None = None, jobs: Sequence[str] | None = None, **options: Any) -> SlotPool:
    """A pool over the jobs of a state dir (all of them, or those named), watched
    through their schedulers. `options` are SlotPool's (overflow, acquire_timeout, ...)."""
    return SlotPool([cluster_source(state_dir, jobs)], **options)


def from_config(profile: str | None = None, config_file: Path | None = None, jobs: Sequence[str] | None = None,
                *, overflow: str | None = None, cloud_profile: str | None = None,
                cloud_settings: Mapping[str, Any] | None = None, **options: Any) -> SlotPool:
    """A pool over the jobs in the state dir that `profile` names (site file, user
    file, `config_file`, HPC_SANDBOX_* variables: as `hpc-sandbox submit` reads them).

    `overflow="modal"` bursts to Modal with the cloud profile `cloud_profile` (else
    the one `profile` names with its `cloud` key), `cloud_settings` overriding its
    keys (burst_after, max_cloud_slots, slots_per_sandbox, ...)."""
    from .config import load_spec  # YAML and profiles only for the callers that read them

    state_dir = load_spec(profile=profile, config_file=config_file).state_dir
    if overflow is not None:
        options["overflow"] = cloud_source(overflow, state_dir, profile, config_file, cloud_profile, cloud_settings)
    return from_state_dir(state_dir, jobs, **options)


@dataclass(frozen=True)
class Plan:
    """What a launch submits, read and checked before anything is submitted: the job's
    spec, and the cloud source that serves callers while it queues (if any)."""

    spec: SandboxSpec
    cloud: CloudSource | None = None


def plan(profile: str | None = None, *, config_file: Path | None = None, overflow: str | None = None,
         cloud_settings: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> Plan:
    """The spec for `profile` with `overrides` (SandboxSpec's fields), and the cloud
    source for `overflow` (the profile's cloud counterpart)."""
    from .config import load_spec

    spec = load_spec(profile=profile, config_file=config_file, overrides=overrides)
    cloud = (cloud_source(overflow, spec.state_dir, profile, config_file, spec.cloud, cloud_settings)
             if overflow is not None else None)
    return Plan(spec, cloud)


async def pool_for(job: job_api.Job, cloud: CloudSource | None = None, *, wait_timeout: float = 600.0,
                   **options: Any) -> SlotPool:
    """A pool (not started) over `job`'s node servers, once the first of them answers;
    at once with a cloud source, which serves callers while the job waits in the queue.
    `options` are SlotPool's (acquire_timeout, lease_ttl)."""
    if cloud is None:
        await job.wait_ready(wait_timeout, servers=1)
    return from_state_dir(job.state_dir, [job.id], overflow=cloud, **options)


@contextlib.asynccontextmanager
async def launch(profile: str | None = None, *, config_file: Path | None = None, wait_timeout: float = 600.0,
                 acquire_timeout: float = 300.0, lease_ttl: float | None = None, overflow: str | None = None,
                 cloud_settings: Mapping[str, Any] | None = None, **overrides: Any) -> AsyncIterator[SlotPool]:
    """Submit a job for `profile` (with `overrides` named as SandboxSpec's fields,
    e.g. scheduler="slurm", array=16, slots=4), attach as soon as its first node
    server is ready, and cancel the job on exit: normal, on error, on Ctrl-C.
    With `overflow="modal"` the pool bursts to the profile's cloud counterpart
    while the job waits in the queue (it does not wait for the job to start)."""
    planned = plan(profile, config_file=config_file, overflow=overflow, cloud_settings=cloud_settings,
                   overrides=overrides)
    job = job_api.submit(planned.spec)
    try:
        pool = await pool_for(job, planned.cloud, wait_timeout=wait_timeout, acquire_timeout=acquire_timeout,
                              lease_ttl=lease_ttl)
        pool.jobs = [job]
        async with pool:
            yield pool
    finally:
        # Shielded from a cancelled task (Ctrl-C): the job must not outlive the pool.
        await asyncio.shield(asyncio.to_thread(job.cancel))
        log.info("job %s cancelled", job.id)


__all__ = ["OVERFLOW_PROVIDERS", "Plan", "cloud_source", "cluster_source", "from_config", "from_state_dir", "launch",
           "plan", "pool_for"]
