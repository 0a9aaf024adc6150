#!/usr/bin/env python3
"""The slot agent: one long-lived process inside a slot's container.

It is bind-mounted as this single file into any image, so it uses the standard
library only, runs on any python3 >= 3.8, and imports nothing from hpc_sandbox.

Protocol (newline-framed JSON; json.dumps never emits a raw newline):
  in  (stdin):  {"id": "r1", "tool": "bash", "args": {"command": "ls"}, "timeout": 30}
  out (stdout): {"id": "r1", "ok": true, "result": {...}}
                {"id": "r1", "ok": false, "error": {"kind": "path", "message": "..."}}
Requests are served concurrently; answers come back in completion order, matched
by id. Stdout carries nothing but answers: diagnostics go to stderr.

Tools: bash, read_file, write_file, list_files, archive, cancel, ping.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import sys
import subprocess
import tarfile
import threading
import time

DEFAULT_OUTPUT_CAP = 1 << 20  # per stream, bytes
DEFAULT_READ_LIMIT = 8 << 20
DEFAULT_ARCHIVE_CAP = 64 << 20
KILL_GRACE_SECONDS = 1.0
# How long a reset keeps killing a slot's processes that keep reappearing (a fork bomb).
RESET_SECONDS = 2.0
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

SLOT_WORKSPACE = "/workspace"  # where a contained slot sees its workspace
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
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


def _open_child_dir(dir_fd: int, name: str, path: str, create: bool = False) -> int:
    """Open the folder `name` in `dir_fd` without following a symlink; mkdir it if asked."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
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
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(dir_fd, name, path, exc)


def _open_child_file(dir_fd: int, name: str, path: str) -> int:
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


def _walk(top_fd: int, top: str, recursive: bool, cut: list):
    """Yield (dir_fd, path, name, lstat) for everything under the folder `top_fd`.

    In os.walk's order (a folder's entries, then each subfolder's in turn), entering
    subfolders through descriptors with O_NOFOLLOW, so a symlink is reported, never
    followed. `top_fd` stays the caller's; every folder opened here is closed here.
    Appends to `cut` the folders not entered for being too deep.
    """
    frames = []  # (fd, path, subfolder names still to enter)
    fd, folder = top_fd, top
    try:
        while True:
            if fd is not None:
                subfolders = []
                for name, st in _scan(fd):
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
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                # Replaced by a symlink or a file, removed, or unreadable: listed, not entered.
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
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


class _Spawned:
    """A `bash -c` child read without asyncio's subprocess layer.

    asyncio's Process.wait() also waits for the child's pipes to close, so a
    command that leaves a background job holding stdout (`server &`) would look
    as if it never ended. Here the exit is watched on a pidfd (a thread on
    pythons/kernels without one) and the pipes are drained separately.
    """

    def __init__(self, loop, argv, cwd, env, out, err):
        self.loop = loop
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: a timeout kills all of it
        )
        self.exited = loop.create_future()
        self.streams_done = loop.create_future()
        self.open_streams = 0
        for pipe, sink in ((self.proc.stdout, out), (self.proc.stderr, err)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.open_streams += 1
            loop.add_reader(fd, self._on_readable, pipe, sink)
        self._watch_exit()

    @property
    def pid(self):
        return self.proc.pid

    def _watch_exit(self):
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.proc.pid)
            except OSError:
                self.pidfd = None
            if self.pidfd is not None:
                self.loop.add_reader(self.pidfd, self._on_exit)
                return
        threading.Thread(target=self._wait_in_thread, daemon=True).start()

    def _on_exit(self):
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self._set_exited(self.proc.wait())

    def _wait_in_thread(self):
        code = self.proc.wait()
        self.loop.call_soon_threadsafe(self._set_exited, code)

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
            self._close_stream(pipe)


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


CALL_ENV = "HPC_SANDBOX_CALL"


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


def _ancestors() -> frozenset:
    """This process and every process above it (in its pid namespace)."""
    found = set()
    pid = os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        try:
            with open("/proc/%d/stat" % pid, "rb") as handle:
                pid = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return frozenset(found)


def _kill_all_but(spared) -> int:
    """SIGKILL every process in /proc but `spared` (zombies are already dead)."""
    killed = 0
    for pid in _pids():
        if pid in spared:
            continue
        try:
            with open("/proc/%d/stat" % pid, "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (OSError, IndexError):
            pass
    return killed


# --- the agent ---------------------------------------------------------------------


class Agent:
    def __init__(self, workspace: str, output_cap: int, own_pid_namespace: bool = False) -> None:
        self.own_pid_namespace = own_pid_namespace
        self.ancestors = _ancestors() if own_pid_namespace else frozenset()
        self.workspace = os.path.realpath(workspace)
        self.roots = workspace_roots(workspace)
        # Every path a tool takes is walked from this descriptor (see "paths" above).
        self.root_fd = os.open(self.workspace, _DIR_FLAGS)
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

    # I/O ----------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")
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
        self.kill_all()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=KILL_GRACE_SECONDS + 1)

    def kill_all(self) -> int:
        """SIGKILL every process of this slot's commands; how many were signalled."""
        for pgid in {pgid for pgid, _ in self.running.values()} | self.lingering:
            _kill_group(pgid, signal.SIGKILL)
        # Counted by the scans only, which pass over zombies (a killed process that its
        # parent has not reaped yet is dead already; a group of them still "exists").
        killed = _kill_tagged(self.tag + ".", exact=False)
        if self.own_pid_namespace:
            # Everything this agent can see is the slot's, but itself and the processes
            # above it (the runtime's init): even a process that left its group and
            # cleared its environment.
            killed += _kill_all_but(self.ancestors)
        return killed

    async def tool_reset(self, request_id, args, timeout):
        """End every process of the slot's commands, so that the slot can change hands
        without a new agent (the node server then wipes the workspace). Repeated until
        nothing is left; a slot that keeps spawning past that is the server's to
        restart (kind reset_failed)."""
        deadline = time.monotonic() + RESET_SECONDS
        killed = 0
        while True:
            round_killed = self.kill_all()
            killed += round_killed
            if not round_killed:
                break
            if time.monotonic() > deadline:
                raise ToolError("reset_failed", "the slot's processes kept reappearing for %.0fs" % RESET_SECONDS)
            await asyncio.sleep(0.01)
        self.lingering.clear()
        return {"killed": killed}

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
            result = await handler(self, request_id, args, request.get("timeout"))
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
        command = args.get("command")
        if not isinstance(command, str):
            raise ToolError("bad_request", "bash needs a string 'command'")
        extra_env = args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise ToolError("bad_request", "env must be an object of strings")
        env = dict(self.base_env)
        env.update({str(k): str(v) for k, v in extra_env.items()})
        self.calls_started += 1
        call_tag = "%s.%d" % (self.tag, self.calls_started)
        env[CALL_ENV] = call_tag
        cap = _bounded_int(args, "output_cap", self.output_cap, MAX_OUTPUT_CAP)
        timeout = float(timeout) if timeout else None

        started = time.monotonic()
        out, err = CappedBuffer(cap), CappedBuffer(cap)
        loop = asyncio.get_event_loop()
        if args.get("cwd"):
            child = self._spawn_in(args["cwd"], loop, [self.bash, "-c", command], env, out, err)
        else:  # the hot path: no walk, no descriptor
            child = _Spawned(loop, [self.bash, "-c", command], self.workspace, env, out, err)
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
        }

    def _spawn_in(self, cwd, loop, argv, env, out, err):
        """Start `argv` in the workspace folder `cwd`, walked like any other path."""
        parts = workspace_parts(cwd, self.roots)
        if not parts:
            return _Spawned(loop, argv, self.workspace, env, out, err)
        dir_fd = self._open_dir(parts, cwd)
        try:
            if self.fd_paths:
                # The child chdirs (before it closes inherited descriptors and execs) to
                # /proc/self/fd/N: the folder we opened, whatever its path is by then.
                return _Spawned(loop, argv, "/proc/self/fd/%d" % dir_fd, env, out, err)
            # No /proc: the child inherits our cwd. Safe to move it for the spawn: nothing
            # in the agent uses a relative path, and spawns happen on this one thread.
            here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fchdir(dir_fd)
                return _Spawned(loop, argv, None, env, out, err)
            finally:
                os.fchdir(here)
                os.close(here)
        finally:
            os.close(dir_fd)

    def _open_dir(self, parts, path, create=False) -> int:
        """A descriptor of the workspace folder `parts`, walked from the workspace's own."""
        fd = os.dup(self.root_fd)
        try:
            for name in parts:
                next_fd = _open_child_dir(fd, name, path, create)
                os.close(fd)
                fd = next_fd
            return fd
        except BaseException:
            os.close(fd)
            raise

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
            fd = _open_child_file(parent, parts[-1], path)
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
            # Created 0666 less the umask, like any new file; then the asked or the old mode.
            tmp = ".hpc-sandbox-write-%s" % os.urandom(6).hex()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                         dir_fd=parent)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    if mode is not None:
                        os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                # Atomic: readers see the old file or the new one. rename() replaces
                # whatever is at the name (even a symlink swapped in since) and follows nothing.
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
                raise
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
        top_fd = self._open_dir(parts, path)
        entries = []
        truncated = False
        cut = []
        walk = _walk(top_fd, "/".join(parts), recursive, cut)
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
        path = args.get("path") or "."
        parts = workspace_parts(path, self.roots)
        cap = _bounded_int(args, "max_bytes", DEFAULT_ARCHIVE_CAP, MAX_ARCHIVE_CAP)
        top = parts[-1] if parts else "."
        file_fd = top_fd = None
        if parts:
            parent = self._open_dir(parts[:-1], path)
            try:
                if stat.S_ISDIR(_lstat_child(parent, top, path).st_mode):
                    top_fd = _open_child_dir(parent, top, path)
                else:
                    file_fd = _open_child_file(parent, top, path)
            finally:
                os.close(parent)
        else:
            top_fd = os.dup(self.root_fd)
        sink = _CappedBytesIO(cap)
        cut = []
        try:
            with tarfile.open(fileobj=sink, mode="w:gz") as tar:
                if file_fd is not None:
                    _tar_file(tar, file_fd, top)
                else:
                    tar.addfile(_tar_info(top, os.fstat(top_fd), tarfile.DIRTYPE))
                    walk = _walk(top_fd, top, True, cut)
                    try:
                        for dir_fd, member, name, st in walk:
                            _tar_entry(tar, dir_fd, member, name, st)
                    finally:
                        walk.close()
                    if cut:
                        raise ToolError("too_large", "%s: folders nested deeper than %d levels (%s)"
                                        % (path, MAX_WALK_DEPTH, cut[0]))
        except _TooLarge:
            raise ToolError("too_large", "archive of %s exceeds %d bytes" % (path, cap))
        finally:
            for fd in (file_fd, top_fd):
                if fd is not None:
                    os.close(fd)
        data = sink.getvalue()
        return {
            "content": base64.b64encode(data).decode("ascii"),
            "encoding": "base64",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    async def tool_cancel(self, request_id, args, timeout):
        running = self.running.get(args.get("target"))
        if running is not None:
            pgid, call_tag = running
            _kill_group(pgid, signal.SIGKILL)
            _kill_tagged(call_tag, exact=True)
        return {"cancelled": running is not None}

    async def tool_ping(self, request_id, args, timeout):
        return {"pid": os.getpid(), "workspace": self.workspace, "python": sys.version.split()[0]}


class _TooLarge(Exception):
    pass


def _tar_info(name: str, st, kind) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def _tar_entry(tar, dir_fd: int, member: str, name: str, st) -> None:
    """Add one entry met by _walk: folders, files and symlinks (as links); nothing else."""
    if stat.S_ISDIR(st.st_mode):
        tar.addfile(_tar_info(member, st, tarfile.DIRTYPE))
    elif stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:  # gone or replaced meanwhile
            return
        info = _tar_info(member, st, tarfile.SYMTYPE)
        info.linkname = target
        tar.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = _open_child_file(dir_fd, name, member)
        except ToolError as exc:
            if exc.kind in ("not_found", "path", "not_a_file", "is_directory"):  # changed meanwhile
                return
            raise
        try:
            _tar_file(tar, fd, member)
        finally:
            os.close(fd)
    # FIFOs, sockets and devices are left out: never opened, never recreated by an unpacker.


def _tar_file(tar, fd: int, member: str) -> None:
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


TOOLS = {
    "bash": Agent.tool_bash,
    "read_file": Agent.tool_read_file,
    "write_file": Agent.tool_write_file,
    "list_files": Agent.tool_list_files,
    "archive": Agent.tool_archive,
    "cancel": Agent.tool_cancel,
    "ping": Agent.tool_ping,
    "reset": Agent.tool_reset,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="hpc-sandbox slot agent (speaks JSON lines on stdin/stdout)")
    parser.add_argument("--workspace", required=True, help="the slot's workspace directory")
    parser.add_argument("--output-cap", type=int, default=DEFAULT_OUTPUT_CAP, help="bytes kept per output stream")
    parser.add_argument("--own-pid-namespace", action="store_true",
                        help="the slot has a pid namespace of its own: every other process in it is the slot's")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.workspace):
        sys.stderr.write("hpc-sandbox agent: workspace %s is not a directory\n" % options.workspace)
        return 2
    agent = Agent(options.workspace, options.output_cap, options.own_pid_namespace)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # A batch scheduler's cancel or walltime signal reaches every process of the job,
    # us included. The node server is the one to stop us (it closes our stdin), so
    # that a running call can still be answered with what happened. A handler, not
    # SIG_IGN: commands we start must still die of SIGTERM.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    # The ready line lets the server know the runtime started us (not just the container tool).
    agent.send({"id": None, "ok": True, "result": {"ready": True, "pid": os.getpid(), "tag": agent.tag}})
    try:
        loop.run_until_complete(agent.serve())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
