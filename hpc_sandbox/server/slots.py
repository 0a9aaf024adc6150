"""The node server's core: slots, their agents, leases and execution ids.

Slot ownership lives here and nowhere else. Acquiring a slot returns a lease; every
later call must carry it; a lease unused for its time-to-live expires and the slot
is reset and freed. Execution ids make retries safe: a repeated id gets the first
result (or waits for the first run to finish) and never runs twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequest, LeaseLost, LimitExceeded, NoFreeSlot, NotFound
from ..protocol import TOOLS, Call, CallAnswer, Grant
from ..runtime import SlotRuntime
from .agent_process import AgentDied, AgentError, AgentProcess

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 600.0
MAX_LEASE_TTL = 7 * 24 * 3600.0
REMEMBERED_EXEC_IDS = 2048  # per slot


@dataclass
class Slot:
    index: int
    workspace: Path
    agent: AgentProcess | None = None
    state: str = "starting"  # starting | free | leased | restarting | resetting | broken
    lease: str | None = None
    trajectory_id: str | None = None
    ttl: float = DEFAULT_LEASE_TTL
    last_used: float = 0.0
    in_flight: int = 0
    restarts: int = 0
    last_error: str | None = None
    results: OrderedDict = field(default_factory=OrderedDict)  # exec id -> Future of a CallAnswer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises start/stop/reset

    def expires_in(self, now: float) -> float | None:
        if self.state != "leased":
            return None
        if self.in_flight:
            return self.ttl  # a running call keeps the lease alive
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


class SlotTable:
    def __init__(self, runtime: SlotRuntime, workspace_root: Path, slots: int, *,
                 max_concurrent: int = 256, agent_start_timeout: float = 120.0) -> None:
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

    async def stop(self) -> None:
        """Stop taking work, kill running commands, stop every agent."""
        self.accepting = False
        self.stopping.set()
        if self._expiry_task:
            self._expiry_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(slot.agent.stop() for slot in self.slots if slot.agent), return_exceptions=True)

    async def _start_agent(self, slot: Slot) -> None:
        argv, env = self.runtime.agent_command(slot.workspace, slot.index)
        agent = AgentProcess(argv, env, cwd=str(slot.workspace), name=f"slot {slot.index}")
        await agent.start(self.agent_start_timeout)
        slot.agent = agent
        if slot.state in ("starting", "restarting", "resetting", "broken"):
            slot.state = "leased" if slot.lease else "free"
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
            slot.state = "restarting"
            if not await self._restart_agent(slot, f"agent died (code {code})"):
                return
            slot.restarts += 1
            slot.last_error = f"agent died unexpectedly (code {code}); restarted"
            log.warning("slot %d: %s (restart %d)", slot.index, slot.last_error, slot.restarts)

    async def _restart_agent(self, slot: Slot, why: str) -> bool:
        """Start a fresh agent for the slot (caller holds its lock); a failure marks it broken."""
        try:
            await self._start_agent(slot)
            return True
        except (AgentDied, OSError) as exc:
            slot.state = "broken"
            slot.last_error = f"{why}; agent could not be restarted: {exc}"
            log.error("slot %d: %s", slot.index, slot.last_error)
            return False

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for slot in self.slots:
                if slot.state == "leased" and not slot.in_flight and now > slot.last_used + slot.ttl:
                    log.info("slot %d: lease of %s expired after %.0fs idle; resetting", slot.index,
                             slot.trajectory_id or "(no trajectory)", slot.ttl)
                    slot.state = "expiring"  # not expired twice while its reset runs
                    self._spawn(self._free(slot, reset=True), f"slot {slot.index}: reset after lease expiry")

    # --- leases ------------------------------------------------------------------

    def acquire(self, trajectory_id: str | None, ttl: float | None) -> Grant:
        if not self.accepting:
            raise NoFreeSlot("node server is shutting down")
        ttl = DEFAULT_LEASE_TTL if ttl is None else float(ttl)
        if not 1 <= ttl <= MAX_LEASE_TTL:
            raise BadRequest(f"ttl must be between 1 and {MAX_LEASE_TTL:.0f} seconds")
        for slot in self.slots:
            if slot.state == "free":
                slot.state = "leased"
                slot.lease = secrets.token_urlsafe(18)
                slot.trajectory_id = trajectory_id
                slot.ttl = ttl
                slot.last_used = time.monotonic()
                slot.results.clear()
                return Grant(slot.index, slot.lease, slot.ttl)
        raise NoFreeSlot(f"all {len(self.slots)} slots are leased or restarting")

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
        return slot

    async def release(self, slot: Slot, reset: bool) -> None:
        await self._free(slot, reset)

    async def _free(self, slot: Slot, reset: bool) -> None:
        """End a lease. The lease is gone whatever happens next: an agent that cannot
        be restarted leaves the slot `broken` (with its reason), not the caller in doubt."""
        slot.lease = None
        slot.trajectory_id = None
        slot.results.clear()
        if reset:
            try:
                await self.reset(slot, keep_lease=False)
            except AgentDied as exc:
                log.error("slot %d: reset after release failed: %s", slot.index, exc)
        elif slot.state in ("leased", "expiring"):
            slot.state = "free"

    async def reset(self, slot: Slot, keep_lease: bool = True) -> None:
        """Stop the agent (killing its commands), wipe the workspace, start a fresh agent."""
        async with slot.lock:
            slot.state = "resetting"
            if slot.agent:
                await slot.agent.stop()
            await asyncio.to_thread(_wipe, slot.workspace)
            if not await self._restart_agent(slot, "reset"):
                raise AgentDied(slot.last_error or "agent could not be restarted")
            slot.state = "leased" if keep_lease and slot.lease else "free"
            slot.last_used = time.monotonic()

    # --- execution ---------------------------------------------------------------

    @contextlib.contextmanager
    def running(self, slot: Slot) -> Iterator[None]:
        """Count one piece of work (a call, a file transfer) against the server's
        concurrency limit; while it runs, the slot's lease does not expire."""
        if self.in_flight >= self.max_concurrent:
            raise LimitExceeded(f"node server is running its limit of {self.max_concurrent} calls; retry later")
        self.in_flight += 1
        slot.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            slot.in_flight -= 1
            slot.last_used = time.monotonic()

    async def execute(self, call: Call) -> CallAnswer:
        """Run one call (or return the first result for a repeated exec id)."""
        slot = self.leased(call.slot, call.lease)
        if call.tool not in TOOLS:
            raise BadRequest(f"unknown tool {call.tool!r}; valid tools: {', '.join(TOOLS)}")
        first = slot.results.get(call.exec_id)
        if first is not None and not first.cancelled():
            return await asyncio.shield(first)
        with self.running(slot):
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            slot.results[call.exec_id] = future
            while len(slot.results) > REMEMBERED_EXEC_IDS:
                slot.results.popitem(last=False)
            try:
                answer = await self._run(slot, call)
            except BaseException:
                # No result (the caller went away, the server is stopping): forget the id
                # so that a retry runs the call instead of waiting on nothing.
                slot.results.pop(call.exec_id, None)
                future.cancel()
                raise
        future.set_result(answer)
        return answer

    async def _run(self, slot: Slot, call: Call) -> CallAnswer:
        if slot.state in ("restarting", "resetting"):
            async with slot.lock:  # wait for the fresh agent rather than fail the call
                pass
        if slot.state != "leased" or slot.agent is None:
            return CallAnswer.failure(call, "slot_unavailable",
                                      f"slot {slot.index} is {slot.state}: {slot.last_error or ''}".rstrip(": "))
        try:
            result = await slot.agent.call(call.tool, call.args, call.timeout)
            answer = CallAnswer.success(call, result)
            if result.get("signal") and not result.get("timed_out"):
                # Killed by a signal nobody here sent: perhaps the job's own SIGTERM,
                # which reaches commands and this server at the same moment.
                await _wait_briefly(self.stopping, 0.5)
        except AgentError as exc:
            answer = CallAnswer.failure(call, exc.kind, exc.message)
        except AgentDied as exc:
            # Under a batch scheduler the agent may die of the job's SIGTERM a moment
            # before the server hears of it: give that signal a moment to arrive.
            if not await _wait_briefly(self.stopping, 0.5):
                return CallAnswer.failure(call, "agent_died", f"{exc}; the slot's agent is being restarted")
        if self.stopping.is_set():
            return CallAnswer.failure(call, "server_stopping", (
                "the node server is stopping (SIGTERM: its job was cancelled, preempted or reached its "
                "walltime); the command was killed"))
        return answer

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [slot.describe(now) for slot in self.slots]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slot in self.slots:
            counts[slot.state] = counts.get(slot.state, 0) + 1
        return counts


async def _wait_briefly(event: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


def _wipe(workspace: Path) -> None:
    """Empty a workspace (not following symlinks out of it)."""
    if workspace.is_symlink() or not workspace.exists():
        workspace.unlink(missing_ok=True)
        workspace.mkdir(parents=True)
        return
    for child in workspace.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
