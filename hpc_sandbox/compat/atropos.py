"""A drop-in `ToolBackend` for Atropos environments, over SlotPool
(the interface as the integration calls it: ../shared/ATROPOS_TOOLBACKEND.md).

    async with HpcSandboxBackend(scheduler="local", slots=8) as backend:   # a job per profile
        slot = await backend.acquire("traj-1")
        results = await backend.execute_batch([
            (slot, "write_file", {"path": "a.py", "content": "print(1)"}),
            (slot, "bash", {"command": "python3 a.py"})])
        tool_results = [r.to_tool_result() for r in results]
        await backend.release(slot, reset_workspace=True)
    # the context manager's exit is stop(purge=True), even when the block raised

What each member maps to (nothing here runs a command, opens a file or keeps a slot):

    start(profiles_to_start) / stop(purge)   compat/profiles.py: a pool per profile, given, or
                                   over a job submitted for it on first use (lazy)
    acquire / release              SlotPool.acquire / release -> Slot (atropos_types.py);
                                   no slot in time: AcquireTimeout, a TimeoutError
    execute_batch                  per slot in request order, slots side by side:
      bash                         agent bash
      bash_stateful                agent bash in the slot's session "main"
      tmux                         compat/tmux.py (real tmux in the slot, else a session)
      read_file, write_file        compat/atropos_files.py (the environments' words)
      any other agent tool         as is; its answer as JSON
    read/list/archive_artifacts    compat/atropos_files.py: dicts, failures as success False
    get_status / list_profiles     sync: what is known without asking a node server

A call's policy flags (allow_network=False, require_sandbox, require_stateful_sandbox)
are checked against what one probe found at the slot's first acquire (atropos_types.
SlotFacts): a slot that cannot keep one answers with an error and never runs the call.
"""
from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ErrorKind, HpcSandboxError, NoCapacity
from ..models import Slot as Lease
from ..models import ToolResult as PoolResult
from ..pool import SlotPool, ToolCall
from . import atropos_files as files
from .atropos_profiles import (Life, pool_status, profile_settings, read_profiles_file, settings_of,
                               warn_unstopped)
from .atropos_types import (POLICY_FLAGS, PROBE, PROBE_TIMEOUT, AcquireTimeout, CompatToolResult, ExecutionResult,
                            Slot, SlotFacts, SlotState, capped, command_result, failed, policy_refusal, refused)
from .profiles import Profile, ProfilePools, profiles_of
from .tmux import TMUX_IDLE, TerminalCall, Terminals, TmuxMode, agent_session_name

log = logging.getLogger(__name__)

# The per-call timeout when a batch names none. The interface's usual 30 s is shorter
# than one test-suite run of a small project (attrs) on a loaded node, or a pip install
# into a fresh venv, both ordinary rollout steps: a call cut at 30 s fails the step for
# nothing. Five minutes still frees a slot from a hung command within one rollout turn.
DEFAULT_TIMEOUT_S = 300.0
STATEFUL_SESSION = "main"  # bash_stateful's session: one per slot, so one per trajectory
TMUX_MODES = tuple(mode.value for mode in TmuxMode)
COMMAND_TOOLS = ("bash", "bash_stateful", "tmux")
# Kinds after which the slot is not usable as it was: its Slot says state "error".
BROKEN = (ErrorKind.LEASE_LOST, ErrorKind.SERVER_GONE, ErrorKind.JOB_ENDED, ErrorKind.SLOT_UNAVAILABLE,
          ErrorKind.AGENT_DIED, ErrorKind.AGENT_STUCK)


@dataclass
class _Request:
    slot: Slot | None
    tool: str
    args: dict[str, Any]
    timeout: Any  # as the caller gave it: the timeout error quotes it
    refusal: ExecutionResult | None = None  # answered without a call


class HpcSandboxBackend:
    """The `ToolBackend` of Atropos environments, served by hpc-sandbox slots.

    `HpcSandboxBackend(pool)` serves a SlotPool given (its jobs are not ours to cancel);
    `HpcSandboxBackend(profile="gpu", array=4)` submits a job of config profile "gpu"
    with SandboxSpec overrides at start() (stop(purge=True) cancels it). Several
    profiles: `with_profiles`. An async context manager (exit: stop(purge=True))."""

    def __init__(self, pool: SlotPool | Any = None, *, profile: str | None = None,
                 config_file: str | Path | None = None, wait_timeout: float = 600.0,
                 acquire_timeout: float = 300.0, lease_ttl: float | None = None,
                 default_timeout_s: float | None = DEFAULT_TIMEOUT_S, stateful_session: str = STATEFUL_SESSION,
                 tmux_idle: float = TMUX_IDLE, tmux: str = "auto", overflow: str | None = None,
                 cloud_settings: Mapping[str, Any] | None = None, **job_overrides: Any) -> None:
        """`pool`: a SlotPool to serve from, or a ModalSandboxConfig-like object whose
        settings join `job_overrides` (atropos_profiles.py). `default_timeout_s`: a call's
        timeout when its batch names none; `tmux`: "auto" (real tmux where the slot has
        it, else a session), "session" or "tmux"."""
        if pool is not None and not isinstance(pool, SlotPool):
            job_overrides, pool = {**profile_settings(pool), **job_overrides}, None
        if pool is not None and (job_overrides or overflow):
            raise ConfigError("give a SlotPool, or a profile with job overrides to submit, not both")
        settings = None if pool is not None else settings_of(profile or "default", job_overrides, named=profile)
        entry = Profile(profile or "default", config_profile=profile, pool=pool, settings=settings,
                        overrides=settings.overrides if settings else {})
        self._configure({entry.name: entry}, entry.name, config_file=config_file, wait_timeout=wait_timeout,
                        acquire_timeout=acquire_timeout, lease_ttl=lease_ttl, default_timeout_s=default_timeout_s,
                        stateful_session=stateful_session, tmux_idle=tmux_idle, tmux=tmux, overflow=overflow,
                        cloud_settings=cloud_settings)

    def _configure(self, profiles: dict[str, Profile], default: str, *,
                   default_timeout_s: float | None = DEFAULT_TIMEOUT_S, stateful_session: str = STATEFUL_SESSION,
                   tmux_idle: float = TMUX_IDLE, tmux: str = "auto", **pool_options: Any) -> None:
        if tmux not in TMUX_MODES:
            raise ConfigError(f"tmux must be one of {', '.join(TMUX_MODES)}; got {tmux!r}")
        self._pools = ProfilePools(profiles, default, **pool_options)
        self.default_profile = default
        self.app_name: str | None = None
        self._default_timeout_s = default_timeout_s
        self.stateful_session = agent_session_name(stateful_session)
        self._held: dict[str, Slot] = {}
        self._facts: dict[str, SlotFacts] = {}
        self._terminals = Terminals(TmuxMode(tmux), tmux_idle)
        self._started = False
        self._lock = asyncio.Lock()
        self._life = Life()
        weakref.finalize(self, warn_unstopped, self._pools, self._life)

    @classmethod
    def with_profiles(cls, app_name: str | None = None, profiles: Mapping[str, Any] | None = None,
                      default_profile: str = "default", profiles_file: str | Path | None = None,
                      **options: Any) -> "HpcSandboxBackend":
        """Several profiles, a pool each. `profiles`: {name: a SlotPool, or settings (a
        ModalSandboxConfig-like object or a dict: see compat/atropos_profiles.py), or
        None}; else read from `profiles_file` (YAML `profiles: {name: {...}}`), else the
        config's "default" profile alone. `default_profile` serves acquire() without a
        profile (the first profile when there is none of that name). `app_name` names
        Modal apps; hpc-sandbox jobs are named by their profiles (job_name), so it is
        kept for status only. `options` are the constructor's."""
        if profiles is None:
            profiles = read_profiles_file(profiles_file) if profiles_file is not None else {"default": None}
        entries = profiles_of(profiles)
        if default_profile not in entries:
            log.info("no profile %r: %r serves acquire() without a profile", default_profile, next(iter(entries)))
            default_profile = next(iter(entries))
        backend = cls.__new__(cls)
        backend._configure(entries, default_profile, **options)
        backend.app_name = app_name
        return backend

    @property
    def default_timeout_s(self) -> float | None:
        """The default profile's execution_timeout_s when it sets one, else the backend's."""
        settings = self._pools.entry(None).settings
        if settings is not None and settings.execution_timeout is not None:
            return settings.execution_timeout
        return self._default_timeout_s

    def _timeout_of(self, slot: Slot | None) -> float | None:
        """A call's timeout when its batch names none: its profile's execution_timeout_s, else the default."""
        entry = self._pools.entries.get(slot.profile or "") if slot is not None else None
        if entry is not None and entry.settings is not None and entry.settings.execution_timeout is not None:
            return entry.settings.execution_timeout
        return self._default_timeout_s

    def list_profiles(self) -> dict[str, dict[str, Any]]:
        return {name: {**(entry.settings.shown if entry.settings else dict.fromkeys(("image", "gpu", "cpu", "memory"))),
                       "slots_per_sandbox": entry.settings.shown.get("slots") if entry.settings else None,
                       "active": entry.started, "default": name == self.default_profile}
                for name, entry in self._pools.entries.items()}

    @property
    def pools(self) -> dict[str, SlotPool | None]:
        return self._pools.pools

    @property
    def jobs(self) -> list[Any]:
        """The jobs this backend submitted that no stop(purge=True) has cancelled yet."""
        return self._pools.jobs

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, profiles_to_start: list[str] | None = None) -> None:
        """Start the default profile (or those named; unknown names are skipped with a
        warning); the others start on their first acquire. A second call does nothing.
        A profile that fails to start leaves nothing behind (pools stopped, jobs cancelled)."""
        async with self._lock:
            if self._started:
                return
            names = [self.default_profile] if profiles_to_start is None else []
            for name in profiles_to_start or []:
                if name in self._pools.entries:
                    names.append(name)
                else:
                    log.warning("start: no profile %r (this backend has %s): skipped", name,
                                ", ".join(self._pools.entries))
            try:
                await self._pools.start(names)
            except BaseException:
                await asyncio.shield(self._teardown(purge=True))
                raise
            self._started = self._life.running = True

    async def stop(self, *, purge: bool = False) -> None:
        """Stop the pools (slots still held are released, reset, unless their job is being
        cancelled). With `purge`, the jobs this backend submitted are cancelled; without,
        they keep running and a later start() attaches to them again."""
        async with self._lock:
            self._started = False
            await asyncio.shield(self._teardown(purge))

    async def _teardown(self, purge: bool) -> None:
        staying = self._pools.staying(purge)
        held = [slot for slot in self._held.values() if slot.profile in staying]
        await asyncio.gather(*(self.release(slot, reset_workspace=True) for slot in held), return_exceptions=True)
        for slot in list(self._held.values()):
            self._forget(slot)
        await self._pools.stop(purge)
        self._life.running = False

    async def __aenter__(self) -> "HpcSandboxBackend":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(purge=True)

    # --- slots ----------------------------------------------------------------------------

    async def acquire(self, trajectory_id: str | None = None, profile: str | None = None) -> Slot:
        """A slot of `profile` (default: the default profile, started here if it is not yet);
        AcquireTimeout (a TimeoutError) when none comes within the acquire timeout."""
        entry = self._pools.entry(profile)
        pool = await self._pools.ensure(entry)
        self._life.running = True
        timeout = entry.settings.acquire_timeout if entry.settings else None
        try:
            lease = await pool.acquire(trajectory_id=trajectory_id, profile=entry.name, timeout=timeout)
        except NoCapacity as exc:
            raise AcquireTimeout(str(exc)) from exc
        facts = self._facts.get(lease.id)
        if facts is None:
            facts = SlotFacts.read(lease, await pool.execute(lease, "bash", {"command": PROBE}, PROBE_TIMEOUT))
            if facts.network != "unknown":
                self._facts[lease.id] = facts
        slot = Slot(slot_id=lease.id, alloc_id=f"{lease.endpoint.job_id}/{lease.endpoint.name}",
                    container_addr=lease.endpoint.url, workspace_dir=facts.workspace_dir, state=SlotState.ACQUIRED,
                    trajectory_id=trajectory_id, lease=lease,
                    metadata={"profile": entry.name, "location": lease.location, "network": facts.network,
                              "sandboxed": facts.sandboxed})
        self._held[slot.slot_id] = slot
        return slot

    def _lease(self, slot: Slot) -> Slot | None:  # the held Slot for one given back (from_dict too)
        held = self._held.get(getattr(slot, "slot_id", None))  # type: ignore[arg-type]
        return held if held is not None and held.lease is not None else None

    def _forget(self, slot: Slot) -> str | None:  # the tmux socket folder its lease left, if any
        self._held.pop(slot.slot_id, None)
        return self._terminals.forget(slot.slot_id)

    async def release(self, slot: Slot, *, reset_workspace: bool = False) -> None:
        """Give the slot back: its sessions and processes end (a tmux server too); its
        workspace is wiped when `reset_workspace`."""
        held = self._lease(slot)
        if held is None:
            log.warning("release: slot %s is not held by this backend (released already?)", slot)
            return
        held.state = slot.state = SlotState.RELEASING
        folder = self._forget(held)
        pool = self._pools.pool_of(held.profile or self.default_profile)
        assert held.lease is not None
        try:
            await Terminals.clear_folder(pool, held.lease, folder)
            await pool.release(held.lease, reset_workspace=reset_workspace)
        finally:
            held.state = slot.state = SlotState.AVAILABLE

    # --- tool calls -----------------------------------------------------------------------

    async def execute(self, slot: Slot, tool: str, args: Mapping[str, Any] | None = None,
                      timeout_s: float | None = None) -> ExecutionResult:
        return (await self.execute_batch([(slot, tool, dict(args or {}))], timeout_s=timeout_s))[0]

    async def execute_batch(self, requests: Sequence[Any], *, timeout_s: float | None = None
                            ) -> list[ExecutionResult]:
        """Results in request order; a call that fails is its own result, never an
        exception. Calls on different slots run at once; those of one slot one after the
        other, in request order (a write_file before the bash that runs the file)."""
        wanted = [self._request(request, timeout_s) for request in requests]
        results: list[ExecutionResult | None] = [r.refusal for r in wanted]
        queues: dict[str, list[int]] = {}
        for position, request in enumerate(wanted):
            if request.refusal is None and request.slot is not None:
                queues.setdefault(request.slot.slot_id, []).append(position)
        busy = [self._held[slot_id] for slot_id in queues]
        for slot in busy:
            slot.state = SlotState.EXECUTING
        try:
            for depth in range(max((len(queue) for queue in queues.values()), default=0)):
                await self._round(wanted, [q[depth] for q in queues.values() if depth < len(q)], results)
        finally:
            for slot in busy:
                if slot.state is SlotState.EXECUTING:
                    slot.state = SlotState.ACQUIRED
        for position, result in enumerate(results):
            slot = wanted[position].slot
            if result is not None and slot is not None and result.metadata.get("error_kind") in BROKEN:
                slot.state = SlotState.ERROR
        return results  # type: ignore[return-value]  (every position is filled)

    def _request(self, request: Any, timeout: Any) -> _Request:
        """A request read: (slot, tool, args[, timeout]) or a dict with slot, tool (or
        tool_name), args (or arguments: a dict or its JSON), timeout. What cannot be
        served is answered here (`refusal`), never raised."""
        slot: Any = None
        tool: Any = None
        args: Any = None
        own_timeout: Any = None
        if isinstance(request, Mapping):
            slot, tool = request.get("slot"), request.get("tool", request.get("tool_name"))
            args, own_timeout = request.get("args", request.get("arguments")), request.get("timeout")
        elif isinstance(request, (tuple, list)) and len(request) in (3, 4):
            slot, tool, args = request[:3]
            own_timeout = request[3] if len(request) == 4 else None
        held = self._lease(slot) if isinstance(slot, Slot) else None
        if own_timeout is not None:
            timeout = own_timeout
        elif timeout is None:
            timeout = self._timeout_of(held)
        stand_in = held or Slot(str(getattr(slot, "slot_id", "")), "", "", "")

        def no(kind: ErrorKind, message: str) -> _Request:
            return _Request(held, str(tool), {}, timeout, refused(stand_in, kind, message))

        if held is None:
            return no(ErrorKind.BAD_REQUEST, f"request {request!r}: expected (slot, tool_name, args) with a slot "
                                             "this backend acquired and has not released")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                return no(ErrorKind.BAD_REQUEST, f"arguments are not valid JSON: {exc}")
        args = {} if args is None else args
        if not isinstance(tool, str) or not isinstance(args, Mapping):
            return no(ErrorKind.BAD_REQUEST, f"a request's tool must be a name and its args an object; got "
                                             f"{tool!r}, {args!r}")
        args = dict(args)
        if tool in COMMAND_TOOLS:
            flags = {flag: args.pop(flag) for flag in POLICY_FLAGS if flag in args}
            refusal = policy_refusal(self._facts.get(held.slot_id), held.slot_id, tool, flags)
            if refusal is not None:
                return no(ErrorKind.UNAVAILABLE, refusal)
        return _Request(held, tool, args, timeout)

    async def _round(self, wanted: list[_Request], positions: list[int],
                     results: list[ExecutionResult | None]) -> None:
        """One call of each slot: the agent's own tools batched per pool, the rest beside them."""
        by_pool: dict[int, tuple[SlotPool, list[int]]] = {}
        single: list[int] = []
        for position in positions:
            request = wanted[position]
            if request.tool in ("tmux", "read_file", "write_file"):
                single.append(position)
            else:
                pool = self._pool(request)
                by_pool.setdefault(id(pool), (pool, []))[1].append(position)

        async def send(pool: SlotPool, batch: list[int]) -> None:
            calls = [self._tool_call(wanted[p]) for p in batch]
            try:
                answers = await pool.execute_batch(calls)
            except HpcSandboxError as exc:
                answers = [PoolResult.failure(c.tool, exc.kind, str(exc), c.slot) for c in calls]
            for p, answer in zip(batch, answers):
                results[p] = self._agent_result(answer, wanted[p])

        async def run(position: int) -> None:
            request = wanted[position]
            try:
                results[position] = await self._single(request)
            except HpcSandboxError as exc:
                lease = request.slot.lease if request.slot else None
                results[position] = failed(PoolResult.failure(request.tool, exc.kind, str(exc), lease))

        await asyncio.gather(*(send(pool, batch) for pool, batch in by_pool.values()), *map(run, single))

    def _pool(self, request: _Request) -> SlotPool:
        assert request.slot is not None
        return self._pools.pool_of(request.slot.profile or self.default_profile)

    def _tool_call(self, request: _Request) -> ToolCall:
        """The agent call of an environment's tool: bash_stateful is bash in a session."""
        assert request.slot is not None and request.slot.lease is not None
        tool, args = request.tool, request.args
        if tool == "bash_stateful":
            name = args.pop("session", None) or args.pop("session_name", None) or self.stateful_session
            tool, args = "bash", {**args, "session": agent_session_name(name)}
        timeout = float(request.timeout) if request.timeout is not None else None
        return ToolCall(request.slot.lease, tool, args, timeout)

    def _agent_result(self, answer: PoolResult, request: _Request) -> ExecutionResult:
        if request.tool in ("bash", "bash_stateful"):
            return command_result(answer, request.timeout, tool=request.tool)
        if not answer.success:
            return failed(answer, tool=request.tool)
        output = answer.data.get("output") if isinstance(answer.data.get("output"), str) else None
        return ExecutionResult(True, output if output is not None else json.dumps(answer.data, default=str), "",
                               slot_id=answer.slot or "", metadata={"tool": request.tool, "slot": answer.slot})

    async def _single(self, request: _Request) -> ExecutionResult:
        assert request.slot is not None and request.slot.lease is not None
        pool, lease = self._pool(request), request.slot.lease
        timeout = float(request.timeout) if request.timeout is not None else DEFAULT_TIMEOUT_S
        if request.tool == "read_file":
            return await files.read_file(pool, lease, request.args, timeout)
        if request.tool == "write_file":
            return await files.write_file(pool, lease, request.args, timeout)
        return await self._tmux(pool, lease, request, timeout)

    async def _tmux(self, pool: SlotPool, lease: Lease, request: _Request, timeout: float) -> ExecutionResult:
        """tmux start/send_keys/capture/stop on `session_name` (default "main"), served by
        compat.tmux; metadata["mode"] says by what ("tmux" or "session"). The output is
        the screen (or what the session printed), capped like a command's."""
        args = request.args
        name = str(args.get("session_name") or args.get("session") or args.get("name") or "main")
        reply = await self._terminals.run(args.get("action"), TerminalCall(pool, lease, name, timeout, args))
        result = command_result(reply.result, request.timeout, tool="tmux")
        result.output = capped(reply.output)
        if reply.error:
            result.error = reply.error
        elif not result.success and reply.result.exit_code is None:
            result.error = reply.error_prefix + result.error
        return result

    # --- artifacts --------------------------------------------------------------------------

    def _artifact_slot(self, slot: Slot) -> tuple[SlotPool, Lease] | None:
        held = self._lease(slot)
        if held is None or held.lease is None:
            return None
        return self._pools.pool_of(held.profile or self.default_profile), held.lease

    async def read_artifact(self, slot: Slot, path: str, *, encoding: str = "text", max_bytes: int | None = None,
                            include_sha256: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
        found = self._artifact_slot(slot)
        if found is None:
            return _not_held(slot, content="", encoding=encoding, truncated=False, bytes=0, file_size=0, path=path)
        return await files.read_artifact(*found, path, encoding=encoding, max_bytes=max_bytes,
                                         include_sha256=include_sha256, timeout_s=timeout_s)

    async def list_artifacts(self, slot: Slot, path: str = ".", *, recursive: bool = False,
                             max_entries: int | None = None, timeout_s: float | None = None,
                             exclude: Sequence[str] = ()) -> dict[str, Any]:
        """`exclude` (ours, not the interface's): glob patterns of entries left out, e.g.
        [".venv", ".git"]; nothing is excluded unless asked, and `truncated` says a cut."""
        found = self._artifact_slot(slot)
        if found is None:
            return _not_held(slot, entries=[], truncated=False)
        return await files.list_artifacts(*found, path, recursive=recursive, max_entries=max_entries,
                                          timeout_s=timeout_s, exclude=exclude)

    async def archive_artifacts(self, slot: Slot, path: str = ".", *, archive_format: str = "tar.gz",
                                max_bytes: int | None = None, max_entries: int | None = None,
                                timeout_s: float | None = None, exclude: Sequence[str] = ()) -> dict[str, Any]:
        found = self._artifact_slot(slot)
        if found is None:
            return _not_held(slot, content="", encoding="base64", format=archive_format, bytes=0, entry_count=0)
        return await files.archive_artifacts(*found, path, archive_format=archive_format, max_bytes=max_bytes,
                                             max_entries=max_entries, timeout_s=timeout_s, exclude=exclude)

    # --- status -----------------------------------------------------------------------------

    def get_status(self) -> dict[str, Any]:
        """Sync, without asking a node server: per started profile, atropos_profiles.pool_status; sums on top."""
        pools = {name: pool_status(entry, [slot.lease for slot in self._held.values() if slot.profile == name])
                 for name, entry in self._pools.entries.items() if entry.started and entry.pool is not None}
        return {"profiles": list(self._pools.entries), "active_pools": list(pools),
                "default_profile": self.default_profile, "app_name": self.app_name, "pools": pools,
                **{key: sum(row[key] for row in pools.values())
                   for key in ("total_slots", "available_slots", "healthy_sandboxes", "held")}}


def _not_held(slot: Any, **shape: Any) -> dict[str, Any]:
    return {**shape, "success": False, "error_kind": str(ErrorKind.BAD_REQUEST),
            "error": f"slot {getattr(slot, 'slot_id', slot)!r} is not held by this backend (released already?)"}


# The name the environments' code knows the interface by.
ToolBackend = HpcSandboxBackend

__all__ = ["AcquireTimeout", "CompatToolResult", "DEFAULT_TIMEOUT_S", "ExecutionResult", "HpcSandboxBackend", "Slot",
           "SlotState", "ToolBackend"]
