"""The DOUBLE's copy of `modal.exception`: the classes the adapter catches, in the real SDK's
hierarchy (modal 1.6.4, checked with `__mro__`), so `except modal.exception.Error` and
friends behave as they would against the real SDK.

The real SDK makes a subset of its errors also subclass `grpclib.GRPCError` (through
`_GRPCErrorWrapper`) while it migrates away from raw gRPC errors; the double keeps that
where grpclib is importable (it is whenever the real `modal` is installed)."""
from __future__ import annotations

try:
    from grpclib import GRPCError as _GRPCBase
except ImportError:  # pragma: no cover - only without the real SDK's dependencies
    _GRPCBase = Exception


class Error(Exception):
    """Base class for all Modal errors."""


class _GRPCErrorWrapper(_GRPCBase):
    """Stand-in for the real transitional class: behaves like a plain Exception."""

    def __init__(self, message: str | None = None):
        Exception.__init__(self, message or "")
        self._message = message or ""

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._message!r})"


class AlreadyExistsError(Error, _GRPCErrorWrapper):
    """A resource creation conflicts with an existing resource (e.g. a sandbox name in use)."""


class AuthError(Error, _GRPCErrorWrapper):
    """Missing or invalid authentication."""


class InternalError(Error, _GRPCErrorWrapper):
    """An internal error in the Modal system."""


class InvalidError(Error, _GRPCErrorWrapper):
    """The caller did something invalid."""


class ConflictError(InvalidError, _GRPCErrorWrapper):
    """The request conflicts with the current state, e.g. waiting on a sandbox that already finished."""


class NotFoundError(Error, _GRPCErrorWrapper):
    """A requested resource was not found."""


class ResourceExhaustedError(Error, _GRPCErrorWrapper):
    """A quota or rate limit was hit (Modal's throttling)."""


class ServiceError(Error, _GRPCErrorWrapper):
    """An error in basic client/server communication."""


class RemoteError(Error):
    """An error on the Modal server."""


class ImageBuildError(RemoteError):
    """An image failed to build."""


class TimeoutError(Error):  # noqa: A001 - the real SDK shadows the builtin name too
    """Base class for Modal timeouts."""


class SandboxTimeoutError(TimeoutError):
    """A sandbox exceeded its lifetime."""


class ExecTimeoutError(TimeoutError):
    """A container process exceeded its time limit."""


class SandboxTerminatedError(Error):
    """A sandbox was terminated for an internal reason."""


class ConnectionError(Error):  # noqa: A001 - as in the real SDK
    """Connecting to the Modal servers failed."""


class ExecutionError(Error):
    """Something unexpected happened during runtime."""


class DeprecationError(UserWarning):
    """Warning category for deprecated Modal features."""
