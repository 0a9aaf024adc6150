"""Trees in and out of a slot, on the caller's side: one tar archive each way.

Up: the caller's folder is packed here into one tar.gz (a temporary file), streamed
into the workspace as one file (the node server's PUT), and unpacked there by the
agent's `extract` tool, which deletes it. Two requests, whatever the tree holds.
Down: the node server packs the slot's folder into a tar.gz as it walks it (its tree
endpoint, server/trees.py), streamed into a temporary file here, and it is unpacked
here into the caller's folder. One request; memory bounded on both sides.

The rules of what is unpacked, and how, are the agent's (agent.py, "trees in"), and
they apply on this side too, because a slot makes the archive it sends: nothing is
written outside the caller's folder, no symlink is followed, no ownership is taken
from the archive. This module only decides what goes into an archive it makes:
folders (empty ones too), regular files with their modes (less setuid, setgid and
sticky) and mtimes, and symlinks that cannot lead out of the tree; a symlink that
could (absolute, or climbing above the top) and special files (FIFOs, sockets,
devices) are left out and named in the result's `skipped`.
"""
from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent import (DEFAULT_TREE_BYTES, DEFAULT_TREE_ENTRIES, DIR_FLAGS, TREE_MODE_BITS, ToolError,
                     link_stays_inside, unpack_tree)
from ..errors import ErrorKind
from ..protocol import TreeRequest

# The archive's name in the workspace while it waits for the agent to unpack it.
UPLOAD_PREFIX = ".hpc-sandbox-tree-"
# gzip level: the tree goes over a network, but packing must not cost more than sending.
COMPRESS_LEVEL = 6


@dataclass
class TreeLimits:
    """Caps on a tree moved either way: bytes of file data, and entries."""

    max_bytes: int = DEFAULT_TREE_BYTES
    max_entries: int = DEFAULT_TREE_ENTRIES


@dataclass
class PackedTree:
    """A local folder packed for upload: the archive's file and what went into it."""

    archive: Path
    entries: int = 0
    bytes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def discard(self) -> None:
        self.archive.unlink(missing_ok=True)


def _walk(top: Path):
    """(name below top, path, lstat) of everything under `top`, a folder before what
    it holds, symlinks reported and never entered."""
    pending = [("", top)]
    while pending:
        prefix, folder = pending.pop()
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda entry: entry.name)
        for entry in entries:
            name = f"{prefix}/{entry.name}" if prefix else entry.name
            st = entry.stat(follow_symlinks=False)
            yield name, Path(entry.path), st
            if stat.S_ISDIR(st.st_mode):
                pending.append((name, Path(entry.path)))


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & TREE_MODE_BITS
    info.mtime = int(st.st_mtime)
    # Never restored by the unpacker; not sent, so that the archive says nothing of the caller.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_tree(local_dir: Path, limits: TreeLimits) -> PackedTree:
    """Pack `local_dir`'s contents into a temporary tar.gz (the caller discards it).
    Raises ToolError (not_found, not_a_directory, too_large) or OSError."""
    top = Path(local_dir)
    if not top.exists():
        raise ToolError(ErrorKind.NOT_FOUND, f"{top}: no such folder")
    if not top.is_dir():
        raise ToolError(ErrorKind.NOT_A_DIRECTORY, f"{top}: is not a folder")
    handle = tempfile.NamedTemporaryFile(prefix="hpc-sandbox-tree-", suffix=".tar.gz", delete=False)
    packed = PackedTree(Path(handle.name))
    try:
        with handle, tarfile.open(fileobj=handle, mode="w:gz", compresslevel=COMPRESS_LEVEL) as tar:
            for name, path, st in _walk(top):
                info = _pack_entry(tar, name, path, st, packed)
                if info is None:
                    continue
                packed.entries += 1
                packed.bytes += info.size
                if packed.entries > limits.max_entries:
                    raise ToolError(ErrorKind.TOO_LARGE, f"{top} holds more than {limits.max_entries} entries")
                if packed.bytes > limits.max_bytes:
                    raise ToolError(ErrorKind.TOO_LARGE, f"{top}'s files hold more than {limits.max_bytes} bytes")
    except BaseException:
        packed.discard()
        raise
    return packed


def _pack_entry(tar: tarfile.TarFile, name: str, path: Path, st: os.stat_result,
                packed: PackedTree) -> tarfile.TarInfo | None:
    """Add one entry; None when it is left out (and said in `packed.skipped`)."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        info = _info(name, st, tarfile.DIRTYPE)
        tar.addfile(info)
        return info
    if stat.S_ISREG(mode):
        with open(path, "rb") as source:
            info = _info(name, os.fstat(source.fileno()), tarfile.REGTYPE)
            info.size = os.fstat(source.fileno()).st_size
            tar.addfile(info, source)
        return info
    if stat.S_ISLNK(mode):
        target = os.readlink(path)
        if not link_stays_inside(name.split("/"), target):
            packed.skipped.append({"path": name, "reason": f"symlink to {target} leads out of the tree"})
            return None
        info = _info(name, st, tarfile.SYMTYPE)
        info.linkname = target
        tar.addfile(info)
        return info
    packed.skipped.append({"path": name, "reason": "not a folder, a regular file or a symlink"})
    return None


def upload_name() -> str:
    return f"{UPLOAD_PREFIX}{os.urandom(8).hex()}.tar.gz"


def tree_request(src: str, limits: TreeLimits, exclude: list[str] | None) -> TreeRequest:
    """What the node server is asked for the slot's folder `src` (its tree endpoint)."""
    return TreeRequest(src, limits.max_bytes, limits.max_entries, tuple(exclude or ()))


def unpack_archive(archive: Path, local_dir: Path, limits: TreeLimits) -> dict[str, Any]:
    """Unpack a downloaded tar.gz (members named below the slot's folder) into
    `local_dir` (made if missing) by the agent's rules; symlinks that lead out of the
    tree are left out and named in `skipped`. The node server made the archive, but
    every name in it is a slot's, so nothing in it is trusted. Raises ToolError (path,
    not_a_file, too_large, corrupt) or OSError."""
    top = Path(os.path.realpath(local_dir))  # the caller's own path: its symlinks are theirs
    made = not top.exists()
    top.mkdir(parents=True, exist_ok=True)
    top_fd = os.open(top, DIR_FLAGS)
    try:
        return unpack_tree(lambda: open(archive, "rb"), top_fd, 0, "skip", limits.max_bytes, limits.max_entries)
    except ToolError as exc:
        if made and not any(top.iterdir()):  # refused before anything was written: leave no trace
            top.rmdir()
        if ErrorKind.read(exc.kind) == ErrorKind.BAD_REQUEST:  # not a tar.gz: damaged on its way
            raise ToolError(ErrorKind.CORRUPT, f"the downloaded archive is damaged: {exc.message}") from None
        raise
    finally:
        os.close(top_fd)
