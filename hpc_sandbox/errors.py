"""The error types every layer shares, and the one list of error kinds.

Each kind of failure is its own class so that callers (the pool, the CLI) can say
exactly what went wrong in one line, and so that results can carry an `error_kind`
a program can branch on. Every kind that is raised, answered on the wire or put in a
result is a member of `ErrorKind`; no module spells one as a bare string (the slot
agent, which imports nothing from the package, sends its kinds as strings: the tests
pin that each of them is a member here).
"""
from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """What went wrong, for programs to branch on. The value is what travels on the
    wire and what `ToolResult.error_kind` compares equal to (a member is a `str`), so
    `result.error_kind == "timeout"` keeps working for callers that predate the enum.
    protocol.ERRORS maps the kinds a node server refuses a request with to HTTP statuses.
    """

    # A member formats as its value, on every Python this runs on (3.10 formats a
    # str-mixin enum by its value, 3.12 by str()).
    def __str__(self) -> str:
        return self.value

    @classmethod
    def read(cls, raw: str) -> "ErrorKind | str":
        """The member a kind read off the wire is; a kind this version does not know
        (a newer server's) stays the string it was, not an error of its own."""
        try:
            return cls(raw)
        except ValueError:
            return raw

    ERROR = "error"  # an unexpected failure (a bug, an answer with no kind)

    # --- control plane ---
    BAD_SPEC = "bad_spec"
    BAD_CONFIG = "bad_config"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    SCHEDULER = "scheduler"
    JOB_NOT_FOUND = "job_not_found"
    JOB_FAILED = "job_failed"

    # --- a node server refuses a request (HTTP error answers; statuses in protocol.ERRORS) ---
    AUTH = "auth"
    NOT_FOUND = "not_found"  # also the agent's: no such file
    BAD_REQUEST = "bad_request"  # also the agent's: bad arguments to a tool
    LEASE_LOST = "lease_lost"
    NO_FREE_SLOT = "no_free_slot"
    LIMIT = "limit"  # a limit of the node server itself (body size, calls at once, batch size)
    IO = "io"  # the server's disk or permissions (also the agent's: an OS error in a tool)
    HTTP = "http"  # any other HTTP error, from aiohttp or whatever answers on the port

    # --- a call the node server took that failed (in a CallAnswer) ---
    SLOT_UNAVAILABLE = "slot_unavailable"  # the slot is broken or not leased
    LIMIT_EXCEEDED = "limit_exceeded"  # a slot limit (memory, processes, disk) ended the command
    AGENT_DIED = "agent_died"
    AGENT_STUCK = "agent_stuck"
    SERVER_STOPPING = "server_stopping"  # SIGTERM: the job was cancelled, preempted or ran out

    # --- the slot agent's own (a tool refused or failed; sent as strings by agent.py) ---
    PATH = "path"  # a path outside the workspace, with '..', or through a symlink
    NOT_A_DIRECTORY = "not_a_directory"
    IS_DIRECTORY = "is_directory"
    NOT_A_FILE = "not_a_file"
    TOO_LARGE = "too_large"
    TOO_MANY = "too_many"
    BUSY = "busy"
    NOT_RUNNING = "not_running"
    UNKNOWN_TOOL = "unknown_tool"
    RESET_FAILED = "reset_failed"

    # --- the client and the pool ---
    CLIENT = "client"
    TIMEOUT = "timeout"  # an HTTP call that did not complete, or a command that ran out its timeout
    SERVER_GONE = "server_gone"
    JOB_ENDED = "job_ended"
    NO_CAPACITY = "no_capacity"
    WAITING = "waiting"  # a session command still runs, silent (waiting for input?)

    # --- compat faces ---
    UNAVAILABLE = "unavailable"  # a slot lacks what a tool needs (tmux)
    CORRUPT = "corrupt"  # an artifact that does not match what the slot sent


class HpcSandboxError(Exception):
    """Base class: every error hpc-sandbox raises on purpose is one of these."""

    kind: ErrorKind = ErrorKind.ERROR


class SpecError(HpcSandboxError):
    """A SandboxSpec (or profile) value is impossible; names the field."""

    kind = ErrorKind.BAD_SPEC

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ConfigError(HpcSandboxError):
    kind = ErrorKind.BAD_CONFIG


class RuntimeUnavailable(HpcSandboxError):
    """A slot runtime cannot start here (binary missing, namespaces off, image missing)."""

    kind = ErrorKind.RUNTIME_UNAVAILABLE


class SchedulerError(HpcSandboxError):
    """A scheduler command failed; what happened is in fields, not only in the text."""

    kind = ErrorKind.SCHEDULER

    def __init__(self, message: str, *, timed_out: bool = False, returncode: int | None = None,
                 said: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out  # the command did not answer in time (a hung controller)
        self.returncode = returncode  # its exit code, when it ran and failed
        self.said = said  # what it printed on failure (stderr, else stdout), "" when silent


class JobNotFound(HpcSandboxError):
    kind = ErrorKind.JOB_NOT_FOUND


# --- errors a node server client can meet --------------------------------------------


class ClientError(HpcSandboxError):
    """Base for failures talking to a node server."""

    kind = ErrorKind.CLIENT


class AuthError(ClientError):
    kind = ErrorKind.AUTH


class NotFound(ClientError):
    kind = ErrorKind.NOT_FOUND


class BadRequest(ClientError):
    kind = ErrorKind.BAD_REQUEST


class PathRefused(BadRequest):
    """A path outside the workspace, with '..', or through a symlink: the same kind
    whether a tool (the agent) or a file endpoint (the node server) refused it."""

    kind = ErrorKind.PATH


class LeaseLost(ClientError):
    """The slot's lease expired or was taken over; the slot may have been reset."""

    kind = ErrorKind.LEASE_LOST


class NoFreeSlot(ClientError):
    kind = ErrorKind.NO_FREE_SLOT


class LimitExceeded(ClientError):
    """A size or concurrency limit of the node server was hit (HTTP 429). Not a slot's
    limit: a command that a memory, process or disk limit ended is a failed call of
    kind LIMIT_EXCEEDED, with the call's answer, not a refused request."""

    kind = ErrorKind.LIMIT


class CallTimeout(ClientError):
    """The HTTP call itself did not complete in time (not a command timeout)."""

    kind = ErrorKind.TIMEOUT


class ServerGone(ClientError):
    """The node server cannot be reached (dead, job ended, network)."""

    kind = ErrorKind.SERVER_GONE


class NoCapacity(HpcSandboxError):
    """The pool could not hand out a slot within its wait."""

    kind = ErrorKind.NO_CAPACITY


class JobEnded(ClientError):
    """The scheduler ended the job that held the slot (cancel, walltime, preemption, node failure)."""

    kind = ErrorKind.JOB_ENDED
