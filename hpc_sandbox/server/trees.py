"""A workspace folder streamed out as one tar.gz, made on the host by the node server.

The folder is walked as the agent walks (agent.py, "paths": directory descriptors
opened with O_NOFOLLOW, relative to the one before), so a slot that swaps a folder for
a symlink mid-walk gets the symlink stored as a symlink, never followed; FIFOs, sockets
and devices are left out unopened (and named). Members are named relative to the
folder's contents. The tar and gzip work is blocking, so it runs in a thread of its own
(not the event loop's executor: a long walk must not hold one of its few workers),
handing compressed blocks to the response through a few credits: the server holds at
most TREE_QUEUE blocks of TREE_BLOCK bytes per download, however big the tree, and
the walk waits while the client is slow. Caps (entries, bytes of file data) stop the
walk as it goes; the answer then ends with an error TreeEnd (protocol.py).
"""
from __future__ import annotations

import asyncio
import os
import stat
import tarfile
import threading
from typing import Callable

from ..agent import (DIR_FLAGS, MAX_WALK_DEPTH, ToolError, exclusion, open_child_file, open_folder, tar_entry,
                     tar_file, walk_folder)
from ..errors import ErrorKind
from ..paths import split_folder_path
from ..protocol import TreeEnd, TreeRequest

TREE_BLOCK = 256 * 1024  # compressed bytes handed to the response at once
TREE_QUEUE = 4  # blocks waiting for the response at most
COMPRESS_LEVEL = 6
# How often a producer waiting for the response looks whether the download was abandoned.
STOP_POLL = 0.5


# A file the walk met that was no longer one when opened (removed, or swapped for a
# symlink, a folder or a FIFO): left out, as the agent's archive leaves it out.
_CHANGED_MEANWHILE = (ErrorKind.NOT_FOUND, ErrorKind.PATH, ErrorKind.NOT_A_FILE, ErrorKind.IS_DIRECTORY)


class _Stopped(Exception):
    """The response is gone (the client hung up): the walk ends."""


def open_tree(workspace: str, path: str) -> tuple[int, list[str]]:
    """The folder `path` of the workspace, opened as the agent opens one (no symlink
    followed, at any level, `path` itself included); its components. Raises
    PathRefused or BadRequest for the path's spelling, ToolError (path, not_found,
    not_a_directory) for what the walk meets."""
    parts = split_folder_path(path)
    top = os.open(workspace, DIR_FLAGS)
    try:
        return open_folder(top, parts, "/".join(parts)), parts
    finally:
        os.close(top)


class TreeProducer:
    """Packs one opened folder into tar.gz blocks, in a thread, at the pace the
    response takes them (`next_block`); the last item is the TreeEnd."""

    def __init__(self, top_fd: int, parts: list[str], asked: TreeRequest) -> None:
        self.top_fd = top_fd
        self.base = "/".join(parts)
        self.asked = asked
        self.skip = self._exclusion(asked.exclude)
        self.loop = asyncio.get_running_loop()
        self.blocks: asyncio.Queue[bytes | TreeEnd] = asyncio.Queue()
        self.credits = threading.Semaphore(TREE_QUEUE)
        self.stopped = threading.Event()
        self.pending = bytearray()
        # What went in so far (the TreeEnd's counts, made when the walk is done).
        self.dirs = self.files = self.links = self.bytes = 0
        self.skipped: list[dict[str, str]] = []
        self.thread = threading.Thread(target=self._run, name="tree-download", daemon=True)

    def _exclusion(self, patterns: tuple[str, ...]) -> Callable[[str, str], bool] | None:
        """The agent's `exclude` (matched against names and workspace-relative paths);
        members here are named below the folder, so their paths get its prefix back."""
        named = exclusion(list(patterns)) if patterns else None
        if named is None:
            return None
        base = self.base
        return lambda name, member: named(name, f"{base}/{member}" if base else member)

    def start(self) -> None:
        self.thread.start()

    async def next_block(self) -> bytes | TreeEnd:
        item = await self.blocks.get()
        if isinstance(item, bytes):
            self.credits.release()
        return item

    def stop(self) -> None:
        """The response will take no more: the walk stops at its next block."""
        self.stopped.set()

    # --- in the thread ---------------------------------------------------------------

    def write(self, data: bytes) -> int:  # tarfile's sink
        self.pending += data
        if len(self.pending) >= TREE_BLOCK:
            self._hand_over()
        return len(data)

    def flush(self) -> None:
        pass

    def _hand_over(self) -> None:
        if not self.pending:
            return
        while not self.credits.acquire(timeout=STOP_POLL):
            if self.stopped.is_set():
                raise _Stopped()
        if self.stopped.is_set():
            raise _Stopped()
        block, self.pending = bytes(self.pending), bytearray()
        self.loop.call_soon_threadsafe(self.blocks.put_nowait, block)

    def _run(self) -> None:
        end: TreeEnd
        try:
            # "w:gz", not the stream mode "w|gz": only it takes a compresslevel before
            # Python 3.12, and it writes to its file object in order, never seeking.
            with tarfile.open(fileobj=self, mode="w:gz", compresslevel=COMPRESS_LEVEL) as tar:
                self._pack(tar)
            self._hand_over()
            end = TreeEnd(self.dirs, self.files, self.links, self.bytes, self.skipped)
        except _Stopped:
            return
        except ToolError as exc:
            end = TreeEnd(error_kind=ErrorKind.read(exc.kind), error=exc.message)
        except OSError as exc:
            end = TreeEnd(error_kind=ErrorKind.IO, error=f"{self.asked.path}: {exc.strerror or exc}")
        except Exception as exc:  # a bug: said in the answer, not lost in a thread
            end = TreeEnd(error_kind=ErrorKind.ERROR, error=f"{type(exc).__name__}: {exc}")
        finally:
            os.close(self.top_fd)
        try:
            self.loop.call_soon_threadsafe(self.blocks.put_nowait, end)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def _pack(self, tar: tarfile.TarFile) -> None:
        cut: list[str] = []
        asked = self.asked
        walk = walk_folder(self.top_fd, "", True, cut, skip=self.skip)
        try:
            for dir_fd, member, name, st in walk:
                kind = st.st_mode
                # What is left out counts too: it bounds the walk, and the end's `skipped`.
                if self.dirs + self.files + self.links + len(self.skipped) + 1 > asked.max_entries:
                    raise ToolError(ErrorKind.TOO_LARGE, f"{asked.path} holds more than {asked.max_entries} entries")
                if not (stat.S_ISDIR(kind) or stat.S_ISREG(kind) or stat.S_ISLNK(kind)):
                    self.skipped.append({"path": member, "reason": "not a folder, a regular file or a symlink"})
                    continue
                if stat.S_ISREG(kind):
                    self._pack_file(tar, dir_fd, member, name)
                elif tar_entry(tar, dir_fd, member, name, st):  # folders, and symlinks stored as symlinks
                    if stat.S_ISDIR(kind):
                        self.dirs += 1
                    else:
                        self.links += 1
                # A TarFile keeps every member it wrote (for getmembers()): a million
                # entries would be hundreds of MiB. Nothing here reads them back.
                tar.members.clear()
        finally:
            walk.close()
        if cut:
            raise ToolError(ErrorKind.TOO_LARGE, f"{asked.path}: folders nested deeper than {MAX_WALK_DEPTH} "
                                                 f"levels ({cut[0]})")

    def _pack_file(self, tar: tarfile.TarFile, dir_fd: int, member: str, name: str) -> None:
        try:
            fd = open_child_file(dir_fd, name, member)
        except ToolError as exc:
            if ErrorKind.read(exc.kind) in _CHANGED_MEANWHILE:
                return
            raise
        try:
            # The size it is stored with (the agent.s tar_file reads exactly this much):
            # checked before a byte of it is read.
            size = os.fstat(fd).st_size
            if self.bytes + size > self.asked.max_bytes:
                raise ToolError(ErrorKind.TOO_LARGE, f"{self.asked.path}'s files hold more than "
                                                     f"{self.asked.max_bytes} bytes")
            tar_file(tar, fd, member)
            # What was stored: the file may have grown since the check (it is read
            # to the size tar_file took, which the unpacker's own cap checks again).
            size = tar.members[-1].size
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size

