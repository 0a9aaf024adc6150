"""SlotPool: the one slot API, whatever the slot's location.

    pool = SlotPool.from_state_dir()          # every live job in ~/.hpc-sandbox
    async with pool:
        slot = await pool.acquire(trajectory_id="t1")
        res = await pool.execute(slot, "bash", {"command": "pytest -q"}, timeout=60)
        await pool.release(slot)

A pool asks its sources for slots in order (local/cluster node servers first; the
cloud overflow plugs in as one more source). Slot ownership is the node servers'
business: the pool holds leases, never locks of its own, so any number of pools in
any number of processes can share the same jobs.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .client import NodeClient, new_exec_id
from .protocol import DEFAULT_EXEC_TIMEOUT, Call, CallAnswer
from .errors import (CallTimeout, ClientError, ConfigError, HpcSandboxError, JobEnded, NoCapacity, NoFreeSlot,
                     ServerGone)
from .models import Endpoint, Slot, ToolResult
from .jobfolder import JobFolder, JobInfo, default_state_dir, list_jobs
from .schedulers import JobState, get_scheduler
from .schedulers.batch import jittered

log = logging.getLogger(__name__)

UNHEALTHY_BACKOFF = 5.0  # seconds a server that failed to answer is skipped
MIN_REFRESH_INTERVAL = 0.25  # seconds between two discoveries, even when forced


@dataclass(frozen=True)
class Capacity:
    """How many slots a source has, and how many of them were free when last asked."""

    source: str
    location: str
    servers: int
    slots: int
    free: int
    # Node servers submitted but not ready yet (queued or starting): capacity to come.
    waiting_servers: int = 0


class _EndGuard:
    """Cancels one task when its job ends, while that task waits on a call."""

    __slots__ = ("task", "active", "fired")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.active = True
        self.fired = False

    def fire(self, _ended: asyncio.Future) -> None:
        if self.active:
            self.fired = True
            self.task.cancel()


class NodeServerSource:
    """Slots on node servers found by a discovery function (rendezvous records, a
    fixed list, a scheduler). Asks the server with the most free slots first."""

    def __init__(self, discover: Callable[[], list[Endpoint]], name: str = "nodes", location: str = "cluster",
                 refresh_interval: float = 2.0) -> None:
        self.discover = discover
        self.name = name
        self.location = location
        self.refresh_interval = refresh_interval
        self._endpoints: list[Endpoint] = []
        self._refreshed = float("-inf")  # never yet
        self._free: dict[str, int] = {}
        self._skip_until: dict[str, float] = {}
        self._trouble: dict[str, str] = {}  # url -> why it was last skipped (for NoCapacity's message)
        self._clients: dict[str, NodeClient] = {}
        self._refreshing: asyncio.Future | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_endpoints(cls, endpoints: Sequence[Endpoint]) -> "NodeServerSource":
        fixed = list(endpoints)
        return cls(lambda: fixed, name="endpoints", location=fixed[0].location if fixed else "cluster")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=60))
        await self.refresh(force=True)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._clients.clear()

    def client(self, endpoint: Endpoint) -> NodeClient:
        client = self._clients.get(endpoint.url)
        if client is None or client.endpoint != endpoint:
            client = NodeClient(endpoint, session=self._session)
            self._clients[endpoint.url] = client
        return client

    async def refresh(self, force: bool = False) -> list[Endpoint]:
        """The node servers, rediscovered when the list is older than refresh_interval
        (or MIN_REFRESH_INTERVAL when forced). Concurrent callers share one discovery:
        many waiting acquires must not each scan a shared filesystem."""
        age = time.monotonic() - self._refreshed
        if age > self.refresh_interval or (force and age >= MIN_REFRESH_INTERVAL):
            if self._refreshing is None:
                self._refreshing = asyncio.ensure_future(self._rediscover())
            await asyncio.shield(self._refreshing)
        return self._endpoints

    async def _rediscover(self) -> None:
        try:
            self._endpoints = await asyncio.to_thread(self.discover)
            self._refreshed = time.monotonic()
        finally:
            self._refreshing = None

    async def try_acquire(self, trajectory_id: str | None, ttl: float | None) -> Slot | None:
        now = time.monotonic()
        # With no node server known yet (a job starting), look at every poll: the first
        # ready record should be used at once, not up to a refresh interval later.
        endpoints = [e for e in await self.refresh(force=not self._endpoints)
                     if self._skip_until.get(e.url, 0) <= now]
        # Most free slots first (as last seen); shuffle ties so that many pools spread out.
        random.shuffle(endpoints)
        endpoints.sort(key=lambda e: -self._free.get(e.url, e.slots))
        for endpoint in endpoints:
            try:
                granted = await self.client(endpoint).acquire(trajectory_id, ttl)
            except NoFreeSlot:
                self._free[endpoint.url] = 0
                continue
            except ClientError as exc:
                # Said once, in NoCapacity's message, if no other server serves the caller.
                log.info("node server %s skipped for %.0fs: %s", endpoint.name, UNHEALTHY_BACKOFF, exc)
                self._skip_until[endpoint.url] = now + UNHEALTHY_BACKOFF
                self._trouble[endpoint.url] = f"{endpoint.name}: {exc}"
                continue
            self._trouble.pop(endpoint.url, None)
            self._free[endpoint.url] = max(0, self._free.get(endpoint.url, endpoint.slots) - 1)
            return Slot(endpoint=endpoint, index=granted.slot, lease=granted.lease, trajectory_id=trajectory_id)
        return None

    def job_ended(self, job_id: str) -> asyncio.Future | None:
        """A future done when the scheduler ends the job (None: this source cannot tell)."""
        return None

    async def why_gone(self, job_id: str) -> str | None:
        """If the job has ended, the scheduler's word for it (checked now)."""
        return None

    def trouble(self) -> list[str]:
        """Why node servers were skipped at their last try (empty when none was)."""
        return list(self._trouble.values())

    def released(self, slot: Slot) -> None:
        self._free[slot.endpoint.url] = self._free.get(slot.endpoint.url, 0) + 1

    async def capacity(self) -> Capacity:
        endpoints = await self.refresh()
        free = 0
        for endpoint in endpoints:
            try:
                answer = await self.client(endpoint).slots()
            except ClientError:
                continue
            self._free[endpoint.url] = answer.free
            free += answer.free
        return Capacity(self.name, self.location, len(endpoints), sum(e.slots for e in endpoints), free)


class ClusterSource(NodeServerSource):
    """Node servers of submitted jobs, found in the state dir's job folders, with
    their jobs watched through their schedulers: a job the scheduler ends (cancel,
    walltime, preemption, node failure) has its slots dropped, and calls running on
    them end at once with a `job_ended` error instead of waiting on a dead node."""

    def __init__(self, state_dir: Path | None = None, jobs: Sequence[str] | None = None,
                 status_interval: float = 5.0) -> None:
        self.state_dir = Path(state_dir or default_state_dir()).expanduser()
        self.jobs = list(jobs) if jobs is not None else None
        self.status_interval = status_interval
        self._infos: dict[str, JobInfo] = {}
        self._ended: dict[str, asyncio.Future] = {}
        self._reasons: dict[str, str] = {}
        self._watcher: asyncio.Task | None = None
        self._waiting = 0
        self._vanished: list[str] = []  # jobs whose folder discovery found gone
        super().__init__(self._discover, name=f"jobs in {self.state_dir}", location="cluster")

    def _discover(self) -> list[Endpoint]:
        endpoints = []
        waiting = 0
        infos = dict(self._infos)
        for job in (self.jobs if self.jobs is not None else list_jobs(self.state_dir)):
            if job in self._reasons:
                continue  # ended: its records may linger if its nodes died hard
            folder = JobFolder(self.state_dir, job)
            try:
                token = folder.read_token()
            except HpcSandboxError as exc:
                if job in infos and not folder.exists():
                    # It was there: `hpc-sandbox cancel` removed its folder. Marked ended
                    # on the event loop (this runs in a thread).
                    self._vanished.append(job)
                    continue
                if self.jobs is not None:
                    raise
                log.debug("skipping job %s: %s", job, exc)
                continue
            try:
                info = folder.read_info()
                infos[job] = info
                where = info.location
            except HpcSandboxError:
                where = "local"  # started by hand with `serve`: no job.json, no scheduler to ask
            records = folder.read_records()
            for record in records:
                endpoints.append(Endpoint(url=record.url, token=token, job_id=job, name=record.name,
                                          location=where, slots=record.slots))
            if job in infos:
                waiting += max(0, infos[job].servers - len(records))
        self._infos = infos  # one assignment: the event loop reads it while this thread runs
        self._waiting = waiting
        return endpoints

    async def refresh(self, force: bool = False) -> list[Endpoint]:
        endpoints = await super().refresh(force)
        while self._vanished:
            job = self._vanished.pop()
            self._mark_ended(job, f"job {job} ended (its folder is gone: cancelled)")
        return endpoints

    async def capacity(self) -> Capacity:
        return dataclasses.replace(await super().capacity(), waiting_servers=self._waiting)

    async def start(self) -> None:
        await super().start()
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await super().stop()

    def job_ended(self, job_id: str) -> asyncio.Future:
        ended = self._ended.get(job_id)
        if ended is None:
            ended = self._ended[job_id] = asyncio.get_running_loop().create_future()
        return ended

    async def why_gone(self, job_id: str) -> str | None:
        if job_id not in self._reasons and job_id in self._infos:
            await self.check_jobs([self._infos[job_id]])
        return self._reasons.get(job_id)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(jittered(self.status_interval))
            try:
                await self.check_jobs([i for j, i in self._infos.items() if j not in self._reasons])
            except HpcSandboxError as exc:  # a slow controller is not a reason to drop slots
                log.warning("job status check failed: %s", exc)
            except Exception:  # a bug here must not silently stop the watching
                log.exception("job status check failed unexpectedly")

    async def check_jobs(self, infos: Sequence[JobInfo]) -> None:
        """One status call per scheduler for all the given jobs."""
        by_scheduler: dict[str, list[JobInfo]] = {}
        for info in infos:
            by_scheduler.setdefault(info.scheduler, []).append(info)
        for scheduler, group in by_scheduler.items():
            backend = get_scheduler(scheduler, self.state_dir)
            statuses = await asyncio.to_thread(backend.status, group)
            for job_id, status in statuses.items():
                # COMPLETING: the scheduler is already killing the job's processes.
                gone = status.state.ended or status.state is JobState.COMPLETING
                if gone:
                    self._mark_ended(job_id, f"job {job_id} ended "
                                             f"({status.state.value}{': ' + status.reason if status.reason else ''})")

    def _mark_ended(self, job_id: str, reason: str) -> None:
        if job_id in self._reasons:
            return
        self._reasons[job_id] = reason
        ended = self.job_ended(job_id)
        if not ended.done():
            ended.set_result(reason)
        self._refreshed = float("-inf")  # forget its node servers at the next acquire
        log.warning("%s; its slots are gone", reason)


class SlotPool:
    def __init__(self, sources: Sequence[NodeServerSource], *, acquire_timeout: float = 300.0,
                 lease_ttl: float | None = None, poll_interval: float = 0.25) -> None:
        if not sources:
            raise ConfigError("a SlotPool needs at least one source")
        self.sources = list(sources)
        self.acquire_timeout = acquire_timeout
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self._source_of: dict[str, NodeServerSource] = {}
        self._started = False

    @classmethod
    def from_state_dir(cls, state_dir: Path | None = None, jobs: Sequence[str] | None = None,
                       **options: Any) -> "SlotPool":
        return cls([ClusterSource(state_dir, jobs)], **options)

    @classmethod
    def from_config(cls, profile: str | None = None, config_file: Path | None = None,
                    jobs: Sequence[str] | None = None, **options: Any) -> "SlotPool":
        """A pool over the jobs in the state dir that `profile` names (site file, user
        file, `config_file`, HPC_SANDBOX_* variables: as `hpc-sandbox submit` reads them)."""
        from .config import load_spec  # the pool needs the config only here

        return cls.from_state_dir(load_spec(profile=profile, config_file=config_file).state_dir, jobs, **options)

    async def start(self) -> None:
        if not self._started:
            for source in self.sources:
                await source.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            for source in self.sources:
                await source.stop()
            self._started = False

    async def __aenter__(self) -> "SlotPool":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- slots -------------------------------------------------------------------

    async def acquire(self, trajectory_id: str | None = None, profile: str = "default",
                      timeout: float | None = None) -> Slot:
        """A free slot from the first source that has one; waits up to `timeout`.

        `profile` names the kind of slot asked for; sources that serve several kinds
        (the cloud overflow) use it, node servers of a job ignore it.
        """
        await self.start()
        deadline = time.monotonic() + (self.acquire_timeout if timeout is None else timeout)
        delay = self.poll_interval
        while True:
            for source in self.sources:
                slot = await source.try_acquire(trajectory_id, self.lease_ttl)
                if slot is not None:
                    self._source_of[slot.id] = source
                    return slot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoCapacity(await self._why_no_slot(timeout if timeout is not None else self.acquire_timeout))
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 2.0)

    async def _why_no_slot(self, waited: float) -> str:
        capacity = [await s.capacity() for s in self.sources]
        total = sum(c.slots for c in capacity)
        waiting = sum(c.waiting_servers for c in capacity)
        coming = (f"; {waiting} more node servers of submitted jobs are queued or starting "
                  "(`hpc-sandbox status`)") if waiting else ""
        trouble = [line for source in self.sources for line in source.trouble()]
        if trouble:
            shown = "; ".join(trouble[:3]) + (f"; and {len(trouble) - 3} more" if len(trouble) > 3 else "")
            return f"no slot within {waited:.0f}s: node servers that could not be used: {shown}{coming}"
        if total:
            return (f"no free slot within {waited:.0f}s ({total} slots on {sum(c.servers for c in capacity)} "
                    f"node servers, all busy{coming})")
        if waiting:
            return f"no node server is ready yet after {waited:.0f}s{coming}"
        return "no node servers are running (submit a job first: hpc-sandbox submit)"

    def _source(self, slot: Slot) -> NodeServerSource:
        return self._source_of.get(slot.id) or self.sources[0]

    def _client(self, slot: Slot) -> NodeClient:
        return self._source(slot).client(slot.endpoint)

    async def _guarded(self, slot: Slot, call: Awaitable[Any]) -> Any:
        """Await a call on `slot`, but give up as soon as the scheduler ends its job.

        Failures that look like a dead node server are checked against the job's
        state, so that the error says what happened (job_ended) when that is it.
        """
        source = self._source(slot)
        ended = source.job_ended(slot.endpoint.job_id)
        if ended is not None and ended.done():
            if asyncio.iscoroutine(call):
                call.close()  # never started: no "never awaited" warning
            raise JobEnded(await source.why_gone(slot.endpoint.job_id) or "its job ended")
        # The job's end cancels this very task: no extra task and no asyncio.wait per
        # call, which is most of what a guard would cost on the hot path.
        task = asyncio.current_task()
        guard = _EndGuard(task) if ended is not None and task is not None else None
        if guard is not None:
            ended.add_done_callback(guard.fire)  # type: ignore[union-attr]
        failure: Exception | None = None
        try:
            return await call
        except asyncio.CancelledError:
            if guard is None or not guard.fired:
                raise
            uncancel = getattr(task, "uncancel", None)  # 3.11+: this cancel is handled here
            if uncancel is not None and uncancel() > 0:
                raise  # cancelled from outside as well: that cancel wins
        except (ServerGone, CallTimeout) as exc:
            failure = exc
        finally:
            if guard is not None:
                guard.active = False  # a callback already queued must not cancel what runs next
                ended.remove_done_callback(guard.fire)  # type: ignore[union-attr]
        # Only now, with the guard disarmed, may this task wait again.
        reason = await source.why_gone(slot.endpoint.job_id)
        if failure is None:
            raise JobEnded(reason or "its job ended")
        if reason:
            raise JobEnded(reason) from failure
        raise failure

    async def _to_result(self, slot: Slot, answer: CallAnswer) -> ToolResult:
        result = ToolResult.from_answer(answer, slot)
        if result.error_kind == "server_stopping" or (result.signal and not result.timed_out):
            reason = await self._source(slot).why_gone(slot.endpoint.job_id)
            if reason:
                return ToolResult.failure(result.tool, JobEnded.kind, f"{reason}; the command was killed", slot)
        return result

    async def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        try:
            await self._client(slot).release(slot.index, slot.lease, reset_workspace)
        except (ServerGone, ClientError) as exc:
            # The lease dies with its server or expires by itself: nothing is leaked.
            log.info("release of %s: %s", slot, exc)
        source = self._source_of.pop(slot.id, None)
        if source is not None:
            source.released(slot)

    async def reset(self, slot: Slot) -> None:
        await self._guarded(slot, self._client(slot).reset(slot.index, slot.lease))

    @contextlib.asynccontextmanager
    async def slot(self, trajectory_id: str | None = None, profile: str = "default",
                   reset_workspace: bool = True) -> AsyncIterator[Slot]:
        slot = await self.acquire(trajectory_id=trajectory_id, profile=profile)
        try:
            yield slot
        finally:
            await self.release(slot, reset_workspace=reset_workspace)

    # --- execution ---------------------------------------------------------------

    async def execute(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> ToolResult:
        try:
            answer = await self._guarded(slot, self._client(slot).execute(slot.index, slot.lease, tool, args or {},
                                                                          timeout))
        except ClientError as exc:
            return ToolResult.failure(tool, exc.kind, str(exc), slot)
        return await self._to_result(slot, answer)

    async def execute_batch(self, calls: Sequence[tuple[Slot, str, dict[str, Any]] | tuple[Slot, str, dict[str, Any], float]],
                            timeout: float | None = None) -> list[ToolResult]:
        """Several calls at once: one HTTP request per node server, results in call order."""
        by_server: dict[str, list[int]] = {}
        for position, call in enumerate(calls):
            by_server.setdefault(call[0].endpoint.url, []).append(position)
        results: list[ToolResult | None] = [None] * len(calls)

        async def send(positions: list[int]) -> None:
            first = calls[positions[0]][0]
            wire = []
            for p in positions:
                slot, tool, args = calls[p][0], calls[p][1], calls[p][2]
                call_timeout = calls[p][3] if len(calls[p]) > 3 else timeout  # type: ignore[misc]
                wire.append(Call(slot.index, slot.lease, new_exec_id(), tool, args,
                                 call_timeout or DEFAULT_EXEC_TIMEOUT))
            try:
                answers = await self._guarded(first, self._client(first).batch(wire))
            except ClientError as exc:
                for p in positions:
                    results[p] = ToolResult.failure(calls[p][1], exc.kind, str(exc), calls[p][0])
                return
            for p, answer in zip(positions, answers):
                results[p] = await self._to_result(calls[p][0], answer)

        await asyncio.gather(*(send(positions) for positions in by_server.values()))
        return results  # type: ignore[return-value]  (every position was filled by its server's send)

    async def download(self, slot: Slot, path: str, dest: Path) -> int:
        return await self._guarded(slot, self._client(slot).download(slot.index, slot.lease, path, dest))

    async def upload(self, slot: Slot, source: Path, path: str) -> int:
        return await self._guarded(slot, self._client(slot).upload(slot.index, slot.lease, source, path))

    async def capacity(self) -> list[Capacity]:
        return [await source.capacity() for source in self.sources]


class SyncSlotPool:
    """A blocking facade for scripts: the async pool runs on a private event loop thread."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hpc-sandbox-pool", daemon=True)
        self._thread.start()
        self._run(pool.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def acquire(self, trajectory_id: str | None = None, profile: str = "default", timeout: float | None = None) -> Slot:
        return self._run(self.pool.acquire(trajectory_id, profile, timeout))

    def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        self._run(self.pool.release(slot, reset_workspace))

    def execute(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
                timeout: float | None = None) -> ToolResult:
        return self._run(self.pool.execute(slot, tool, args, timeout))

    def execute_batch(self, calls: Sequence[Any], timeout: float | None = None) -> list[ToolResult]:
        return self._run(self.pool.execute_batch(calls, timeout))

    def close(self) -> None:
        self._run(self.pool.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "SyncSlotPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
