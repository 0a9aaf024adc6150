"""A face's artifact helpers: a slot's workspace files read, listed and archived as dicts,
each one agent call (read_file, list_files, archive) through the pool.

A failure raises ArtifactError with the agent's kind (not_found, path, too_large, ...):
the agent walks every path (workspace relative, no symlink followed); nothing here
checks a path a second time.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ErrorKind, HpcSandboxError
from ..models import Slot, ToolResult
from ..pool import SlotPool

DEFAULT_ARTIFACT_BYTES = 1 << 20
DEFAULT_MAX_ENTRIES = 1000


class ArtifactListing(list):
    """The entries of list_artifacts (dicts with path, is_dir, size, mtime, type): a
    plain list, with `truncated` True when max_entries (or the depth limit) cut it."""

    truncated: bool = False


class ArtifactError(HpcSandboxError):
    """An artifact helper failed: `kind` is the agent's (not_found, path, too_large, ...)."""

    def __init__(self, kind: ErrorKind | str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _patterns(exclude: str | Sequence[str]) -> list[str]:
    """`exclude` as the agent takes it: one pattern alone is a list of one."""
    return [exclude] if isinstance(exclude, str) else list(exclude)


async def _call(pool: SlotPool, slot: Slot, tool: str, args: dict[str, Any], timeout: float | None) -> ToolResult:
    result = await pool.execute(slot, tool, args, timeout=timeout)
    if not result.success:
        raise ArtifactError(result.error_kind or ErrorKind.ERROR, result.error or f"{tool} failed")
    return result


async def read_artifact(pool: SlotPool, slot: Slot, path: str, max_bytes: int = DEFAULT_ARTIFACT_BYTES,
                        encoding: str = "text", timeout_s: float | None = None) -> dict[str, Any]:
    """A workspace file (agent read_file with sha256): a dict with path (workspace
    relative), content (the first max_bytes; text, or base64 with encoding="base64"),
    encoding, size (the whole file's), sha256 (the whole file's), truncated, bytes_read,
    lossy (binary read as text)."""
    result = await _call(pool, slot, "read_file", {"path": path, "limit": max_bytes, "sha256": True,
                                                   "encoding": encoding}, timeout_s)
    data = result.data
    return {"path": data["path"], "content": data["content"], "encoding": data["encoding"],
            "size": data["size"], "sha256": data.get("sha256"), "truncated": not data["eof"],
            "bytes_read": data["bytes_read"], "lossy": bool(data.get("lossy"))}


async def list_artifacts(pool: SlotPool, slot: Slot, path: str = ".", recursive: bool = False,
                         max_entries: int = DEFAULT_MAX_ENTRIES, timeout_s: float | None = None, *,
                         exclude: str | Sequence[str] = ()) -> ArtifactListing:
    """The entries under `path` (agent list_files): dicts with path (workspace relative),
    is_dir, size, mtime, type (file, dir, symlink, other); at most max_entries of them
    (`.truncated` says whether there were more). `exclude`: glob patterns matched
    against each entry's name and workspace-relative path ([".venv", ".git",
    "__pycache__", "*.pyc"]); an excluded folder is not entered. Nothing is excluded
    unless asked."""
    args: dict[str, Any] = {"path": path, "recursive": recursive, "max_entries": max_entries}
    if exclude:
        args["exclude"] = _patterns(exclude)
    result = await _call(pool, slot, "list_files", args, timeout_s)
    listing = ArtifactListing({"path": entry["path"], "is_dir": entry["type"] == "dir", "size": entry["size"],
                               "mtime": entry["mtime"], "type": entry["type"]}
                              for entry in result.data["entries"])
    listing.truncated = bool(result.data.get("truncated"))
    return listing


async def archive_artifacts(pool: SlotPool, slot: Slot, paths: str | Sequence[str] = ".",
                            dest: str | Path | None = None, max_bytes: int | None = None,
                            timeout_s: float | None = None, *, exclude: str | Sequence[str] = ()) -> dict[str, Any]:
    """A tar.gz of `paths` (files or folders, workspace relative; "." is the whole
    workspace), member names relative to the workspace ("sub/a.txt"): one agent `archive`
    of them all (`paths`), so nothing is unpacked or re-packed here. Returns a dict:
    content (the bytes, or None when written to `dest`), path (`dest`), size, sha256 (of
    the tar.gz), members. `max_bytes` caps the archive. `exclude`: glob patterns, as
    list_artifacts takes them (what `paths` names is never excluded itself)."""
    wanted = [paths] if isinstance(paths, str) else list(paths)
    args: dict[str, Any] = {"paths": wanted}
    if exclude:
        args["exclude"] = _patterns(exclude)
    if max_bytes is not None:
        args["max_bytes"] = max_bytes
    data = (await _call(pool, slot, "archive", args, timeout_s)).data
    try:
        packed = base64.b64decode(data["content"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArtifactError(ErrorKind.CORRUPT, f"archive of {', '.join(wanted)}: not base64: {exc}") from None
    digest = hashlib.sha256(packed).hexdigest()
    if digest != data.get("sha256"):
        raise ArtifactError(ErrorKind.CORRUPT,
                            f"archive of {', '.join(wanted)}: sha256 does not match what the slot sent")
    written: str | None = None
    if dest is not None:
        target = Path(dest).expanduser()
        partial = target.with_name(target.name + ".part")
        await asyncio.to_thread(partial.write_bytes, packed)
        os.replace(partial, target)
        written = str(target)
    return {"content": None if written else packed, "path": written, "size": len(packed), "sha256": digest,
            "members": list(data.get("members", []))}
