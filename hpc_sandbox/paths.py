"""Workspace-relative paths as the HTTP API takes them (shared by client and server)."""
from __future__ import annotations

from pathlib import PurePosixPath

from .errors import BadRequest

SLOT_WORKSPACE = "/workspace"


def split_workspace_path(path: str) -> list[str]:
    """Components of a workspace-relative path; refuses anything that could leave it."""
    if not path or "\x00" in path:
        raise BadRequest("path must be a non-empty string without NUL bytes")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        # Slots see their workspace at /workspace; accept that spelling, nothing else.
        try:
            pure = pure.relative_to(SLOT_WORKSPACE)
        except ValueError:
            raise BadRequest(f"{path}: outside the workspace") from None
    parts = [p for p in pure.parts if p not in ("", ".")]
    if ".." in parts:
        raise BadRequest(f"{path}: '..' is not allowed")
    if not parts:
        raise BadRequest(f"{path}: names the workspace itself, not a file")
    return parts


def workspace_relative(path: str) -> str:
    """The normal relative spelling of a workspace path, for URLs."""
    return "/".join(split_workspace_path(path))
