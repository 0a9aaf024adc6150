"""The node server's wire protocol, written once: routes, headers, tool names, the
typed shape of every request and answer (a `bash` result among them), and the
error kind <-> HTTP status table (the kinds themselves are errors.ErrorKind).

The server (`server/app.py`), the client (`client.py`), the pool and the preflight
import these; none of them spells a route, a header or a dict shape of its own.

    GET  /v1/health                  no auth                    -> Health
    GET  /v1/slots                                              -> SlotsAnswer
    POST /v1/slots/acquire           AcquireRequest             -> Grant
    POST /v1/slots/{i}/release       ReleaseRequest (X-Lease)   -> {"slot", "released"}
    POST /v1/slots/{i}/renew         RenewRequest   (X-Lease)   -> {"slot", "ttl"}
    POST /v1/slots/{i}/reset                        (X-Lease)   -> {"slot", "reset"}
    POST /v1/slots/{i}/exec          Call           (X-Lease)   -> CallAnswer
    POST /v1/slots/{i}/exec          Call + "stream": true      -> StreamEvent lines (NDJSON)
                                                    (X-Lease)
    POST /v1/batch                   {"calls": [Call...]}       -> {"results": [CallAnswer...]}
    GET  /v1/slots/{i}/files/{path}  stream a file out of the workspace  (X-Lease)
    PUT  /v1/slots/{i}/files/{path}  stream a file into the workspace    (X-Lease, X-Mode?)
    GET  /v1/slots/{i}/tree?path=P   stream a tar.gz of a workspace folder (X-Lease)
         &max_bytes=N&max_entries=N&exclude=GLOB...          -> TreeRequest; tree frames

Every request but /v1/health carries `Authorization: Bearer TOKEN`. An error is
`{"error": {"kind", "message"}}` with the status ERRORS gives its kind.

A streamed exec answers `application/x-ndjson`, one StreamEvent per line, in the order
the output came: `{"event": "stdout"|"stderr", "data": "..."}` (with `"skipped": N`
when N bytes before it were dropped), then last `{"event": "result", "answer":
CallAnswer, "dropped_bytes": N}`. The answer is exactly what a plain exec answers;
`dropped_bytes` counts the output bytes a slow reader was not sent (the server keeps
at most STREAM_BUFFER_BYTES per call). An error before the stream starts (auth,
lease, limits, a bad request) is the usual JSON error with its status; one after it
started is a failed answer in the result event.

A tree answers `application/x-hpc-sandbox-tree`: the tar.gz in frames (a 4-byte
big-endian length, then that many bytes; at most TREE_FRAME_BYTES), then a frame of
length 0, then a JSON TreeEnd (counts, or the error that stopped the walk, e.g. a cap:
`too_large`). A body that ends before the TreeEnd broke off; only a TreeEnd without an
error vouches for the archive. Refusals before the stream starts (lease, a folder that
is missing or outside the workspace) are the usual JSON errors.

Requests are validated by the server (`from_json` raises BadRequest); answers are
validated by the client (`from_json` raises BadAnswer): a node server, or whatever
answers on its port, that sends nonsense is an error with a name, never a KeyError.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar
from urllib.parse import quote

from .agent import CLIENT_TOOLS
from .errors import (AuthError, BadRequest, ClientError, ErrorKind, LeaseLost, LimitExceeded, NoFreeSlot,
                     NotFound, PathRefused)

# --- routes and headers ---------------------------------------------------------------

HEALTH = "/v1/health"
STREAM_CONTENT_TYPE = "application/x-ndjson"
SLOTS = "/v1/slots"
ACQUIRE = "/v1/slots/acquire"
BATCH = "/v1/batch"
LEASE_HEADER = "X-Lease"
AUTH_HEADER = "Authorization"
# A PUT of a file may name the mode it gets (octal, as "755"); without it, 0644.
MODE_HEADER = "X-Mode"
UPLOAD_MODE = 0o644


def slot_route(index: int, action: str) -> str:
    """/v1/slots/{i}/{action}: release, renew, reset, exec."""
    return f"{SLOTS}/{index}/{action}"


def file_route(index: int, path: str) -> str:
    return f"{SLOTS}/{index}/files/{quote(path)}"


TREE = "tree"
TREE_CONTENT_TYPE = "application/x-hpc-sandbox-tree"
TREE_FRAME_BYTES = 1 << 20
TREE_FRAME_HEADER = 4  # bytes: the frame's length, big-endian
# A TreeEnd's JSON at most (its `skipped` is bounded by the entries cap).
MAX_TREE_END_BYTES = 256 << 20


def tree_frame(data: bytes) -> bytes:
    """One frame of a tree answer; b"" makes the end frame (a TreeEnd follows it)."""
    return len(data).to_bytes(TREE_FRAME_HEADER, "big") + data


def bearer(token: str) -> str:
    return f"Bearer {token}"


def mode_header(mode: int) -> str:
    return format(mode & 0o777, "o")


def parse_mode_header(raw: str | None) -> int:
    """The mode a PUT asks for (permission bits only: never setuid, setgid or sticky)."""
    if raw is None:
        return UPLOAD_MODE
    if not re.fullmatch(r"[0-7]{1,4}", raw):
        raise BadRequest(f"{MODE_HEADER} must be an octal mode such as 755, got {raw[:20]!r}")
    return int(raw, 8) & 0o777


# A slot index in a URL: ASCII digits only (str.isdigit() also takes "²"), and few
# enough of them that int() never meets its digit limit.
_SLOT_INDEX = re.compile(r"[0-9]{1,9}")


def parse_slot_index(raw: str) -> int:
    if not _SLOT_INDEX.fullmatch(raw):
        raise NotFound(f"no slot {raw[:40]!r}")
    return int(raw)


# --- tools and defaults ---------------------------------------------------------------

# bash (plain, in a named session, or in the background), session (list, close), process
# (list, output, signal, wait of background processes), and the file tools: the agent's
# (it owns the slot contract).
TOOLS = CLIENT_TOOLS
# An acquire may wait on the server for a slot to free up, at most this long (a client
# that wants longer asks again: proxies and NATs drop idle connections).
MAX_ACQUIRE_WAIT = 60.0
# A grant must be used (any call that carries its lease: exec, renew, a file...) within
# this long, or the slot goes back to the pool: a client that died, or whose connection
# broke, just as the grant was sent never learned of its lease.
DEFAULT_CONFIRM_WITHIN = 30.0
# A tool call that names no timeout gets this one, from the server and the client alike:
# with none at all, a forgotten `sleep` would hold a slot and a client forever.
DEFAULT_EXEC_TIMEOUT = 300.0
MAX_EXEC_ID = 128
# A streamed call: bytes of output events a node server holds per call for a reader
# that is slower than the command (past that, chunks are dropped and counted: the
# server's memory must not grow with a slow client), and the longest line a client
# accepts (the result event holds two capped output streams, JSON-escaped).
STREAM_BUFFER_BYTES = 2 << 20
MAX_STREAM_LINE = 512 << 20
STREAM_OUTPUTS = ("stdout", "stderr")


def exec_timeout(asked: float | None) -> float:
    """The timeout a client's call runs with: the one asked for, else (None or 0) the
    default. Every client-side call (single, streamed, batched) and what the CLI says
    of a timeout take it from here; a node server gives a call that names none its own
    configured default (ServerLimits.default_timeout)."""
    return asked or DEFAULT_EXEC_TIMEOUT


# --- slot states ----------------------------------------------------------------------


class SlotState(str, Enum):
    """A node server's slot, as GET /v1/slots describes it (its `state` and the keys of
    its `counts`). A member is the string that goes on the wire."""

    def __str__(self) -> str:
        return self.value

    STARTING = "starting"  # its first agent is starting
    FREE = "free"
    LEASED = "leased"
    EXPIRING = "expiring"  # its lease ran out (or its grant was never confirmed): being freed
    RESTARTING = "restarting"  # its agent died or got stuck and is being replaced
    RESETTING = "resetting"  # its processes are ending (and its workspace is wiped)
    BROKEN = "broken"  # its agent could not be restarted: see its last_error


# --- errors ---------------------------------------------------------------------------

# The kinds a node server refuses a request with: kind -> (the class a client raises,
# the HTTP status a server answers with). Other kinds (a tool's own: path, busy...; a
# call that failed: agent_died, limit_exceeded...) travel inside a CallAnswer with 200.
ERRORS: dict[ErrorKind, tuple[type[ClientError], int]] = {
    AuthError.kind: (AuthError, 401),
    NotFound.kind: (NotFound, 404),
    LeaseLost.kind: (LeaseLost, 409),
    BadRequest.kind: (BadRequest, 400),
    PathRefused.kind: (PathRefused, 400),
    NoFreeSlot.kind: (NoFreeSlot, 503),
    LimitExceeded.kind: (LimitExceeded, 429),
    ErrorKind.IO: (ClientError, 500),  # the server's own disk (a full one, a permission)
}
BODY_TOO_LARGE = 413  # aiohttp's own answer to an oversized body: a `limit` error


def status_of(kind: ErrorKind) -> int:
    """The HTTP status a server refuses a request of this kind with."""
    return ERRORS[kind][1]


def status_for(exc: ClientError) -> int:
    return ERRORS.get(exc.kind, (ClientError, 400))[1]


def error_for(kind: str, status: int, message: str) -> ClientError:
    """The exception a client raises for an error answer."""
    if status == BODY_TOO_LARGE:
        kind = LimitExceeded.kind
    cls = ERRORS.get(ErrorKind.read(kind), (ClientError, status))[0]
    return cls(message)


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message}}


class BadAnswer(ValueError):
    """An answer that does not have the shape this protocol gives it."""


# --- helpers for validation -------------------------------------------------------------


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadAnswer(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(data: dict[str, Any], key: str, check, what: str, expected: str) -> Any:
    value = data.get(key)
    if not check(value):
        raise BadAnswer(f"{what}: {key!r} should be {expected}, got {value!r}"[:300])
    return value


# --- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquireRequest:
    trajectory_id: str | None = None
    ttl: float | None = None
    # Seconds to wait on the server for a slot when none is free (0: answer at once);
    # requests waiting on one server are served first come, first served.
    wait: float = 0.0
    confirm_within: float = DEFAULT_CONFIRM_WITHIN

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"trajectory_id": self.trajectory_id}
        if self.ttl is not None:
            body["ttl"] = self.ttl
        if self.wait:
            body["wait"] = self.wait
        if self.confirm_within != DEFAULT_CONFIRM_WITHIN:
            body["confirm_within"] = self.confirm_within
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "AcquireRequest":
        trajectory_id = body.get("trajectory_id")
        if trajectory_id is not None and not isinstance(trajectory_id, str):
            raise BadRequest("'trajectory_id' must be a string")
        ttl = body.get("ttl")
        if ttl is not None and not _number(ttl):
            raise BadRequest("'ttl' must be a number of seconds")
        wait = body.get("wait", 0.0)
        if not _number(wait) or not 0 <= wait <= MAX_ACQUIRE_WAIT:
            raise BadRequest(f"'wait' must be a number of seconds in [0, {MAX_ACQUIRE_WAIT:.0f}]")
        confirm = body.get("confirm_within", DEFAULT_CONFIRM_WITHIN)
        if not _number(confirm) or not 1 <= confirm <= 3600:
            raise BadRequest("'confirm_within' must be a number of seconds in [1, 3600]")
        return cls(trajectory_id, float(ttl) if ttl is not None else None, float(wait), float(confirm))


@dataclass(frozen=True)
class RenewRequest:
    """A renewal that may also name who holds the lease now. A pool's long-poll acquire
    is labelled with the caller oldest in its queue when it is sent, but its grant goes
    to the oldest still waiting when it comes back: the pool then names the real holder
    (`rename`; a None trajectory_id says the holder gave none). An empty body renews."""

    trajectory_id: str | None = None
    rename: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"trajectory_id": self.trajectory_id} if self.rename else {}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "RenewRequest":
        if "trajectory_id" not in body:
            return cls()
        trajectory_id = body["trajectory_id"]
        if trajectory_id is not None and not isinstance(trajectory_id, str):
            raise BadRequest("'trajectory_id' must be a string")
        return cls(trajectory_id, rename=True)


@dataclass(frozen=True)
class ReleaseRequest:
    reset_workspace: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"reset_workspace": self.reset_workspace}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "ReleaseRequest":
        reset = body.get("reset_workspace", True)
        if not isinstance(reset, bool):
            raise BadRequest("'reset_workspace' must be true or false")
        return cls(reset)


@dataclass(frozen=True)
class Call:
    """One tool call on one leased slot."""

    slot: int
    lease: str = field(repr=False)
    exec_id: str
    tool: str
    args: dict[str, Any]
    timeout: float = DEFAULT_EXEC_TIMEOUT
    # Answer with a stream of output events ending in the answer (single exec only).
    stream: bool = False

    def to_json(self, *, with_slot: bool = True) -> dict[str, Any]:
        """The request body: in a batch each call names its slot and lease; a single
        exec names them in the URL and the X-Lease header."""
        body: dict[str, Any] = {"exec_id": self.exec_id, "tool": self.tool, "args": self.args,
                                "timeout": self.timeout}
        if self.stream:
            body["stream"] = True
        if with_slot:
            body.update(slot=self.slot, lease=self.lease)
        return body

    @classmethod
    def from_json(cls, body: object, *, max_timeout: float, default_timeout: float,
                  slot: int | None = None, lease: str | None = None) -> "Call":
        """Validated at the server's edge; `slot`/`lease` come from the URL and header
        for a single exec, from the body for a call of a batch."""
        if not isinstance(body, dict):
            raise BadRequest("each call must be a JSON object")
        if slot is None:
            slot, lease = body.get("slot"), body.get("lease")
            if not _integer(slot):
                raise BadRequest("each call needs an integer 'slot'")
            if lease is not None and not isinstance(lease, str):
                raise BadRequest("'lease' must be a string")
        exec_id = body.get("exec_id")
        if not isinstance(exec_id, str) or not 1 <= len(exec_id) <= MAX_EXEC_ID:
            raise BadRequest(f"'exec_id' must be a string of 1-{MAX_EXEC_ID} characters")
        tool = body.get("tool")
        if not isinstance(tool, str):
            raise BadRequest("'tool' must be a string")
        args = body.get("args", {})
        if not isinstance(args, dict):
            raise BadRequest("'args' must be an object")
        timeout = body.get("timeout")
        if timeout is not None and (not _number(timeout) or not 0 < timeout <= max_timeout):
            raise BadRequest(f"'timeout' must be a number of seconds in (0, {max_timeout:.0f}]")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        return cls(slot=slot, lease=lease or "", exec_id=exec_id, tool=tool, args=args,
                   timeout=float(timeout) if timeout is not None else default_timeout, stream=stream)


# --- answers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    ready: bool
    slots: int

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "slots": self.slots}

    @classmethod
    def from_json(cls, data: object) -> "Health":
        data = _need(data, "health")
        return cls(bool(data.get("ready")), _get(data, "slots", _integer, "health", "an integer"))


@dataclass(frozen=True)
class Grant:
    """A leased slot, as the server grants it."""

    slot: int
    lease: str = field(repr=False)
    ttl: float
    free: int | None = None  # slots still free on that server after this grant (a hint)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"slot": self.slot, "lease": self.lease, "ttl": self.ttl}
        if self.free is not None:
            body["free"] = self.free
        return body

    @classmethod
    def from_json(cls, data: object) -> "Grant":
        data = _need(data, "acquire")
        free = data.get("free")
        return cls(slot=_get(data, "slot", lambda v: _integer(v) and v >= 0, "acquire", "a slot index"),
                   lease=_get(data, "lease", lambda v: isinstance(v, str) and v, "acquire", "a lease string"),
                   ttl=float(_get(data, "ttl", _number, "acquire", "a number of seconds")),
                   free=free if _integer(free) else None)


@dataclass(frozen=True)
class CallAnswer:
    """What one call came to, on the wire: the tool's result, or an error kind and message."""

    slot: int
    exec_id: str
    tool: str
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    # An ErrorKind; a kind this version does not know (a newer server's) stays a str.
    error_kind: ErrorKind | str | None = None
    error_message: str | None = None

    @classmethod
    def success(cls, call: Call, result: dict[str, Any]) -> "CallAnswer":
        return cls(call.slot, call.exec_id, call.tool, True, result)

    @classmethod
    def failure(cls, call: Call, kind: ErrorKind | str, message: str) -> "CallAnswer":
        return cls(call.slot, call.exec_id, call.tool, False, error_kind=kind, error_message=message)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"slot": self.slot, "exec_id": self.exec_id, "tool": self.tool, "ok": self.ok}
        if self.ok:
            body["result"] = self.result
        else:
            body.update(error_body(self.error_kind or ErrorKind.ERROR, self.error_message or ""))
        return body

    @classmethod
    def from_json(cls, data: object) -> "CallAnswer":
        data = _need(data, "call answer")
        ok = _get(data, "ok", lambda v: isinstance(v, bool), "call answer", "true or false")
        base = dict(slot=_get(data, "slot", _integer, "call answer", "a slot index"),
                    exec_id=_get(data, "exec_id", lambda v: isinstance(v, str), "call answer", "a string"),
                    tool=_get(data, "tool", lambda v: isinstance(v, str), "call answer", "a tool name"), ok=ok)
        if ok:
            return cls(**base, result=_get(data, "result", lambda v: isinstance(v, dict), "call answer",
                                           "an object"))
        error = _get(data, "error", lambda v: isinstance(v, dict), "call answer", "an error object")
        return cls(**base, error_kind=ErrorKind.read(str(error.get("kind") or ErrorKind.ERROR)),
                   error_message=str(error.get("message") or "unknown error"))


@dataclass(frozen=True)
class BashResult:
    """A `bash` call's result (CallAnswer.result of tool "bash"), as the slot agent
    sends it: one shape for its three forms, a plain command, a call in a named
    session (the session fields set) and a background start (`background`, `handle`
    and `pid` set). The agent (standard library only) builds it as a dict;
    tests/test_kinds.py pins that every key it sends is a field here.

    Read leniently, as before it had a type: a field that is missing takes its
    default, and the server forwards the agent's dict as it came, never a re-encoding.
    The optional fields are None when the agent did not send them."""

    exit_code: int | None = None
    signal: int | None = None  # the signal that ended the command (a session's exit 137 is reported as 9)
    timed_out: bool = False
    duration: float = 0.0
    stdout: str = ""
    stderr: str = ""
    stdout_dropped: int | None = None  # output bytes past the cap, not captured
    stderr_dropped: int | None = None
    session: str | None = None
    session_started: bool | None = None
    session_ended: bool | None = None
    waiting: bool | None = None  # returned on silence: the command still runs
    interrupted: bool | None = None
    background: bool | None = None
    handle: str | None = None
    pid: int | None = None
    # The tag every process of the command carries (agent.CALL_ENV): a limit breach that
    # killed a process with it killed part of this call, whatever the call's exit code.
    call: str | None = None

    # The fields a caller finds in ToolResult.data (the rest have fields of their own).
    EXTRA: ClassVar[tuple[str, ...]] = ("stdout_dropped", "stderr_dropped", "session", "session_started",
                                         "session_ended", "waiting", "interrupted", "background", "handle", "pid")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BashResult":
        return cls(exit_code=data.get("exit_code"), signal=data.get("signal"),
                   timed_out=bool(data.get("timed_out")), duration=float(data.get("duration") or 0.0),
                   stdout=data.get("stdout", ""), stderr=data.get("stderr", ""),
                   call=call if isinstance(call := data.get("call"), str) else None,
                   **{key: data.get(key) for key in cls.EXTRA})

    @property
    def killed_by_signal(self) -> bool:
        return killed_by_signal(self.signal, self.timed_out)

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)

    def extra(self) -> dict[str, Any]:
        """The fields of EXTRA the agent sent."""
        return {key: value for key in self.EXTRA if (value := getattr(self, key)) is not None}


def killed_by_signal(signal: int | None, timed_out: bool) -> bool:
    """A command ended by a signal that its own timeout did not send: a slot limit's
    watchdog, the job's SIGTERM reaching it, a kill by hand. The one place this is
    decided; the node server then looks for a breach, the pool for its job's end."""
    return bool(signal) and not timed_out


@dataclass(frozen=True)
class StreamEvent:
    """One line of a streamed exec: an output chunk (`event` stdout or stderr, with its
    `data` and the bytes dropped just before it, `skipped`), or the last line (`event`
    result, with the call's `answer` and the output bytes dropped in all)."""

    event: str
    data: str = ""
    skipped: int = 0
    answer: CallAnswer | None = None
    dropped_bytes: int = 0

    @classmethod
    def output(cls, stream: str, data: str, skipped: int = 0) -> "StreamEvent":
        return cls(stream, data, skipped)

    @classmethod
    def result(cls, answer: CallAnswer, dropped_bytes: int = 0) -> "StreamEvent":
        return cls("result", answer=answer, dropped_bytes=dropped_bytes)

    def to_json(self) -> dict[str, Any]:
        if self.answer is not None:
            return {"event": "result", "answer": self.answer.to_json(), "dropped_bytes": self.dropped_bytes}
        body: dict[str, Any] = {"event": self.event, "data": self.data}
        if self.skipped:
            body["skipped"] = self.skipped
        return body

    def to_line(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: object) -> "StreamEvent":
        data = _need(data, "stream event")
        event = _get(data, "event", lambda v: v in (*STREAM_OUTPUTS, "result"), "stream event",
                     "stdout, stderr or result")
        if event == "result":
            dropped = data.get("dropped_bytes", 0)
            return cls.result(CallAnswer.from_json(data.get("answer")), dropped if _integer(dropped) else 0)
        skipped = data.get("skipped", 0)
        return cls.output(event, _get(data, "data", lambda v: isinstance(v, str), "stream event", "a string"),
                          skipped if _integer(skipped) else 0)


def batch_answers(data: object, calls: list[Call]) -> list[CallAnswer]:
    """The answers of a batch in call order, matched by exec id (not by position: an
    answer list that is short or out of order must not pin one call's result on
    another). A call the answer does not cover gets a `server_gone` failure of its own."""
    data = _need(data, "batch")
    results = _get(data, "results", lambda v: isinstance(v, list), "batch", "a list")
    by_id = {answer.exec_id: answer for answer in map(CallAnswer.from_json, results)}
    return [by_id.get(call.exec_id) or CallAnswer.failure(
                call, ErrorKind.SERVER_GONE, "the node server's answer to the batch holds no result for this call")
            for call in calls]


@dataclass(frozen=True)
class SlotsAnswer:
    """GET /v1/slots: every slot's state, the count per state, calls running."""

    slots: list[dict[str, Any]]
    counts: dict[str, int]
    running: int

    def to_json(self) -> dict[str, Any]:
        return {"slots": self.slots, "counts": self.counts, "running": self.running}

    @classmethod
    def from_json(cls, data: object) -> "SlotsAnswer":
        data = _need(data, "slots")
        counts = _get(data, "counts", lambda v: isinstance(v, dict) and all(_integer(n) for n in v.values()),
                      "slots", "an object of counts")
        return cls(slots=_get(data, "slots", lambda v: isinstance(v, list), "slots", "a list"),
                   counts=counts, running=int(data.get("running") or 0))

    @property
    def free(self) -> int:
        return self.counts.get(SlotState.FREE, 0)


@dataclass(frozen=True)
class TreeRequest:
    """What a tree download asks: the workspace folder (relative, or under /workspace),
    the caps the server stops at, and glob patterns left out (the agent's `exclude`)."""

    path: str
    max_bytes: int
    max_entries: int
    exclude: tuple[str, ...] = ()

    def to_query(self) -> list[tuple[str, str]]:
        return ([("path", self.path), ("max_bytes", str(self.max_bytes)), ("max_entries", str(self.max_entries))]
                + [("exclude", pattern) for pattern in self.exclude])

    @classmethod
    def from_query(cls, query: Any, max_bytes: int, max_entries: int) -> "TreeRequest":
        """From a request's query (a multidict); the caps at most the given ceilings."""
        def cap(key: str, ceiling: int) -> int:
            raw = query.get(key)
            if raw is None or not (raw.isascii() and raw.isdigit()) or int(raw) > ceiling:
                raise BadRequest(f"{key} must be an integer in 0..{ceiling}")
            return int(raw)

        path = query.get("path")
        if not path:
            raise BadRequest("path is required")
        return cls(path, cap("max_bytes", max_bytes), cap("max_entries", max_entries),
                   tuple(query.getall("exclude", ())))


@dataclass(frozen=True)
class TreeEnd:
    """The last word of a tree answer: what went in, or why it stopped."""

    dirs: int = 0
    files: int = 0
    links: int = 0
    bytes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    error_kind: ErrorKind | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.error_kind is not None:
            return error_body(self.error_kind, self.error)
        return {"dirs": self.dirs, "files": self.files, "links": self.links, "bytes": self.bytes,
                "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: object) -> "TreeEnd":
        what = "a tree's end"
        data = _need(data, what)
        if "error" in data:
            error = _need(data["error"], what)
            kind, message = error.get("kind"), error.get("message")
            if not isinstance(kind, str) or not isinstance(message, str):
                raise BadAnswer(f"{what}: malformed error {error!r}"[:200])
            return cls(error_kind=ErrorKind.read(kind), error=message)
        counts = {key: _get(data, key, _integer, what, "an integer") for key in ("dirs", "files", "links", "bytes")}
        skipped = data.get("skipped")
        if not isinstance(skipped, list) or not all(isinstance(s, dict) for s in skipped):
            raise BadAnswer(f"{what}: skipped is not a list of objects")
        return cls(**counts, skipped=skipped)
