"""The pools behind a face's profiles: one SlotPool per profile, started and stopped together.

A profile's pool is either given (its jobs are not ours to cancel) or made at start()
over a job submitted for a config profile with SandboxSpec fields as overrides (that
job is cancelled by stop(purge=True), and by a start() that fails). One pool per
profile because a pool hands out any slot of its jobs (its node servers do not tell
profiles apart): a pool shared by two profiles' jobs would give a GPU trajectory a CPU
slot.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..pool import SlotPool

log = logging.getLogger(__name__)


@dataclass
class Profile:
    """One profile: its own pool (given, or over the job start() submits)."""

    name: str
    config_profile: str | None = None  # the config profile its job is submitted from
    overrides: dict[str, Any] = field(default_factory=dict)  # SandboxSpec fields over the profile
    pool: SlotPool | None = None
    own_pool: bool = False  # made by start(): stopped and dropped by stop()
    job: Any = None  # the jobs.Job start() submitted, until cancelled


def profiles_of(values: Mapping[str, SlotPool | Mapping[str, Any] | None]) -> dict[str, Profile]:
    """Profiles by name from a SlotPool to serve from, or the job overrides to submit config
    profile NAME with at start() (None: no overrides; a "profile" key names another config
    profile)."""
    if not values:
        raise ConfigError("with_profiles needs at least one profile")
    entries: dict[str, Profile] = {}
    for name, value in values.items():
        if isinstance(value, SlotPool):
            entries[name] = Profile(name, pool=value)
        elif value is None or isinstance(value, Mapping):
            overrides = dict(value or {})
            entries[name] = Profile(name, config_profile=overrides.pop("profile", name), overrides=overrides)
        else:
            raise ConfigError(f"profile {name!r}: expected a SlotPool or a mapping of job overrides, "
                              f"got {type(value).__name__}")
    return entries


def _cancel_job(job: Any) -> None:
    """Cancel a job start() submitted: purged where its scheduler keeps ended jobs (Nomad)."""
    job.cancel(purge=True)


class ProfilePools:
    """The profiles of a face and their pools. `wait_timeout` bounds the wait for a
    submitted job's first node server; `acquire_timeout`, `lease_ttl` and `overflow` (a
    cloud source's name, with `cloud_settings`) are the pools' it makes."""

    def __init__(self, profiles: dict[str, Profile], default: str, *, config_file: str | Path | None = None,
                 wait_timeout: float = 600.0, acquire_timeout: float = 300.0, lease_ttl: float | None = None,
                 overflow: str | None = None, cloud_settings: Mapping[str, Any] | None = None) -> None:
        if default not in profiles:
            raise ConfigError(f"default profile {default!r} is not one of {', '.join(profiles)}")
        self.entries = profiles
        self.default = default
        self.config_file = Path(config_file).expanduser() if config_file is not None else None
        self.wait_timeout = wait_timeout
        self.acquire_timeout = acquire_timeout
        self.lease_ttl = lease_ttl
        self.overflow = overflow
        self.cloud_settings = dict(cloud_settings) if cloud_settings else None

    def entry(self, profile: str | None) -> Profile:
        name = self.default if profile is None else profile
        entry = self.entries.get(name)
        if entry is None:
            raise ConfigError(f"unknown profile {name!r}; this backend has: {', '.join(self.entries)}")
        return entry

    def pool_of(self, profile: str) -> SlotPool:
        pool = self.entry(profile).pool
        if pool is None:
            raise ConfigError(f"profile {profile!r} has no pool: the backend is stopped (call start())")
        return pool

    @property
    def pools(self) -> dict[str, SlotPool | None]:
        return {name: entry.pool for name, entry in self.entries.items()}

    @property
    def jobs(self) -> list[Any]:
        return [entry.job for entry in self.entries.values() if entry.job is not None]

    def staying(self, purge: bool) -> set[str]:
        """The profiles whose pools outlive a stop(purge): the slots held of them are
        worth releasing (reset) first, unlike those on a job about to be cancelled."""
        return {entry.name for entry in self.entries.values()
                if not (purge and entry.job is not None) and entry.pool is not None}

    async def start(self) -> None:
        """Start every pool, submitting the jobs of the profiles without one (each waits
        for its first node server). The first failure is raised once all have ended; the
        caller then stops everything (purge), so that nothing this start made outlives it."""
        outcomes = await asyncio.gather(*(self._start_profile(e) for e in self.entries.values()),
                                        return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]

    async def _start_profile(self, entry: Profile) -> None:
        if entry.pool is not None:
            await entry.pool.start()
            return
        from .. import connect, jobs as job_api  # what `submit` and connect.launch use

        planned = connect.plan(entry.config_profile, config_file=self.config_file, overflow=self.overflow,
                               cloud_settings=self.cloud_settings, overrides=entry.overrides)
        submitted = entry.job is None
        if submitted:
            entry.job = job_api.submit(planned.spec)
            log.info("profile %s: submitted job %s", entry.name, entry.job.id)
        job = entry.job
        try:
            # With the cloud overflow, callers are served while the job queues.
            pool = await connect.pool_for(job, planned.cloud, wait_timeout=self.wait_timeout,
                                          acquire_timeout=self.acquire_timeout, lease_ttl=self.lease_ttl)
            await pool.start()
        except BaseException:
            if submitted:
                entry.job = None
                await asyncio.shield(asyncio.to_thread(_cancel_job, job))  # never outlives a failed start
            raise
        entry.pool, entry.own_pool = pool, True

    async def stop(self, purge: bool) -> None:
        """Stop the pools (those made by start() are dropped); with `purge`, cancel the
        jobs start() submitted (Nomad: purged); without, they keep running, and a later
        start() attaches to them again."""
        for entry in self.entries.values():
            if entry.pool is not None:
                await entry.pool.stop()
                if entry.own_pool:
                    entry.pool, entry.own_pool = None, False
            if entry.job is not None:
                if purge:
                    job, entry.job = entry.job, None
                    await asyncio.to_thread(_cancel_job, job)
                    log.info("profile %s: job %s cancelled", entry.name, job.id)
                else:
                    log.warning("profile %s: job %s keeps running (stop(purge=True) or `hpc-sandbox cancel %s` "
                                "ends it)", entry.name, entry.job.id, entry.job.id)
