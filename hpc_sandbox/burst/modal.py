"""ModalSource: slots in Modal Sandboxes, for a pool's overflow.

Each sandbox runs the same node server as a cluster node (`burst/entry.py`), with the
profile's `slots_per_sandbox` slots; its port is exposed with `encrypted_ports` and
reached through Modal's tunnel over TLS (the system's CAs vouch for Modal's edge), with
the pool's token on every request. Once a sandbox has its slots it is one more node
server: a `NodeServerSource` this source owns (pool/sources.py's ServerOwner) hands
its slots to the pool's queue with its long-poll acquires. This source only decides
how many sandboxes there are:

- `provision(n)`: start sandboxes for n more slots (the pool's overflow policy calls
  it), never beyond `max_cloud_slots`, at most `max_creates_per_second`, at most
  `max_creates_in_flight` at once; Modal's throttling is retried with a backoff.
- a sandbox none of whose slots has been leased for `cloud_idle_timeout` is stopped;
  one that dies is dropped (calls running there end as `server_gone`).
- every sandbox is tagged with the pool's id, its owner process and the hpc-sandbox
  version, and has a lifetime and Modal's own idle timeout: a pool that is killed
  leaks nothing for long, and the next pool with the same id stops what it left.

The Modal SDK is used through its async interface only (`.aio`), never blocking the
event loop; it is imported when a source starts (`pip install 'hpc-sandbox[modal]'`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import __version__
from ..client import NodeClient
from ..errors import ClientError, ConfigError
from ..jobfolder import CloudFolder, PoolState, SandboxEntry, users_state_dir
from ..models import Endpoint, Slot
from ..pool.sources import Capacity, NodeServerSource, Outlook
from ..pool.waiters import WaitQueue
from .entry import SLOT_ENV_NAMES, TOKEN_ENV
from .owner import Owner
from ..cloudprofile import CloudProfile
from .sdk import OWNER_TAG, POOL_TAG, PROFILE_TAG, VERSION_TAG, default_pool_id, describe, import_sdk

log = logging.getLogger(__name__)

# What the node server needs inside a sandbox besides the package's own source.
SERVER_REQUIREMENTS = ("aiohttp>=3.9", "click>=8.1", "PyYAML>=6.0", "jinja2>=3.1", "cryptography>=41")
READY_TIMEOUT = 300  # seconds a sandbox may take to start (image pull included)
WATCH_INTERVAL = 5.0  # seconds between two looks at the sandboxes (dead? idle?)
THROTTLE_BACKOFF = (1.0, 30.0)  # first and longest wait after Modal throttled a create
FAILURE_BACKOFF = (10.0, 300.0)  # the same after a create that failed otherwise
# Failures that no retry mends: the cloud is off for this pool, said once.
FATAL = ("AuthError", "NotFoundError", "ImageBuildError", "InvalidError", "PermissionDeniedError")


class _RateLimit:
    """At most `rate` starts per second, spread evenly (a create burst would be throttled)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class _Sandbox:
    entry: SandboxEntry
    handle: Any = None  # the SDK's Sandbox
    endpoint: Endpoint | None = None
    leased: int = 0
    idle_since: float = 0.0  # monotonic


class ModalSource:
    """A pool's cloud source (pool/overflow.py's CloudSource): sandboxes made on demand,
    their slots handed out by `self.nodes`, a node-server source of its own."""

    location = "cloud"

    def __init__(self, profile: CloudProfile, *, state_dir: Path | None = None, pool_id: str | None = None,
                 sdk: ModuleType | None = None, poll_wait: float = 10.0) -> None:
        self.name = f"modal profile {profile.name}"
        # The sandboxes that are ready, as node servers: their slots go to the callers
        # this source is to serve (demand), and every grant and release is counted here.
        self.nodes = NodeServerSource(self._ready, name=self.name, location="cloud", refresh_interval=1.0,
                                      poll_wait=poll_wait, owner=self)
        self.profile = profile
        state = Path(state_dir or users_state_dir()).expanduser()
        self.pool_id = pool_id or default_pool_id(state, profile.name)
        self.folder = CloudFolder(state, self.pool_id)
        self.owner = Owner.me()
        self.wanted = 0  # waiting callers the overflow policy gives to the cloud now
        self.created = 0  # sandboxes created, for the record (sandboxes per cloud slot)
        self._sdk = sdk
        self._token = ""
        self._app: Any = None
        self._image: Any = None
        self._sandboxes: dict[str, _Sandbox] = {}  # by sandbox id (or a provisional key while creating)
        self._creating = 0  # slots in sandboxes being made
        self._handles: dict[str, Any] = {}  # every sandbox made, kept the moment create returns
        self._sdk_creates: set[asyncio.Future] = set()  # Sandbox.create calls not returned yet
        self._limit: _RateLimit | None = None
        self._in_flight: asyncio.Semaphore | None = None
        self._prepared: asyncio.Future | None = None
        self._watcher: asyncio.Task | None = None
        self._fatal: str | None = None  # why the cloud is off for this pool
        self._failure: str | None = None  # the last create failure, said once
        self._quiet_until = 0.0  # no new create before this (backoff after a failure)
        self._failures = 0
        self._seq = 0
        self._state: PoolState | None = None
        self._tasks: set[asyncio.Task] = set()  # sandbox creates under way
        self._stopped = False

    # --- lifecycle ---------------------------------------------------------------

    async def start(self, queue: WaitQueue | None = None, lease_ttl: float | None = None) -> None:
        self._stopped = False
        await self.nodes.start(queue, lease_ttl)
        self._limit = _RateLimit(self.profile.max_creates_per_second)
        self._in_flight = asyncio.Semaphore(self.profile.max_creates_in_flight)
        self._token = self.folder.make_token(reuse=self.profile.recover)
        self._state = PoolState(self.pool_id, self.profile.name, str(self.owner), time.time(),
                                self.profile.cost_per_hour, runtime=self.profile.runtime)
        self._save()
        # Modal is asked in the background: a pool over a busy cluster starts at once,
        # and a cloud that cannot be reached is said once, not raised at every caller.
        self._prepared = asyncio.ensure_future(self._prepare())
        self._watcher = asyncio.ensure_future(self._watch())

    async def _prepare(self) -> bool:
        try:
            sdk = self._sdk = self._sdk or import_sdk()
            self._app = await sdk.App.lookup.aio(self.profile.app_name, create_if_missing=True)
            image = sdk.Image.from_registry(self.profile.image, add_python=self.profile.add_python)
            self._image = image.pip_install(*SERVER_REQUIREMENTS).add_local_python_source("hpc_sandbox")
            await self._sweep_leftovers()
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the SDK's errors, ConfigError: the cloud is off, the cluster is not
            if isinstance(exc, ConfigError) or type(exc).__name__ in FATAL:
                self._turn_off(f"cannot use Modal: {describe(exc)}")
            else:  # a network blip: said once, tried again at the next burst after a backoff
                self._create_failed(exc)
                self._prepared = None
            return False

    async def stop(self) -> None:
        """Stop every sandbox this pool made, including ones still being created."""
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._prepared is not None and not self._prepared.done():
            self._prepared.cancel()
        creates = list(self._tasks)
        for task in creates:  # cancelled: their SDK calls finish in _handles
            task.cancel()
        await self.nodes.stop()
        await asyncio.gather(*creates, return_exceptions=True)
        await self._terminate_all()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _terminate_all(self) -> None:
        if self._sdk_creates:  # a create in flight: its sandbox exists once it returns
            await asyncio.wait(set(self._sdk_creates), timeout=30.0)
        handles = dict(self._handles)
        await asyncio.gather(*(self._terminate(sandbox_id, handle, "the pool stopped")
                               for sandbox_id, handle in handles.items()), return_exceptions=True)
        if self._app is not None and self._sdk is not None:
            # What a create cut off by the stop may have made without us seeing its handle.
            with contextlib.suppress(Exception):
                async for sandbox in self._sdk.Sandbox.list.aio(app_id=self._app.app_id, tags=self._tags(owner=True)):
                    await self._terminate(sandbox.object_id, sandbox, "the pool stopped")
        if self._state is not None:
            self._state.stopped = time.time()
        self._save()

    # --- what the pool asks ------------------------------------------------------

    def wake(self) -> None:
        self.nodes.wake()

    def client(self, endpoint: Endpoint) -> NodeClient:
        return self.nodes.client(endpoint)

    async def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        await self.nodes.release(slot, reset_workspace)

    def job_ended(self, job_id: str) -> asyncio.Future | None:
        return None  # no job: a sandbox that dies ends its calls as server_gone

    async def why_gone(self, job_id: str) -> str | None:
        return None

    def outlook(self) -> Outlook:
        return Outlook(slots=sum(s.entry.slots for s in self._sandboxes.values() if s.entry.state == "ready"))

    def trouble(self) -> list[str]:
        said = [f"cloud ({self.name}): {self._fatal or self._failure}"] if (self._fatal or self._failure) else []
        return said + self.nodes.trouble()

    @property
    def off(self) -> str | None:
        """Why this pool cannot use the cloud (None while it can)."""
        return self._fatal

    def slots_coming(self) -> int:
        """Slots that need no new sandbox: free ones on ready sandboxes, and those of
        sandboxes being made."""
        free = sum(s.entry.slots - s.leased for s in self._sandboxes.values() if s.entry.state == "ready")
        return free + self._creating

    def slots_total(self) -> int:
        return self._creating + sum(s.entry.slots for s in self._sandboxes.values() if s.entry.state == "ready")

    async def capacity(self) -> Capacity:
        found = await self.nodes.capacity()
        return Capacity(self.name, "cloud", found.servers, found.slots, found.free,
                        waiting_servers=sum(1 for s in self._sandboxes.values() if s.entry.state == "creating"))

    def usage(self) -> PoolState:
        """Sandboxes, their seconds and cost so far (also in pool.json)."""
        assert self._state is not None, "start the source first"
        return self._state

    # --- what its node-server source asks (ServerOwner) ------------------------------

    def demand(self, waiting: int) -> int:
        return min(self.wanted, waiting)

    def granted(self, endpoint: Endpoint) -> None:
        # One caller fewer for the cloud until the policy next counts: a caller still
        # within burst_after must not get a cloud slot meanwhile.
        self.wanted = max(0, self.wanted - 1)
        sandbox = self._sandboxes.get(endpoint.name)
        if sandbox is not None:
            sandbox.leased += 1

    def released(self, slot: Slot) -> None:
        sandbox = self._sandboxes.get(slot.endpoint.name)
        if sandbox is not None and sandbox.leased > 0:
            sandbox.leased -= 1
            if sandbox.leased == 0:
                sandbox.idle_since = time.monotonic()

    # --- provisioning ------------------------------------------------------------

    def provision(self, slots: int) -> int:
        """Start sandboxes for `slots` more slots (within max_cloud_slots); returns how
        many sandboxes were started."""
        if self._stopped or self._fatal or slots <= 0 or time.monotonic() < self._quiet_until:
            return 0
        room = self.profile.max_cloud_slots - self.slots_total()
        started = 0
        while slots > 0 and room > 0:
            size = min(self.profile.slots_per_sandbox, room)
            self._creating += size
            self._spawn(self._create(size))
            slots -= size
            room -= size
            started += 1
        return started

    async def _create(self, size: int) -> None:
        assert self._limit is not None and self._in_flight is not None
        sandbox: _Sandbox | None = None
        try:
            if self._prepared is None:
                self._prepared = asyncio.ensure_future(self._prepare())
            if not await asyncio.shield(self._prepared):
                return
            async with self._in_flight:
                handle = await self._create_sandbox(size)
                if handle is None:
                    return
                sandbox = self._sandboxes[handle.object_id]
            await self._make_ready(sandbox, handle)
        finally:
            self._creating -= size
            if sandbox is None or sandbox.entry.state != "ready":
                self.nodes.rescan()
            self._save()

    async def _create_sandbox(self, size: int) -> Any:
        """One `Sandbox.create`, retried while Modal throttles; None when it failed."""
        sdk, profile = self._sdk, self.profile
        assert sdk is not None
        self._seq += 1
        name = f"hpcsbx-{self.pool_id}-{self.owner.pid}-{self._seq}"
        backoff = THROTTLE_BACKOFF[0]
        while not self._stopped:
            await self._limit.wait()  # type: ignore[union-attr]
            # Not cancelled with the task that waits for it: a sandbox exists before
            # create returns, and its handle must reach _handles whatever happens here.
            creating = asyncio.ensure_future(sdk.Sandbox.create.aio(
                "python", "-m", "hpc_sandbox.burst.entry", "--port", str(profile.port), "--slots", str(size),
                "--runtime", profile.runtime,
                app=self._app, name=name, tags=self._tags(owner=True), image=self._image,
                secrets=[sdk.Secret.from_dict({TOKEN_ENV: self._token}),
                         *(sdk.Secret.from_name(secret) for secret in profile.secrets)],
                env={**profile.env, SLOT_ENV_NAMES: ",".join(sorted({*profile.env, *profile.pass_env}))},
                timeout=profile.timeout, idle_timeout=profile.idle_timeout,
                gpu=profile.gpu, cpu=profile.cpu, memory=profile.memory, region=profile.region,
                encrypted_ports=[profile.port], readiness_probe=sdk.Probe.with_tcp(profile.port),
                # add_local_python_source puts the package under /root: `python -m` finds it there.
                workdir="/root"))
            self._sdk_creates.add(creating)
            creating.add_done_callback(self._keep_handle)
            try:
                handle = await asyncio.shield(creating)
            except Exception as exc:
                if type(exc).__name__ == "ResourceExhaustedError":  # Modal's throttling: wait, try again
                    log.info("Modal throttled a sandbox create; retrying in %.1fs", backoff)
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, THROTTLE_BACKOFF[1])
                    continue
                self._create_failed(exc)
                return None
            self.created += 1
            entry = SandboxEntry(id=handle.object_id, name=name, slots=size, state="creating", created=time.time())
            self._sandboxes[handle.object_id] = _Sandbox(entry, handle)
            assert self._state is not None
            self._state.sandboxes.append(entry)
            log.info("cloud sandbox %s created (%d slots)", handle.object_id, size)
            return handle
        return None

    def _keep_handle(self, creating: asyncio.Future) -> None:
        self._sdk_creates.discard(creating)
        if not creating.cancelled() and creating.exception() is None:
            handle = creating.result()
            self._handles[handle.object_id] = handle
            if self._stopped and handle.object_id not in self._sandboxes:
                # Made after the pool stopped: no one will use it.
                self._spawn_detached(self._terminate(handle.object_id, handle, "the pool stopped"))

    def _spawn_detached(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _make_ready(self, sandbox: _Sandbox, handle: Any) -> None:
        """Wait for the node server, find its tunnel, and check it answers with our token."""
        port = self.profile.port
        try:
            await handle.wait_until_ready.aio(timeout=READY_TIMEOUT)
            tunnels = await handle.tunnels.aio(timeout=60)
            url = tunnels[port].url
            if not url.startswith("https://"):
                raise ConfigError(f"Modal gave a tunnel that is not HTTPS ({url}); refusing to send the token")
            endpoint = Endpoint(url=url, token=self._token, job_id=f"modal-{self.pool_id}", name=handle.object_id,
                                location="cloud", slots=sandbox.entry.slots)
            await self.client(endpoint).slots()  # one authenticated request before any slot is handed out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._stopped:  # stopped meanwhile: its end is no failure
                self._create_failed(exc, sandbox.entry.id)
            await self._terminate(handle.object_id, handle, f"not ready: {describe(exc)}")
            return
        sandbox.endpoint = endpoint
        sandbox.entry.url, sandbox.entry.state = url, "ready"
        sandbox.idle_since = time.monotonic()
        self._failures, self._failure = 0, None
        log.info("cloud sandbox %s ready: %d slots at %s", handle.object_id, sandbox.entry.slots, url)
        self.nodes.set_endpoints(self._ready())
        self.nodes.pump()

    def _create_failed(self, exc: BaseException, sandbox_id: str | None = None) -> None:
        message = describe(exc)
        if type(exc).__name__ in FATAL:
            self._turn_off(f"cannot create a sandbox: {message}")
            return
        self._failures += 1
        wait = min(FAILURE_BACKOFF[0] * 2 ** (self._failures - 1), FAILURE_BACKOFF[1])
        self._quiet_until = time.monotonic() + wait
        if message != self._failure:
            log.error("cloud overflow (%s): %s%s; no new sandbox for %.0fs", self.name, message,
                      f" (sandbox {sandbox_id})" if sandbox_id else "", wait)
        self._failure = message

    def _turn_off(self, why: str) -> None:
        if self._fatal is None:
            log.error("cloud overflow off (%s): %s; callers wait for the cluster", self.name, why)
        self._fatal = why

    # --- watching ----------------------------------------------------------------

    def _ready(self) -> list[Endpoint]:
        return [s.endpoint for s in self._sandboxes.values() if s.entry.state == "ready" and s.endpoint is not None]

    async def _watch(self) -> None:
        while not self._stopped:
            await asyncio.sleep(min(WATCH_INTERVAL, self.profile.cloud_idle_timeout / 2))
            try:
                await self.look()
            except Exception:  # a bug here must not stop the reaping
                log.exception("watching cloud sandboxes failed")

    async def look(self) -> None:
        """Drop sandboxes that died; stop those idle for cloud_idle_timeout."""
        now = time.monotonic()
        for sandbox in [s for s in self._sandboxes.values() if s.entry.state == "ready"]:
            try:
                exit_code = await sandbox.handle.poll.aio()
            except Exception as exc:
                log.info("cannot poll sandbox %s: %s", sandbox.entry.id, describe(exc))
                continue
            if exit_code is not None:
                self._gone(sandbox, "dead", f"it exited ({exit_code})")
                log.warning("cloud sandbox %s died (exit %s); calls running there end as server_gone",
                            sandbox.entry.id, exit_code)
                self._create_failed(RuntimeError(f"sandbox {sandbox.entry.id} died (exit {exit_code})"))
            elif sandbox.leased == 0 and now - sandbox.idle_since >= self.profile.cloud_idle_timeout:
                log.info("cloud sandbox %s idle for %.0fs: stopping it", sandbox.entry.id, now - sandbox.idle_since)
                await self._terminate(sandbox.entry.id, sandbox.handle, "idle")
        self._save()

    def _gone(self, sandbox: _Sandbox, state: str, reason: str) -> None:
        sandbox.entry.state, sandbox.entry.reason = state, reason
        sandbox.entry.ended = sandbox.entry.ended or time.time()
        self.nodes.set_endpoints(self._ready())

    async def _terminate(self, sandbox_id: str, handle: Any, reason: str) -> None:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is not None and sandbox.entry.state not in ("dead", "stopped"):
            self._gone(sandbox, "stopped", reason)
        self._handles.pop(sandbox_id, None)
        try:
            await handle.terminate.aio()
        except Exception as exc:  # it has a lifetime and an idle timeout of its own
            log.warning("cannot stop sandbox %s: %s (Modal stops it within %ds at the latest)", sandbox_id,
                        describe(exc), self.profile.timeout)

    def _tags(self, owner: bool) -> dict[str, str]:
        tags = {POOL_TAG: self.pool_id}
        if owner:
            tags.update({OWNER_TAG: str(self.owner), VERSION_TAG: __version__, PROFILE_TAG: self.profile.name})
        return tags

    async def _sweep_leftovers(self) -> None:
        """Stop (or, with `recover`, adopt) the sandboxes an earlier run of this pool
        left behind: tagged with this pool id, owned by a process that is gone."""
        assert self._sdk is not None
        async for handle in self._sdk.Sandbox.list.aio(app_id=self._app.app_id, tags=self._tags(owner=False)):
            tags = await handle.get_tags.aio()
            owner = Owner.parse(tags.get(OWNER_TAG, ""))
            if owner == self.owner or (owner is not None and owner.alive() is not False):
                continue  # ours now, or a live pool (or one on another host: it cannot be told)
            if self.profile.recover and await self._adopt(handle, tags):
                continue
            log.warning("stopping cloud sandbox %s left by an earlier run of pool %s (%s)", handle.object_id,
                        self.pool_id, owner)
            await self._terminate(handle.object_id, handle, "left by an earlier run")

    async def _adopt(self, handle: Any, tags: dict[str, str]) -> bool:
        """Take over a leftover sandbox that answers with this pool's token."""
        if tags.get(VERSION_TAG) != __version__:
            return False
        try:
            url = (await handle.tunnels.aio(timeout=30))[self.profile.port].url
            endpoint = Endpoint(url=url, token=self._token, job_id=f"modal-{self.pool_id}", name=handle.object_id,
                                location="cloud", slots=0)
            answer = await self.client(endpoint).slots()
            await handle.set_tags.aio({**tags, OWNER_TAG: str(self.owner)})
        except Exception as exc:
            log.info("not adopting sandbox %s: %s", handle.object_id, describe(exc))
            return False
        entry = SandboxEntry(id=handle.object_id, name=handle.object_id, slots=len(answer.slots), state="ready",
                             created=time.time(), url=url)
        endpoint = Endpoint(url=url, token=self._token, job_id=f"modal-{self.pool_id}", name=handle.object_id,
                            location="cloud", slots=entry.slots)
        self._sandboxes[handle.object_id] = _Sandbox(entry, handle, endpoint, idle_since=time.monotonic())
        self._handles[handle.object_id] = handle
        assert self._state is not None
        self._state.sandboxes.append(entry)
        self.nodes.set_endpoints(self._ready())
        log.info("adopted cloud sandbox %s (%d slots) left by an earlier run", handle.object_id, entry.slots)
        return True

    def _save(self) -> None:
        if self._state is not None:
            self._state.updated = time.time()
            try:
                self.folder.write(self._state)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.folder.state_file(self._state.owner), exc)


__all__ = ["ModalSource"]

