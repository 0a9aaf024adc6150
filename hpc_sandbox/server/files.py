"""Streaming file transfer between a client and a slot's workspace.

The node server runs on the host, outside the slot's container, with the user's
own rights, while the workspace is written by untrusted code. So a path is walked
one component at a time from the workspace's directory descriptor with
O_NOFOLLOW: no symlink is ever followed (a slot could swap one in between a check
and an open), and `..` is refused outright.
"""
from __future__ import annotations

import os
import secrets
import stat
from ..errors import BadRequest, NotFound
from ..paths import split_workspace_path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(workspace: str, parts: list[str], create: bool) -> int:
    fd = os.open(workspace, _DIR_FLAGS)
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"{'/'.join(parts)}: no such file") from None
                os.mkdir(name, 0o755, dir_fd=fd)
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                raise BadRequest(f"{'/'.join(parts)}: {name} is a symlink or not a directory ({exc.strerror})") from None
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_for_read(workspace: str, path: str) -> tuple[int, int]:
    """Open a regular file in the workspace; returns (fd, size)."""
    parts = split_workspace_path(path)
    parent = _open_parent(workspace, parts, create=False)
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as exc:
        raise BadRequest(f"{path}: cannot open ({exc.strerror}; symlinks are not followed)") from None
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadRequest(f"{path}: not a regular file")
    return fd, st.st_size


class AtomicUpload:
    """Write into a temp file beside the target, then rename it into place."""

    def __init__(self, workspace: str, path: str) -> None:
        self.parts = split_workspace_path(path)
        self.path = path
        self.parent = _open_parent(workspace, self.parts, create=True)
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
