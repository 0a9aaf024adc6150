"""A drop-in `ToolBackend` for Atropos-style RL environments, over SlotPool.

    backend = HpcSandboxBackend(profile="gpu", array=4)         # start() submits, stop(purge=True) cancels
    backend = HpcSandboxBackend(connect.from_config("default"))  # or over jobs that already run
    await backend.start()
    slot = await backend.acquire("traj-1")
    results = await backend.execute_batch([(slot, "write_file", {"path": "a.py", "content": "print(1)"}),
                                           (slot, "bash", {"command": "python a.py"})], timeout_s=60)
    results[1].success, results[1].output, results[1].metadata["exit_code"]
    await backend.release(slot, reset_workspace=True)
    await backend.stop(purge=True)

The environments' names and shapes, and what each maps to (nothing here runs a command,
opens a file or keeps a slot: the pool and the slot agent do):

    start() / stop(purge=False)    compat.profiles: each profile's pool, given or over a job
                                   submitted for it; purge=True cancels the jobs start() submitted
    acquire(trajectory_id, profile=None)     SlotPool.acquire -> BackendSlot (`slot_id`, `slot`)
    release(slot, reset_workspace=False)     SlotPool.release (sessions end either way)
    execute_batch(requests, timeout_s)       SlotPool.execute_batch, one round per call of a slot
      bash                         agent `bash`
      bash_stateful                agent `bash` with `session` (default "main": one per slot,
                                   so one per trajectory)
      tmux start/send_keys/capture/stop      compat.tmux: real tmux in the slot when it has
                                   one, else the agent session "tmux-NAME"
      read_file, write_file, ...   the agent's tool of that name, arguments as they are
    read/list/archive_artifacts    compat.artifacts: agent `read_file`, `list_files`, `archive`
    get_status()                   SlotPool.report() of every profile's pool

Results are `ExecutionResult`s: `success`, `output` (stdout, then "[stderr]" and stderr
when there is any), `error` ("exit code 3", "command timed out after 30s", or the tool's
own error), `metadata` (exit_code, duration, truncated, location, slot, tool, error_kind
and the tool's own fields), `execution_id` (new for every call).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ErrorKind, HpcSandboxError
from ..models import Slot, ToolResult
from ..pool import SlotPool, ToolCall
from . import artifacts
from .artifacts import DEFAULT_ARTIFACT_BYTES, DEFAULT_MAX_ENTRIES, ArtifactError, ArtifactListing
from .profiles import Profile, ProfilePools, profiles_of
from .tmux import TMUX_IDLE, TerminalCall, Terminals, TmuxMode, agent_session_name

DEFAULT_TIMEOUT = 30.0  # seconds per call of a batch, when execute_batch is given none
STATEFUL_SESSION = "main"  # the session bash_stateful uses (one slot per trajectory: one per trajectory)
TMUX_MODES = tuple(mode.value for mode in TmuxMode)  # the constructor's `tmux`: see HpcSandboxBackend.__init__


def _new_execution_id() -> str:
    return uuid.uuid4().hex


# --- shapes ------------------------------------------------------------------------------


@dataclass
class ExecutionResult:
    """What one call of a batch came to, in the shape the environments read.

    `output` is stdout, followed by a "[stderr]" line and stderr when stderr is not
    empty: "out\\n[stderr]\\nerr" (no blank line when stdout already ends with a
    newline). For read_file it is the content; for write_file a line saying what was
    written; for the agent's other tools their answer as JSON. `error` is None on
    success, else "exit code N", "command timed out after Ns", "killed by signal N" or
    the tool's own error message (its kind is metadata["error_kind"]).
    """

    success: bool
    output: str = ""
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    execution_id: str = field(default_factory=_new_execution_id)

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "output": self.output, "error": self.error,
                "metadata": dict(self.metadata), "execution_id": self.execution_id}


@dataclass(frozen=True)
class BackendSlot:
    """A slot as an environment holds it: `slot_id`, and the hpc-sandbox Slot (its
    lease) with the profile whose pool it came from."""

    slot: Slot
    profile: str
    trajectory_id: str | None = None

    @property
    def slot_id(self) -> str:
        return self.slot.id

    @property
    def location(self) -> str:
        return self.slot.location

    def __str__(self) -> str:
        return self.slot_id


# --- result mapping ----------------------------------------------------------------------


def _output(stdout: str, stderr: str) -> str:
    if not stderr:
        return stdout
    return stdout + ("" if stdout.endswith("\n") else "\n") + "[stderr]\n" + stderr


def _error(result: ToolResult, timeout: float) -> str | None:
    if result.success:
        return None
    if result.timed_out:
        return f"command timed out after {timeout:g}s"
    if result.error_kind is None and result.exit_code not in (None, 0):
        return f"exit code {result.exit_code}"
    if result.killed_by_signal:
        return f"killed by signal {result.signal}"
    return result.error or result.error_kind or "failed"


def _metadata(result: ToolResult, tool: str) -> dict[str, Any]:
    data = result.data
    # The tool's own scalar fields (path, size, sha256, session, waiting, handle, ...); its
    # content and lists (entries, sessions) are the output's, not the metadata's.
    meta: dict[str, Any] = {key: value for key, value in data.items()
                            if key not in ("content", "output") and not isinstance(value, (list, dict))}
    meta.update(tool=tool, exit_code=result.exit_code, duration=result.duration, location=result.location,
                slot=result.slot, timed_out=result.timed_out, error_kind=result.error_kind,
                truncated=bool(result.truncated or data.get("truncated") or data.get("eof") is False))
    if result.signal is not None:
        meta["signal"] = result.signal
    return meta


def _tool_output(result: ToolResult) -> str:
    if result.exit_code is not None or result.tool == "bash":
        return _output(result.stdout, result.stderr)
    data = result.data
    if not result.success:
        return ""
    if isinstance(data.get("content"), str):
        return data["content"]
    if isinstance(data.get("output"), str):  # process output
        return data["output"]
    if result.tool == "write_file":
        return f"wrote {data.get('size', 0)} bytes to {data.get('path', '?')}"
    return json.dumps(data, sort_keys=True, default=str)


def to_execution_result(result: ToolResult, tool: str, timeout: float, *, output: str | None = None,
                        **extra: Any) -> ExecutionResult:
    """An ExecutionResult of the pool's ToolResult; `tool` is the name the environment used."""
    meta = _metadata(result, tool)
    meta.update(extra)
    return ExecutionResult(success=result.success, output=_tool_output(result) if output is None else output,
                           error=_error(result, timeout), metadata=meta)


def _refused(slot: BackendSlot, tool: str, kind: ErrorKind | str, message: str) -> ExecutionResult:
    """An answer given without a call to the slot."""
    return to_execution_result(ToolResult.failure(tool, kind, message, slot.slot), tool, 0.0)


# --- the backend -------------------------------------------------------------------------


@dataclass
class _Request:
    slot: BackendSlot
    tool: str
    args: dict[str, Any]
    timeout: float
    invalid: str | None = None  # arguments that could not be read (bad JSON): answered, not sent


class HpcSandboxBackend:
    """The `ToolBackend` of Atropos-style environments, served by hpc-sandbox slots.

    Either over a SlotPool given (`HpcSandboxBackend(pool)`: its jobs are not ours to
    cancel), or over a job submitted by start() for a config profile with SandboxSpec
    fields as overrides (`HpcSandboxBackend(profile="gpu", array=16)`, cancelled by
    `stop(purge=True)`). Several profiles: `with_profiles`. Also an async context
    manager: `async with HpcSandboxBackend(...) as backend:` (exit = stop(purge=True)).
    """

    def __init__(self, pool: SlotPool | None = None, *, profile: str | None = None,
                 config_file: str | Path | None = None, wait_timeout: float = 600.0,
                 acquire_timeout: float = 300.0, lease_ttl: float | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT, stateful_session: str = STATEFUL_SESSION,
                 tmux_idle: float = TMUX_IDLE, tmux: str = "auto", overflow: str | None = None,
                 cloud_settings: Mapping[str, Any] | None = None, **job_overrides: Any) -> None:
        """`pool`: serve from it; else submit `profile` (the config's; "default") with
        `job_overrides` (SandboxSpec fields: scheduler, slots, array, state_dir, ...) at
        start(). `wait_timeout` bounds the wait for the job's first node server;
        `default_timeout` is execute_batch's timeout_s when none is given; `tmux_idle` is
        how long send_keys/capture wait for more output of a command before returning.
        `tmux` says what serves the tmux tool: "auto" (real tmux in a slot that has it,
        asked once per slot; else a session without a terminal), "session" (always the
        session), "tmux" (real tmux; a slot without it answers error_kind "unavailable")."""
        if pool is not None and (job_overrides or overflow):
            raise ConfigError("give a SlotPool, or a profile with job overrides to submit, not both")
        entry = Profile(profile or "default", config_profile=profile, overrides=dict(job_overrides), pool=pool)
        self._configure({entry.name: entry}, entry.name, config_file=config_file, wait_timeout=wait_timeout,
                        acquire_timeout=acquire_timeout, lease_ttl=lease_ttl, default_timeout=default_timeout,
                        stateful_session=stateful_session, tmux_idle=tmux_idle, tmux=tmux, overflow=overflow,
                        cloud_settings=cloud_settings)

    def _configure(self, profiles: dict[str, Profile], default: str, *, default_timeout: float = DEFAULT_TIMEOUT,
                   stateful_session: str = STATEFUL_SESSION, tmux_idle: float = TMUX_IDLE, tmux: str = "auto",
                   **pool_options: Any) -> None:
        self._pools = ProfilePools(profiles, default, **pool_options)
        if tmux not in TMUX_MODES:
            raise ConfigError(f"tmux must be one of {', '.join(TMUX_MODES)}; got {tmux!r}")
        self.default_profile = default
        self.default_timeout = default_timeout
        self.stateful_session = agent_session_name(stateful_session)
        self.tmux_idle = tmux_idle
        self.tmux = tmux
        self._held: dict[str, BackendSlot] = {}
        self._terminals = Terminals(TmuxMode(tmux), tmux_idle)
        self._started = False
        self._lock = asyncio.Lock()

    @classmethod
    def with_profiles(cls, profiles: Mapping[str, SlotPool | Mapping[str, Any] | None], *,
                      default: str | None = None, **options: Any) -> "HpcSandboxBackend":
        """Several profiles, one SlotPool each (see compat/profiles.py): `acquire(...,
        profile=NAME)` takes a slot of that profile's pool. A value is a SlotPool to serve
        from, or the job overrides to submit config profile NAME with at start() (None:
        no overrides; a "profile" key names another config profile). `default` (else the
        first) serves acquire() without a profile; `options` are the constructor's."""
        entries = profiles_of(profiles)
        backend = cls.__new__(cls)
        backend._configure(entries, default if default is not None else next(iter(entries)), **options)
        return backend

    def list_profiles(self) -> list[str]:
        return list(self._pools.entries)

    @property
    def pools(self) -> dict[str, SlotPool | None]:
        """Each profile's pool (None before start() for a profile that submits)."""
        return self._pools.pools

    @property
    def jobs(self) -> list[Any]:
        """The jobs start() submitted and no stop(purge=True) has cancelled yet."""
        return self._pools.jobs

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every profile's pool, submitting the jobs of those without one (each
        waits for its first node server; a job that fails to start is cancelled, and
        so are the others this call submitted)."""
        async with self._lock:
            if self._started:
                return
            try:
                await self._pools.start()
            except BaseException:
                # Nothing this start made outlives it: pools stopped, jobs submitted cancelled.
                await asyncio.shield(self._teardown(purge=True))
                raise
            self._started = True

    async def stop(self, purge: bool = False) -> None:
        """Stop the pools; slots still held are released first (reset), unless their
        job is being cancelled. With `purge`, the jobs start() submitted are cancelled
        (Nomad: purged); without, they keep running, and a later start() attaches to
        them again."""
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

    async def __aenter__(self) -> "HpcSandboxBackend":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(purge=True)

    # --- slots ----------------------------------------------------------------------------

    def _pool_of(self, slot: BackendSlot) -> SlotPool:
        return self._pools.pool_of(slot.profile)

    async def acquire(self, trajectory_id: str | None = None, profile: str | None = None,
                      timeout: float | None = None) -> BackendSlot:
        """A slot of `profile` (default: the default profile), as soon as one is free
        (SlotPool.acquire: first come, first served; NoCapacity after `timeout`)."""
        entry = self._pools.entry(profile)
        if not self._started:
            await self.start()
        if entry.pool is None:
            raise ConfigError(f"profile {entry.name!r} has no pool: the backend is stopped")
        slot = BackendSlot(await entry.pool.acquire(trajectory_id=trajectory_id, profile=entry.name, timeout=timeout),
                           entry.name, trajectory_id)
        self._held[slot.slot_id] = slot
        return slot

    def _forget(self, slot: BackendSlot) -> str | None:
        """Drop the slot from those held here; the tmux socket folder its lease left."""
        self._held.pop(slot.slot_id, None)
        return self._terminals.forget(slot.slot_id)

    async def release(self, slot: BackendSlot, reset_workspace: bool = False) -> None:
        """Give the slot back (SlotPool.release): its sessions and processes end (a real
        tmux server too: the agent's reset finds it by the tag in its environment); its
        workspace is wiped when `reset_workspace`."""
        folder = self._forget(slot)
        pool = self._pool_of(slot)
        await Terminals.clear_folder(pool, slot.slot, folder)
        await pool.release(slot.slot, reset_workspace=reset_workspace)

    # --- tool calls -----------------------------------------------------------------------

    async def execute(self, slot: BackendSlot, tool: str, args: Mapping[str, Any] | str | None = None,
                      timeout_s: float | None = None) -> ExecutionResult:
        """One call: execute_batch of one."""
        return (await self.execute_batch([(slot, tool, args or {})], timeout_s=timeout_s))[0]

    async def execute_batch(self, requests: Sequence[tuple | Mapping[str, Any]],
                            timeout_s: float | None = None) -> list[ExecutionResult]:
        """Run the requests; results in request order.

        A request is (slot, tool, args[, timeout]) or a dict with slot, tool (or
        tool_name/name), args (or arguments: a dict or its JSON) and optionally timeout.
        Calls on different slots run at once (one SlotPool.execute_batch per round); the
        calls of one slot run one after the other, in request order, as an agent's tool
        calls of one turn expect (a write_file before the bash that runs the file)."""
        timeout = self.default_timeout if timeout_s is None else float(timeout_s)
        wanted = [self._request(request, timeout) for request in requests]
        results: list[ExecutionResult | None] = [None] * len(wanted)
        queues: dict[str, list[int]] = {}
        for position, request in enumerate(wanted):
            queues.setdefault(request.slot.slot_id, []).append(position)
        for depth in range(max((len(queue) for queue in queues.values()), default=0)):
            await self._round(wanted, [queue[depth] for queue in queues.values() if depth < len(queue)], results)
        return results  # type: ignore[return-value]  (every position is filled by its round)

    def _request(self, request: tuple | Mapping[str, Any], timeout: float) -> _Request:
        call_timeout: Any = None
        if isinstance(request, Mapping):
            slot = request.get("slot")
            tool = request.get("tool", request.get("tool_name", request.get("name")))
            args = request.get("args", request.get("arguments"))
            call_timeout = request.get("timeout", request.get("timeout_s"))
        elif isinstance(request, (tuple, list)) and len(request) in (3, 4):
            slot, tool, args = request[0], request[1], request[2]
            call_timeout = request[3] if len(request) == 4 else None
        else:
            raise TypeError(f"a request is (slot, tool, args[, timeout]) or a dict with slot, tool, args; "
                            f"got {request!r}")
        if not isinstance(slot, BackendSlot):
            raise TypeError(f"a request's slot must come from acquire(), got {type(slot).__name__}")
        if not isinstance(tool, str):
            raise TypeError(f"a request's tool must be a name, got {tool!r}")
        effective = timeout if call_timeout is None else float(call_timeout)
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                return _Request(slot, tool, {}, effective, invalid=f"arguments are not valid JSON: {exc}")
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            return _Request(slot, tool, {}, effective, invalid=f"arguments must be an object, got {args!r}")
        return _Request(slot, tool, dict(args), effective)

    def _tool_call(self, request: _Request) -> ToolCall:
        """The agent call of an environment's tool: bash_stateful is bash in a session."""
        tool, args = request.tool, request.args
        if tool == "bash_stateful":
            name = args.pop("session", None) or args.pop("session_name", None) or self.stateful_session
            tool, args = "bash", {**args, "session": agent_session_name(name)}
        return ToolCall(request.slot.slot, tool, args, request.timeout)

    async def _round(self, wanted: list[_Request], positions: list[int],
                     results: list[ExecutionResult | None]) -> None:
        """One call of each slot: the tool calls batched per pool, tmux actions alongside."""
        by_pool: dict[int, tuple[SlotPool, list[int]]] = {}
        terminal: list[int] = []
        for position in positions:
            request = wanted[position]
            if request.invalid is not None:
                results[position] = _refused(request.slot, request.tool, ErrorKind.BAD_REQUEST, request.invalid)
            elif request.tool == "tmux":
                terminal.append(position)
            else:
                pool = self._pool_of(request.slot)
                by_pool.setdefault(id(pool), (pool, []))[1].append(position)

        async def send(pool: SlotPool, batch: list[int]) -> None:
            try:
                answers = await pool.execute_batch([self._tool_call(wanted[p]) for p in batch])
            except HpcSandboxError as exc:
                answers = [ToolResult.failure(wanted[p].tool, exc.kind, str(exc), wanted[p].slot.slot) for p in batch]
            for p, answer in zip(batch, answers):
                results[p] = to_execution_result(answer, wanted[p].tool, wanted[p].timeout)

        async def run(position: int) -> None:
            request = wanted[position]
            try:
                results[position] = await self._tmux_call(request)
            except HpcSandboxError as exc:
                results[position] = _refused(request.slot, request.tool, exc.kind, str(exc))

        await asyncio.gather(*(send(pool, batch) for pool, batch in by_pool.values()), *map(run, terminal))

    async def _tmux_call(self, request: _Request) -> ExecutionResult:
        """tmux `action` start/send_keys/capture/stop on session `session_name` (default
        "main"), served by compat.tmux; metadata["mode"] says by what ("tmux" or "session")."""
        args = request.args
        name = str(args.get("session_name") or args.get("session") or args.get("name") or "main")
        call = TerminalCall(self._pool_of(request.slot), request.slot.slot, name, request.timeout, args)
        reply = await self._terminals.run(args.get("action"), call)
        result = to_execution_result(reply.result, "tmux", request.timeout, output=reply.output)
        if not result.success:
            result.error = reply.error or reply.error_prefix + (result.error or "")
        return result

    # --- artifacts (compat/artifacts.py) ---------------------------------------------------

    async def read_artifact(self, slot: BackendSlot, path: str, max_bytes: int = DEFAULT_ARTIFACT_BYTES,
                            encoding: str = "text", timeout_s: float | None = None) -> dict[str, Any]:
        """A workspace file as a dict (content, size, sha256, truncated, ...)."""
        return await artifacts.read_artifact(self._pool_of(slot), slot.slot, path, max_bytes, encoding, timeout_s)

    async def list_artifacts(self, slot: BackendSlot, path: str = ".", recursive: bool = False,
                             max_entries: int = DEFAULT_MAX_ENTRIES,
                             timeout_s: float | None = None) -> ArtifactListing:
        """The entries under `path` (path, is_dir, size, mtime, type); `.truncated`."""
        return await artifacts.list_artifacts(self._pool_of(slot), slot.slot, path, recursive, max_entries,
                                              timeout_s)

    async def archive_artifacts(self, slot: BackendSlot, paths: str | Sequence[str] = ".",
                                dest: str | Path | None = None, max_bytes: int | None = None,
                                timeout_s: float | None = None) -> dict[str, Any]:
        """One tar.gz of `paths`, members named relative to the workspace (content or
        `dest`, size, sha256, members)."""
        return await artifacts.archive_artifacts(self._pool_of(slot), slot.slot, paths, dest, max_bytes, timeout_s)

    # --- status ---------------------------------------------------------------------------

    async def get_status(self) -> dict[str, Any]:
        """What the pools say (SlotPool.report()): per profile and summed, slots by place
        (servers, slots, free, busy, starting), callers waiting, cloud sandboxes alive,
        sandbox-seconds and estimated cost; plus the jobs and the slots held here."""
        profiles: dict[str, dict[str, Any]] = {}
        for entry in self._pools.entries.values():
            jobs = [entry.job.id] if entry.job is not None else []
            if entry.pool is not None:
                jobs += [job.id for job in entry.pool.jobs if job.id not in jobs]
            row: dict[str, Any] = {"jobs": jobs, "held": sum(1 for s in self._held.values() if s.profile == entry.name),
                                   "slots": {}, "waiting": 0, "sandboxes": 0, "sandbox_seconds": 0.0, "cost": None,
                                   "cloud_off": None}
            if entry.pool is not None and self._started:
                report = await entry.pool.report()
                row["slots"] = {place.place: {"servers": place.servers, "slots": place.slots, "free": place.free,
                                              "busy": place.slots - place.free, "starting": place.starting}
                                for place in report.places}
                row.update(waiting=report.waiting, sandboxes=report.sandboxes_alive,
                           sandbox_seconds=report.sandbox_seconds, cost=report.cost, cloud_off=report.cloud_off)
            profiles[entry.name] = row
        places: dict[str, dict[str, int]] = {}
        for row in profiles.values():
            for place, counts in row["slots"].items():
                summed = places.setdefault(place, dict.fromkeys(counts, 0))
                for name, value in counts.items():
                    summed[name] += value
        totals = {key: sum(row[key] for row in profiles.values()) for key in ("waiting", "sandboxes", "sandbox_seconds")}
        costs = [row["cost"] for row in profiles.values() if row["cost"] is not None]
        return {"started": self._started, "default_profile": self.default_profile, "slots": places, **totals,
                "cost": sum(costs) if costs else None, "held": len(self._held), "profiles": profiles}


# The name the environments' code knows the interface by.
ToolBackend = HpcSandboxBackend

__all__ = ["ArtifactError", "ArtifactListing", "BackendSlot", "ExecutionResult", "HpcSandboxBackend", "ToolBackend",
           "to_execution_result"]
