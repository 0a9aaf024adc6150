"""Plain typed objects that cross module boundaries (client, pool, CLI)."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorKind
from .protocol import BashResult, CallAnswer, killed_by_signal

LOCATIONS = ("local", "cluster", "cloud")


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
    timeout. `error_kind` names the failure for programs (an ErrorKind, equal to its
    string): a tool-level kind from the agent (path, not_found, not_a_file, ...), or
    one of timeout, waiting, agent_died, agent_stuck, limit_exceeded, lease_lost,
    server_gone, auth, limit, job_ended. A `bash` call's result is read as a
    protocol.BashResult: its output, exit code, signal and timing are fields here, the
    rest (session, handle, output bytes dropped...) is in `data`.
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
    error_kind: ErrorKind | str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the tool's own fields (content, entries, sha256, ...)

    @classmethod
    def from_answer(cls, answer: CallAnswer, slot: Slot | None = None) -> "ToolResult":
        """Build from a node server's answer to one call."""
        tool = answer.tool
        where = {"slot": slot.id if slot else None, "location": slot.location if slot else None}
        if not answer.ok:
            return cls(success=False, tool=tool, error=answer.error_message or "unknown error",
                       error_kind=answer.error_kind or ErrorKind.ERROR, **where)
        if tool == "bash":
            bash = BashResult.from_json(answer.result)
            # A session call that returned on silence (`waiting`) has no exit code yet: not
            # a success, and said so; a background start succeeded when it has a handle.
            error: str | None = None
            error_kind: ErrorKind | None = None
            if bash.timed_out:
                error, error_kind = "command timed out", ErrorKind.TIMEOUT
            elif bash.waiting:
                error, error_kind = ("the command is still running and printed nothing for idle_timeout "
                                     "(waiting for input?): follow it with input or interrupt"), ErrorKind.WAITING
            elif bash.killed_by_signal:
                # No limit of the slot's killed it (that would be a limit_exceeded answer):
                # a SIGKILL nobody here sent is most often the kernel's OOM killer.
                error = f"killed by {_signal_name(bash.signal)}" + (" (out of memory?)" if bash.signal == 9 else "")
            return cls(
                success=(bash.exit_code == 0 and not bash.timed_out and not bash.waiting) or bool(bash.background),
                tool=tool,
                stdout=bash.stdout,
                stderr=bash.stderr,
                exit_code=bash.exit_code,
                signal=bash.signal,
                duration=bash.duration,
                timed_out=bash.timed_out,
                truncated=bash.truncated,
                error=error,
                error_kind=error_kind,
                data=bash.extra(),
                **where,
            )
        return cls(success=True, tool=tool, data=dict(answer.result), **where)

    @property
    def killed_by_signal(self) -> bool:
        """A command that a signal ended, not its timeout (see protocol.killed_by_signal)."""
        return killed_by_signal(self.signal, self.timed_out)

    @classmethod
    def failure(cls, tool: str, kind: ErrorKind | str, message: str, slot: Slot | None = None) -> "ToolResult":
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


def _signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number or 0).name
    except ValueError:
        return f"signal {number}"
