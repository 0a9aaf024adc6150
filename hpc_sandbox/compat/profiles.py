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
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..pool import SlotPool
from .atropos_profiles import ProfileSettings, check_image, settings_of

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
    settings: ProfileSettings | None = None  # with_profiles' per-profile settings, mapped
    started: bool = False
    servers: int = 0  # node servers that answered when the profile started
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


def profiles_of(values: Mapping[str, Any]) -> dict[str, Profile]:
    """Profiles by name from a SlotPool to serve from, or the settings to submit config
    profile NAME with on first use: None, a dict or a ModalSandboxConfig-like object
    (compat/atropos_profiles.py; a "profile" key names another config profile)."""
    if not values:
        raise ConfigError("with_profiles needs at least one profile")
    entries: dict[str, Profile] = {}
    for name, value in values.items():
        if isinstance(value, SlotPool):
            entries[name] = Profile(name, pool=value)
        else:
            settings = settings_of(name, value)
            entries[name] = Profile(name, config_profile=settings.config_profile, overrides=settings.overrides,
                                    settings=settings)
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

    async def start(self, names: list[str] | None = None) -> None:
        """Start the pools of the profiles named (all of them when None), submitting the
        jobs of those without a pool (each waits for its first node server). The first
        failure is raised once all have ended; the caller then stops everything (purge),
        so that nothing this start made outlives it."""
        chosen = list(self.entries.values()) if names is None else [self.entries[n] for n in names]
        outcomes = await asyncio.gather(*(self.ensure(e) for e in chosen), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]

    async def ensure(self, entry: Profile) -> SlotPool:
        """The profile's pool, started (its job submitted) on first use; one start at a
        time per profile, so that two first acquires submit one job."""
        async with entry.lock:
            if not entry.started:
                await self._start_profile(entry)
                entry.started = True
                assert entry.pool is not None
                # Node servers up now, for a status that must be given without asking (sync).
                entry.servers = sum(c.servers for c in await entry.pool.capacity())
        assert entry.pool is not None
        return entry.pool

    def _plan(self, entry: Profile, connect: Any) -> Any:
        """What to submit for the profile: its config profile with its overrides. An
        Atropos profile name ("pytorch-gpu") that the config does not define, and that
        named no `profile`, falls back on the config's default profile."""
        options = {"config_file": self.config_file, "overflow": self.overflow, "cloud_settings": self.cloud_settings,
                   "overrides": entry.overrides}
        try:
            return connect.plan(entry.config_profile, **options)
        except ConfigError as exc:
            if entry.settings is None or entry.settings.named or "is not defined" not in str(exc):
                raise
            log.info("profile %s: not in the config; submitted as its default profile with these settings", entry.name)
            return connect.plan(None, **options)

    async def _start_profile(self, entry: Profile) -> None:
        if entry.pool is not None:
            await entry.pool.start()
            return
        from .. import connect, jobs as job_api  # what `submit` and connect.launch use

        planned = self._plan(entry, connect)
        planned = dataclasses.replace(planned, spec=check_image(entry.name, planned.spec))
        submitted = entry.job is None
        if submitted:
            entry.job = job_api.submit(planned.spec)
            log.info("profile %s: submitted job %s", entry.name, entry.job.id)
        job = entry.job
        try:
            # With the cloud overflow, callers are served while the job queues.
            acquire_timeout = entry.settings.acquire_timeout if entry.settings else None
            pool = await connect.pool_for(job, planned.cloud, wait_timeout=self.wait_timeout,
                                          acquire_timeout=acquire_timeout or self.acquire_timeout,
                                          lease_ttl=self.lease_ttl)
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
            entry.started = False
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
