"""Where a pool's slots come from: node servers found by a discovery function
(`NodeServerSource`), or the node servers of submitted jobs in a state dir, watched
through their schedulers (`ClusterSource`). The cloud overflow is one more `Source`,
which makes node servers itself and hands their slots out through a NodeServerSource
it owns (`ServerOwner`).

A source serves the pool's one queue of waiting callers (`WaitQueue`). A node server
source keeps long-poll acquires in flight on its node servers (servers with free slots
first, at most one waiting request per server that has none), never more than callers
are waiting: a node server holds each request until a slot frees up and hands slots to
its waiting requests first come, first served; every grant goes to the oldest caller
still waiting. So a freed slot is taken at once, without polling, and a grant costs
about one request whatever the number of callers and servers.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from ..client import NodeClient, endpoint_of
from ..errors import ClientError, HpcSandboxError, NoFreeSlot
from ..jobfolder import Credentials, JobFolder, JobInfo, ServerRecord, list_jobs, users_state_dir
from ..jobstate import JobState, JobStatus, jittered
from ..models import Endpoint, Slot
from .waiters import WaitQueue

log = logging.getLogger(__name__)

UNHEALTHY_BACKOFF = 5.0  # seconds a server that failed to answer is skipped
MIN_REFRESH_INTERVAL = 0.25  # seconds between two discoveries, even when forced
LOCATE_INTERVAL = 1.0  # seconds between two asks of a scheduler's API for one job's node servers
POLL_WAIT = 10.0  # seconds one long-poll acquire waits on a node server before it is sent again
CAPACITY_CONCURRENCY = 32  # node servers asked at once by capacity()
# A pump that has at most FEW requests to send looks at SAMPLE random servers first.
FEW, SAMPLE = 4, 16

# How a ClusterSource learns the state of jobs: one call for many jobs (connect binds it
# to the schedulers through jobs.job_states; the pool itself never imports them).
JobStates = Callable[[Sequence[JobInfo]], Mapping[str, JobStatus]]
# How it finds the node servers of a job whose scheduler knows them (Nomad's API); None
# for a job whose ready records in its folder are the truth.
Locate = Callable[[JobInfo], "list[ServerRecord] | None"]


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


@dataclass(frozen=True)
class Outlook:
    """A source's capacity as known now, without asking anyone: what the overflow
    policy reads to decide whether the cluster may still serve a waiting caller."""

    slots: int  # slots on node servers that are up (busy or not)
    # One entry per node server submitted but not up yet: the scheduler's expected start
    # (Unix time), or None when it gives none.
    pending: tuple[float | None, ...] = ()


class Source(Protocol):
    """What a pool asks of a place slots come from."""

    name: str
    location: str

    async def start(self, queue: WaitQueue, lease_ttl: float | None) -> None: ...
    async def stop(self) -> None: ...
    def wake(self) -> None:
        """Callers joined the queue: go and find them slots."""
    def client(self, endpoint: Endpoint) -> NodeClient: ...
    async def release(self, slot: Slot, reset_workspace: bool) -> None: ...
    async def capacity(self) -> Capacity: ...
    def job_ended(self, job_id: str) -> asyncio.Future | None: ...
    async def why_gone(self, job_id: str) -> str | None: ...
    def trouble(self) -> list[str]: ...
    def outlook(self) -> Outlook: ...


class ServerOwner(Source, Protocol):
    """A source that makes node servers itself (a cloud source) and hands their slots
    out through a NodeServerSource it owns. It says how many of the waiting callers
    are its to serve, and learns of every slot granted and given back. Its grants
    reach the pool's queue as its own: the pool deals only with the sources it was given."""

    def demand(self, waiting: int) -> int:
        """Of `waiting` callers, how many this source should find slots for now."""
    def granted(self, endpoint: Endpoint) -> None:
        """A slot of `endpoint` was leased to a caller."""
    def released(self, slot: Slot) -> None:
        """A slot it granted was given back (or its release failed)."""


class NodeServerSource:
    """Slots on node servers found by a discovery function (a fixed list, the job
    folders of a state dir, a scheduler's API), or pushed by the source that owns
    them (`owner`: a cloud source, through set_endpoints, pump and rescan)."""

    def __init__(self, discover: Callable[[], list[Endpoint]], name: str = "nodes", location: str = "cluster",
                 refresh_interval: float = 2.0, *, max_polls: int = 256, poll_wait: float = POLL_WAIT,
                 owner: ServerOwner | None = None) -> None:
        self.discover = discover
        self.owner = owner
        self._offered_as: Source = owner if owner is not None else self  # what the queue's grants name
        self.name = name
        self.location = location
        self.refresh_interval = refresh_interval
        self.max_polls = max_polls
        self.poll_wait = poll_wait
        self.lease_ttl: float | None = None
        self.requests = 0  # acquire requests sent, for the record (requests per grant)
        self.renames = 0  # grants whose holder was named after the request (see _hand_over)
        self._queue: WaitQueue | None = None
        self._endpoints: list[Endpoint] = []
        self._refreshed = float("-inf")  # never yet
        self._free: dict[str, int] = {}  # url -> free slots when last heard of
        self._inflight: dict[str, int] = {}  # url -> acquire requests waiting there now
        self._inflight_total = 0
        self._parked = 0  # of those, requests sent to servers that had no free slot (long polls)
        self._saturated = False  # every usable server has its share of requests: joins cost O(1)
        self._skip_until: dict[str, float] = {}
        self._usable_cache: list[Endpoint] | None = None  # see _usable
        self._usable_until = float("inf")
        self._trouble: dict[str, str] = {}  # url -> why it was last skipped (for NoCapacity's message)
        self._clients: dict[str, NodeClient] = {}
        self._refreshing: asyncio.Future | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self._stopped = False

    @classmethod
    def from_endpoints(cls, endpoints: Sequence[Endpoint]) -> "NodeServerSource":
        fixed = list(endpoints)
        return cls(lambda: fixed, name="endpoints", location=fixed[0].location if fixed else "cluster")

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, queue: WaitQueue | None = None, lease_ttl: float | None = None) -> None:
        self._queue = queue if queue is not None else WaitQueue()
        self.lease_ttl = lease_ttl
        self._stopped = False
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        await self.refresh(force=True)

    async def stop(self) -> None:
        self._stopped = True
        tasks = [*self._tasks, *([self._ticker] if self._ticker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._clients.clear()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def client(self, endpoint: Endpoint) -> NodeClient:
        client = self._clients.get(endpoint.url)
        if client is None or client.endpoint != endpoint:
            client = NodeClient(endpoint, session=self._session)
            self._clients[endpoint.url] = client
        return client

    # --- discovery -------------------------------------------------------------------

    async def refresh(self, force: bool = False) -> list[Endpoint]:
        """The node servers, rediscovered when the list is older than refresh_interval
        (or MIN_REFRESH_INTERVAL when forced). Concurrent callers share one discovery:
        many waiting callers must not each scan a shared filesystem."""
        age = time.monotonic() - self._refreshed
        if age > self.refresh_interval or (force and age >= MIN_REFRESH_INTERVAL):
            if self._refreshing is None:
                self._refreshing = asyncio.ensure_future(self._rediscover())
            await asyncio.shield(self._refreshing)
        return self._endpoints

    async def _rediscover(self) -> None:
        try:
            self.set_endpoints(await asyncio.to_thread(self.discover))
            self._refreshed = time.monotonic()
        finally:
            self._refreshing = None

    def set_endpoints(self, found: list[Endpoint]) -> None:
        """The node servers known now (discovery's answer, or the owner's word)."""
        if found != self._endpoints:
            self._endpoints = found
            self._usable_cache = None
            self._saturated = False

    def rescan(self) -> None:
        """Look at every server again at the next pump (for an owner whose count of what
        it should serve changed without its servers changing)."""
        self._saturated = False

    def pump(self) -> None:
        """Send requests for the callers waiting now (an owner's server just came up)."""
        self._pump()

    # --- handing out slots -----------------------------------------------------------

    def wake(self) -> None:
        self._pump()
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        """While callers wait: look for node servers (new ones, or again after a backoff)."""
        assert self._queue is not None
        while not self._stopped and self._demand():
            known = bool(self._endpoints)
            # With no node server known yet (a job starting), look at every tick: the first
            # ready record should be used at once, not a refresh interval later.
            await asyncio.sleep(self.refresh_interval / 4 if known else MIN_REFRESH_INTERVAL)
            try:
                await self.refresh(force=not known)
            except HpcSandboxError as exc:
                log.warning("%s: discovery failed: %s", self.name, exc)
            self._saturated = False
            self._pump()

    def _pump(self, extra: Endpoint | None = None) -> None:
        """Send as many long-poll acquires as callers wait for and servers can take;
        and one to `extra` (a server this pool just freed a slot on) while callers wait,
        even if their requests wait elsewhere: the freed slot is served now, and a grant
        that then finds nobody waiting is given back.

        A request parked on a full server (a long poll) does not stop one from going to a
        server with a free slot: a server that has just come up (a node, a cloud sandbox)
        is used at once, not when a parked request times out."""
        queue = self._queue
        if queue is None or self._stopped:
            return
        demand = self._demand()
        if extra is not None and demand and not self._inflight.get(extra.url):
            self._send(extra, parked=False)
        if self._saturated:
            return
        wanted = min(demand, self.max_polls)
        missing = wanted - (self._inflight_total - self._parked)  # what requests that wait nowhere cover
        if missing <= 0:
            return
        usable = self._usable(time.monotonic())

        def free(e: Endpoint) -> int:
            return self._free.get(e.url, e.slots) - self._inflight.get(e.url, 0)

        def room(e: Endpoint) -> int:
            # Each server gets as many requests as it has free slots, and one that waits
            # (a long poll) when it has none.
            return max(1, self._free.get(e.url, e.slots)) - self._inflight.get(e.url, 0)

        def key(e: Endpoint) -> tuple[bool, int]:
            # Servers with free slots first: a request that would wait on a full server
            # while another has a free slot would keep its caller waiting for nothing.
            return free(e) > 0, room(e)

        if missing <= FEW and len(usable) > SAMPLE:
            # The common case under load (a request ended, one more to send): a random
            # handful of servers, not all of them sorted. Enough when one of them has a
            # free slot; else the full look below.
            sample = sorted(random.sample(usable, SAMPLE), key=key, reverse=True)
            if free(sample[0]) > 0:
                for endpoint in sample:
                    count = min(free(endpoint), missing)
                    for _ in range(max(0, count)):
                        self._send(endpoint, parked=False)
                    missing -= max(0, count)
                    if missing <= 0:
                        return
        candidates = list(usable)
        random.shuffle(candidates)  # ties broken at random: many pools spread out
        for endpoint in sorted(candidates, key=key, reverse=True):
            parked = free(endpoint) <= 0
            # Parked requests never make more requests in flight than callers wait.
            count = min(room(endpoint), missing, wanted - self._inflight_total if parked else missing)
            if count <= 0:
                break
            for _ in range(count):
                self._send(endpoint, parked=parked)
            missing -= count
            if missing <= 0:
                return
        self._saturated = True  # until a request ends, servers change or a backoff ends (_tick)

    def _usable(self, now: float) -> list[Endpoint]:
        """The servers not in a backoff: kept until the servers change, one is skipped,
        or a backoff ends (a pump per grant must not walk a thousand servers)."""
        if self._usable_cache is None or now >= self._usable_until:
            skipped = {url: until for url, until in self._skip_until.items() if until > now}
            self._usable_cache = [e for e in self._endpoints if e.url not in skipped]
            self._usable_until = min(skipped.values(), default=float("inf"))
        return self._usable_cache

    def _skip(self, url: str, seconds: float) -> None:
        self._skip_until[url] = time.monotonic() + seconds
        self._usable_cache = None

    def _send(self, endpoint: Endpoint, parked: bool) -> None:
        self._inflight[endpoint.url] = self._inflight.get(endpoint.url, 0) + 1
        self._inflight_total += 1
        self._parked += parked
        self._spawn(self._poll(endpoint, parked))

    async def _poll(self, endpoint: Endpoint, parked: bool) -> None:
        assert self._queue is not None
        url = endpoint.url
        sent = time.monotonic()
        try:
            self.requests += 1
            label = self._queue.oldest_label()
            grant = await self.client(endpoint).acquire(label, self.lease_ttl, wait=self.poll_wait)
        except NoFreeSlot:
            self._free[url] = 0  # it waited poll_wait and nothing freed: ask again (below)
            if time.monotonic() - sent < self.poll_wait / 2:
                # Answered without waiting (a server that is stopping, or one too old to
                # wait): do not ask it again in a tight loop.
                self._skip(url, MIN_REFRESH_INTERVAL * 4)
        except ClientError as exc:
            # Said once, in NoCapacity's message, if no other server serves the caller.
            log.info("node server %s skipped for %.0fs: %s", endpoint.name, UNHEALTHY_BACKOFF, exc)
            self._skip(url, UNHEALTHY_BACKOFF)
            self._trouble[url] = f"{endpoint.name}: {exc}"
        else:
            self._trouble.pop(url, None)
            if grant.free is not None:
                self._free[url] = grant.free
            slot = Slot(endpoint=endpoint, index=grant.slot, lease=grant.lease)
            if self.owner is not None:
                self.owner.granted(endpoint)
            await self._hand_over(slot, label)
        finally:
            self._inflight[url] -= 1
            self._inflight_total -= 1
            self._parked -= parked
            self._saturated = False
            if not self._stopped:
                self._pump()

    async def _hand_over(self, slot: Slot, label: str | None) -> None:
        """Give a grant to the oldest caller still waiting. The request was labelled
        with the oldest one when it was sent, who may have been served since: the node
        server is told the real holder first (its slot list and logs name trajectories),
        so that it knows by the time the caller has the slot; a request per grant only
        where the label was wrong."""
        assert self._queue is not None
        named = label
        if self._queue.waiting and (oldest := self._queue.oldest_label()) != label:
            try:
                named = oldest if await self._name_holder(slot, oldest) else label
            except asyncio.CancelledError:  # the source stops: the grant, confirmed by now, goes back
                with contextlib.suppress(ClientError):
                    await self.client(slot.endpoint).release(slot.index, slot.lease, reset_workspace=False)
                raise
        waiter = self._queue.offer(slot, self._offered_as)
        if waiter is None:
            # Every caller left (gave up, was cancelled) while this request waited.
            self._spawn(self.release(slot, reset_workspace=False))
        elif waiter.trajectory_id != named:  # the one named gave up meanwhile: a late word
            self._spawn(self._name_holder(slot, waiter.trajectory_id))

    async def _name_holder(self, slot: Slot, trajectory_id: str | None) -> bool:
        self.renames += 1
        try:
            await self.client(slot.endpoint).name_holder(slot.index, slot.lease, trajectory_id)
        except ClientError as exc:  # only a name is lost: the caller's first call says if the lease is
            log.info("naming the holder of %s: %s", slot, exc)
            return False
        return True

    def _demand(self) -> int:
        """How many waiting callers this source should find slots for: all of them, or
        as many as its owner says."""
        waiting = self._queue.waiting if self._queue is not None else 0
        return waiting if self.owner is None else self.owner.demand(waiting)

    async def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        if self.owner is not None:
            self.owner.released(slot)
        try:
            await self.client(slot.endpoint).release(slot.index, slot.lease, reset_workspace)
        except ClientError as exc:
            # The lease dies with its server or expires by itself: nothing is leaked.
            log.info("release of %s: %s", slot, exc)
            return
        url = slot.endpoint.url
        if not self._inflight.get(url):  # else our own waiting request takes it at once
            self._free[url] = self._free.get(url, 0) + 1
            self._saturated = False
            self._pump(extra=slot.endpoint)

    # --- what the pool asks ----------------------------------------------------------

    def job_ended(self, job_id: str) -> asyncio.Future | None:
        """A future done when the scheduler ends the job (None: this source cannot tell)."""
        return None

    async def why_gone(self, job_id: str) -> str | None:
        """If the job has ended, the scheduler's word for it (checked now)."""
        return None

    def trouble(self) -> list[str]:
        """Why node servers were skipped at their last try (empty when none was)."""
        return list(self._trouble.values())

    def outlook(self) -> Outlook:
        return Outlook(slots=sum(e.slots for e in self._endpoints))

    async def capacity(self) -> Capacity:
        endpoints = await self.refresh()
        limit = asyncio.Semaphore(CAPACITY_CONCURRENCY)

        async def free_on(endpoint: Endpoint) -> int:
            async with limit:
                try:
                    answer = await self.client(endpoint).slots()
                except ClientError as exc:
                    self._trouble[endpoint.url] = f"{endpoint.name}: {exc}"  # said in NoCapacity's message
                    return 0
            self._free[endpoint.url] = answer.free
            return answer.free

        free = await asyncio.gather(*(free_on(e) for e in endpoints))
        return Capacity(self.name, self.location, len(endpoints), sum(e.slots for e in endpoints), sum(free))


@dataclass
class _JobView:
    """What discovery keeps of one job between two looks at its folder."""

    credentials: Credentials
    info: JobInfo | None
    stamp: tuple[int, int] | None = None  # (mtime_ns, inode) of servers/ when last read
    endpoints: list[Endpoint] = dataclasses.field(default_factory=list)
    located: bool = False  # its node servers come from its scheduler's API, not its folder
    located_at: float = float("-inf")  # when its scheduler's API was last asked (monotonic)


class ClusterSource(NodeServerSource):
    """Node servers of submitted jobs, found in the state dir's job folders, with
    their jobs watched through `job_states`: a job the scheduler ends (cancel,
    walltime, preemption, node failure) has its slots dropped, and calls running on
    them end at once with a `job_ended` error instead of waiting on a dead node.

    A job's ready records are read again only when its servers/ folder changed
    (its mtime): on a shared filesystem, a look at a 1,000-task array that changed
    nothing costs one `stat` per job, not a thousand file reads.
    """

    def __init__(self, state_dir: Path | None = None, jobs: Sequence[str] | None = None,
                 status_interval: float = 5.0, job_states: JobStates | None = None, locate: Locate | None = None,
                 **options: Any) -> None:
        self.state_dir = Path(state_dir or users_state_dir()).expanduser()
        self.jobs = list(jobs) if jobs is not None else None
        self.status_interval = status_interval
        self.job_states = job_states
        self.locate = locate
        self._views: dict[str, _JobView] = {}
        self._infos: dict[str, JobInfo] = {}
        self._ended: dict[str, asyncio.Future] = {}
        self._reasons: dict[str, str] = {}
        self._watcher: asyncio.Task | None = None
        self._vanished: list[str] = []  # jobs whose folder discovery found gone
        self._missing: dict[str, int] = {}  # job -> node servers not up yet
        self._expected: dict[str, float | None] = {}  # job -> the scheduler's expected start, if pending
        super().__init__(self._discover, name=f"jobs in {self.state_dir}", location="cluster", **options)

    def _discover(self) -> list[Endpoint]:
        endpoints: list[Endpoint] = []
        missing: dict[str, int] = {}
        views = dict(self._views)
        for job in (self.jobs if self.jobs is not None else list_jobs(self.state_dir)):
            if job in self._reasons:
                continue  # ended: its records may linger if its nodes died hard
            folder = JobFolder(self.state_dir, job)
            view = views.get(job)
            if view is None:
                view = self._look_at(folder)
                if view is None:
                    continue
                views[job] = view
            try:
                st = os.stat(folder.servers)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                if not folder.exists():
                    # It was there: `hpc-sandbox cancel` removed its folder. Marked ended
                    # on the event loop (this runs in a thread).
                    self._vanished.append(job)
                    views.pop(job, None)
                    continue
                stamp = None  # no node server ready yet
            located = self._located(view) if self.locate is not None and view.info is not None else None
            if located is not None:
                view.endpoints = [endpoint_of(r, view.credentials, view.info.location) for r in located]  # type: ignore[union-attr]
            elif view.located:
                pass  # its scheduler's API did not answer this time: keep what it said last
            elif stamp != view.stamp:
                where = view.info.location if view.info else "local"
                # A record whose server is known dead (same host, process gone) is not tried.
                records = folder.read_records() if stamp is not None else []
                view.endpoints = [endpoint_of(r, view.credentials, where) for r in records if not r.process_gone()]
                view.stamp = stamp
            endpoints += view.endpoints
            if view.info is not None and view.info.servers > len(view.endpoints):
                missing[job] = view.info.servers - len(view.endpoints)
        # One assignment each: the event loop reads them while this thread runs.
        self._views = views
        self._infos = {job: view.info for job, view in views.items() if view.info is not None}
        self._missing = missing
        return endpoints

    def _located(self, view: _JobView) -> list[ServerRecord] | None:
        """The job's node servers from its scheduler's API; None: read its folder, or,
        when the API did not answer, keep what it said last (the failure is said once)."""
        assert self.locate is not None and view.info is not None
        job = view.info.job_id
        now = time.monotonic()
        if view.located and now - view.located_at < LOCATE_INTERVAL:
            return None  # asked moments ago: a shared agent is not asked four times a second
        view.located_at = now
        try:
            found = self.locate(view.info)
        except HpcSandboxError as exc:
            if job not in self._trouble:
                log.warning("cannot list the node servers of job %s: %s", job, exc)
            self._trouble[job] = f"job {job}: {exc}"
            return None
        self._trouble.pop(job, None)
        view.located = found is not None
        return found

    def _look_at(self, folder: JobFolder) -> _JobView | None:
        """A job seen for the first time: its credentials and job.json (read once)."""
        try:
            credentials = folder.credentials()
        except HpcSandboxError as exc:
            if self.jobs is not None:
                raise
            log.debug("skipping job %s: %s", folder.job_id, exc)
            return None
        try:
            info: JobInfo | None = folder.read_info()
        except HpcSandboxError:
            info = None  # started by hand with `serve`: no job.json, no scheduler to ask
        return _JobView(credentials, info)

    async def refresh(self, force: bool = False) -> list[Endpoint]:
        endpoints = await super().refresh(force)
        while self._vanished:
            job = self._vanished.pop()
            self._mark_ended(job, f"job {job} ended (its folder is gone: cancelled)")
        return endpoints

    async def capacity(self) -> Capacity:
        return dataclasses.replace(await super().capacity(), waiting_servers=sum(self._missing.values()))

    def outlook(self) -> Outlook:
        pending = tuple(self._expected.get(job) for job, count in self._missing.items()
                        if job not in self._reasons for _ in range(count))
        return Outlook(slots=sum(e.slots for e in self._endpoints), pending=pending)

    async def start(self, queue: WaitQueue | None = None, lease_ttl: float | None = None) -> None:
        await super().start(queue, lease_ttl)
        if self.job_states is not None:
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
            try:
                await self.check_jobs([i for j, i in self._infos.items() if j not in self._reasons])
            except HpcSandboxError as exc:  # a slow controller is not a reason to drop slots
                log.warning("job status check failed: %s", exc)
            except Exception:  # a bug here must not silently stop the watching
                log.exception("job status check failed unexpectedly")
            await asyncio.sleep(jittered(self.status_interval))

    async def check_jobs(self, infos: Sequence[JobInfo]) -> None:
        """One status call for all the given jobs (one per scheduler, in job_states)."""
        if not infos or self.job_states is None:
            return
        statuses = await asyncio.to_thread(self.job_states, infos)
        for job_id, status in statuses.items():
            # What the overflow policy reads: when a queued job is expected to start.
            self._expected[job_id] = status.expected_start if status.state is JobState.PENDING else None
            # COMPLETING: the scheduler is already killing the job's processes.
            if status.state.ended or status.state is JobState.COMPLETING:
                self._mark_ended(job_id, f"job {job_id} ended "
                                         f"({status.state.value}{': ' + status.reason if status.reason else ''})")

    def _mark_ended(self, job_id: str, reason: str) -> None:
        if job_id in self._reasons:
            return
        self._reasons[job_id] = reason
        ended = self.job_ended(job_id)
        if not ended.done():
            ended.set_result(reason)
        self._refreshed = float("-inf")  # forget its node servers at the next look
        log.warning("%s; its slots are gone", reason)
