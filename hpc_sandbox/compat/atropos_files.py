"""The Atropos face's file tools and artifact dicts, over the slot agent's own tools.

`read_file` / `write_file` calls of a batch answer in the words the environments read
(ATROPOS_TOOLBACKEND.md); read/list/archive_artifacts answer dicts with exactly the keys
the executor's models read, a failure being `success: False` with `error`, never an
exception. Every path is walked by the agent (workspace relative, no symlink followed,
no '..'): nothing here checks a path a second time; compat/artifacts.py makes the calls.
"""
from __future__ import annotations

import base64
import hashlib
import mimetypes
from collections.abc import Sequence
from typing import Any

from ..errors import ErrorKind, HpcSandboxError
from ..models import Slot as Lease
from ..models import ToolResult as PoolResult
from ..pool import SlotPool
from . import artifacts
from .atropos_types import ExecutionResult, failed

WRITE_MAX_CHARS = 100_000  # write_file refuses content longer than this (the environments' limit)
# read_file refuses a file larger than this: its text goes whole into a model's context,
# where 50,000 characters is already the cap of a command's output.
READ_FILE_MAX_BYTES = 1 << 20
ARTIFACT_MAX_BYTES = 10 << 20  # read_artifact's max_bytes=None: more is cut (truncated True)
LIST_MAX_ENTRIES = 10_000  # list_artifacts' max_entries=None: the agent's own default
ARCHIVE_FORMATS = ("tar.gz", "tgz")


def _path_error(result: PoolResult, path: str) -> str:
    """The environments' words for the agent's refusals of a path."""
    kind = result.error_kind
    if kind == ErrorKind.PATH:
        return "Access denied: path outside workspace"
    if kind == ErrorKind.NOT_FOUND:
        return f"File not found: {path}"
    if kind in (ErrorKind.NOT_A_FILE, ErrorKind.IS_DIRECTORY):
        return f"Not a file: {path}"
    return result.error or str(kind or ErrorKind.ERROR)


async def read_file(pool: SlotPool, lease: Lease, args: dict[str, Any], timeout: float) -> ExecutionResult:
    path = str(args.get("path", ""))
    # One byte over the cap is enough to tell a file too large, without reading it all.
    result = await pool.execute(lease, "read_file", {"path": path, "limit": READ_FILE_MAX_BYTES + 1}, timeout)
    if not result.success:
        return failed(result, _path_error(result, path), path=path)
    data = result.data
    if data["size"] > READ_FILE_MAX_BYTES:
        return failed(PoolResult.failure("read_file", ErrorKind.TOO_LARGE, "", lease),
                      f"File too large: {path} ({data['size']} bytes; at most {READ_FILE_MAX_BYTES})",
                      path=path, size=data["size"])
    meta = {"path": data["path"], "size": data["size"], "slot": result.slot, "location": result.location}
    if data.get("lossy"):
        meta["lossy"] = True  # binary bytes read as text
    return ExecutionResult(True, data["content"], "", slot_id=result.slot or "", metadata=meta)


def write_too_large(content: object) -> str | None:
    """Why write_file refuses `content` before it reaches the slot, if it does."""
    if not isinstance(content, str):
        return f"content must be a string, got {type(content).__name__}"
    if len(content) > WRITE_MAX_CHARS:
        return f"Content too large: {len(content)} characters (at most {WRITE_MAX_CHARS})"
    return None


async def write_file(pool: SlotPool, lease: Lease, args: dict[str, Any], timeout: float) -> ExecutionResult:
    path, content = str(args.get("path", "")), args.get("content", "")
    refusal = write_too_large(content)
    if refusal is not None:
        kind = ErrorKind.TOO_LARGE if isinstance(content, str) else ErrorKind.BAD_REQUEST
        return failed(PoolResult.failure("write_file", kind, refusal, lease), path=path)
    result = await pool.execute(lease, "write_file", {"path": path, "content": content}, timeout)
    if not result.success:
        return failed(result, _path_error(result, path), path=path)
    size = int(result.data.get("size", len(content.encode())))
    return ExecutionResult(True, f"Successfully wrote {size} bytes to {path}", "", slot_id=result.slot or "",
                           metadata={"path": path, "size": size, "slot": result.slot, "location": result.location})


# --- artifacts --------------------------------------------------------------------------


def _artifact_failure(exc: HpcSandboxError, **shape: Any) -> dict[str, Any]:
    return {**shape, "success": False, "error": str(exc), "error_kind": str(exc.kind)}


async def read_artifact(pool: SlotPool, lease: Lease, path: str, *, encoding: str = "text",
                        max_bytes: int | None = None, include_sha256: bool = False,
                        timeout_s: float | None = None) -> dict[str, Any]:
    """success, content, error, encoding, truncated, bytes (returned), file_size, path,
    mime, and with include_sha256 the sha256 of the bytes returned."""
    shape: dict[str, Any] = {"content": "", "encoding": encoding, "truncated": False, "bytes": 0, "file_size": 0,
                             "path": path, "mime": mimetypes.guess_type(path)[0]}
    if encoding not in ("text", "base64"):
        return {**shape, "success": False, "error": f"encoding must be 'text' or 'base64', got {encoding!r}"}
    limit = ARTIFACT_MAX_BYTES if max_bytes is None else max(0, int(max_bytes))
    try:
        # Always base64 on the wire: the bytes returned are hashed exactly, then shown as asked.
        got = await artifacts.read_artifact(pool, lease, path, limit, "base64", timeout_s)
    except HpcSandboxError as exc:
        return _artifact_failure(exc, **shape)
    raw = base64.b64decode(got["content"])
    content = got["content"] if encoding == "base64" else raw.decode("utf-8", "replace")
    found = {**shape, "success": True, "error": "", "content": content, "truncated": got["truncated"],
             "bytes": len(raw), "file_size": got["size"], "path": got["path"]}
    if include_sha256:
        found["sha256"] = hashlib.sha256(raw).hexdigest()
    return found


async def list_artifacts(pool: SlotPool, lease: Lease, path: str = ".", *, recursive: bool = False,
                         max_entries: int | None = None, timeout_s: float | None = None,
                         exclude: Sequence[str] = ()) -> dict[str, Any]:
    """success, entries (path, is_dir, size, mtime), truncated, error."""
    limit = LIST_MAX_ENTRIES if max_entries is None else max(1, int(max_entries))
    try:
        listing = await artifacts.list_artifacts(pool, lease, path, recursive, limit, timeout_s, exclude=exclude)
    except HpcSandboxError as exc:
        return _artifact_failure(exc, entries=[], truncated=False)
    entries = [{"path": e["path"], "is_dir": e["is_dir"], "size": e["size"], "mtime": e["mtime"]} for e in listing]
    return {"success": True, "entries": entries, "truncated": listing.truncated, "error": ""}


async def archive_artifacts(pool: SlotPool, lease: Lease, path: str = ".", *, archive_format: str = "tar.gz",
                            max_bytes: int | None = None, max_entries: int | None = None,
                            timeout_s: float | None = None, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """success, content (base64 of the tar.gz), error, encoding "base64", format, bytes,
    entry_count."""
    shape: dict[str, Any] = {"content": "", "encoding": "base64", "format": archive_format, "bytes": 0,
                             "entry_count": 0}
    if archive_format not in ARCHIVE_FORMATS:
        return {**shape, "success": False,
                "error": f"archive_format must be one of {', '.join(ARCHIVE_FORMATS)}, got {archive_format!r}"}
    try:
        packed = await artifacts.archive_artifacts(pool, lease, path, None, max_bytes, timeout_s, exclude=exclude)
    except HpcSandboxError as exc:
        return _artifact_failure(exc, **shape)
    count = len(packed["members"])
    if max_entries is not None and count > max_entries:
        return {**shape, "success": False, "entry_count": count,
                "error": f"Too many entries: {count} under {path} (max_entries {max_entries})"}
    return {**shape, "success": True, "error": "", "content": base64.b64encode(packed["content"]).decode("ascii"),
            "bytes": packed["size"], "entry_count": count}
