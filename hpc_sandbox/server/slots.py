"""The node server's core: slots, their agents, leases and execution ids.

Slot ownership lives here and nowhere else. Acquiring a slot returns a lease; every
later call must carry it; a lease unused for its time-to-live expires and the slot
is reset and freed. Execution ids make retries safe: a repeated id gets the first
result (or waits for the first run to finish) and never runs twice.

Ending a lease always ends the slot's processes (a fresh agent); only the files may
stay. An agent that stops answering is given up on after the call's timeout and a
grace, and replaced. Per-slot limits are kept by a watchdog (see limits.py).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import secrets
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, ErrorKind, LeaseLost, LimitExceeded, NoFreeSlot, NotFound
from ..protocol import TOOLS, AcquireRequest, BashResult, Call, CallAnswer, Grant, SlotState
from ..agent import RESET_TIMEOUT, empty_folder
from ..runtime import SlotRuntime, host_scratch, task_fence
from .agent_process import STUCK_GRACE_SECONDS, AgentDied, AgentError, AgentProcess, AgentStuck, OutputSink
from .cgroups import CgroupPlace, SlotCgroup
from .limits import DISK_EVERY, WATCH_INTERVAL, SlotLimits, SlotView, Watchdog
from .procfs import oom_kills

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 600.0
MAX_LEASE_TTL = 7 * 24 * 3600.0
REMEMBERED_EXEC_IDS = 2048  # per slot
# A command killed by SIGKILL while the kernel's OOM killer killed something on the node
# (no watchdog breach explains it): most likely the node, or the job's cgroup, ran out.
KERNEL_OOM = ("out of memory: the command was killed by SIGKILL while the kernel's OOM killer was killing "
              "on this node (the node or the job's memory ran out; a lower slot_memory makes the slot's "
              "watchdog end it first)")


@dataclass
class Slot:
    index: int
    workspace: Path
    agent: AgentProcess | None = None
    state: SlotState = SlotState.STARTING
    lease: str | None = None
    trajectory_id: str | None = None
    ttl: float = DEFAULT_LEASE_TTL
    last_used: float = 0.0
    in_flight: int = 0
    # When each piece of running work stops keeping the lease alive: a call's timeout
    # plus the grace after which its agent is given up on (inf for a file transfer,
    # which ends with its connection).
    deadlines: list[float] = field(default_factory=list)
    restarts: int = 0
    last_error: str | None = None
    results: OrderedDict = field(default_factory=OrderedDict)  # exec id -> Future of a CallAnswer
    # Whether anything ran in the slot under its current lease (a call, a transfer): an
    # unused grant goes back without restarting its agent.
    used: bool = False
    # A fresh grant must be confirmed (any request with its lease) by then, or it goes
    # back: its client may never have received it. None once confirmed.
    confirm_by: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises start/stop/reset
    # The watchdog's marks: the last_used at which a scan found nothing running in the
    # slot (it need not look again until last_used moves), and at which its workspace
    # was measured with nothing running.
    quiet_at: float | None = None
    measured_at: float | None = None
    cgroup: SlotCgroup | None = None  # where its agent runs, when the node lets the server make cgroups

    def expires_in(self, now: float) -> float | None:
        if self.state != SlotState.LEASED:
            return None
        if self.deadlines and now < max(self.deadlines):
            return self.ttl  # a running call keeps the lease alive, until its agent is given up on
        return max(0.0, self.last_used + self.ttl - now)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state,
            "trajectory_id": self.trajectory_id,
            "lease_expires_in": self.expires_in(now),
            "running": self.in_flight,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


@dataclass
class _Waiting:
    """An acquire request waiting on this server for a slot."""

    future: asyncio.Future  # of a Grant
    asked: AcquireRequest
    still_there: Callable[[], bool]


class SlotTable:
    def __init__(self, runtime: SlotRuntime, workspace_root: Path, slots: int, *,
                 max_concurrent: int = 256, agent_start_timeout: float = 120.0,
                 limits: SlotLimits | None = None, cgroups: CgroupPlace | None = None) -> None:
        self.runtime = runtime
        self.workspace_root = workspace_root
        self.slots = [Slot(index=i, workspace=workspace_root / f"slot-{i}" / "workspace") for i in range(slots)]
        self.max_concurrent = max_concurrent
        self.agent_start_timeout = agent_start_timeout
        self.in_flight = 0
        self.accepting = True
        self.stopping = asyncio.Event()
        # Every background task the table starts is kept here until it ends, so none is
        # collected mid-run and none fails unseen (see _spawn).
        self._tasks: set[asyncio.Task] = set()
        self._expiry_task: asyncio.Task | None = None
        self.limits = limits or SlotLimits()
        self.watchdog = Watchdog(self.limits) if self.limits.any else None
        self._watch_task: asyncio.Task | None = None
        self._round: asyncio.Task | None = None  # the watchdog's round in progress
        # Acquire requests waiting for a slot, oldest first (see acquire and _offer).
        self._waiting: collections.deque[_Waiting] = collections.deque()
        # The server's folder of slot cgroups (cgroups.claim), if any: the table removes it at stop.
        self.cgroups = cgroups

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        for slot in self.slots:
            slot.workspace.mkdir(parents=True, exist_ok=True)
        results = await asyncio.gather(*(self._start_agent(slot) for slot in self.slots), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        self._expiry_task = asyncio.create_task(self._expire_leases())
        if self.watchdog:
            self._watch_task = asyncio.create_task(self._keep_limits())

    async def stop(self) -> None:
        """Stop taking work, kill running commands, stop every agent."""
        self.accepting = False
        self.stopping.set()
        for task in (self._expiry_task, self._watch_task, self._round):
            if task:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        while self._waiting:
            self._waiting.popleft().future.cancel()
        await asyncio.gather(*(slot.agent.stop() for slot in self.slots if slot.agent), return_exceptions=True)
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.close)  # what the agents left, then the folders

    async def _start_agent(self, slot: Slot) -> None:
        argv, env = self.runtime.agent_command(slot.workspace, slot.index)
        if self.cgroups is not None:
            # Every agent starts in an empty cgroup: whatever the last one left (a dead
            # agent's orphans, a stuck one's commands) is killed first.
            if slot.cgroup is None:
                procs = self.limits.max_procs
                slot.cgroup = self.cgroups.slot(slot.index, task_fence(procs) if procs is not None else None)
            await asyncio.to_thread(_emptied, slot.cgroup)
            argv = slot.cgroup.enter_argv(argv)
        agent = AgentProcess(argv, env, cwd=str(slot.workspace), name=f"slot {slot.index}")
        agent.cgroup = slot.cgroup
        await agent.start(self.agent_start_timeout)
        if self.watchdog:
            try:
                agent.infra = await asyncio.to_thread(self.watchdog.infrastructure, agent.pid)
            except BaseException:
                await agent.stop()
                raise
        slot.agent = agent
        slot.quiet_at = slot.measured_at = None
        if slot.state in (SlotState.STARTING, SlotState.RESTARTING, SlotState.RESETTING, SlotState.BROKEN):
            slot.state = SlotState.LEASED if slot.lease else SlotState.FREE
        self._spawn(self._watch(slot, agent), f"watch slot {slot.index}")

    def _spawn(self, work: Coroutine[Any, Any, Any], what: str) -> None:
        """Run `work` in the background, owned by the table: kept until done, and a
        failure is logged with what it was (never "exception was never retrieved")."""
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(finished: asyncio.Task) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                exc = finished.exception()
                log.error("%s failed: %s: %s", what, type(exc).__name__, exc)

        task.add_done_callback(done)

    async def _watch(self, slot: Slot, agent: AgentProcess) -> None:
        """Restart an agent that died on its own, and say so."""
        await agent.exited.wait()
        if agent.stopping or not self.accepting:
            return
        async with slot.lock:
            if slot.agent is not agent:
                return  # someone (a reset) already replaced it
            code = agent.proc.returncode if agent.proc else "?"
            slot.state = SlotState.RESTARTING
            if not await self._restart_agent(slot, f"agent died (code {code})"):
                return
            slot.restarts += 1
            slot.last_error = f"agent died unexpectedly (code {code}); restarted"
            log.warning("slot %d: %s (restart %d)", slot.index, slot.last_error, slot.restarts)
            self._offer(slot)

    async def _restart_agent(self, slot: Slot, why: str) -> bool:
        """Start a fresh agent for the slot (caller holds its lock); a failure marks it broken."""
        try:
            await self._start_agent(slot)
            return True
        except (AgentDied, OSError) as exc:
            slot.state = SlotState.BROKEN
            slot.last_error = f"{why}; agent could not be restarted: {exc}"
            log.error("slot %d: %s", slot.index, slot.last_error)
            return False

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for slot in self.slots:
                if slot.state == SlotState.LEASED and slot.confirm_by is not None and now > slot.confirm_by:
                    log.info("slot %d: grant to %s not confirmed within its time (its client never got it?); "
                             "taken back", slot.index, slot.trajectory_id or "(no trajectory)")
                    slot.state = SlotState.EXPIRING
                    self._spawn(self._free(slot, reset=False), f"slot {slot.index}: unconfirmed grant taken back")
                elif slot.state == SlotState.LEASED and slot.expires_in(now) == 0:
                    log.info("slot %d: lease of %s expired after %.0fs idle; resetting", slot.index,
                             slot.trajectory_id or "(no trajectory)", slot.ttl)
                    slot.state = SlotState.EXPIRING  # not expired twice while its reset runs
                    self._spawn(self._free(slot, reset=True), f"slot {slot.index}: reset after lease expiry")

    # --- leases ------------------------------------------------------------------

    async def acquire(self, asked: AcquireRequest, still_there: Callable[[], bool] = lambda: True) -> Grant:
        """A free slot now; else, with `asked.wait`, the first slot that frees up within
        that time, first come first served among the requests waiting here. A request
        whose client has gone (`still_there`) is passed over: it gets nothing."""
        if not self.accepting:
            raise NoFreeSlot("node server is shutting down")
        if asked.ttl is not None and not 1 <= asked.ttl <= MAX_LEASE_TTL:
            raise BadRequest(f"ttl must be between 1 and {MAX_LEASE_TTL:.0f} seconds")
        for slot in self.slots:
            if slot.state == SlotState.FREE:
                return self._lease(slot, asked)
        if asked.wait <= 0:
            raise NoFreeSlot(f"all {len(self.slots)} slots are leased or restarting")
        entry = _Waiting(asyncio.get_running_loop().create_future(), asked, still_there)
        self._waiting.append(entry)
        deadline = time.monotonic() + asked.wait
        try:
            while not entry.future.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Woken by a grant, or every second to see whether the client is still there.
                await asyncio.wait({entry.future}, timeout=min(1.0, left))
                if not entry.future.done() and not still_there():
                    break
        except asyncio.CancelledError:
            if entry.future.done() and not entry.future.cancelled():
                self._spawn(self._free(self.slots[entry.future.result().slot], reset=False),
                            "a grant whose request was cancelled")
            entry.future.cancel()
            raise
        if entry.future.done() and not entry.future.cancelled():
            return entry.future.result()
        entry.future.cancel()  # _offer passes over it
        if not self.accepting:
            raise NoFreeSlot("node server is shutting down")
        raise NoFreeSlot(f"no slot of {len(self.slots)} freed up within {asked.wait:.0f}s")

    def _lease(self, slot: Slot, asked: AcquireRequest) -> Grant:
        slot.state = SlotState.LEASED
        slot.lease = secrets.token_urlsafe(18)
        slot.trajectory_id = asked.trajectory_id
        slot.ttl = DEFAULT_LEASE_TTL if asked.ttl is None else asked.ttl
        slot.last_used = time.monotonic()
        slot.confirm_by = slot.last_used + asked.confirm_within
        slot.used = False
        slot.results.clear()
        free = sum(1 for other in self.slots if other.state == SlotState.FREE)
        return Grant(slot.index, slot.lease, slot.ttl, free=free)

    def _offer(self, slot: Slot) -> None:
        """A slot just became free: the oldest request still waiting here gets it."""
        while slot.state == SlotState.FREE and self._waiting:
            entry = self._waiting.popleft()
            if entry.future.done():
                continue  # gave up (timeout, client gone, server stopping)
            if not entry.still_there():
                entry.future.cancel()
                continue
            entry.future.set_result(self._lease(slot, entry.asked))

    def leased(self, index: int, lease: str | None) -> Slot:
        """The slot, if `lease` is its current lease; renews the lease."""
        if not 0 <= index < len(self.slots):
            raise NotFound(f"no slot {index} (this server has slots 0-{len(self.slots) - 1})")
        slot = self.slots[index]
        if not lease:
            raise LeaseLost(f"slot {index}: a lease is required (acquire the slot first)")
        if slot.lease is None or not secrets.compare_digest(slot.lease, lease):
            raise LeaseLost(f"slot {index}: lease is not current (it expired, was released, or belongs to someone else)")
        slot.last_used = time.monotonic()
        slot.confirm_by = None  # its client has it
        return slot

    def rename(self, slot: Slot, trajectory_id: str | None) -> None:
        """The leased slot's holder, named by its client (see protocol.RenewRequest)."""
        if trajectory_id != slot.trajectory_id:
            log.info("slot %d: held by %s (leased as %s)", slot.index, trajectory_id or "(no trajectory)",
                     slot.trajectory_id or "(no trajectory)")
            slot.trajectory_id = trajectory_id

    async def release(self, slot: Slot, reset: bool) -> None:
        await self._free(slot, reset)

    async def _free(self, slot: Slot, reset: bool) -> None:
        """End a lease. The lease is gone whatever happens next: an agent that cannot
        be restarted leaves the slot `broken` (with its reason), not the caller in doubt.

        The slot's processes end either way (a background loop of one holder must not
        run into the next one's lease); `reset` says whether its files go too."""
        slot.lease = None
        slot.trajectory_id = None
        slot.results.clear()
        slot.confirm_by = None
        if (not slot.used and slot.state in (SlotState.LEASED, SlotState.EXPIRING) and slot.agent is not None
                and slot.agent.alive):
            # Nothing ran under this lease (a grant nobody wanted, or not confirmed): no
            # process to end and no file to wipe, so no restart.
            slot.state = SlotState.FREE
            self._offer(slot)
            return
        try:
            await self.reset(slot, keep_lease=False, wipe=reset)
        except AgentDied as exc:
            log.error("slot %d: %s after release failed: %s", slot.index, "reset" if reset else "restart", exc)

    async def reset(self, slot: Slot, keep_lease: bool = True, wipe: bool = True) -> None:
        """End the slot's processes, wipe the workspace (if `wipe`); the agent stays
        when it can end them all itself (its `reset` tool), else it is replaced."""
        async with slot.lock:
            slot.state = SlotState.RESETTING
            kept = await self._reset_in_place(slot)
            if not kept and slot.agent:
                await slot.agent.stop()
            if not kept and host_scratch(slot.workspace).is_dir():  # runtime none's: a folder here
                await asyncio.to_thread(_wipe, host_scratch(slot.workspace))
            if wipe:
                await asyncio.to_thread(_wipe, slot.workspace)
            if not kept and not await self._restart_agent(slot, "reset" if wipe else "restart"):
                raise AgentDied(slot.last_error or "agent could not be restarted")
            slot.quiet_at = slot.measured_at = None
            slot.state = SlotState.LEASED if keep_lease and slot.lease else SlotState.FREE
            slot.last_used = time.monotonic()
            self._offer(slot)

    async def _reset_in_place(self, slot: Slot) -> bool:
        """Have the slot's own agent end every process of its commands: a handover in
        milliseconds instead of a new agent's start-up (about 0.2 s, seconds under
        Apptainer). False when it cannot (no live agent, a stuck one, a slot that keeps
        spawning): then the agent is replaced."""
        agent = slot.agent
        if agent is None or not agent.alive or agent.stopping or getattr(agent, "stuck", None):
            return False
        try:
            await agent.call("reset", {}, RESET_TIMEOUT)
        except (AgentError, AgentDied, AgentStuck) as exc:
            log.info("slot %d: reset in place failed (%s); replacing its agent", slot.index, exc)
            return False
        return True

    # --- execution ---------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, slot: Slot, timeout: float | None = None) -> Iterator[None]:
        """Count one piece of work (a call, a file transfer) against the server's
        concurrency limit; while it runs, the slot's lease does not expire, up to
        `timeout` plus the grace after which a silent agent is given up on."""
        if self.in_flight >= self.max_concurrent:
            raise LimitExceeded(f"node server is running its limit of {self.max_concurrent} calls; retry later")
        deadline = time.monotonic() + timeout + STUCK_GRACE_SECONDS if timeout else math.inf
        self.in_flight += 1
        slot.in_flight += 1
        slot.used = True
        slot.deadlines.append(deadline)
        try:
            yield
        finally:
            self.in_flight -= 1
            slot.in_flight -= 1
            slot.deadlines.remove(deadline)
            slot.last_used = time.monotonic()

    async def execute(self, call: Call, output: OutputSink | None = None,
                      admitted: Callable[[], None] | None = None) -> CallAnswer:
        """Run one call (or return the first result for a repeated exec id).

        A streamed call passes `output` (its chunks go there as the agent sends them)
        and `admitted`, called once every check has passed (lease, tool, the server's
        limits) and before anything runs: up to then a refusal is raised as for a
        plain call; from then on everything is in the answer. A repeated exec id gets
        the first run's answer and no output."""
        slot = self.leased(call.slot, call.lease)
        if call.tool not in TOOLS:
            raise BadRequest(f"unknown tool {call.tool!r}; valid tools: {', '.join(TOOLS)}")
        first = slot.results.get(call.exec_id)
        if first is not None and not first.cancelled():
            if admitted is not None:
                admitted()
            return await asyncio.shield(first)
        with self.running(slot, call.timeout):
            if admitted is not None:
                admitted()
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            slot.results[call.exec_id] = future
            while len(slot.results) > REMEMBERED_EXEC_IDS:
                slot.results.popitem(last=False)
            try:
                answer = await self._run(slot, call, output)
            except BaseException:
                # No result (the caller went away, the server is stopping): forget the id
                # so that a retry runs the call instead of waiting on nothing.
                slot.results.pop(call.exec_id, None)
                future.cancel()
                raise
        future.set_result(answer)
        return answer

    async def _run(self, slot: Slot, call: Call, output: OutputSink | None = None) -> CallAnswer:
        if slot.state in (SlotState.RESTARTING, SlotState.RESETTING):
            async with slot.lock:  # wait for the fresh agent rather than fail the call
                pass
        agent = slot.agent
        if slot.state != SlotState.LEASED or agent is None:
            return CallAnswer.failure(call, ErrorKind.SLOT_UNAVAILABLE,
                                      f"slot {slot.index} is {slot.state}: {slot.last_error or ''}".rstrip(": "))
        started = time.monotonic()
        oom_before = oom_kills() if call.tool == "bash" else None
        try:
            result = await agent.call(call.tool, call.args, call.timeout, output)
            answer = CallAnswer.success(call, result)
            # Only a command the call ran can have been killed under it (a `process`
            # answer that reports a background process's signal is just a report).
            if call.tool == "bash":
                bash = BashResult.from_json(result)
                breach = self._breach_of(slot, started, bash)
                if breach:
                    return CallAnswer.failure(call, ErrorKind.LIMIT_EXCEEDED, breach)
                if bash.killed_by_signal:
                    if bash.signal == signal.SIGKILL and _grew(oom_before, oom_kills()):
                        return CallAnswer.failure(call, ErrorKind.LIMIT_EXCEEDED, KERNEL_OOM)
                    # Killed by a signal nobody here sent: perhaps the job's own SIGTERM,
                    # which reaches commands and this server at the same moment.
                    await _wait_briefly(self.stopping, 0.5)
        except AgentError as exc:
            answer = CallAnswer.failure(call, exc.kind, exc.message)
        except AgentStuck as exc:
            await self._replace_stuck(slot, agent)
            answer = CallAnswer.failure(call, AgentStuck.kind,
                                        f"{exc}; the slot's agent is being restarted (its workspace is kept)")
        except AgentDied as exc:
            # Under a batch scheduler the agent may die of the job's SIGTERM a moment
            # before the server hears of it: give that signal a moment to arrive.
            if not await _wait_briefly(self.stopping, 0.5):
                return CallAnswer.failure(call, AgentDied.kind, f"{exc}; the slot's agent is being restarted")
        if self.stopping.is_set():
            return CallAnswer.failure(call, ErrorKind.SERVER_STOPPING, (
                "the node server is stopping (SIGTERM: its job was cancelled, preempted or reached its "
                "walltime); the command was killed"))
        return answer

    async def _replace_stuck(self, slot: Slot, agent: AgentProcess) -> None:
        """Kill an agent that stopped answering and start a fresh one, in the
        background: the call that found it stuck is answered at once, while the
        slot's next call waits for the fresh agent (state `restarting`, lock held)."""
        # asyncio.Lock has no owner: taken here (at once, unless a reset or release
        # holds it) so that no call slips in before the restart, released by it.
        await slot.lock.acquire()
        if slot.agent is not agent or agent.stopping:
            slot.lock.release()  # already replaced, or being stopped by whoever held the lock
            return
        slot.state = SlotState.RESTARTING
        why = agent.stuck or "agent stopped answering"

        async def restart() -> None:
            try:
                await agent.stop()  # at once: a stuck agent is killed, with its whole tree
                if await self._restart_agent(slot, why):
                    slot.restarts += 1
                    slot.last_error = f"{why}; restarted"
                    log.warning("slot %d: %s (restart %d)", slot.index, slot.last_error, slot.restarts)
            finally:
                slot.lock.release()

        self._spawn(restart(), f"slot {slot.index}: restart of a stuck agent")

    # --- limits ------------------------------------------------------------------

    async def _keep_limits(self) -> None:
        """The watchdog's loop: a round every WATCH_INTERVAL over the slots where
        something may run; none at all while every slot is free or quiet."""
        assert self.watchdog is not None
        rounds = 0
        disk_limit = self.limits.disk_mb is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            rounds += 1
            disk_round = rounds % DISK_EVERY == 0
            views, marks = [], []
            for slot in self.slots:
                agent = slot.agent
                if slot.state != SlotState.LEASED or agent is None or not agent.alive or agent.infra is None:
                    continue
                busy = bool(slot.in_flight)
                scan = busy or slot.quiet_at != slot.last_used
                measure = disk_limit and (busy or slot.measured_at != slot.last_used)
                if not scan and not (measure and disk_round):
                    continue  # nothing has run in it since a round found it empty (and measured it)
                views.append(SlotView(slot.index, agent.pid or 0, agent.infra, slot.workspace,
                                      measure_disk=measure, tmpdir=self._tmpdir(slot), cgroup=slot.cgroup))
                marks.append((slot, agent, busy, slot.last_used))
            if not views:
                continue
            self._round = asyncio.ensure_future(self._watch_round(views, marks, disk_round))
            try:
                await asyncio.shield(self._round)
            except Exception as exc:  # a bad round must not end the watchdog
                log.error("limit watchdog: %s: %s", type(exc).__name__, exc)

    def _tmpdir(self, slot: Slot) -> Path | None:
        """The slot's TMPDIR on the node's disk, when its runtime gives it one there."""
        tmpdir = host_scratch(slot.workspace)
        return tmpdir if str(tmpdir) in self.runtime.scratch(slot.workspace) else None

    async def _watch_round(self, views: list[SlotView], marks: list, disk_round: bool) -> None:
        assert self.watchdog is not None
        findings = await asyncio.to_thread(self.watchdog.check, views, disk_round)
        for finding, (slot, agent, busy, last_used) in zip(findings, marks):
            if slot.agent is not agent or finding.index != slot.index:
                continue  # replaced meanwhile: its marks start over
            if finding.breach:
                slot.last_error = finding.breach
                log.warning("slot %d: %s", slot.index, finding.breach)
                slot.quiet_at = slot.measured_at = None
                continue
            empty = not busy and finding.processes == 0
            slot.quiet_at = last_used if empty else None
            if finding.disk_measured:
                slot.measured_at = last_used if empty else None

    def _breach_of(self, slot: Slot, started: float, bash: BashResult) -> str | None:
        """The limit breach that killed part of a `bash` call started at `started`, if
        any: whatever its exit code (a session's shell, a call that waited for a process
        it moved to a group of its own, goes on after the kill). The watchdog records a
        kill before it signals, so a call it cut short finds it here.

        A kill matches the call when it killed a process carrying the call's tag (at
        any time: the tag is the command's alone), or every command of the slot while
        the call ran; one whose processes' tags could not be read, when the call came
        back killed by a signal. A kill of another process (a background one, a job an
        earlier session command left running) fails no call."""
        if self.watchdog is None:
            return None
        for kill in reversed(self.watchdog.kills(slot.index)):
            if kill.calls and bash.call in kill.calls:
                return kill.message
            if kill.at >= started and (kill.calls is None or (not kill.calls and bash.killed_by_signal)):
                return kill.message
        return None

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [slot.describe(now) for slot in self.slots]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self.slots:
            counts[slot.state] = counts.get(slot.state, 0) + 1
        return counts


def _grew(before: int | None, after: int | None) -> bool:
    return before is not None and after is not None and after > before


async def _wait_briefly(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


def _emptied(cgroup: SlotCgroup) -> None:
    cgroup.kill()
    cgroup.make()


def _wipe(folder: Path) -> None:
    """Empty a workspace or a scratch folder, as the agent empties its own (never
    following a symlink out of it, opening up what the last holder locked)."""
    if folder.is_symlink():
        folder.unlink()
    try:
        empty_folder(str(folder))
    except OSError as exc:
        log.error("cannot empty %s: %s", folder, exc)
