"""Workspace-relative paths as the HTTP API takes them (shared by client and server)."""
from __future__ import annotations

from .agent import SLOT_WORKSPACE, ToolError, workspace_parts
from .errors import BadRequest, PathRefused

_ROOTS = [[part for part in SLOT_WORKSPACE.split("/") if part]]


def split_folder_path(path: str) -> list[str]:
    """Components of a workspace-relative path (or one under /workspace, as a slot sees
    it), [] for the workspace itself: the agent's own rules (agent.workspace_parts) and
    refusal kinds (path, bad_request)."""
    try:
        return workspace_parts(path, _ROOTS)
    except ToolError as exc:
        raise (PathRefused if exc.kind == PathRefused.kind else BadRequest)(exc.message) from None


def split_workspace_path(path: str) -> list[str]:
    """As split_folder_path, for a path that names a file: never the workspace itself."""
    parts = split_folder_path(path)
    if not parts:
        raise BadRequest(f"{path}: names the workspace itself, not a file")
    return parts


def workspace_relative(path: str) -> str:
    """The normal relative spelling of a workspace path, for URLs."""
    return "/".join(split_workspace_path(path))
