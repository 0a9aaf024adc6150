"""SlotPool: the one slot API, whatever the slot's location.

    pool = SlotPool([source, ...], overflow=cloud)   # connect.from_state_dir() etc. build them
    async with pool:
        slot = await pool.acquire(trajectory_id="t1")
        res = await pool.execute(slot, "bash", {"command": "pytest -q"}, timeout=60)
        await pool.release(slot)

Callers that find no free slot wait in one queue, first come, first served; the
pool's sources (local/cluster node servers; the cloud overflow plugs in as one more)
find slots for them. Slot ownership is the node servers' business: the pool holds
leases, never locks of its own, so any number of pools in any number of processes can
share the same jobs. The pool knows its sources and nothing else: `hpc_sandbox.connect`
binds them to jobs, schedulers, profiles and the cloud.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent import ToolError
from ..client import NodeClient, new_exec_id
from ..errors import CallTimeout, ClientError, ConfigError, ErrorKind, JobEnded, NoCapacity, ServerGone
from ..models import ExecEvent, Slot, ToolResult
from ..protocol import DEFAULT_CONFIRM_WITHIN, Call, CallAnswer, exec_timeout
from . import trees
from .overflow import CloudSource, Overflow
from .sources import Capacity, Source
from .waiters import WaitQueue

log = logging.getLogger(__name__)

# A grant the caller has not used yet is renewed this long before the node server would
# take it back (protocol.DEFAULT_CONFIRM_WITHIN): a caller may hold a slot a while before
# its first call (a model generating its first action).
CONFIRM_MARGIN = 10.0


@dataclass(frozen=True)
class ToolCall:
    """One call of a batch: `pool.execute_batch([ToolCall(slot, "bash", {...}), ...])`."""

    slot: Slot
    tool: str
    args: dict[str, Any]
    timeout: float | None = None


async def _next_event(events: AsyncGenerator[Any, None]) -> Any:
    """The next item of `events`, None at its end (a coroutine, as _guarded wants)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


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


@dataclass(frozen=True)
class PlaceReport:
    """Slots in one place (cluster or cloud)."""

    place: str
    servers: int
    slots: int
    free: int
    starting: int  # node servers (or sandboxes) not up yet


@dataclass(frozen=True)
class PoolReport:
    """What `pool.report()` says: slots by place, callers waiting, the cloud's use."""

    places: tuple[PlaceReport, ...]
    waiting: int
    sandboxes_alive: int = 0
    sandbox_seconds: float = 0.0
    cost: float | None = None  # estimated, from the cloud profile's cost_per_hour
    cloud_off: str | None = None  # why the cloud cannot be used, if it cannot


class SlotPool:
    def __init__(self, sources: Sequence[Source], *, overflow: CloudSource | None = None,
                 burst_after: float | None = None, acquire_timeout: float = 300.0,
                 lease_ttl: float | None = None) -> None:
        """`sources` serve callers in the order they come; `overflow` (a cloud source,
        e.g. burst.modal.ModalSource) serves those who waited `burst_after` seconds
        (default: its profile's) or at once when the cluster has nothing coming."""
        if not sources and overflow is None:
            raise ConfigError("a SlotPool needs at least one source")
        self.sources = [*sources, *([overflow] if overflow is not None else [])]
        self.overflow = overflow
        self.acquire_timeout = acquire_timeout
        self.lease_ttl = lease_ttl
        self.queue = WaitQueue()
        self._source_of: dict[str, Source] = {}
        self._unconfirmed: dict[str, tuple[Slot, float]] = {}  # slot id -> (slot, granted at)
        self._keeper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self.jobs: list[Any] = []  # the jobs this pool was made for (connect.launch), which cancels them
        self._policy: Overflow | None = None
        if overflow is not None:
            after = burst_after if burst_after is not None else getattr(getattr(overflow, "profile", None),
                                                                        "burst_after", 30.0)
            self._policy = Overflow(overflow, sources, self.queue, after)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if not self._started:
            for source in self.sources:
                await source.start(self.queue, self.lease_ttl)
            self._keeper = asyncio.ensure_future(self._keep_grants())
            if self._policy is not None:
                self._policy.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            self.queue.close(NoCapacity("the pool was stopped while this acquire waited for a slot"))
            if self._keeper is not None:
                self._keeper.cancel()
            if self._policy is not None:
                await self._policy.stop()
            for source in self.sources:
                await source.stop()

    async def __aenter__(self) -> "SlotPool":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- slots -------------------------------------------------------------------

    async def acquire(self, trajectory_id: str | None = None, profile: str = "default",
                      timeout: float | None = None) -> Slot:
        """A slot, as soon as one is free: callers are served in the order they came.
        Waits up to `timeout` (default acquire_timeout), then raises NoCapacity saying
        what was tried. A caller cancelled while waiting leaks nothing.

        `profile` names the kind of slot asked for; sources that serve several kinds
        (the cloud overflow) will use it, node servers of a job do not need it.
        """
        await self.start()
        waited = self.acquire_timeout if timeout is None else timeout
        waiter = self.queue.join(trajectory_id, profile)
        for source in self.sources:
            source.wake()
        if self._policy is not None:
            self._policy.wake()
        try:
            slot, source = await asyncio.wait_for(asyncio.shield(waiter.future), waited)
        except NoCapacity:
            raise  # the pool stopped (WaitQueue.close)
        except asyncio.TimeoutError:
            if not waiter.future.done():
                self.queue.leave(waiter)
                raise NoCapacity(await self._why_no_slot(waited)) from None
            slot, source = waiter.future.result()  # granted in the very moment the wait ran out
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted, but the caller is gone: give the slot back, untouched.
                given, source = waiter.future.result()
                task = asyncio.ensure_future(source.release(given, reset_workspace=False))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self.queue.leave(waiter)
            raise
        self._source_of[slot.id] = source
        self._unconfirmed[slot.id] = (slot, time.monotonic())
        return slot

    async def _keep_grants(self) -> None:
        """Renew grants that callers hold without having used them yet, before the node
        server takes them back (it does so with grants nobody confirms, which only a
        caller that died just as it got one would leave)."""
        while True:
            await asyncio.sleep(CONFIRM_MARGIN / 2)
            due = time.monotonic() - (DEFAULT_CONFIRM_WITHIN - CONFIRM_MARGIN)
            for slot_id, (slot, granted) in list(self._unconfirmed.items()):
                if granted <= due:
                    self._unconfirmed.pop(slot_id, None)
                    try:
                        await self._client(slot).renew(slot.index, slot.lease)
                    except ClientError as exc:
                        log.info("renewing %s: %s", slot, exc)

    def _used(self, slot: Slot) -> None:
        self._unconfirmed.pop(slot.id, None)

    async def _why_no_slot(self, waited: float) -> str:
        capacity = [await s.capacity() for s in self.sources]
        total = sum(c.slots for c in capacity)
        waiting = sum(c.waiting_servers for c in capacity)
        coming = (f"; {waiting} more node servers of submitted jobs are queued or starting "
                  "(`hpc-sandbox status`)") if waiting else ""
        trouble = [line for source in self.sources for line in source.trouble()]
        if self.overflow is not None and not self.overflow.off:
            trouble.append(f"cloud: {self.overflow.slots_total()} of max_cloud_slots "
                           f"{getattr(getattr(self.overflow, 'profile', None), 'max_cloud_slots', '?')} slots in use "
                           "or starting")
        if trouble:
            shown = "; ".join(trouble[:3]) + (f"; and {len(trouble) - 3} more" if len(trouble) > 3 else "")
            return f"no slot within {waited:.0f}s: node servers that could not be used: {shown}{coming}"
        if total:
            return (f"no free slot within {waited:.0f}s ({total} slots on {sum(c.servers for c in capacity)} "
                    f"node servers, all busy; {self.queue.waiting} callers still waiting{coming})")
        if waiting:
            return f"no node server is ready yet after {waited:.0f}s{coming}"
        return "no node servers are running (submit a job first: hpc-sandbox submit)"

    def _source(self, slot: Slot) -> Source:
        """The source a slot came from (the first one for a slot this pool did not hand out)."""
        return self._source_of.get(slot.id) or self.sources[0]

    def _client(self, slot: Slot) -> NodeClient:
        return self._source(slot).client(slot.endpoint)

    async def _guarded(self, slot: Slot, call: Awaitable[Any]) -> Any:
        """Await a call on `slot`, but give up as soon as the scheduler ends its job.

        Failures that look like a dead node server are checked against the job's
        state, so that the error says what happened (job_ended) when that is it.
        """
        self._used(slot)
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
        if result.error_kind == ErrorKind.SERVER_STOPPING or result.killed_by_signal:
            reason = await self._source(slot).why_gone(slot.endpoint.job_id)
            if reason:
                return ToolResult.failure(result.tool, JobEnded.kind, f"{reason}; the command was killed", slot)
        return result

    async def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        """Give the slot back: its processes end, and its workspace is wiped unless
        reset_workspace is False. The next caller waiting gets it at once."""
        self._used(slot)
        source = self._source_of.pop(slot.id, None) or self.sources[0]
        await source.release(slot, reset_workspace)

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

    async def stream(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
                     timeout: float | None = None) -> AsyncGenerator[ExecEvent, None]:
        """Run a call and yield its output as it comes (ExecEvent "stdout"/"stderr"),
        then last its result (ExecEvent "result" with the ToolResult `execute` would
        return). A failure is that last event's result, never an exception or a hang:
        a refusal, a dead node server, a job the scheduler ended (which ends a stream
        that waits on it at once). Leaving the loop early hangs up; the call still runs
        to its end in the slot (release or reset the slot to stop it)."""
        events = self._client(slot).stream(slot.index, slot.lease, tool, args or {}, timeout)
        try:
            while True:
                # Guarded one step at a time: the job's end cancels whatever task waits on
                # the stream, so it may only be armed while this generator waits for the
                # next event, never while its caller does something else between events.
                try:
                    event = await self._guarded(slot, _next_event(events))
                except ClientError as exc:
                    yield ExecEvent.ended(ToolResult.failure(tool, exc.kind, str(exc), slot))
                    return
                if event is None:  # NodeClient.stream ends only after a result, or raises
                    yield ExecEvent.ended(ToolResult.failure(tool, ServerGone.kind, "the stream ended without a "
                                                             "result", slot))
                    return
                if event.answer is not None:
                    yield ExecEvent.ended(await self._to_result(slot, event.answer), event.dropped_bytes)
                    return
                yield ExecEvent(event.event, event.data, event.skipped)
        finally:
            await events.aclose()

    async def execute_batch(self, calls: Sequence[ToolCall | tuple], timeout: float | None = None) -> list[ToolResult]:
        """Several calls at once: one HTTP request per node server, results in call
        order. A call is a ToolCall, or a tuple (slot, tool, args[, timeout])."""
        wanted = [c if isinstance(c, ToolCall) else ToolCall(*c) for c in calls]
        by_server: dict[str, list[int]] = {}
        for position, call in enumerate(wanted):
            by_server.setdefault(call.slot.endpoint.url, []).append(position)
        results: list[ToolResult | None] = [None] * len(wanted)

        async def send(positions: list[int]) -> None:
            first = wanted[positions[0]].slot
            wire = [Call(wanted[p].slot.index, wanted[p].slot.lease, new_exec_id(), wanted[p].tool, wanted[p].args,
                         exec_timeout(wanted[p].timeout or timeout)) for p in positions]
            for p in positions:
                self._used(wanted[p].slot)
            try:
                answers = await self._guarded(first, self._client(first).batch(wire))
            except ClientError as exc:
                for p in positions:
                    results[p] = ToolResult.failure(wanted[p].tool, exc.kind, str(exc), wanted[p].slot)
                return
            for p, answer in zip(positions, answers):
                results[p] = await self._to_result(wanted[p].slot, answer)

        await asyncio.gather(*(send(positions) for positions in by_server.values()))
        return results  # type: ignore[return-value]  (every position was filled by its server's send)

    # --- files and trees ---------------------------------------------------------
    #
    # Like execute, these return a ToolResult and never raise for a failure: a refused
    # path, a missing local folder, a dead node server or an ended job is the result's
    # error_kind. Their `data` says what moved ({"path", "size"} for a file).

    async def download(self, slot: Slot, path: str, dest: Path) -> ToolResult:
        """Stream the workspace file `path` to the local file `dest` (written atomically)."""
        try:
            size = await self._guarded(slot, self._client(slot).download(slot.index, slot.lease, path, dest))
        except ClientError as exc:
            return ToolResult.failure("download", exc.kind, str(exc), slot)
        except OSError as exc:  # the local side: a missing folder, a full disk
            return ToolResult.failure("download", _local_kind(exc), f"{dest}: {exc.strerror or exc}", slot)
        return _done("download", slot, {"path": path, "size": size})

    async def upload(self, slot: Slot, source: Path, path: str, mode: int | None = None) -> ToolResult:
        """Stream the local file `source` into the workspace at `path` (replacing
        atomically), with `mode`, by default the local file's permission bits (an
        executable stays executable; setuid, setgid and sticky are dropped)."""
        if not Path(source).is_file():  # read only once the request is under way: said before it
            kind = ErrorKind.NOT_FOUND if not Path(source).exists() else ErrorKind.NOT_A_FILE
            return ToolResult.failure("upload", kind, f"{source}: no such file" if kind == ErrorKind.NOT_FOUND
                                      else f"{source}: not a regular file", slot)
        if mode is None:
            mode = Path(source).stat().st_mode & 0o777
        try:
            size = await self._guarded(slot, self._client(slot).upload(slot.index, slot.lease, source, path,
                                                                       mode=mode))
        except ClientError as exc:
            return ToolResult.failure("upload", exc.kind, str(exc), slot)
        except OSError as exc:
            return ToolResult.failure("upload", _local_kind(exc), f"{source}: {exc.strerror or exc}", slot)
        return _done("upload", slot, {"path": path, "size": size})

    async def upload_tree(self, slot: Slot, local_dir: Path, dest: str = ".", *,
                          max_bytes: int | None = None, max_entries: int | None = None,
                          timeout: float | None = None) -> ToolResult:
        """Copy the contents of the local folder `local_dir` into the workspace folder
        `dest` (made if missing; what is there already stays unless replaced): one
        tar.gz streamed in, unpacked by the slot's agent (pool/trees.py says what is
        kept). `data`: dirs, files, links, bytes, and `skipped` (links out of the tree,
        special files: left out)."""
        limits = trees.TreeLimits(max_bytes or trees.DEFAULT_TREE_BYTES, max_entries or trees.DEFAULT_TREE_ENTRIES)
        try:
            packed = await asyncio.to_thread(trees.pack_tree, Path(local_dir), limits)
        except ToolError as exc:
            return ToolResult.failure("upload_tree", ErrorKind.read(exc.kind), exc.message, slot)
        except OSError as exc:
            return ToolResult.failure("upload_tree", _local_kind(exc), f"{local_dir}: {exc.strerror or exc}", slot)
        try:
            name = trees.upload_name()
            client = self._client(slot)
            await self._guarded(slot, client.upload(slot.index, slot.lease, packed.archive, name))
            answer = await self._guarded(slot, client.execute(
                slot.index, slot.lease, "extract",
                {"path": name, "dest": dest, "remove": True, "max_bytes": limits.max_bytes,
                 "max_entries": limits.max_entries}, timeout))
        except ClientError as exc:
            return ToolResult.failure("upload_tree", exc.kind, str(exc), slot)
        finally:
            packed.discard()
        result = await self._to_result(slot, answer)
        if not result.success:
            return dataclasses.replace(result, tool="upload_tree")
        return _done("upload_tree", slot, {**result.data, "skipped": packed.skipped + result.data.get("skipped", [])})

    async def download_tree(self, slot: Slot, src: str, local_dir: Path, *,
                            max_bytes: int | None = None, max_entries: int | None = None,
                            exclude: list[str] | None = None, timeout: float | None = None) -> ToolResult:
        """Copy the contents of the workspace folder `src` into the local folder
        `local_dir` (made if missing): one tar.gz, made by the node server as it walks
        the folder (no symlink followed) and streamed into a temporary file here (never
        held in memory by either side), then unpacked by the agent's rules, so a slot
        cannot write outside `local_dir`. `exclude`: glob patterns left out (as
        list_files' `exclude`). `data` as for upload_tree; `skipped` names special files
        and links out of the tree."""
        limits = trees.TreeLimits(max_bytes or trees.DEFAULT_TREE_BYTES, max_entries or trees.DEFAULT_TREE_ENTRIES)
        asked = trees.tree_request(src, limits, exclude)
        handle = tempfile.NamedTemporaryFile(prefix="hpc-sandbox-tree-", suffix=".tar.gz", delete=False)
        archive = Path(handle.name)
        try:
            with handle:
                client = self._client(slot)
                fetch = (client.download_tree(slot.index, slot.lease, asked, handle) if timeout is None
                         else client.download_tree(slot.index, slot.lease, asked, handle, timeout))
                end = await self._guarded(slot, fetch)
            if end.error_kind is not None:
                return ToolResult.failure("download_tree", end.error_kind, end.error, slot)
            made = await asyncio.to_thread(trees.unpack_archive, archive, Path(local_dir), limits)
        except ClientError as exc:
            return ToolResult.failure("download_tree", exc.kind, str(exc), slot)
        except ToolError as exc:
            return ToolResult.failure("download_tree", ErrorKind.read(exc.kind), exc.message, slot)
        except OSError as exc:
            return ToolResult.failure("download_tree", _local_kind(exc), f"{local_dir}: {exc.strerror or exc}",
                                      slot)
        finally:
            archive.unlink(missing_ok=True)
        return _done("download_tree", slot, {**made, "skipped": end.skipped + made["skipped"],
                                             "dest": str(local_dir)})

    async def capacity(self) -> list[Capacity]:
        return [await source.capacity() for source in self.sources]

    async def report(self) -> PoolReport:
        """Slots by place (asks every node server), callers waiting, and what the cloud
        part has cost so far."""
        places: dict[str, list[Capacity]] = {}
        for capacity in await self.capacity():
            places.setdefault(capacity.location, []).append(capacity)
        rows = tuple(PlaceReport(place, sum(c.servers for c in found), sum(c.slots for c in found),
                                 sum(c.free for c in found), sum(c.waiting_servers for c in found))
                     for place, found in places.items())
        if self.overflow is None:
            return PoolReport(rows, self.queue.waiting)
        usage = self.overflow.usage()  # type: ignore[attr-defined]
        now = time.time()
        return PoolReport(rows, self.queue.waiting,
                          sandboxes_alive=sum(1 for s in usage.sandboxes if s.state in ("creating", "ready")),
                          sandbox_seconds=usage.sandbox_seconds(now), cost=usage.cost(now), cloud_off=self.overflow.off)


def _done(tool: str, slot: Slot, data: dict[str, Any]) -> ToolResult:
    return ToolResult(success=True, tool=tool, slot=slot.id, location=slot.location, data=data)


def _local_kind(exc: OSError) -> ErrorKind:
    """The kind of a failure on the caller's own disk."""
    if isinstance(exc, FileNotFoundError):
        return ErrorKind.NOT_FOUND
    if isinstance(exc, NotADirectoryError):
        return ErrorKind.NOT_A_DIRECTORY
    return ErrorKind.IO
