#!/usr/bin/env python3
"""The slot agent: one long-lived process inside a slot's container.

It is bind-mounted as this single file into any image, so it uses the standard
library only, runs on any python3 >= 3.8, and imports nothing from hpc_sandbox. That is
why it stays one file; its sections, in order:

  the slot contract   what the node server and the agent agree on (the server imports it)
  paths               the workspace walk: one component at a time, O_NOFOLLOW, from an fd
  output capture      capped buffers, streamed chunks, spawning `bash -c` children
  processes           finding and killing the slot's processes (groups, tags, tree, pid ns)
  scratch folders     emptying the slot's /tmp (and the like) at reset
  sessions            persistent shells fed one command per call
  background          processes that outlive their call, with capped logs
  the agent           the Agent class: I/O, reset, and one method per tool
  archives            tar.gz of workspace paths
  trees in            unpacking a (hostile) tar archive into a folder: the extract tool
  tools and main      the tool table, argument parsing, the ready line, the event loop

Protocol (newline-framed JSON, json.dumps never emits a raw newline; but for the raw
bytes of streamed output, see "Streaming" below):
  in  (stdin):  {"id": "r1", "tool": "bash", "args": {"command": "ls"}, "timeout": 30}
  out (stdout): {"id": "r1", "ok": true, "result": {...}}
                {"id": "r1", "ok": false, "error": {"kind": "path", "message": "..."}}
Requests are served concurrently; answers come back in completion order, matched
by id. Stdout carries nothing but answers (and a streaming call's output chunks):
diagnostics go to stderr.

Streaming: a request with "stream": true also gets its output as it is read, before
its answer (only `bash` has any, plain or in a session), as a header line without
"ok" followed by exactly `size` raw bytes of output, then the next line:
  out (stdout): {"id": "r1", "chunk": "stdout", "size": 65536}\n<65536 bytes>
A chunk is whole UTF-8 characters where the output is UTF-8 (a character is never
split between two chunks). Chunks are coalesced: one per ~50 ms or 64 KiB, stdout and
stderr in the order they were read. The answer that follows is the same as without
streaming (the capped head+tail of each stream). The agent writes chunks as fast as
it reads them, whoever reads the stream at the far end: the node server never lets a
slow reader hold up this channel.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import fnmatch
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import subprocess
import tarfile
import tempfile
import threading
import time

# --- the slot contract ---------------------------------------------------------------
#
# What the node server (hpc_sandbox/server/) and this agent must agree on, defined here
# once and imported by the server; tests/test_slot_contract.py pins it.

SLOT_WORKSPACE = "/workspace"  # where a contained slot sees its workspace
# Every command runs with CALL_ENV=<agent tag>.<call> in its environment: the agent's
# per-call kills find what left a call's process group by it, and a `bash` result names
# its tag (`call`), by which the node server's watchdog tells whose process it killed.
CALL_ENV = "HPC_SANDBOX_CALL"
# How long a reset keeps killing a slot's processes that keep reappearing (a fork bomb),
# and how long the node server waits for the reset's answer before replacing the agent.
RESET_SECONDS = 2.0
RESET_TIMEOUT = RESET_SECONDS + 1.0
# A streaming call's output goes out in chunks of about this much raw output, at most
# this long after the first byte of it was read: a chatty command must not cost a
# header per read, and a quiet one must still show its output at once. A chunk is never
# larger than MAX_CHUNK_BYTES (the server refuses a header announcing more).
STREAM_FLUSH_BYTES = 64 << 10
STREAM_FLUSH_SECONDS = 0.05
MAX_CHUNK_BYTES = 8 << 20
# The tools a client may call through the node server; the agent's others (cancel,
# ping, reset) are the server's own.
CLIENT_TOOLS = ("bash", "session", "process", "read_file", "write_file", "list_files", "archive")
CLIENT_TOOLS += ("extract",)  # a tar archive in the workspace unpacked into a folder (see "trees in")


def ready_message(pid: int, tag: str) -> dict:
    """The line the agent sends once it runs: the server knows then that the runtime
    started the agent (not just the container tool)."""
    return {"id": None, "ok": True, "result": {"ready": True, "pid": pid, "tag": tag}}


def is_ready(answer: dict) -> bool:
    return answer.get("id") is None and bool(answer.get("ok")) and bool((answer.get("result") or {}).get("ready"))


DEFAULT_OUTPUT_CAP = 1 << 20  # per stream, bytes
DEFAULT_READ_LIMIT = 8 << 20
DEFAULT_ARCHIVE_CAP = 64 << 20
KILL_GRACE_SECONDS = 1.0
# After the command's own process exits, background children may still hold its
# pipes open (`server &`); we stop waiting for their output after this long.
PIPE_DRAIN_SECONDS = 0.2
MAX_REQUEST_LINE = 512 << 20
# Ceilings on what a caller may ask for: every answer is one JSON line the node
# server holds in memory, so no request may make it arbitrarily large.
MAX_OUTPUT_CAP = 16 << 20  # per stream
MAX_READ_LIMIT = 64 << 20
MAX_ARCHIVE_CAP = 128 << 20
MAX_LIST_ENTRIES = 100000
# list_files' and archive's `exclude`: at most this many glob patterns, each at most this long.
MAX_EXCLUDE_PATTERNS = 64
MAX_EXCLUDE_CHARS = 256


def exclusion(patterns):
    """list_files' and archive's `exclude` (glob patterns, fnmatch's, case-sensitive) as
    a skip(name, path) for walk_folder, None when there are none; a bad_request unless a
    list of at most MAX_EXCLUDE_PATTERNS strings of 1..MAX_EXCLUDE_CHARS characters. A
    pattern matches an entry's name or its workspace-relative path, whole ("*.pyc",
    ".venv", "src/gen"); all of them are one regex, so a big walk costs two matches per
    entry. What a call names itself (its path or paths) is never excluded."""
    if patterns is None:
        return None
    if (not isinstance(patterns, list) or len(patterns) > MAX_EXCLUDE_PATTERNS
            or not all(isinstance(p, str) and 1 <= len(p) <= MAX_EXCLUDE_CHARS for p in patterns)):
        raise ToolError("bad_request", "exclude must be a list of at most %d glob patterns of 1 to %d characters"
                        % (MAX_EXCLUDE_PATTERNS, MAX_EXCLUDE_CHARS))
    if not patterns:
        return None
    match = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
    return lambda name, path: match(name) is not None or match(path) is not None


def _bounded_int(args, key, default, ceiling):
    """args[key] as an int in [0, ceiling], `default` when absent; else a bad_request."""
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ToolError("bad_request", "%s must be an integer >= 0" % key)
    if ceiling is not None and value > ceiling:
        raise ToolError("bad_request", "%s must be at most %d" % (key, ceiling))
    return value


class ToolError(Exception):
    """A request that cannot be served; becomes {"ok": false, "error": ...}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- paths -------------------------------------------------------------------------
#
# The workspace is written by the untrusted code the agent serves, which may swap a
# folder for a symlink between a check and an open. So no path is ever resolved and
# then opened: it is walked one component at a time from the workspace's directory
# descriptor, each folder opened with O_NOFOLLOW | O_DIRECTORY relative to the one
# before (openat), the last component with O_NOFOLLOW. A symlink anywhere is refused,
# `..` is refused outright, and nothing but a regular file is ever opened for data
# (a FIFO would block the open, a device could do anything).

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NOT_FOLLOWED = "symlinks are not followed"
# Folders a walk (list_files, archive) holds open at once, one per level: deeper
# folders are not entered (list_files says truncated; archive refuses).
MAX_WALK_DEPTH = 128


def workspace_roots(workspace: str) -> list:
    """The spellings an absolute path may start with to name the workspace, as components."""
    roots = []
    for spelling in (os.path.realpath(workspace), os.path.abspath(workspace), SLOT_WORKSPACE):
        parts = [part for part in spelling.split("/") if part]
        if parts not in roots:
            roots.append(parts)
    return roots


def workspace_parts(path, roots) -> list:
    """The components of `path` below the workspace ([] for the workspace itself), or raise.

    Relative paths are taken from the workspace; absolute ones only under one of `roots`.
    """
    if not isinstance(path, str) or path == "":
        raise ToolError("bad_request", "path must be a non-empty string")
    if "\x00" in path:
        raise ToolError("bad_request", "path contains a NUL byte")
    parts = [part for part in path.split("/") if part and part != "."]
    if ".." in parts:
        raise ToolError("path", "%s: '..' is not allowed" % path)
    if path.startswith("/"):
        for root in roots:
            if parts[:len(root)] == root:
                return parts[len(root):]
        raise ToolError("path", "%s: outside the workspace" % path)
    return parts


def _refusal(dir_fd: int, name: str, path: str, exc: OSError) -> ToolError:
    """Why `name` in the folder `dir_fd` could not be opened, as the error to answer."""
    if isinstance(exc, FileNotFoundError):
        return ToolError("not_found", "%s: no such file or directory" % path)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        st = None
    # O_NOFOLLOW gives ELOOP on a symlink, and ENOTDIR when O_DIRECTORY is set too.
    if exc.errno == errno.ELOOP or (st is not None and stat.S_ISLNK(st.st_mode)):
        return ToolError("path", "%s: %s is a symlink; %s" % (path, name, NOT_FOLLOWED))
    if exc.errno == errno.ENOTDIR:
        if st is not None and stat.S_ISDIR(st.st_mode):  # a folder again by now: it was swapped
            return ToolError("path", "%s: %s changed while being opened; %s" % (path, name, NOT_FOLLOWED))
        return ToolError("not_a_directory", "%s: %s is not a directory" % (path, name))
    return ToolError("io", "%s: %s" % (path, exc.strerror or exc))


def _check_regular(st, path: str, name: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise ToolError("path", "%s: %s is a symlink; %s" % (path, name, NOT_FOLLOWED))
    if stat.S_ISDIR(st.st_mode):
        raise ToolError("is_directory", "%s: is a directory" % path)
    raise ToolError("not_a_file", "%s: is not a regular file (fifo/socket/device)" % path)


def _lstat_child(dir_fd: int, name: str, path: str):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise _refusal(dir_fd, name, path, exc)


def open_child_dir(dir_fd: int, name: str, path: str, create: bool = False) -> int:
    """Open the folder `name` in `dir_fd` without following a symlink; mkdir it if asked."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        if not create:
            raise _refusal(dir_fd, name, path, exc)
    except OSError as exc:
        raise _refusal(dir_fd, name, path, exc)
    try:
        os.mkdir(name, 0o777, dir_fd=dir_fd)
    except FileExistsError:  # made meanwhile: opened below under the same rules
        pass
    except OSError as exc:
        raise ToolError("io", "%s: cannot create %s (%s)" % (path, name, exc.strerror or exc))
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(dir_fd, name, path, exc)


def open_folder(top_fd: int, parts, path: str, create: bool = False) -> int:
    """A new descriptor of the folder `parts` below the folder `top_fd` (which stays the
    caller's), one component at a time with open_child_dir; made where missing if asked."""
    fd = os.dup(top_fd)
    try:
        for name in parts:
            next_fd = open_child_dir(fd, name, path, create)
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_child_file(dir_fd: int, name: str, path: str) -> int:
    """Open the regular file `name` in `dir_fd` for reading; anything else is refused unopened."""
    _check_regular(_lstat_child(dir_fd, name, path), path, name)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(dir_fd, name, path, exc)
    try:
        _check_regular(os.fstat(fd), path, name)  # it may have been swapped since the lstat
    except BaseException:
        os.close(fd)
        raise
    return fd


def _join(folder: str, name: str) -> str:
    return folder + "/" + name if folder else name


def _scan(dir_fd: int) -> list:
    """(name, lstat) of the entries of the folder `dir_fd`, sorted by name."""
    found = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError:  # gone meanwhile
                continue
    found.sort(key=lambda item: item[0])
    return found


def walk_folder(top_fd: int, top: str, recursive: bool, cut: list, unreadable=None, skip=None):
    """Yield (dir_fd, path, name, lstat) for everything under the folder `top_fd`.

    In os.walk's order (a folder's entries, then each subfolder's in turn), entering
    subfolders through descriptors with O_NOFOLLOW, so a symlink is reported, never
    followed. `top_fd` stays the caller's; every folder opened here is closed here.
    Appends to `cut` the folders not entered for being too deep, and to `unreadable`
    (when given) those not entered for want of permission. An entry for which
    `skip(name, path)` is true is neither yielded nor, if a folder, entered.
    """
    frames = []  # (fd, path, subfolder names still to enter)
    fd, folder = top_fd, top
    try:
        while True:
            if fd is not None:
                subfolders = []
                for name, st in _scan(fd):
                    if skip is not None and skip(name, _join(folder, name)):
                        continue
                    yield fd, _join(folder, name), name, st
                    if recursive and stat.S_ISDIR(st.st_mode):
                        subfolders.append(name)
                frames.append((fd, folder, iter(subfolders)))
                fd = None
            if not frames:
                return
            parent_fd, parent, pending = frames[-1]
            name = next(pending, None)
            if name is None:
                frames.pop()
                if parent_fd != top_fd:
                    os.close(parent_fd)
                continue
            if len(frames) >= MAX_WALK_DEPTH:
                cut.append(_join(parent, name))
                continue
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                # Replaced by a symlink or a file, removed, or unreadable: listed, not entered.
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
                    if exc.errno == errno.EACCES and unreadable is not None:
                        unreadable.append(_join(parent, name))
                    continue
                raise ToolError("io", "%s: %s" % (_join(parent, name), exc.strerror or exc))
            folder = _join(parent, name)
    finally:
        if fd is not None and fd != top_fd:
            os.close(fd)
        for parent_fd, _, _ in frames:
            if parent_fd != top_fd:
                os.close(parent_fd)


def _file_mode(value):
    """write_file's `mode`: an int in 0..0o7777 or an octal string ('644', '0755', '0o600')."""
    if value is None:
        return None
    if isinstance(value, str):
        digits = value[2:] if value[:2] in ("0o", "0O") else value
        value = int(digits, 8) if digits and all(c in "01234567" for c in digits) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise ToolError("bad_request", "mode must be an integer in 0..0o7777 or an octal string such as '644'")
    return value


# --- output capture ----------------------------------------------------------------


class CappedBuffer:
    """Keeps the first and the last bytes of a stream, up to `cap` in all.

    The error that matters is usually at the end of a long log, so a capped stream
    keeps its head and its tail and counts what was dropped between them.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self.head_cap = self.cap // 2
        self.tail_cap = self.cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            excess = len(self.tail) - self.tail_cap
            if excess > 0:
                del self.tail[:excess]

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        if self.dropped:
            marker = "\n[... hpc-sandbox: %d bytes dropped ...]\n" % self.dropped
            return (
                bytes(self.head).decode("utf-8", "replace")
                + marker
                + bytes(self.tail).decode("utf-8", "replace")
            )
        return bytes(self.head + self.tail).decode("utf-8", "replace")




class _Streamer:
    """Sends a streaming call's output as chunks, coalesced (see the docstring)."""

    def __init__(self, agent: "Agent", request_id, loop) -> None:
        self.agent = agent
        self.request_id = request_id
        self.loop = loop
        self.pending = []  # [stream name, bytearray]: runs of one stream, in read order
        self.size = 0
        self.timer = None
        # Per stream, the start of a character cut off at the end of the last chunk:
        # it goes with the next one, so that every chunk is whole UTF-8 characters
        # (a reader may decode each on its own, or skip one).
        self.carry = {"stdout": b"", "stderr": b""}
        self.closed = False

    def feed(self, name: str, chunk: bytes) -> None:
        if self.closed or not chunk:
            return
        if self.pending and self.pending[-1][0] == name:
            self.pending[-1][1] += chunk
        else:
            self.pending.append([name, bytearray(chunk)])
        self.size += len(chunk)
        if self.size >= STREAM_FLUSH_BYTES:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(STREAM_FLUSH_SECONDS, self.flush)

    def flush(self, final: bool = False) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending, self.size = self.pending, [], 0
        try:
            self._send(pending, final)
        except OSError:  # the node server is gone (its end of our stdout closed): nobody to stream to
            self.closed = True

    def _send(self, pending, final: bool) -> None:
        for name, data in pending:
            if self.carry[name]:
                data[:0] = self.carry[name]
            whole = _utf8_complete(data)
            self.carry[name] = bytes(data[whole:])
            if whole:
                self.agent.send_chunk(self.request_id, name, memoryview(data)[:whole])
        if final:  # the command has ended: a cut-off character will not be completed
            for name, rest in self.carry.items():
                if rest:
                    self.agent.send_chunk(self.request_id, name, rest)
            self.carry = {"stdout": b"", "stderr": b""}

    def close(self) -> None:
        """Flush what is left; the answer, sent next, comes after every chunk."""
        if not self.closed:
            self.flush(final=True)
            self.closed = True


class _Tee:
    """An output sink that keeps the capped buffer and streams as well."""

    def __init__(self, buffer: "CappedBuffer", streamer: _Streamer, name: str) -> None:
        self.buffer = buffer
        self.streamer = streamer
        self.name = name

    def feed(self, chunk: bytes) -> None:
        self.buffer.feed(chunk)
        self.streamer.feed(self.name, chunk)


class _Spawned:
    """A `bash -c` child read without asyncio's subprocess layer.

    asyncio's Process.wait() also waits for the child's pipes to close, so a
    command that leaves a background job holding stdout (`server &`) would look
    as if it never ended. Here the exit is watched on a pidfd (a thread on
    pythons/kernels without one) and the pipes are drained separately.
    """

    def __init__(self, loop, argv, cwd, env, out, err, merge=False):
        self.loop = loop
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            # merge: one pipe for both, so that their order is kept (a background process's log)
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            start_new_session=True,  # own process group: a timeout kills all of it
        )
        self.exited = loop.create_future()
        self.streams_done = loop.create_future()
        self.open_streams = 0
        for pipe, sink in ((self.proc.stdout, out), (self.proc.stderr, err)):
            if pipe is None:
                continue
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.open_streams += 1
            loop.add_reader(fd, self._on_readable, pipe, sink)
        _watch_exit(loop, self.proc, self._set_exited)

    @property
    def pid(self):
        return self.proc.pid

    def _set_exited(self, code):
        if not self.exited.done():
            self.exited.set_result(code)

    def _on_readable(self, pipe, sink):
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            sink.feed(chunk)
            return
        self._close_stream(pipe)

    def _close_stream(self, pipe):
        if pipe.closed:
            return
        self.loop.remove_reader(pipe.fileno())
        pipe.close()
        self.open_streams -= 1
        if self.open_streams == 0 and not self.streams_done.done():
            self.streams_done.set_result(None)

    def close_streams(self):
        """Stop reading (a background job may hold the pipes open for hours)."""
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                self._close_stream(pipe)


# The children the agent spawned and waits for itself (see _watch_exit). Any other child
# is a process the agent adopted as the slot's subreaper, which it reaps (_reap_adopted).
_OWN_CHILDREN = set()


def _watch_exit(loop, proc, on_exit) -> None:
    """Call on_exit(returncode) on `loop` when `proc` ends: from a pidfd where python
    and the kernel have them, else from a thread blocked in wait()."""
    _OWN_CHILDREN.add(proc.pid)
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            pidfd = pidfd_open(proc.pid)
        except OSError:
            pidfd = None
        if pidfd is not None:
            def ready():
                loop.remove_reader(pidfd)
                os.close(pidfd)
                code = proc.wait()
                _OWN_CHILDREN.discard(proc.pid)
                on_exit(code)

            loop.add_reader(pidfd, ready)
            return

    def wait_in_thread():
        code = proc.wait()
        _OWN_CHILDREN.discard(proc.pid)
        try:
            loop.call_soon_threadsafe(on_exit, code)
        except RuntimeError:  # the loop closed meanwhile (the agent is exiting)
            pass

    threading.Thread(target=wait_in_thread, daemon=True).start()


async def _done_within(loop, future, seconds):
    """Wait until `future` is done or `seconds` pass (None: no limit); never cancels it.

    The hot path of every command: one plain future and one timer, where
    wait_for(shield(...)) would add a task and two more futures.
    """
    if future.done():
        return True
    waiter = loop.create_future()

    def wake(_=None):
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake) if seconds is not None else None
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


# --- processes ----------------------------------------------------------------------
#
# Finding and killing the slot's processes from inside it: by process group, by call
# tag, by the agent's process tree (it is the slot's subreaper), or everything in the
# slot's pid namespace. The node server has its own, on the host (server/procfs.py).


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids() -> list:
    """Every process this one can see (in its pid namespace); none without /proc."""
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _kill_tagged(tag: str, exact: bool) -> int:
    """SIGKILL every process whose environment carries CALL_ENV=tag (or tag...).

    A command can leave its process group (`setsid`, a daemonising server), so
    killing the group is not enough. Every command starts with a tag in its
    environment, which its descendants inherit; /proc/PID/environ still shows it
    after they leave the group. (A process that re-executes itself with a cleared
    environment escapes this; the container's pid namespace still ends it at reset.)
    """
    needle = ("%s=%s" % (CALL_ENV, tag)).encode()
    me = os.getpid()
    killed = 0
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if any(entry == needle or (not exact and entry.startswith(needle)) for entry in entries):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def _process_table() -> dict:
    """pid -> (parent pid, state letter) of every process this one can see.

    /proc/PID/stat is readable whoever owns the process and whatever it hides: a
    process that makes itself non-dumpable closes its environ to its own user, not this."""
    table = {}
    for pid in _pids():
        try:
            with open("/proc/%d/stat" % pid, "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            table[pid] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return table


def _ancestors() -> frozenset:
    """This process and every process above it (in its pid namespace)."""
    table = _process_table()
    found = set()
    pid = os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        pid = table.get(pid, (0, b""))[0]
    return frozenset(found)


def _descendants(root: int, table: dict) -> list:
    """The live (not zombie) processes below `root` in `table`."""
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if table[pid][1] != b"Z":
            found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _kill_pids(pids) -> int:
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def _kill_all_but(spared) -> int:
    """SIGKILL every process in /proc but `spared` (zombies are already dead)."""
    return _kill_pids(pid for pid, (_, state) in _process_table().items() if pid not in spared and state != b"Z")


def _children_of(pid: int):
    """The children of `pid` (all its threads'), from /proc/PID/task/TID/children; None
    when the kernel has no such file (CONFIG_PROC_CHILDREN) or the process is gone."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    found = []
    for task in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, task), "rb") as handle:
                found.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            if task == str(pid):
                return None  # no children files at all (or gone)
        except (OSError, ValueError):
            continue
    return found


def _state(pid: int):
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _kill_descendants() -> int:
    """SIGKILL every live process below this one. The agent is the slot's subreaper
    (see _become_subreaper), so a process that daemonised (double fork, setsid) is
    still below it: it cannot leave the tree the way it can leave a group or a session.

    The tree is read from the children files of the processes in it, so the cost is the
    slot's processes, not the node's; a kernel without them has the whole /proc read."""
    me = os.getpid()
    if _children_of(me) is None:
        return _kill_pids(_descendants(me, _process_table()))
    killed, todo = 0, [me]
    while todo:
        kids = _children_of(todo.pop()) or []
        for kid in kids:
            state = _state(kid)
            if state is not None and state != b"Z":
                killed += _kill_pids((kid,))
        todo.extend(kids)
    return killed


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


def _become_subreaper() -> bool:
    """Make the agent the reaper of its orphaned descendants (Linux >= 3.4): a command's
    process whose parent exits is re-parented to the agent, not to the node's init, so
    it stays in the slot's process tree where reset, release and the node server's
    watchdog find it, whatever it does to its environment or session."""
    try:
        import ctypes  # the standard library's; only here, at start

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_adopted() -> None:
    """Reap the adopted children that ended (never one the agent waits for itself).

    Run now and then and at every reset, not at every SIGCHLD: a fork bomb's thousands
    of orphans must not cost the agent a look at all its children for each one's end."""
    for pid in _children_of(os.getpid()) or ():
        if pid in _OWN_CHILDREN:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


REAP_SECONDS = 1.0


# --- scratch folders ----------------------------------------------------------------
#
# A slot's temporary folders outside its workspace (/tmp and /dev/shm in a container,
# a folder of the slot's own named by TMPDIR under runtime none) are the runtime's to
# name (--scratch). A reset empties them once every process of the slot has ended, so
# the next holder finds nothing of the last one's there. Nothing runs in the slot while
# they are emptied, so no entry can be swapped under the walk; a folder the last holder
# locked (chmod 000) is opened up first. A tree too deep to walk, or anything that will
# not go, leaves the slot unclean: the node server then replaces its agent (and with it
# a container's tmpfs).

MAX_SCRUB_DEPTH = 256
SYSV_IPC = ("/proc/sysvipc/shm", "/proc/sysvipc/sem", "/proc/sysvipc/msg")


def empty_folder(path: str) -> None:
    """Remove everything inside `path`; raise OSError on what will not go."""
    try:
        top = os.open(path, DIR_FLAGS)
    except FileNotFoundError:
        os.makedirs(path, 0o700, exist_ok=True)
        return
    if os.fstatvfs(top).f_flag & os.ST_RDONLY:  # nothing the slot could have written
        os.close(top)
        return
    stack = [(top, None, [])]  # (folder fd, its name in the folder above, subfolders left)

    def enter(fd, subfolders):
        for name, st in _scan(fd):
            if stat.S_ISDIR(st.st_mode):
                subfolders.append(name)
            else:
                os.unlink(name, dir_fd=fd)

    try:
        enter(top, stack[0][2])
        while stack:
            fd, name, subfolders = stack[-1]
            if subfolders:
                child = subfolders.pop()
                if len(stack) >= MAX_SCRUB_DEPTH:
                    raise OSError(errno.ELOOP, "folders nested deeper than %d" % MAX_SCRUB_DEPTH, child)
                try:
                    os.chmod(child, 0o700, dir_fd=fd)  # a real folder, and nothing can swap it now
                except OSError:
                    pass
                child_fd = os.open(child, DIR_FLAGS, dir_fd=fd)
                stack.append((child_fd, child, []))
                enter(child_fd, stack[-1][2])
                continue
            stack.pop()
            os.close(fd)
            if stack:
                os.rmdir(name, dir_fd=stack[-1][0])
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _sysv_ipc_left() -> bool:
    """Whether any SysV shared memory, semaphore or message queue exists in this IPC
    namespace (a contained slot's own: they outlive the processes that made them)."""
    for table in SYSV_IPC:
        try:
            with open(table, "rb") as handle:
                if len(handle.read().splitlines()) > 1:  # a header line, then one per object
                    return True
        except OSError:
            continue
    return False


# --- sessions -----------------------------------------------------------------------
#
# A session is one long-lived `bash -i` of the slot, fed one command line per call on
# a pipe that is its stdin. Each call's command is written to a file in the session's
# private folder and run with `source` in the shell itself, so cwd, variables,
# functions and an activated venv carry over. The line that runs it is:
#
#   export HPC_SANDBOX_CALL=TAG; { source CMD; } <IN >>OUT 2>>ERR; printf 'NONCE %d\n' "$?" >>STATUS
#
# - Completion and exit status come through STATUS, a FIFO of their own, as the call's
#   random nonce and `$?`: never from matching anything in the output, which can hold
#   any bytes. No other process holds STATUS open (the shell opens it for one write).
# - The command's stdin is /dev/null (a command that reads stdin gets EOF at once, never
#   the shell's own input), a file holding `input`, or, with `idle_timeout`, a FIFO the
#   agent keeps open so that a later call can send more input to a waiting prompt.
# - OUT and ERR are FIFOs that live as long as the session and that the agent always
#   reads: a job left running in the background (`server &`) keeps writing to them and
#   never blocks on a full pipe, and is never waited for. Output that comes while no
#   command runs is dropped. The shell's own stdout and stderr (prompts, job notices)
#   go to /dev/null; a heredoc, binary output or a line that looks like a status line
#   is the command's output and nothing else.
# - `exit 3` or a failure under `set -e` ends the shell: no status line comes, and the
#   shell's exit (seen on a pidfd) ends the call with its exit code and
#   session_ended. The next call on that name starts a fresh shell.
# - The shell is interactive (-i) so that SIGINT aborts the command line that runs,
#   even a loop of builtins, and the shell goes on reading the next line with its state
#   intact, as a terminal's Ctrl-C does. It has no terminal (a program that opens
#   /dev/tty fails at once rather than wait for a password), but job control is on
#   (`set -m`): every job, foreground or `&`, runs in a process group of its own, in the
#   shell's session. So a timeout (or `interrupt`) can stop what the command started
#   and nothing older: SIGINT to each group of the session whose leader's pid is newer
#   than the last pid the system had given out when the command started
#   (/proc/loadavg), and to the shell; then a line that reports `$?` under the same
#   nonce (the aborted line never reports). After a grace: SIGKILL to those groups and
#   to every process carrying the call's tag (what left the session), SIGINT to the
#   shell again. After another, the whole session dies. A server started with `&` by an
#   earlier command is left alone; one started by the interrupted command is not.
# - Every process of a session carries a tag AGENT.sN-M (the shell M=0, call M=n), so
#   reset, the limits watchdog (which takes the tag up to its last dot) and session
#   close find them all, even those that left the group.

SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_SESSIONS = 16  # per slot: each is a shell the slot's limits count
MAX_INPUT = 1 << 20  # bytes of `input` in one call
# Lines the shell runs at start: no history (it would be saved in $HOME, the workspace),
# no history expansion of our lines, nothing run before each prompt.
_SESSION_INIT = "\\builtin set -m +o history +H; \\builtin unset HISTFILE MAILCHECK PROMPT_COMMAND\n"
_STATUS_LINE = "\\builtin printf '%%s %%d\\n' %s \"$?\" >>%s\n"


def _last_pid():
    """The pid the system (this pid namespace) gave out last; None if it cannot tell."""
    try:
        with open("/proc/loadavg", "rb") as handle:
            return int(handle.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _session_groups(sid: int, newer_than) -> set:
    """The process groups of session `sid` but its leader's own, whose leader's pid is
    above `newer_than` (all when None): the jobs a command started since then."""
    groups = set()
    for pid in _pids():
        try:
            with open("/proc/%d/stat" % pid, "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            pgid, session = int(fields[2]), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        if session == sid and pgid != sid and (newer_than is None or pgid > newer_than):
            groups.add(pgid)
    return groups


def _private_root() -> str:
    """A folder of the agent's own outside the workspace, for session files and logs.

    Outside the workspace so that a slot's listing, archive or wipe never meets it and
    a command cannot take it for one of its files: the slot's own /tmp (private to
    the slot under every runtime but none), made 0700 by mkdtemp."""
    for folder in (os.environ.get("TMPDIR"), "/tmp", "/dev/shm", "/var/tmp"):
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            try:
                return tempfile.mkdtemp(prefix="hpc-sandbox-agent-", dir=folder)
            except OSError:
                continue
    raise ToolError("io", "no writable temporary folder for the agent's session and process files")


class _SessionCommand:
    """One command line run in a session, from its start to its status."""

    def __init__(self, loop, nonce: str, tag: str, cap: int) -> None:
        self.loop = loop
        self.nonce = nonce
        self.tag = tag
        self.done = loop.create_future()
        # The output of the call following the command; a fresh pair after each call
        # that returns while it runs (waiting), which the next call picks up.
        self.out = CappedBuffer(cap)
        self.err = CappedBuffer(cap)
        self.cap = cap
        self.last_output = time.monotonic()
        self.finished = False
        self.collected = False  # a call returned its end
        self.ended = False  # the shell ended with it
        self.exit_code = None
        self.signal = None
        self.interrupted = False
        self.stdin_fd = None  # the agent's end of a stdin FIFO, while it is open
        self.stdin_path = None
        self.last_pid = None
        self.pending_input = bytearray()
        self.eof_after_input = False
        # The streamer of the call that follows the command, if that call streams.
        self.streamer = None

    def feed(self, out: bool, chunk: bytes) -> None:
        (self.out if out else self.err).feed(chunk)
        if self.streamer is not None:
            self.streamer.feed("stdout" if out else "stderr", chunk)
        self.last_output = time.monotonic()

    def detach(self):
        """The output so far, for a call that returns while the command runs."""
        out, err = self.out, self.err
        self.out, self.err = CappedBuffer(self.cap), CappedBuffer(self.cap)
        return out, err

    def finish(self, status=None, returncode=None) -> None:
        """Its `$?` came (status), or the shell ended (its returncode)."""
        if self.finished:
            return
        self.finished = True
        if returncode is not None:
            self.ended = True
            self.exit_code = returncode if returncode >= 0 else None
            self.signal = -returncode if returncode < 0 else None
        else:
            self.exit_code = status
        if self.exit_code == 137 and self.signal is None and not self.interrupted:
            # 128+SIGKILL: what the limits watchdog sends; the node server looks at
            # `signal` to tell a limit breach from an ordinary end.
            self.signal = signal.SIGKILL.value
        self.close_stdin()
        if not self.done.done():
            self.done.set_result(None)

    # stdin FIFO ---------------------------------------------------------------------

    def send_input(self, data: bytes, eof: bool) -> None:
        self.pending_input += data
        self.eof_after_input = self.eof_after_input or eof
        self._write_input()

    def _write_input(self) -> None:
        if self.stdin_fd is None:
            return
        try:
            while self.pending_input:
                written = os.write(self.stdin_fd, self.pending_input[:65536])
                del self.pending_input[:written]
        except BlockingIOError:  # the command has not read the last batch yet
            self.loop.add_writer(self.stdin_fd, self._on_writable)
            return
        except OSError:
            self.pending_input.clear()
        self.loop.remove_writer(self.stdin_fd)
        if self.eof_after_input:
            self.close_stdin()

    def _on_writable(self) -> None:
        self._write_input()

    def close_stdin(self) -> None:
        """The command reads EOF once it has read what was sent."""
        if self.stdin_fd is not None:
            self.loop.remove_writer(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None
        if self.finished and self.stdin_path is not None:
            try:
                os.unlink(self.stdin_path)
            except OSError:
                pass
            self.stdin_path = None


class _Session:
    """One persistent shell of the slot, and the FIFOs it talks to the agent on."""

    def __init__(self, agent: "Agent", name: str, number: int) -> None:
        self.agent = agent
        self.name = name
        self.number = number
        self.tag = "%s.s%d-" % (agent.tag, number)  # + 0 for the shell, + n for its n-th call
        self.folder = os.path.join(agent.private_folder(), "s%d" % number)
        self.loop = None
        self.proc = None
        self.alive = False
        self.closed = False
        self.returncode = None
        self.fds = {}  # "out" | "err" | "status" -> the agent's end
        self.control = None  # the write end of the shell's stdin
        self.status_buffer = b""
        self.current = None  # the last command started, until the next one
        self.calls = 0
        self.attached = None  # the request id of the call that follows the current command
        self.started_at = time.time()

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def start(self, loop) -> None:
        self.loop = loop
        os.mkdir(self.folder, 0o700)
        control_r = None
        try:
            for name in ("out", "err", "status"):
                os.mkfifo(self.path(name), 0o600)
                # O_RDWR: the agent is a writer too, so its end never reads EOF while
                # the shell's writers come and go, and the shell's opens never block.
                self.fds[name] = os.open(self.path(name), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            control_r, self.control = os.pipe()
            env = dict(self.agent.base_env)
            env[CALL_ENV] = self.tag + "0"
            self.proc = subprocess.Popen(
                [self.agent.bash, "--noprofile", "--norc", "--noediting", "-i"], cwd=self.agent.workspace,
                env=env, stdin=control_r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # a group of its own, which the agent's signals never hit
            )
        except BaseException:
            self.close_files()
            raise
        finally:
            if control_r is not None:
                os.close(control_r)
        os.set_blocking(self.control, False)
        self.alive = True
        loop.add_reader(self.fds["out"], self._on_output, True)
        loop.add_reader(self.fds["err"], self._on_output, False)
        loop.add_reader(self.fds["status"], self._on_status)
        _watch_exit(loop, self.proc, self._on_exit)
        self.send(_SESSION_INIT)

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.finished

    def send(self, line: str) -> bool:
        """Write a line to the shell's stdin; False if the shell is not there to read it."""
        if not self.alive or self.control is None:
            return False
        try:
            data = line.encode("utf-8")
            while data:  # the pipe holds 64 KiB; our lines are short and the shell reads them
                data = data[os.write(self.control, data):]
            return True
        except (BlockingIOError, BrokenPipeError, OSError):
            return False

    def begin(self, command: bytes, stdin: str, cap: int, stdin_fd=None) -> _SessionCommand:
        """Start `command` (written to a file first); its stdin is the path `stdin`."""
        self.calls += 1
        nonce = "c%d-%s" % (self.calls, os.urandom(8).hex())
        cmd = _SessionCommand(self.loop, nonce, self.tag + str(self.calls), cap)
        cmd.stdin_fd = stdin_fd
        with open(os.open(self.path("cmd"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "wb") as handle:
            handle.write(command)
        line = ("\\builtin export %s=%s; { \\builtin source %s; } <%s >>%s 2>>%s; " + _STATUS_LINE) % (
            CALL_ENV, cmd.tag, shlex.quote(self.path("cmd")), shlex.quote(stdin), shlex.quote(self.path("out")),
            shlex.quote(self.path("err")), nonce, shlex.quote(self.path("status")))
        self.current = cmd
        cmd.last_pid = _last_pid()  # any job it starts gets a newer one (see _interrupt)
        if not self.send(line):
            cmd.finish(returncode=self.returncode if self.returncode is not None else -signal.SIGKILL)
        return cmd

    def ask_status(self, cmd: _SessionCommand, attempt: int) -> None:
        """After a SIGINT, ask for `$?` under the command's nonce: the line SIGINT
        aborted never reports it."""
        self.send(_STATUS_LINE % ("%s.i%d" % (cmd.nonce, attempt), shlex.quote(self.path("status"))))

    def signal_jobs(self, cmd: _SessionCommand, sig: int) -> None:
        """`sig` to the process groups `cmd` started, and SIGINT to the shell (which
        aborts what it runs itself, a loop of builtins)."""
        if not self.alive:
            return
        for pgid in _session_groups(self.proc.pid, cmd.last_pid):
            _kill_group(pgid, sig)
        _kill_group(self.proc.pid, signal.SIGINT)

    # readers ------------------------------------------------------------------------

    def _read(self, name: str) -> bytes:
        fd = self.fds.get(name)
        if fd is None:
            return b""
        try:
            return os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return b""

    def _on_output(self, out: bool) -> None:
        chunk = self._read("out" if out else "err")
        cmd = self.current
        if chunk and cmd is not None and not cmd.finished:
            cmd.feed(out, chunk)
        # else: a background job's output between commands: dropped (read all the same,
        # so that it never blocks on a full pipe)

    def _drain_output(self) -> None:
        """Everything the command wrote is in the FIFOs by the time its status is:
        read it before the command counts as finished."""
        for out in (True, False):
            while True:
                chunk = self._read("out" if out else "err")
                if not chunk:
                    break
                cmd = self.current
                if cmd is not None and not cmd.finished:
                    cmd.feed(out, chunk)

    def _on_status(self) -> None:
        chunk = self._read("status")
        if not chunk:
            return
        self.status_buffer += chunk
        while b"\n" in self.status_buffer:
            line, self.status_buffer = self.status_buffer.split(b"\n", 1)
            fields = line.split()
            cmd = self.current
            if len(fields) != 2 or cmd is None or cmd.finished:
                continue
            nonce = fields[0].decode("ascii", "replace")
            # Its own nonce, or the nonce of a status asked for after an interrupt;
            # any other is a late answer for an earlier command.
            if nonce != cmd.nonce and not nonce.startswith(cmd.nonce + "."):
                continue
            try:
                status = int(fields[1])
            except ValueError:
                continue
            self._drain_output()
            cmd.finish(status=status)

    def _on_exit(self, code: int) -> None:
        self.returncode = code
        self.alive = False
        if self.closed:
            return
        self._on_status()  # a status written just before it ended still counts
        self._drain_output()
        if self.current is not None:
            self.current.finish(returncode=code)
        # The session is over: so are the jobs it left running, as when a terminal
        # closes. Its group id is not reused while one of them is in it.
        _kill_group(self.proc.pid, signal.SIGKILL)
        _kill_tagged(self.tag, exact=False)

    # ending ---------------------------------------------------------------------------

    def kill(self) -> int:
        """SIGKILL every process of the session: its group and all that carry its tags."""
        if self.proc is not None and self.returncode is None:  # not reaped: its pid is still its own
            _kill_group(self.proc.pid, signal.SIGKILL)
        return _kill_tagged(self.tag, exact=False)

    def close(self, kill: bool = True) -> None:
        """End the session and forget its files. A call that follows its command ends.
        `kill` False: the caller has just killed every process of the slot (one scan of
        /proc for all, not one per session)."""
        if self.closed:
            return
        if kill:
            self.kill()
        self.closed = True
        self.alive = False
        if self.current is not None:
            self.current.finish(returncode=self.returncode if self.returncode is not None else -signal.SIGKILL)
        self.close_files()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close_files(self) -> None:
        for fd in self.fds.values():
            if self.loop is not None:
                self.loop.remove_reader(fd)
            os.close(fd)
        self.fds = {}
        if self.control is not None:
            os.close(self.control)
            self.control = None

    def describe(self) -> dict:
        try:
            cwd = os.readlink("/proc/%d/cwd" % self.proc.pid) if self.alive else None
        except OSError:
            cwd = None
        cmd = self.current
        return {
            "name": self.name,
            "pid": self.proc.pid if self.proc else None,
            "alive": self.alive,
            "running": cmd is not None and not cmd.finished,
            "calls": self.calls,
            "cwd": cwd,
            "started_at": self.started_at,
        }


# --- background processes -----------------------------------------------------------
#
# `bash` with `background: true` starts `bash -c COMMAND` in a process group of its own,
# tagged AGENT.bN, stdin /dev/null, stdout and stderr on one pipe (their order kept, as
# 2>&1) that the agent reads into a capped log file in its private folder (outside the
# workspace, as session files are: never listed, archived or wiped with the slot's
# files, and never counted in its disk limit, so capped here). The log keeps the head
# and a ring of the latest bytes; offsets are positions in the whole output.

MAX_BACKGROUND = 64  # handles kept per slot; the oldest finished one goes first
SIGNALS = {sig.name[3:]: sig for sig in signal.Signals if sig.name.startswith("SIG") and not sig.name.startswith("SIG_")}


class _OutputLog:
    """A stream kept in a file of at most `cap` bytes: its first cap/2 bytes, then a ring
    of its latest cap/2. Positions are offsets in the whole stream."""

    def __init__(self, path: str, cap: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.head = cap // 2
        self.ring = cap - self.head
        self.total = 0

    @property
    def kept_from(self) -> int:
        """The first offset of the ring's part (what lies between head and it is gone)."""
        return min(self.total, max(self.head, self.total - self.ring))

    def feed(self, chunk: bytes) -> None:
        if self.fd is None:
            return
        data = memoryview(chunk)
        if self.total < self.head:
            room = min(len(data), self.head - self.total)
            os.pwrite(self.fd, data[:room], self.total)
            self.total += room
            data = data[room:]
        if not data:
            return
        if len(data) > self.ring:  # only its last `ring` bytes can stay
            self.total += len(data) - self.ring
            data = data[len(data) - self.ring:]
        if not data:
            return
        at = (self.total - self.head) % self.ring
        first = min(len(data), self.ring - at)
        os.pwrite(self.fd, data[:first], self.head + at)
        if first < len(data):
            os.pwrite(self.fd, data[first:], self.head)
        self.total += len(data)

    def read(self, offset: int, limit: int):
        """(start, bytes) from `offset` on: `start` > `offset` when what lay between was dropped."""
        start = min(offset, self.total)
        if start < min(self.head, self.total):
            end = self.total if self.kept_from <= self.head else self.head  # up to the gap, if any
        else:
            start = max(start, self.kept_from)
            end = self.total
        end = min(end, start + limit)
        pieces = []
        if start < min(end, self.head):
            pieces.append(os.pread(self.fd, min(end, self.head) - start, start))
        at = max(start, self.head)
        while at < end:
            ring_at = (at - self.head) % self.ring
            n = min(end - at, self.ring - ring_at)
            pieces.append(os.pread(self.fd, n, self.head + ring_at))
            at += n
        return start, b"".join(pieces)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _utf8_complete(data: bytes) -> int:
    """How many bytes of `data` end on a whole UTF-8 character (a reader at an offset
    must not split one between two reads)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0x6 else 3 if byte >> 4 == 0xE else 4 if byte >> 3 == 0x1E else 1
            return len(data) if back >= need else len(data) - back
    return len(data)


class _Background:
    """A process started with `background: true`."""

    def __init__(self, handle: str, command: str, tag: str, log: _OutputLog) -> None:
        self.handle = handle
        self.command = command
        self.tag = tag
        self.log = log
        self.child = None  # _Spawned
        self.started_at = time.time()
        self.started = time.monotonic()
        self.ended = None  # time.monotonic() of its exit

    @property
    def running(self) -> bool:
        return not self.child.exited.done()

    def status(self) -> dict:
        code = self.child.exited.result() if self.child.exited.done() else None
        return {
            "handle": self.handle,
            "pid": self.child.pid,
            "running": code is None,
            "exit_code": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 else None,
            "duration": round((self.ended or time.monotonic()) - self.started, 6),
        }

    def kill(self) -> None:
        if self.running:
            _kill_group(self.child.pid, signal.SIGKILL)
        _kill_tagged(self.tag, exact=True)

    def close(self, kill: bool = True) -> None:
        if kill:
            self.kill()
        self.child.close_streams()
        self.log.close()


def _signal_number(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value in {sig.value for sig in SIGNALS.values()}:
            return value
    elif isinstance(value, str):
        name = value.upper()
        name = name[3:] if name.startswith("SIG") else name
        if name in SIGNALS:
            return SIGNALS[name].value
    raise ToolError("bad_request", "signal must be a signal name (TERM, INT, KILL, HUP, USR1...) or number")


# --- the agent ---------------------------------------------------------------------


class Agent:
    def __init__(self, workspace: str, output_cap: int, own_pid_namespace: bool = False, scratch=()) -> None:
        self.own_pid_namespace = own_pid_namespace
        self.scratch = tuple(scratch)  # the slot's temporary folders, emptied at reset
        self.subreaper = False  # whether orphans of its commands come back to it (main sets it)
        self.ancestors = _ancestors() if own_pid_namespace else frozenset()
        self.workspace = os.path.realpath(workspace)
        self.roots = workspace_roots(workspace)
        # Every path a tool takes is walked from this descriptor (see "paths" above).
        self.root_fd = os.open(self.workspace, DIR_FLAGS)
        # A `cwd` is handed to a command as the path of a descriptor we opened, which
        # the kernel resolves to that very folder; without /proc, by fchdir around the spawn.
        self.fd_paths = os.path.isdir("/proc/self/fd")
        self.output_cap = output_cap
        self.running = {}  # request id -> (process group id, call tag) of a running bash command
        # Groups that may still hold background jobs (`server &`) of finished commands.
        # Linux does not reuse a pid while a group of that id has members, so killing
        # these at shutdown cannot hit a stranger's group that is still alive.
        self.lingering = set()
        self.tasks = set()
        self.out = sys.stdout.buffer
        # Tags every command's environment (see _kill_tagged): this agent's, then the call's.
        # The node server learns it from the ready line, to find a slot's commands that
        # left the agent's process tree; under a pid namespace every agent is pid 2, so
        # the random part alone tells the slots apart.
        self.tag = "%d.%s" % (os.getpid(), os.urandom(8).hex())
        self.calls_started = 0
        # Looked up once: a command's environment starts from the agent's own, and
        # naming bash by its path spares every spawn a search along PATH.
        self.base_env = dict(os.environ)
        self.bash = shutil.which("bash") or "bash"
        self.sessions = {}  # name -> _Session
        self.background = {}  # handle -> _Background
        self.sessions_started = 0
        self.background_started = 0
        self.streamers = {}  # request id -> _Streamer of a call that streams its output
        self._private = None  # the private folder, made on first use (see _private_root)

    def private_folder(self) -> str:
        if self._private is None:
            self._private = _private_root()
        return self._private

    # I/O ----------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")
        self.out.flush()

    def send_chunk(self, request_id, stream: str, data) -> None:
        """A streaming call's output: a header line, then its bytes as they are (no JSON
        escaping: a node server can skip a chunk its reader has no room for unread)."""
        header = {"id": request_id, "chunk": stream, "size": len(data)}
        self.out.write(json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n")
        self.out.write(data)
        self.out.flush()

    async def serve(self) -> None:
        loop = asyncio.get_event_loop()
        reader = asyncio.StreamReader(limit=MAX_REQUEST_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line over the limit: the stream cannot be resynced
                self.send({"id": None, "ok": False, "error": {"kind": "bad_request", "message": "request too large"}})
                break
            if not line:
                break
            if not line.strip():
                continue
            task = loop.create_task(self.handle_line(line))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        # stdin closed: the server is gone or is stopping us. Leave nothing behind.
        try:
            await self.end_processes()
        except ToolError:
            pass  # what still runs is the server's to kill (it kills the agent's whole tree)
        self.forget_all()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=KILL_GRACE_SECONDS + 1)

    def kill_all(self) -> int:
        """SIGKILL every process of this slot's commands; how many were signalled."""
        groups = {pgid for pgid, _ in self.running.values()} | self.lingering
        groups |= {session.proc.pid for session in self.sessions.values() if session.alive}
        groups |= {process.child.pid for process in self.background.values() if process.running}
        for pgid in groups:
            _kill_group(pgid, signal.SIGKILL)
        # Counted by the scans only, which pass over zombies (a killed process that its
        # parent has not reaped yet is dead already; a group of them still "exists").
        if self.own_pid_namespace:
            # Everything this agent can see is the slot's, but itself and the processes
            # above it (the runtime's init): even a process that left its group and
            # cleared its environment.
            return _kill_all_but(self.ancestors)
        # No namespace of its own: every process below the agent, its subreaper (what
        # daemonised too); on a kernel that refused a subreaper, what carries its tag.
        killed = _kill_descendants()
        if not self.subreaper:
            killed += _kill_tagged(self.tag + ".", exact=False)
        return killed

    async def end_processes(self) -> int:
        """Kill the slot's processes until none is left (what they fork meanwhile too);
        how many were killed. ToolError reset_failed if they keep reappearing."""
        deadline = time.monotonic() + RESET_SECONDS
        killed = quiet = 0
        # Done after two rounds in a row find nothing: a process whose parent dies while a
        # round walks the tree is re-parented to the agent after the round read the
        # agent's children, and only the next round sees it there.
        while quiet < 2:
            round_killed = self.kill_all()
            killed += round_killed
            quiet = 0 if round_killed else quiet + 1
            if round_killed and time.monotonic() > deadline:
                raise ToolError("reset_failed", "the slot's processes kept reappearing for %.0fs" % RESET_SECONDS)
            await asyncio.sleep(0.005 if quiet else 0.01)
        _reap_adopted()
        return killed

    async def tool_reset(self, request_id, args, timeout):
        """End every process of the slot's commands and empty its scratch folders, so
        that the slot can change hands without a new agent (the node server then wipes
        the workspace). Killing is repeated until nothing is left; a slot that keeps
        spawning past that, or whose scratch folders will not empty, is the server's to
        restart (kind reset_failed)."""
        killed = await self.end_processes()
        self.lingering.clear()
        self.forget_all()
        self._private = None  # inside a scratch folder (or gone with forget_all): made anew on use
        for folder in self.scratch:
            try:
                empty_folder(folder)
            except OSError as exc:
                raise ToolError("reset_failed", "cannot empty the slot's %s: %s" % (folder, exc.strerror or exc))
        if self.own_pid_namespace and _sysv_ipc_left():
            raise ToolError("reset_failed", "SysV IPC objects of the last holder are left in the slot")
        return {"killed": killed}

    def forget_all(self) -> None:
        """Close every session and drop every background process with its log: the next
        holder of the slot must not meet the last one's shells or output."""
        for session in list(self.sessions.values()):
            session.close(kill=False)
        self.sessions.clear()
        for process in list(self.background.values()):
            process.close(kill=False)
        self.background.clear()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    async def handle_line(self, line: bytes) -> None:
        request_id = None
        try:
            try:
                request = json.loads(line)
            except ValueError as exc:
                raise ToolError("bad_request", "malformed JSON: %s" % exc)
            if not isinstance(request, dict):
                raise ToolError("bad_request", "a request must be a JSON object")
            request_id = request.get("id")
            tool = request.get("tool")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ToolError("bad_request", "args must be an object")
            handler = TOOLS.get(tool)
            if handler is None:
                raise ToolError("unknown_tool", "unknown tool %r (known: %s)" % (tool, ", ".join(sorted(TOOLS))))
            streamer = None
            if request.get("stream") is True and request_id is not None and request_id not in self.streamers:
                streamer = self.streamers[request_id] = _Streamer(self, request_id, asyncio.get_event_loop())
            try:
                result = await handler(self, request_id, args, request.get("timeout"))
            finally:
                if streamer is not None:  # every chunk goes out before the answer
                    del self.streamers[request_id]
                    streamer.close()
            self.send({"id": request_id, "ok": True, "result": result})
        except ToolError as exc:
            self.send({"id": request_id, "ok": False, "error": {"kind": exc.kind, "message": exc.message}})
        except Exception as exc:  # a bug or an OS error must not take the agent down
            kind = "not_found" if isinstance(exc, FileNotFoundError) else "io"
            if isinstance(exc, IsADirectoryError):
                kind = "is_directory"
            elif isinstance(exc, NotADirectoryError):
                kind = "not_a_directory"
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.send({"id": request_id, "ok": False, "error": {"kind": kind, "message": detail}})

    # tools --------------------------------------------------------------------------

    async def tool_bash(self, request_id, args, timeout):
        if args.get("session") is not None:
            if args.get("background"):
                raise ToolError("bad_request", "a command runs either in a session or in the background, not both")
            return await self._session_call(request_id, args, timeout)
        for key in ("input", "idle_timeout", "interrupt", "eof"):
            if args.get(key) not in (None, False):
                raise ToolError("bad_request", "%s goes with a session (args.session)" % key)
        command = args.get("command")
        if not isinstance(command, str):
            raise ToolError("bad_request", "bash needs a string 'command'")
        extra_env = args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise ToolError("bad_request", "env must be an object of strings")
        if args.get("background"):
            return self._start_background(args, command, extra_env)
        env = dict(self.base_env)
        env.update({str(k): str(v) for k, v in extra_env.items()})
        self.calls_started += 1
        call_tag = "%s.%d" % (self.tag, self.calls_started)
        env[CALL_ENV] = call_tag
        cap = _bounded_int(args, "output_cap", self.output_cap, MAX_OUTPUT_CAP)
        timeout = float(timeout) if timeout else None

        started = time.monotonic()
        out, err = CappedBuffer(cap), CappedBuffer(cap)
        sinks = (out, err)
        streamer = self.streamers.get(request_id)
        if streamer is not None:
            sinks = (_Tee(out, streamer, "stdout"), _Tee(err, streamer, "stderr"))
        loop = asyncio.get_event_loop()
        if args.get("cwd"):
            child = self._spawn_in(args["cwd"], loop, [self.bash, "-c", command], env, *sinks)
        else:  # the hot path: no walk, no descriptor
            child = _Spawned(loop, [self.bash, "-c", command], self.workspace, env, *sinks)
        self.running[request_id] = (child.pid, call_tag)
        timed_out = False
        try:
            if not await _done_within(loop, child.exited, timeout):
                timed_out = True
                _kill_group(child.pid, signal.SIGTERM)
                if not await _done_within(loop, child.exited, KILL_GRACE_SECONDS):
                    _kill_group(child.pid, signal.SIGKILL)
                _kill_tagged(call_tag, exact=True)
            code = await child.exited
            await _done_within(loop, child.streams_done, PIPE_DRAIN_SECONDS)
        finally:
            self.running.pop(request_id, None)
            if not child.exited.done():  # cancelled: leave nothing behind
                _kill_group(child.pid, signal.SIGKILL)
                _kill_tagged(call_tag, exact=True)
            child.close_streams()
            if _group_alive(child.pid):
                self.lingering.add(child.pid)
        return {
            "exit_code": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 else None,
            "timed_out": timed_out,
            "duration": round(time.monotonic() - started, 6),
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_dropped": out.dropped,
            "stderr_dropped": err.dropped,
            "call": call_tag,
        }

    # sessions -----------------------------------------------------------------------

    async def _session_call(self, request_id, args, timeout):
        """`bash` in a session: start a command, or follow the one that runs (send it
        input, interrupt it, or just wait for more of it)."""
        name = args.get("session")
        if not isinstance(name, str) or not SESSION_NAME.match(name):
            raise ToolError("bad_request", "session must be a name of 1-64 letters, digits, '_', '.' or '-' "
                                           "starting with a letter or digit")
        command = args.get("command")
        data = args.get("input")
        if data is not None and not isinstance(data, str):
            raise ToolError("bad_request", "input must be a string")
        data = data.encode("utf-8", "surrogatepass") if data is not None else None
        if data is not None and len(data) > MAX_INPUT:
            raise ToolError("bad_request", "input must be at most %d bytes" % MAX_INPUT)
        idle = args.get("idle_timeout")
        if idle is not None and (isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0):
            raise ToolError("bad_request", "idle_timeout must be a number of seconds > 0")
        interrupt = bool(args.get("interrupt"))
        eof = bool(args.get("eof"))
        cap = _bounded_int(args, "output_cap", self.output_cap, MAX_OUTPUT_CAP)
        timeout = float(timeout) if timeout else None
        loop = asyncio.get_event_loop()
        started = time.monotonic()
        session = self.sessions.get(name)
        if session is not None and session.attached is not None:
            raise ToolError("busy", "session %s is serving another call" % name)
        fresh = False
        if command is not None:
            if not isinstance(command, str):
                raise ToolError("bad_request", "bash needs a string 'command'")
            if "\x00" in command:
                raise ToolError("bad_request", "command contains a NUL byte")
            if interrupt or eof:
                raise ToolError("bad_request", "interrupt and eof go with a call that follows a running command, "
                                               "not with a new command")
            if session is not None and session.running:
                raise ToolError("busy", "a command still runs in session %s: follow it (a call without a command, "
                                        "with input or interrupt) before starting another" % name)
            prefix = self._session_prefix(args)
            if session is None or not session.alive:
                session = self._new_session(name, loop)
                fresh = True
            cmd = self._begin(session, prefix + command.encode("utf-8", "surrogatepass"), data, idle, cap)
            if cmd.finished and cmd.ended and not fresh:
                # It died between our look and our line (killed from outside): start over once.
                session = self._new_session(name, loop)
                fresh = True
                cmd = self._begin(session, prefix + command.encode("utf-8", "surrogatepass"), data, idle, cap)
        else:
            cmd = session.current if session is not None else None
            if cmd is None or cmd.collected:
                raise ToolError("not_running", "no command runs in session %s: send a command" % name)
            if (data is not None or eof) and not cmd.finished:
                if cmd.stdin_fd is None:
                    raise ToolError("bad_request", "the command's stdin is not open: a command that may wait for "
                                                   "input must be started with idle_timeout")
                cmd.send_input(data or b"", eof)
            cmd.last_output = max(cmd.last_output, started)  # silence counts from this call
        session.attached = request_id
        # Output that came while no call followed the command is in its buffers (and so
        # in this call's result), not in the chunks: only what comes from now on is streamed.
        cmd.streamer = self.streamers.get(request_id)
        try:
            timed_out = waiting = False
            deadline = started + timeout if timeout is not None else None
            if interrupt and not cmd.finished:
                await self._interrupt(session, cmd)
            while not cmd.finished:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    timed_out = True
                    await self._interrupt(session, cmd)
                    break
                if idle is not None and now >= cmd.last_output + idle:
                    waiting = True
                    break
                waits = [limit for limit in (deadline, cmd.last_output + idle if idle is not None else None)
                         if limit is not None]
                await _done_within(loop, cmd.done, min(waits) - now if waits else None)
        finally:
            session.attached = None
            cmd.streamer = None
        out, err = cmd.detach()
        if cmd.finished:
            cmd.collected = True
            if cmd.ended and self.sessions.get(name) is session:
                self._drop_session(session)
        return {
            "session": name,
            "session_started": fresh,
            "exit_code": cmd.exit_code if cmd.finished else None,
            "signal": cmd.signal if cmd.finished else None,
            "timed_out": timed_out,
            "interrupted": cmd.interrupted,
            "waiting": waiting,
            "session_ended": cmd.ended,
            "duration": round(time.monotonic() - started, 6),
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_dropped": out.dropped,
            "stderr_dropped": err.dropped,
            "call": cmd.tag,
        }

    def _session_prefix(self, args) -> bytes:
        """`cwd` and `env` of a session call, as commands run before it in the shell:
        they stay, as a `cd` and an `export` typed there would. On the command's first
        line, so that the line numbers of its errors are its own."""
        words = []
        extra_env = args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise ToolError("bad_request", "env must be an object of strings")
        for key, value in extra_env.items():
            if not isinstance(key, str) or not ENV_NAME.match(key):
                raise ToolError("bad_request", "env: %r is not a variable name" % (key,))
            words.append("\\builtin export %s=%s; " % (key, shlex.quote(str(value))))
        if args.get("cwd"):
            parts = workspace_parts(args["cwd"], self.roots)
            os.close(self._open_dir(parts, args["cwd"]))  # a folder inside, reached without a symlink
            words.append("\\builtin cd -- %s || \\builtin return; "
                         % shlex.quote(os.path.join(self.workspace, *parts)))
        return "".join(words).encode("utf-8", "surrogatepass")

    def _new_session(self, name, loop) -> _Session:
        old = self.sessions.pop(name, None)
        if old is not None:
            old.close()
        if len(self.sessions) >= MAX_SESSIONS:
            raise ToolError("too_many", "this slot has %d sessions, its limit: close one first" % MAX_SESSIONS)
        self.sessions_started += 1
        session = _Session(self, name, self.sessions_started)
        session.start(loop)
        self.sessions[name] = session
        return session

    def _drop_session(self, session: _Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
        session.close()

    def _begin(self, session: _Session, command: bytes, data, idle, cap) -> _SessionCommand:
        """Start a command in `session` with the stdin the call asks for."""
        stdin, stdin_fd = "/dev/null", None
        if idle is not None:
            # It may stop at a prompt: a FIFO that stays open for a later call's input.
            stdin = session.path("in%d" % (session.calls + 1))
            os.mkfifo(stdin, 0o600)
            # O_RDWR: the shell's open for reading does not block, and what is written
            # stays in the FIFO until the command reads it.
            stdin_fd = os.open(stdin, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        elif data is not None:
            stdin = session.path("input")  # all of it, then EOF
            with open(os.open(stdin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as handle:
                handle.write(data)
        cmd = session.begin(command, stdin, cap, stdin_fd)
        if stdin_fd is not None:
            cmd.stdin_path = stdin  # removed when the command ends
            if data is not None:
                cmd.send_input(data, False)
        return cmd

    async def _interrupt(self, session: _Session, cmd: _SessionCommand) -> None:
        """Stop the command that runs in `session`, keeping the session when it can:
        SIGINT to the jobs it started and to the shell (which aborts the line, as at a
        terminal); after a grace, SIGKILL to them and what carries the call's tag, and
        SIGINT to the shell again; after another, the session ends."""
        loop = asyncio.get_event_loop()
        cmd.interrupted = True
        for attempt in (1, 2):
            session.signal_jobs(cmd, signal.SIGINT if attempt == 1 else signal.SIGKILL)
            if attempt == 2:
                _kill_tagged(cmd.tag, exact=True)
            session.ask_status(cmd, attempt)
            if await _done_within(loop, cmd.done, KILL_GRACE_SECONDS):
                return
        session.kill()
        await _done_within(loop, cmd.done, KILL_GRACE_SECONDS)
        if not cmd.finished:  # not even its end was seen: close it for good
            self._drop_session(session)

    async def tool_session(self, request_id, args, timeout):
        action = args.get("action")
        if action == "list":
            return {"sessions": [session.describe() for session in self.sessions.values()]}
        if action == "close":
            name = args.get("name")
            if not isinstance(name, str):
                raise ToolError("bad_request", "close needs the session's name")
            session = self.sessions.get(name)
            if session is not None:
                self._drop_session(session)
            return {"name": name, "closed": session is not None}
        raise ToolError("bad_request", "session action must be 'list' or 'close'")

    # background processes -----------------------------------------------------------

    def _start_background(self, args, command, extra_env) -> dict:
        if len(self.background) >= MAX_BACKGROUND:
            finished = [process for process in self.background.values() if not process.running]
            if not finished:
                raise ToolError("too_many", "%d background processes run in this slot, its limit" % MAX_BACKGROUND)
            oldest = min(finished, key=lambda process: process.started)
            del self.background[oldest.handle]
            oldest.close()
        cap = _bounded_int(args, "output_cap", self.output_cap, MAX_OUTPUT_CAP)
        env = dict(self.base_env)
        env.update({str(k): str(v) for k, v in extra_env.items()})
        self.background_started += 1
        handle = "bg-%d" % self.background_started
        tag = "%s.b%d" % (self.tag, self.background_started)
        env[CALL_ENV] = tag
        started = time.monotonic()
        log = _OutputLog(os.path.join(self.private_folder(), handle + ".log"), cap)
        process = _Background(handle, command, tag, log)
        loop = asyncio.get_event_loop()
        try:
            argv = [self.bash, "-c", command]
            if args.get("cwd"):
                process.child = self._spawn_in(args["cwd"], loop, argv, env, log, None, merge=True)
            else:
                process.child = _Spawned(loop, argv, self.workspace, env, log, None, merge=True)
        except BaseException:
            log.close()
            raise
        process.child.exited.add_done_callback(lambda _: setattr(process, "ended", time.monotonic()))
        self.background[handle] = process
        return {
            "background": True,
            "handle": handle,
            "pid": process.child.pid,
            "exit_code": None,
            "signal": None,
            "timed_out": False,
            "duration": round(time.monotonic() - started, 6),
            "stdout": "",
            "stderr": "",
            "stdout_dropped": 0,
            "stderr_dropped": 0,
        }

    async def tool_process(self, request_id, args, timeout):
        action = args.get("action")
        if action == "list":
            return {"processes": [dict(process.status(), command=process.command[:200],
                                       started_at=process.started_at, output_bytes=process.log.total)
                                  for process in self.background.values()]}
        if action not in ("output", "signal", "wait"):
            raise ToolError("bad_request", "process action must be 'list', 'output', 'signal' or 'wait'")
        process = self.background.get(args.get("handle"))
        if process is None:
            raise ToolError("not_found", "no background process %r in this slot (it ended with a reset or "
                                         "release, or was never started)" % (args.get("handle"),))
        if action == "output":
            offset = _bounded_int(args, "offset", 0, None)
            limit = _bounded_int(args, "limit", DEFAULT_OUTPUT_CAP, MAX_OUTPUT_CAP)
            encoding = args.get("encoding", "text")
            if encoding not in ("text", "base64"):
                raise ToolError("bad_request", "encoding must be 'text' or 'base64'")
            start, data = process.log.read(offset, limit)
            if encoding == "text":
                # Whole characters only, unless nothing more can come.
                more = start + len(data) < process.log.total or process.running or not process.child.streams_done.done()
                if more:
                    data = data[:_utf8_complete(data)]
                output = data.decode("utf-8", "replace")
            else:
                output = base64.b64encode(data).decode("ascii")
            return dict(process.status(), offset=start, next_offset=start + len(data), dropped=start - min(offset, start),
                        total=process.log.total, output=output, encoding=encoding)
        if action == "signal":
            number = _signal_number(args.get("signal", "TERM"))
            sent = process.running
            if sent:
                _kill_group(process.child.pid, number)
            if number == signal.SIGKILL:
                _kill_tagged(process.tag, exact=True)  # what left its group too
            return dict(process.status(), sent=sent)
        # wait
        wait = args.get("timeout")
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0):
            raise ToolError("bad_request", "timeout must be a number of seconds >= 0")
        if timeout:
            wait = float(timeout) if wait is None else min(float(wait), float(timeout))
        loop = asyncio.get_event_loop()
        if await _done_within(loop, process.child.exited, wait):
            # What it wrote just before it ended, read before answering.
            await _done_within(loop, process.child.streams_done, PIPE_DRAIN_SECONDS)
        return process.status()

    def _spawn_in(self, cwd, loop, argv, env, out, err, merge=False):
        """Start `argv` in the workspace folder `cwd`, walked like any other path."""
        parts = workspace_parts(cwd, self.roots)
        if not parts:
            return _Spawned(loop, argv, self.workspace, env, out, err, merge)
        dir_fd = self._open_dir(parts, cwd)
        try:
            if self.fd_paths:
                # The child chdirs (before it closes inherited descriptors and execs) to
                # /proc/self/fd/N: the folder we opened, whatever its path is by then.
                return _Spawned(loop, argv, "/proc/self/fd/%d" % dir_fd, env, out, err, merge)
            # No /proc: the child inherits our cwd. Safe to move it for the spawn: nothing
            # in the agent uses a relative path, and spawns happen on this one thread.
            here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fchdir(dir_fd)
                return _Spawned(loop, argv, None, env, out, err, merge)
            finally:
                os.fchdir(here)
                os.close(here)
        finally:
            os.close(dir_fd)

    def _open_dir(self, parts, path, create=False) -> int:
        """A descriptor of the workspace folder `parts`, walked from the workspace's own."""
        return open_folder(self.root_fd, parts, path, create)

    async def _in_thread(self, function, *args):
        # File tools do blocking disk I/O (a slow or huge file system, a big archive):
        # on a worker thread, so the agent keeps answering (cancel, ping, bash) meanwhile.
        return await asyncio.get_event_loop().run_in_executor(None, functools.partial(function, *args))

    async def tool_read_file(self, request_id, args, timeout):
        return await self._in_thread(self._read_file, args)

    def _read_file(self, args):
        path = args.get("path")
        parts = workspace_parts(path, self.roots)
        encoding = args.get("encoding", "text")
        if encoding not in ("text", "base64"):
            raise ToolError("bad_request", "encoding must be 'text' or 'base64'")
        offset = _bounded_int(args, "offset", 0, None)
        limit = _bounded_int(args, "limit", DEFAULT_READ_LIMIT, MAX_READ_LIMIT)
        if not parts:
            raise ToolError("is_directory", "%s: is a directory (the workspace)" % path)
        parent = self._open_dir(parts[:-1], path)
        try:
            fd = open_child_file(parent, parts[-1], path)
        finally:
            os.close(parent)
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(fd).st_size
            handle.seek(offset)
            data = handle.read(limit)
            digest = None
            if args.get("sha256"):
                handle.seek(0)
                hasher = hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
                digest = hasher.hexdigest()
        result = {
            "path": "/".join(parts),
            "size": size,
            "offset": offset,
            "bytes_read": len(data),
            "eof": offset + len(data) >= size,
            "encoding": encoding,
        }
        if encoding == "base64":
            result["content"] = base64.b64encode(data).decode("ascii")
        else:
            try:
                result["content"] = data.decode("utf-8")
            except UnicodeDecodeError:  # binary data asked for as text: say so, don't fail
                result["content"] = data.decode("utf-8", "replace")
                result["lossy"] = True
        if digest:
            result["sha256"] = digest
        return result

    async def tool_write_file(self, request_id, args, timeout):
        return await self._in_thread(self._write_file, args)

    def _write_file(self, args):
        path = args.get("path")
        parts = workspace_parts(path, self.roots)
        content = args.get("content", "")
        if not isinstance(content, str):
            raise ToolError("bad_request", "content must be a string")
        encoding = args.get("encoding", "text")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError:
                raise ToolError("bad_request", "content is not valid base64")
        elif encoding == "text":
            data = content.encode("utf-8")
        else:
            raise ToolError("bad_request", "encoding must be 'text' or 'base64'")
        mode = _file_mode(args.get("mode"))
        if not parts:
            raise ToolError("is_directory", "%s: is a directory (the workspace)" % path)
        name = parts[-1]
        parent = self._open_dir(parts[:-1], path, create=True)
        try:
            try:
                old = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            except OSError as exc:
                raise _refusal(parent, name, path, exc)
            if old is not None:
                _check_regular(old, path, name)  # a symlink, folder, FIFO or device is left alone
                if mode is None:
                    mode = stat.S_IMODE(old.st_mode)

            def make(folder, tmp):
                # Created 0666 less the umask, like any new file; then the asked or the old mode.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=folder)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    if mode is not None:
                        os.fchmod(fd, mode)
                finally:
                    os.close(fd)

            _swap_in(parent, name, make, "write")
        finally:
            os.close(parent)
        return {"path": "/".join(parts), "size": len(data)}

    async def tool_list_files(self, request_id, args, timeout):
        return await self._in_thread(self._list_files, args)

    def _list_files(self, args):
        path = args.get("path") or "."
        parts = workspace_parts(path, self.roots)
        recursive = bool(args.get("recursive"))
        max_entries = _bounded_int(args, "max_entries", 10000, MAX_LIST_ENTRIES)
        skip = exclusion(args.get("exclude"))
        top_fd = self._open_dir(parts, path)
        entries = []
        truncated = False
        cut = []
        walk = walk_folder(top_fd, "/".join(parts), recursive, cut, skip=skip)
        try:
            for _, entry_path, _, st in walk:
                if len(entries) >= max_entries:
                    truncated = True
                    break
                mode = st.st_mode
                kind = ("symlink" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode)
                        else "file" if stat.S_ISREG(mode) else "other")
                entries.append({"path": entry_path, "type": kind, "size": st.st_size, "mtime": st.st_mtime})
        finally:
            walk.close()
            os.close(top_fd)
        return {"entries": entries, "truncated": truncated or bool(cut)}

    async def tool_archive(self, request_id, args, timeout):
        return await self._in_thread(self._archive, args)

    def _archive(self, args):
        """One tar.gz of `path`, or of several `paths` at once.

        With `path` (as ever) members are named after the path's last part ("b/x" for
        "a/b", "./x" for "."). With `paths` they are named relative to the workspace
        ("a/b/x"; "." adds the workspace's contents, not an entry for itself), so a
        caller who wants several paths asks once and unpacks nothing. A member met
        twice (overlapping paths) is stored once. `members` lists the names stored.
        """
        paths = args.get("paths")
        if paths is None:
            path = args.get("path") or "."
            parts = workspace_parts(path, self.roots)
            tops = [(path, parts, parts[-1] if parts else ".")]
            label = path
        else:
            if args.get("path") is not None:
                raise ToolError("bad_request", "give path or paths, not both")
            if not isinstance(paths, list) or not 1 <= len(paths) <= MAX_ARCHIVE_PATHS:
                raise ToolError("bad_request", "paths must be a list of 1 to %d paths" % MAX_ARCHIVE_PATHS)
            # Every path is checked before anything is read: a bad one refuses the whole call.
            tops = []
            for path in paths:
                parts = workspace_parts(path, self.roots)
                tops.append((path, parts, "/".join(parts)))
            label = ", ".join(paths)
        cap = _bounded_int(args, "max_bytes", DEFAULT_ARCHIVE_CAP, MAX_ARCHIVE_CAP)
        skip = exclusion(args.get("exclude"))
        sink = _CappedBytesIO(cap)
        members = []
        try:
            with tarfile.open(fileobj=sink, mode="w:gz") as tar:
                seen = set()
                for path, parts, top in tops:
                    self._archive_path(tar, path, parts, top, seen, members, skip)
        except _TooLarge:
            raise ToolError("too_large", "archive of %s exceeds %d bytes" % (label, cap))
        data = sink.getvalue()
        return {
            "content": base64.b64encode(data).decode("ascii"),
            "encoding": "base64",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "members": members,
        }

    def _archive_path(self, tar, path, parts, top, seen, members, skip=None) -> None:
        """Add the file or folder `parts` to `tar` as `top` ("" names the workspace
        itself, which then gets no entry of its own), skipping members in `seen` and
        what `skip` excludes (see exclusion)."""
        file_fd = top_fd = None
        if parts:
            parent = self._open_dir(parts[:-1], path)
            try:
                if stat.S_ISDIR(_lstat_child(parent, parts[-1], path).st_mode):
                    top_fd = open_child_dir(parent, parts[-1], path)
                else:
                    file_fd = open_child_file(parent, parts[-1], path)
            finally:
                os.close(parent)
        else:
            top_fd = os.dup(self.root_fd)
        cut = []
        try:
            if file_fd is not None:
                if top not in seen:
                    seen.add(top)
                    members.append(top)
                    tar_file(tar, file_fd, top)
                return
            if top and top not in seen:
                seen.add(top)
                members.append(top)
                tar.addfile(_tar_info(top, os.fstat(top_fd), tarfile.DIRTYPE))
            base = "/".join(parts)
            if skip is not None and top != base:
                # Members named after the path's last part ("b/x" for "a/b", "./x" for "."):
                # patterns are matched against the workspace-relative path all the same.
                named = skip
                skip = lambda name, member: named(name, base + member[len(top):] if base  # noqa: E731
                                                  else member[len(top) + 1:])
            walk = walk_folder(top_fd, top, True, cut, skip=skip)
            try:
                for dir_fd, member, name, st in walk:
                    if member not in seen and tar_entry(tar, dir_fd, member, name, st):
                        seen.add(member)
                        members.append(member)
            finally:
                walk.close()
            if cut:
                raise ToolError("too_large", "%s: folders nested deeper than %d levels (%s)"
                                % (path, MAX_WALK_DEPTH, cut[0]))
        finally:
            for fd in (file_fd, top_fd):
                if fd is not None:
                    os.close(fd)

    async def tool_cancel(self, request_id, args, timeout):
        target = args.get("target")
        running = self.running.get(target)
        if running is not None:
            pgid, call_tag = running
            _kill_group(pgid, signal.SIGKILL)
            _kill_tagged(call_tag, exact=True)
            return {"cancelled": True}
        for session in self.sessions.values():
            if session.attached is not None and session.attached == target and session.running:
                # Its caller has gone: stop the command as a timeout would, keeping the
                # session; the call then answers, to no one.
                self._spawn_task(self._interrupt(session, session.current))
                return {"cancelled": True}
        return {"cancelled": False}

    def _spawn_task(self, work) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def tool_ping(self, request_id, args, timeout):
        return {"pid": os.getpid(), "workspace": self.workspace, "python": sys.version.split()[0]}


# --- archives -----------------------------------------------------------------------

MAX_ARCHIVE_PATHS = 1000  # paths one archive call may name


class _TooLarge(Exception):
    pass


def _tar_info(name: str, st, kind) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def tar_entry(tar, dir_fd: int, member: str, name: str, st) -> bool:
    """Add one entry met by _walk: folders, files and symlinks (as links); nothing else.
    Whether it was added."""
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(_tar_info(member, st, tarfile.DIRTYPE))
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:  # gone or replaced meanwhile
            return False
        info = _tar_info(member, st, tarfile.SYMTYPE)
        info.linkname = target
        tar.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = open_child_file(dir_fd, name, member)
        except ToolError as exc:
            if exc.kind in ("not_found", "path", "not_a_file", "is_directory"):  # changed meanwhile
                return False
            raise
        try:
            tar_file(tar, fd, member)
        finally:
            os.close(fd)
    else:  # FIFOs, sockets and devices are left out: never opened, never recreated by an unpacker.
        return False
    return True


def tar_file(tar, fd: int, member: str) -> None:
    st = os.fstat(fd)
    info = _tar_info(member, st, tarfile.REGTYPE)
    info.size = st.st_size
    tar.addfile(info, _ExactReader(fd, st.st_size))


class _ExactReader:
    """Reads `size` bytes from `fd`: zeros past an early end (the file shrank meanwhile)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        chunks = []
        want = n
        while want > 0:
            chunk = os.read(self.fd, min(want, 1 << 20))
            if not chunk:
                chunks.append(bytes(want))
                break
            chunks.append(chunk)
            want -= len(chunk)
        self.left -= n
        return b"".join(chunks)


class _CappedBytesIO(io.BytesIO):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, data) -> int:
        if self.tell() + len(data) > self.cap:
            raise _TooLarge()
        return super().write(data)


# --- trees in -----------------------------------------------------------------------
#
# A tree comes into a slot as one tar archive that the node server streamed into the
# workspace (PUT, as any file), unpacked here by the `extract` tool; the pool unpacks
# a tree it downloads with the same code on its own side, into the caller's folder.
# Either way the archive is hostile: a slot made the one the pool reads, anyone may
# hand-make the one a slot gets. So every member is checked before anything is
# written (a first pass over the whole archive), and checked again as it is written
# (the slot may change the archive between the passes):
# - a name is relative, without `..` and without a NUL, and no member lies under a
#   symlink or a file of the archive (folders are walked with O_NOFOLLOW anyway);
# - folders, regular files and symlinks only: a hard link, a device, a FIFO is refused;
# - a symlink is made only if it cannot lead out of the tree it was unpacked into: its
#   target is relative, climbs with leading `..` only, and no higher than the tree's
#   top (so, by induction over the links of the tree, it resolves inside). Where
#   `links_out` is "skip" (a download: a slot's venv links to /usr/bin/python3) such a
#   link is left out and named in the answer; elsewhere it refuses the archive;
# - modes are kept (less setuid, setgid and sticky), mtimes too; ownership never: what
#   is made belongs to whoever unpacks (the slot's own uid in a slot), whatever uid the
#   archive names, so a root server's bwrap slot never tries a chown it cannot do;
# - caps on the bytes of file data and on the number of members, checked on the
#   headers before any data is read (too_large).

DEFAULT_TREE_BYTES = 1 << 30
MAX_TREE_BYTES = 16 << 30
DEFAULT_TREE_ENTRIES = 100000
MAX_TREE_ENTRIES = 1000000
TREE_MODE_BITS = 0o777  # setuid, setgid and sticky are not kept
_COPY_BLOCK = 1 << 20


def tree_member_parts(name: str) -> list:
    """The components of an archive member's name below the tree's top; or raise (path)."""
    if "\x00" in name:
        raise ToolError("path", "archive member %r: the name holds a NUL byte" % name)
    if name.startswith("/"):
        raise ToolError("path", "archive member %s: absolute names are not unpacked" % name)
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." in parts:
        raise ToolError("path", "archive member %s: '..' is not allowed" % name)
    return parts


def link_stays_inside(parts: list, target: str) -> bool:
    """Whether a symlink at `parts` (below the tree's top) pointing at `target` cannot
    lead out of the tree: relative, `..` only leading, and no higher than the top."""
    if not target or "\x00" in target or target.startswith("/"):
        return False
    names = [part for part in target.split("/") if part and part != "."]
    climbs = 0
    while climbs < len(names) and names[climbs] == "..":
        climbs += 1
    return ".." not in names[climbs:] and climbs <= len(parts) - 1


class _TreeMember:
    """One member of an archive, checked: what it is and where it goes."""

    __slots__ = ("info", "parts", "kind")

    def __init__(self, info, parts, kind) -> None:
        self.info = info
        self.parts = parts
        self.kind = kind  # "dir", "file" or "link"


def _check_member(info, strip: int, kinds: dict, links_out: str, skipped: list):
    """The member as a _TreeMember; None for the top itself or a link left out; or
    raise. `kinds` maps the paths met so far to their kind: nothing may lie under a
    file or a symlink of the archive, nor be a folder in one place and not in another."""
    parts = tree_member_parts(info.name)
    if len(parts) < strip:
        raise ToolError("path", "archive member %s: outside the folder asked for" % info.name)
    parts = parts[strip:]
    for depth in range(1, len(parts)):
        above = kinds.get(tuple(parts[:depth]))
        if above is not None and above != "dir":
            raise ToolError("path", "archive member %s: lies under the %s %s; %s"
                            % (info.name, "symlink" if above == "link" else "file", "/".join(parts[:depth]),
                               NOT_FOLLOWED))
    if len(parts) > MAX_WALK_DEPTH:
        raise ToolError("too_large", "archive member %s: nested deeper than %d levels" % (info.name, MAX_WALK_DEPTH))
    if info.isdir():
        member = _TreeMember(info, parts, "dir") if parts else None
    elif not parts:
        raise ToolError("not_a_directory", "the archive's top %s is not a folder" % info.name)
    elif info.isreg():
        member = _TreeMember(info, parts, "file")
    elif info.issym():
        if not link_stays_inside(parts, info.linkname):
            if links_out != "skip":
                raise ToolError("path", "archive member %s: a symlink to %s could lead out of the tree"
                                % (info.name, info.linkname))
            skipped.append({"path": "/".join(parts), "reason": "symlink to %s leads out of the tree" % info.linkname})
            return None
        member = _TreeMember(info, parts, "link")
    else:
        what = "a hard link" if info.islnk() else "a device, FIFO or other special file"
        raise ToolError("not_a_file", "archive member %s: is %s; only folders, files and symlinks are unpacked"
                        % (info.name, what))
    if member is not None:
        before = kinds.setdefault(tuple(parts), member.kind)
        if (before == "dir") != (member.kind == "dir"):
            raise ToolError("path", "archive member %s: is a folder in one place, a file or a symlink in another"
                            % info.name)
    return member


def _tree_members(fileobj, strip: int, links_out: str, max_bytes: int, max_entries: int, skipped: list):
    """Yield (tar, _TreeMember) of a tar stream (any compression tarfile reads), checked
    and counted against the caps as the headers come. Closes `fileobj`."""
    import zlib  # the standard library's: what a damaged gzip stream raises

    kinds = {}
    total = entries = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                member = _check_member(info, strip, kinds, links_out, skipped)
                if member is None:
                    continue
                entries += 1
                total += info.size if member.kind == "file" else 0
                if entries > max_entries:
                    raise ToolError("too_large", "the archive holds more than %d entries" % max_entries)
                if total > max_bytes:
                    raise ToolError("too_large", "the archive's files hold more than %d bytes" % max_bytes)
                yield tar, member
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ToolError("bad_request", "not a readable tar archive: %s" % exc)
    except OSError as exc:
        if exc.errno is None:  # gzip.BadGzipFile and the like: the data, not the disk
            raise ToolError("bad_request", "not a readable tar archive: %s" % exc)
        raise
    finally:
        fileobj.close()


def _place(parent: int, name: str, label: str, make) -> None:
    """Put what `make(parent, tmp)` creates at `name` in `parent`, atomically: rename()
    replaces a file or a symlink there and follows nothing; a folder there is refused."""
    try:
        old = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise ToolError("is_directory", "%s: a folder is in the way" % label)
    _swap_in(parent, name, make, "extract")


def _swap_in(parent: int, name: str, make, what: str) -> None:
    """Have `make(parent, tmp)` create a temporary entry beside `name`, then rename it
    over `name`: readers see the old entry or the new one, and rename() replaces
    whatever is at the name (even a symlink swapped in meanwhile) and follows nothing.
    On any failure the temporary entry goes."""
    tmp = ".hpc-sandbox-%s-%s" % (what, os.urandom(6).hex())
    try:
        make(parent, tmp)
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise


def _write_member(tar, member: _TreeMember, parent: int, label: str) -> None:
    info = member.info
    if member.kind == "link":
        _place(parent, member.parts[-1], label, lambda fd, tmp: os.symlink(info.linkname, tmp, dir_fd=fd))
        return
    source = tar.extractfile(info)

    def make(fd_dir, tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=fd_dir)
        try:
            left = info.size
            while left > 0:
                block = source.read(min(left, _COPY_BLOCK))
                if not block:
                    raise ToolError("bad_request", "archive member %s: its data ends early" % info.name)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                left -= len(block)
            os.fchmod(fd, info.mode & TREE_MODE_BITS)
            os.utime(fd, (info.mtime, info.mtime))
        finally:
            os.close(fd)

    _place(parent, member.parts[-1], label, make)


def unpack_tree(open_archive, top_fd: int, strip: int = 0, links_out: str = "refuse",
                max_bytes: int = DEFAULT_TREE_BYTES, max_entries: int = DEFAULT_TREE_ENTRIES) -> dict:
    """Unpack the tar stream that `open_archive()` gives (called once per pass) into the
    folder `top_fd`, by the rules above; `strip` leading components of each name are
    the top's own. What was made, and the links left out."""
    skipped = []
    for _ in _tree_members(open_archive(), strip, links_out, max_bytes, max_entries, []):
        pass  # the first pass: a bad member refuses the archive before anything is written
    counts = {"dirs": 0, "files": 0, "links": 0, "bytes": 0}
    folders = []  # (parts, mode): modes are set last, deepest first, so that a read-only
    #               folder of the archive does not stop its own members from being written
    for tar, member in _tree_members(open_archive(), strip, links_out, max_bytes, max_entries, skipped):
        label = "/".join(member.parts)
        if member.kind == "dir":
            os.close(open_folder(top_fd, member.parts, label, create=True))
            folders.append((member.parts, member.info.mode & TREE_MODE_BITS))
            counts["dirs"] += 1
            continue
        parent = open_folder(top_fd, member.parts[:-1], label, create=True)
        try:
            _write_member(tar, member, parent, label)
        finally:
            os.close(parent)
        counts["files" if member.kind == "file" else "links"] += 1
        counts["bytes"] += member.info.size if member.kind == "file" else 0
    for parts, mode in sorted(folders, key=lambda item: -len(item[0])):
        fd = open_folder(top_fd, parts, "/".join(parts), create=True)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    counts["skipped"] = skipped
    return counts


async def _tool_extract(agent, request_id, args, timeout):
    return await agent._in_thread(_extract, agent, args)


def _extract(agent, args) -> dict:
    """Unpack the tar archive at `path` (a workspace file; gzip, bzip2, xz or none) into
    the folder `dest` (made if missing); `remove` deletes the archive, whether it
    unpacks or is refused. `max_bytes` and `max_entries` cap the files' data and the
    members."""
    path = args.get("path")
    parts = workspace_parts(path, agent.roots)
    dest = args.get("dest") or "."
    dest_parts = workspace_parts(dest, agent.roots)
    max_bytes = _bounded_int(args, "max_bytes", DEFAULT_TREE_BYTES, MAX_TREE_BYTES)
    max_entries = _bounded_int(args, "max_entries", DEFAULT_TREE_ENTRIES, MAX_TREE_ENTRIES)
    if not parts:
        raise ToolError("is_directory", "%s: is a directory (the workspace)" % path)
    parent = agent._open_dir(parts[:-1], path)
    try:
        fd = open_child_file(parent, parts[-1], path)
        if args.get("remove"):  # the descriptor still reads it
            os.unlink(parts[-1], dir_fd=parent)
    finally:
        os.close(parent)
    try:
        top_fd = agent._open_dir(dest_parts, dest, create=True)
        try:
            def open_archive():
                os.lseek(fd, 0, os.SEEK_SET)
                return os.fdopen(os.dup(fd), "rb")

            result = unpack_tree(open_archive, top_fd, 0, "refuse", max_bytes, max_entries)
        finally:
            os.close(top_fd)
    finally:
        os.close(fd)
    result["dest"] = "/".join(dest_parts) or "."
    return result


# --- tools and main -----------------------------------------------------------------

TOOLS = {
    "bash": Agent.tool_bash,
    "session": Agent.tool_session,
    "process": Agent.tool_process,
    "read_file": Agent.tool_read_file,
    "write_file": Agent.tool_write_file,
    "list_files": Agent.tool_list_files,
    "archive": Agent.tool_archive,
    "extract": _tool_extract,
    "cancel": Agent.tool_cancel,
    "ping": Agent.tool_ping,
    "reset": Agent.tool_reset,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="hpc-sandbox slot agent (speaks JSON lines on stdin/stdout)")
    parser.add_argument("--workspace", required=True, help="the slot's workspace directory")
    parser.add_argument("--output-cap", type=int, default=DEFAULT_OUTPUT_CAP, help="bytes kept per output stream")
    parser.add_argument("--own-pid-namespace", action="store_true",
                        help="the slot has pid and IPC namespaces of its own: every other process in it is the "
                             "slot's")
    parser.add_argument("--scratch", action="append", default=[], metavar="DIR",
                        help="a temporary folder private to the slot (made if missing), emptied at every reset")
    parser.add_argument("--max-tasks", type=int, default=None, metavar="N",
                        help="RLIMIT_NPROC for the slot: only where the slot has a user namespace of its own, "
                             "in which the kernel counts its tasks apart from the user's others")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.workspace):
        sys.stderr.write("hpc-sandbox agent: workspace %s is not a directory\n" % options.workspace)
        return 2
    for folder in options.scratch:
        os.makedirs(folder, 0o700, exist_ok=True)
    if options.max_tasks:
        import resource

        resource.setrlimit(resource.RLIMIT_NPROC, (options.max_tasks, options.max_tasks))
    agent = Agent(options.workspace, options.output_cap, options.own_pid_namespace, options.scratch)
    agent.subreaper = _become_subreaper()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def reap_now_and_then():  # adopted orphans (the agent is the slot's subreaper) that ended
        _reap_adopted()
        loop.call_later(REAP_SECONDS, reap_now_and_then)

    loop.call_later(REAP_SECONDS, reap_now_and_then)
    # A batch scheduler's cancel or walltime signal reaches every process of the job,
    # us included. The node server is the one to stop us (it closes our stdin), so
    # that a running call can still be answered with what happened. A handler, not
    # SIG_IGN: commands we start must still die of SIGTERM.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    # The ready line lets the server know the runtime started us (not just the container tool).
    agent.send(ready_message(os.getpid(), agent.tag))
    try:
        loop.run_until_complete(agent.serve())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
