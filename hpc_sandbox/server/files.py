"""Streaming file transfer between a client and a slot's workspace.

The node server runs on the host, outside the slot's container, with the user's
own rights, while the workspace is written by untrusted code. So a path is walked as
the agent walks it (agent.py, "paths"): one component at a time from the workspace's
directory descriptor with O_NOFOLLOW, no symlink ever followed (a slot could swap one
in between a check and an open), `..` refused outright, nothing but a regular file
opened for data.
"""
from __future__ import annotations

import os
import secrets

from ..agent import DIR_FLAGS, ToolError, open_child_file, open_folder
from ..errors import BadRequest, ClientError, ErrorKind
from ..paths import split_workspace_path
from ..protocol import ERRORS


def refused(exc: ToolError) -> ClientError:
    """The agent's refusal of a path, as the file endpoints answer it: with the agent's
    own kind where the protocol has a status for it (not_found, path), else bad_request."""
    kind = ErrorKind.read(exc.kind)
    cls = ERRORS[kind][0] if kind in ERRORS else BadRequest
    return cls(exc.message)


def _open_parent(workspace: str, parts: list[str], path: str, create: bool) -> int:
    """The folder that holds the path's last component, walked as the agent walks."""
    top = os.open(workspace, DIR_FLAGS)
    try:
        return open_folder(top, parts[:-1], path, create)
    except ToolError as exc:
        raise refused(exc) from None
    finally:
        os.close(top)


def open_for_read(workspace: str, path: str) -> tuple[int, int]:
    """Open a regular file in the workspace; returns (fd, size)."""
    parts = split_workspace_path(path)
    parent = _open_parent(workspace, parts, path, create=False)
    try:
        fd = open_child_file(parent, parts[-1], path)
    except ToolError as exc:
        raise refused(exc) from None
    finally:
        os.close(parent)
    return fd, os.fstat(fd).st_size


class AtomicUpload:
    """Write into a temp file beside the target, then rename it into place."""

    def __init__(self, workspace: str, path: str, mode: int = 0o644) -> None:
        self.parts = split_workspace_path(path)
        self.mode = mode
        self.path = path
        self.parent = _open_parent(workspace, self.parts, path, create=True)
        self.tmp_name = f".hpc-sandbox-upload-{secrets.token_hex(6)}"
        self.fd = os.open(self.tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o644, dir_fd=self.parent)
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)

    def commit(self) -> None:
        os.fchmod(self.fd, self.mode)  # exactly the mode asked for, whatever the umask
        os.close(self.fd)
        self.fd = -1
        # rename() replaces a symlink at the target rather than following it.
        os.rename(self.tmp_name, self.parts[-1], src_dir_fd=self.parent, dst_dir_fd=self.parent)
        os.close(self.parent)
        self.parent = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.parent >= 0:
            try:
                os.unlink(self.tmp_name, dir_fd=self.parent)
            except OSError:
                pass
            os.close(self.parent)
            self.parent = -1
