"""Plain typed objects that cross module boundaries (client, pool, CLI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocol import CallAnswer

LOCATIONS = ("local", "cluster", "cloud")
# The fields of a bash result kept in ToolResult.data: output sizes dropped, and those of a
# session call (session, session_started, session_ended, waiting, interrupted) or of a
# background start (background, handle, pid).
_BASH_DATA = ("stdout_dropped", "stderr_dropped", "session", "session_started", "session_ended", "waiting",
              "interrupted", "background", "handle", "pid")


@dataclass(frozen=True)
class Endpoint:
    """One node server, as a client reaches it."""

    url: str
    token: str = field(repr=False)  # never in a repr, so never in a log line by accident
    job_id: str
    name: str
    location: str = "cluster"
    slots: int = 0
    # The certificate an https server must present (pinned); None with https means the
    # system's CAs (a cloud tunnel's own certificate), and plain http has none.
    cert: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Slot:
    """A leased slot: where it lives and the lease that proves it is ours."""

    endpoint: Endpoint
    index: int
    lease: str = field(repr=False)
    trajectory_id: str | None = None

    @property
    def id(self) -> str:
        return f"{self.endpoint.job_id}/{self.endpoint.name}/{self.index}"

    @property
    def location(self) -> str:
        return self.endpoint.location

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class ToolResult:
    """What one tool call came to. A failure is a result with an error, never a hang.

    `success` is True when the tool did what was asked: for `bash`, exit code 0 and no
    timeout. `error_kind` names the failure for programs: a tool-level kind from the
    agent (path, not_found, not_a_file, ...), or one of timeout, agent_died,
    agent_stuck, limit_exceeded, lease_lost, server_gone, auth, limit, job_ended.
    """

    success: bool
    tool: str
    slot: str | None = None
    location: str | None = None
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    duration: float = 0.0
    timed_out: bool = False
    truncated: bool = False
    error: str | None = None
    error_kind: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the tool's own fields (content, entries, sha256, ...)

    @classmethod
    def from_answer(cls, answer: CallAnswer, slot: Slot | None = None) -> "ToolResult":
        """Build from a node server's answer to one call."""
        tool = answer.tool
        where = {"slot": slot.id if slot else None, "location": slot.location if slot else None}
        if not answer.ok:
            return cls(success=False, tool=tool, error=answer.error_message or "unknown error",
                       error_kind=answer.error_kind or "error", **where)
        result = dict(answer.result)
        if tool == "bash":
            timed_out = bool(result.get("timed_out"))
            exit_code = result.get("exit_code")
            # A session call that returned on silence (`waiting`) has no exit code yet: not
            # a success, and said so; a background start succeeded when it has a handle.
            waiting = bool(result.get("waiting"))
            error, error_kind = None, None
            if timed_out:
                error, error_kind = "command timed out", "timeout"
            elif waiting:
                error, error_kind = ("the command is still running and printed nothing for idle_timeout "
                                     "(waiting for input?): follow it with input or interrupt"), "waiting"
            return cls(
                success=(exit_code == 0 and not timed_out and not waiting) or bool(result.get("background")),
                tool=tool,
                stdout=result.get("stdout", ""),
                stderr=result.get("stderr", ""),
                exit_code=exit_code,
                signal=result.get("signal"),
                duration=float(result.get("duration") or 0.0),
                timed_out=timed_out,
                truncated=bool(result.get("stdout_dropped") or result.get("stderr_dropped")),
                error=error,
                error_kind=error_kind,
                data={k: result[k] for k in _BASH_DATA if k in result},
                **where,
            )
        return cls(success=True, tool=tool, data=result, **where)

    @classmethod
    def failure(cls, tool: str, kind: str, message: str, slot: Slot | None = None) -> "ToolResult":
        return cls(success=False, tool=tool, error=message, error_kind=kind,
                   slot=slot.id if slot else None, location=slot.location if slot else None)


@dataclass(frozen=True)
class ExecEvent:
    """One item of `pool.stream(...)`: a piece of output as it came (`kind` "stdout" or
    "stderr", its text in `data`, and `skipped`: output bytes just before it that a
    slow reader was not sent), or, last, the call's `result` (`kind` "result"), the
    same ToolResult `execute` returns, with `dropped_bytes`: output bytes the stream
    left out in all (the result itself is never cut short by the stream)."""

    kind: str
    data: str = ""
    skipped: int = 0
    result: ToolResult | None = None
    dropped_bytes: int = 0

    @classmethod
    def ended(cls, result: ToolResult, dropped_bytes: int = 0) -> "ExecEvent":
        return cls("result", result=result, dropped_bytes=dropped_bytes)
