"""The error types every layer shares.

Each kind of failure is its own class so that callers (the pool, the CLI) can say
exactly what went wrong in one line, and so that results can carry an `error_kind`
a program can branch on.
"""
from __future__ import annotations


class HpcSandboxError(Exception):
    """Base class: every error hpc-sandbox raises on purpose is one of these."""

    kind = "error"


class SpecError(HpcSandboxError):
    """A SandboxSpec (or profile) value is impossible; names the field."""

    kind = "bad_spec"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ConfigError(HpcSandboxError):
    kind = "bad_config"


class RuntimeUnavailable(HpcSandboxError):
    """A slot runtime cannot start here (binary missing, namespaces off, image missing)."""

    kind = "runtime_unavailable"


class SchedulerError(HpcSandboxError):
    """A scheduler command failed; what happened is in fields, not only in the text."""

    kind = "scheduler"

    def __init__(self, message: str, *, timed_out: bool = False, returncode: int | None = None,
                 said: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out  # the command did not answer in time (a hung controller)
        self.returncode = returncode  # its exit code, when it ran and failed
        self.said = said  # what it printed on failure (stderr, else stdout), "" when silent


class JobNotFound(HpcSandboxError):
    kind = "job_not_found"


# --- errors a node server client can meet --------------------------------------------


class ClientError(HpcSandboxError):
    """Base for failures talking to a node server."""

    kind = "client"


class AuthError(ClientError):
    kind = "auth"


class NotFound(ClientError):
    kind = "not_found"


class BadRequest(ClientError):
    kind = "bad_request"


class LeaseLost(ClientError):
    """The slot's lease expired or was taken over; the slot may have been reset."""

    kind = "lease_lost"


class NoFreeSlot(ClientError):
    kind = "no_free_slot"


class LimitExceeded(ClientError):
    """A size or concurrency limit of the node server was hit."""

    kind = "limit"


class CallTimeout(ClientError):
    """The HTTP call itself did not complete in time (not a command timeout)."""

    kind = "timeout"


class ServerGone(ClientError):
    """The node server cannot be reached (dead, job ended, network)."""

    kind = "server_gone"


class NoCapacity(HpcSandboxError):
    """The pool could not hand out a slot within its wait."""

    kind = "no_capacity"


class JobEnded(ClientError):
    """The scheduler ended the job that held the slot (cancel, walltime, preemption, node failure)."""

    kind = "job_ended"
